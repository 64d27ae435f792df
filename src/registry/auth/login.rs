//! `ggfs auth login`, `logout` and `get`: credentials checked against a
//! registry and stored in docker's config.json (or the credential helper it
//! names), forgotten, or printed in credential-helper form.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;

use super::config::{key_registry, names_registry, registry_key};
use super::helper::helper_run;
use super::{docker_config_path, Credential, Keychain};
use crate::error::{Error, Result};

/// Check `user`/`pass` against `registry`, then store them: in the
/// credential helper config.json names for it, else in config.json `auths`.
/// Returns where they went.
pub async fn login(registry: &str, user: &str, pass: &str) -> Result<String> {
    let client = crate::registry::Client::new(crate::registry::ClientOptions::default())?;
    login_with(&client, registry, user, pass).await
}

/// [`login`] with a configured client (insecure registries and so on).
pub async fn login_with(
    client: &crate::registry::Client,
    registry: &str,
    user: &str,
    pass: &str,
) -> Result<String> {
    let registry = crate::reference::normalize_registry(registry);
    let cred = Credential::Basic {
        username: user.to_string(),
        password: pass.to_string(),
    };
    client.check_credential(&registry, &cred).await?;
    store(&registry, user, pass)
}

/// Store credentials without checking them.
pub fn store(registry: &str, user: &str, pass: &str) -> Result<String> {
    let path = config_path_for_write()?;
    let mut cfg = load_json(&path)?;
    let key = registry_key(registry);
    if let Some(helper) = helper_name(&cfg, registry) {
        let input = serde_json::json!({"ServerURL": key, "Username": user, "Secret": pass});
        helper_run(&helper, "store", &input.to_string())?;
        return Ok(format!("docker-credential-{helper}"));
    }
    let obj = as_object(&mut cfg, &path)?;
    let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
    let auths = auths
        .as_object_mut()
        .ok_or_else(|| Error::invalid(path.display().to_string(), "`auths` is not an object"))?;
    // Drop other spellings of the same registry so the new entry wins.
    let norm = crate::reference::normalize_registry(registry);
    auths.retain(|k, _| !names_registry(k, &norm));
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    auths.insert(key, serde_json::json!({ "auth": encoded }));
    save_json(&path, &cfg)?;
    Ok(path.display().to_string())
}

/// Forget the credentials stored for `registry`. `Ok(false)` when none were.
pub fn logout(registry: &str) -> Result<bool> {
    let path = config_path_for_write()?;
    let mut cfg = load_json(&path)?;
    let erased = match helper_name(&cfg, registry) {
        Some(helper) => {
            helper_run(&helper, "erase", &registry_key(registry))?;
            true
        }
        None => false,
    };
    let norm = crate::reference::normalize_registry(registry);
    let obj = as_object(&mut cfg, &path)?;
    let Some(auths) = obj.get_mut("auths").and_then(|a| a.as_object_mut()) else {
        return Ok(erased);
    };
    let before = auths.len();
    auths.retain(|k, _| !names_registry(k, &norm));
    let removed = auths.len() != before;
    if removed {
        save_json(&path, &cfg)?;
    }
    Ok(removed || erased)
}

/// What a docker credential helper's `get` prints.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HelperCredentials {
    /// The registry the credential is for.
    #[serde(rename = "ServerURL")]
    pub server_url: String,
    /// Account name (`<token>` for an identity token).
    pub username: String,
    /// Password or identity token.
    pub secret: String,
}

/// The stored credentials for `registry`, in credential-helper form
/// (`{"ServerURL":..,"Username":..,"Secret":..}`); identity tokens have
/// username `<token>`. Anonymous registries answer the helpers' error.
pub fn get(registry: &str) -> Result<HelperCredentials> {
    let server_url = registry_key(registry);
    let cred = Keychain::from_env().resolve(registry, None)?;
    match cred {
        Some(Credential::Basic { username, password }) => Ok(HelperCredentials {
            server_url,
            username,
            secret: password,
        }),
        Some(Credential::IdentityToken { token, .. }) => Ok(HelperCredentials {
            server_url,
            username: "<token>".into(),
            secret: token,
        }),
        None => Err(Error::NotFound(format!("credentials for {registry}"))),
    }
}

fn config_path_for_write() -> Result<PathBuf> {
    docker_config_path()
        .ok_or_else(|| Error::invalid("docker config", "neither $DOCKER_CONFIG nor $HOME is set"))
}

fn helper_name(cfg: &serde_json::Value, registry: &str) -> Option<String> {
    let norm = crate::reference::normalize_registry(registry);
    let from_helpers = cfg
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| {
            h.iter()
                .find(|(k, _)| key_registry(k) == norm)
                .and_then(|(_, v)| v.as_str().map(str::to_string))
        });
    from_helpers
        .or_else(|| {
            cfg.get("credsStore")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|s| !s.is_empty())
}

fn load_json(path: &Path) -> Result<serde_json::Value> {
    match std::fs::read(path) {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Ok(serde_json::json!({})),
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::invalid(path.display().to_string(), e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::json!({})),
        Err(e) => Err(Error::io(path.display().to_string(), e)),
    }
}

fn as_object<'a>(
    v: &'a mut serde_json::Value,
    path: &Path,
) -> Result<&'a mut serde_json::Map<String, serde_json::Value>> {
    v.as_object_mut()
        .ok_or_else(|| Error::invalid(path.display().to_string(), "not a JSON object"))
}

/// Write atomically with owner-only permissions: it holds secrets.
fn save_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let ctx = || path.display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(ctx(), e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".config.json-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(ctx(), e))?;
    let text = serde_json::to_vec_pretty(v).map_err(|e| Error::invalid(ctx(), e.to_string()))?;
    tmp.write_all(&text).map_err(|e| Error::io(ctx(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(ctx(), e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(ctx(), e.error))?;
    Ok(())
}
