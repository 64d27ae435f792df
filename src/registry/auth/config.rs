//! docker's config.json (and podman's auth.json, the same shape): the
//! `auths` entries, `credHelpers` and `credsStore`, and the keys registries
//! go by in it.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

use super::helper::helper_get;
use super::Credential;
use crate::error::{Error, Result};
use crate::reference::DOCKER_HUB;

/// The key docker uses for Docker Hub in config.json and with helpers.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

#[derive(Deserialize, Default, Clone)]
pub(super) struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub(super) struct ConfigFile {
    #[serde(default)]
    pub(super) auths: BTreeMap<String, AuthEntry>,
    pub(super) creds_store: Option<String>,
    #[serde(default)]
    pub(super) cred_helpers: BTreeMap<String, String>,
}

/// The registry a config.json key names: scheme and path dropped, Docker
/// Hub aliases folded into `index.docker.io`.
pub fn key_registry(key: &str) -> String {
    let k = strip_scheme(key).unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    crate::reference::normalize_registry(host)
}

/// Does a config key name a whole registry (`host`, `https://host/v1/`),
/// as opposed to podman's `host/namespace`? Keys with a scheme are docker's
/// URL form, whatever their path.
pub fn is_registry_key(key: &str) -> bool {
    strip_scheme(key).is_some() || !key.trim_end_matches('/').contains('/')
}

fn strip_scheme(key: &str) -> Option<&str> {
    key.strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
}

/// Does config key `key` stand for the whole of (normalised) `registry`?
pub(super) fn names_registry(key: &str, registry: &str) -> bool {
    is_registry_key(key) && key_registry(key) == registry
}

/// The key docker writes for a registry (Docker Hub's is special).
pub fn registry_key(registry: &str) -> String {
    if crate::reference::normalize_registry(registry) == DOCKER_HUB {
        DOCKER_HUB_KEY.to_string()
    } else {
        registry.to_string()
    }
}

impl ConfigFile {
    pub(super) fn load(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path.display().to_string(), e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::invalid(
                format!("credentials file {}", path.display()),
                e.to_string(),
            )
        })
    }

    pub(super) fn credential(
        &self,
        path: &Path,
        registry: &str,
        repo: Option<&str>,
    ) -> Result<Option<Credential>> {
        let registry = crate::reference::normalize_registry(registry);
        if let Some(helper) = self.helper_for(&registry) {
            return helper_get(helper, &registry);
        }
        if let Some(entry) = self.entry_for(&registry, repo) {
            if let Some(c) = entry_credential(path, &registry, entry)? {
                return Ok(Some(c));
            }
        }
        match &self.creds_store {
            Some(store) if !store.is_empty() => helper_get(store, &registry),
            _ => Ok(None),
        }
    }

    fn helper_for(&self, registry: &str) -> Option<&str> {
        self.cred_helpers
            .iter()
            .find(|(k, v)| !v.is_empty() && key_registry(k) == registry)
            .map(|(_, v)| v.as_str())
    }

    /// The most specific matching `auths` key: `registry/repo/path` prefixes
    /// (podman) before the bare registry.
    fn entry_for(&self, registry: &str, repo: Option<&str>) -> Option<&AuthEntry> {
        if let Some(repo) = repo {
            let mut path = format!("{registry}/{repo}");
            loop {
                if let Some(e) = self.auths.get(&path) {
                    return Some(e);
                }
                match path.rfind('/') {
                    Some(i) if i > registry.len() => path.truncate(i),
                    _ => break,
                }
            }
        }
        if let Some(e) = self.auths.get(registry) {
            return Some(e);
        }
        self.auths
            .iter()
            .find(|(k, _)| names_registry(k, registry))
            .map(|(_, e)| e)
    }
}

fn entry_credential(path: &Path, registry: &str, e: &AuthEntry) -> Result<Option<Credential>> {
    if let Some(token) = e.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        let username = match e.auth.as_deref().map(decode_auth).transpose() {
            Ok(up) => up.map(|(u, _)| u).or_else(|| e.username.clone()),
            Err(_) => e.username.clone(),
        };
        return Ok(Some(Credential::IdentityToken {
            username,
            token: token.clone(),
        }));
    }
    if let Some(auth) = e.auth.as_ref().filter(|a| !a.is_empty()) {
        let (username, password) = decode_auth(auth).map_err(|reason| {
            Error::invalid(
                format!("credentials for {registry} in {}", path.display()),
                reason,
            )
        })?;
        return Ok(Some(Credential::Basic { username, password }));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credential::Basic {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// Decode config.json's `auth`: base64 of `user:password`, padding optional.
fn decode_auth(auth: &str) -> std::result::Result<(String, String), String> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let raw = engine
        .decode(auth.trim())
        .map_err(|e| format!("`auth` is not base64: {e}"))?;
    let s = String::from_utf8(raw).map_err(|_| "`auth` is not UTF-8".to_string())?;
    let (u, p) = s
        .split_once(':')
        .ok_or_else(|| "`auth` must decode to user:password".to_string())?;
    Ok((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_forms() {
        assert_eq!(key_registry(DOCKER_HUB_KEY), "index.docker.io");
        assert_eq!(
            key_registry("https://registry-1.docker.io"),
            "index.docker.io"
        );
        assert_eq!(key_registry("http://localhost:5000/v2/"), "localhost:5000");
        assert_eq!(registry_key("docker.io"), DOCKER_HUB_KEY);
        assert_eq!(registry_key("ghcr.io"), "ghcr.io");
    }
}
