//! Credentials and the keychain they are looked up in: docker's
//! config.json, podman's auth.json, and Kubernetes pull secrets, in that
//! order of search (secrets first).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use super::config::{AuthEntry, ConfigFile};
use crate::error::{Error, Result};

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password: Basic auth, or exchanged for a token.
    Basic {
        /// The account name.
        username: String,
        /// Its password (or a personal access token).
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in config.json, or a helper
    /// answering user `<token>`).
    IdentityToken {
        /// The account name, when the config or helper gave one.
        username: Option<String>,
        /// The refresh token.
        token: String,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            Credential::IdentityToken { username, .. } => {
                write!(
                    f,
                    "IdentityToken {{ username: {username:?}, token: <redacted> }}"
                )
            }
        }
    }
}

impl Credential {
    /// The `Authorization` value for Basic auth, if this is a password.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credential::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Credential::IdentityToken { .. } => None,
        }
    }
}

/// Where credentials are looked up. `from_env` follows docker and podman.
#[derive(Clone, Debug, Default)]
pub struct Keychain {
    /// docker config.json files, first match wins.
    pub docker_configs: Vec<PathBuf>,
    /// podman/containers auth.json files, consulted after docker's.
    pub auth_files: Vec<PathBuf>,
    /// Kubernetes pull secrets, consulted before the files, first match wins.
    pub pull_secrets: Vec<PullSecret>,
}

/// The credentials of a Kubernetes image pull secret: the `auths` of its
/// `.dockerconfigjson` (or the map of a legacy `.dockercfg`), looked up as
/// config.json's are. Credential helpers are never run on a secret's say.
#[derive(Clone)]
pub struct PullSecret {
    origin: String,
    config: ConfigFile,
}

impl std::fmt::Debug for PullSecret {
    /// The origin and registries, never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullSecret")
            .field("origin", &self.origin)
            .field("registries", &self.config.auths.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PullSecret {
    /// A `.dockerconfigjson` document (`{"auths": {REGISTRY: {...}}}`), or
    /// with `legacy` a `.dockercfg` one (`{REGISTRY: {...}}`); `origin`
    /// names it in errors.
    pub fn parse(origin: &str, json: &[u8], legacy: bool) -> Result<Self> {
        let bad =
            |e: serde_json::Error| Error::invalid(format!("pull secret {origin}"), e.to_string());
        let auths = if legacy {
            serde_json::from_slice(json).map_err(bad)?
        } else {
            #[derive(Deserialize)]
            struct Doc {
                auths: BTreeMap<String, AuthEntry>,
            }
            serde_json::from_slice::<Doc>(json).map_err(bad)?.auths
        };
        Ok(PullSecret {
            origin: origin.to_string(),
            config: ConfigFile {
                auths,
                ..ConfigFile::default()
            },
        })
    }

    /// The registries (config keys) it holds credentials for.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.config.auths.keys().map(String::as_str)
    }
}

/// The directory holding docker's config.json: $DOCKER_CONFIG or ~/.docker.
pub fn docker_config_dir() -> Option<PathBuf> {
    std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")))
}

/// docker's config.json path.
pub fn docker_config_path() -> Option<PathBuf> {
    docker_config_dir().map(|d| d.join("config.json"))
}

impl Keychain {
    /// docker's config.json, then podman's auth.json: $REGISTRY_AUTH_FILE,
    /// or $XDG_RUNTIME_DIR/containers/auth.json and
    /// ~/.config/containers/auth.json.
    pub fn from_env() -> Self {
        let docker_configs = docker_config_path().into_iter().collect();
        let mut auth_files = Vec::new();
        if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
            auth_files.push(PathBuf::from(f));
        } else {
            if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
                auth_files.push(Path::new(&d).join("containers/auth.json"));
            }
            if let Some(h) = std::env::var_os("HOME") {
                auth_files.push(Path::new(&h).join(".config/containers/auth.json"));
            }
        }
        Keychain {
            docker_configs,
            auth_files,
            pull_secrets: Vec::new(),
        }
    }

    /// A keychain reading one docker config directory (tests, `--config`).
    pub fn docker_dir(dir: impl AsRef<Path>) -> Self {
        Keychain {
            docker_configs: vec![dir.as_ref().join("config.json")],
            ..Keychain::default()
        }
    }

    /// An empty keychain: every registry is anonymous.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// Credentials for `registry` (host\[:port\]); `repo` lets podman's
    /// namespaced keys (`quay.io/org`) match. `None` means anonymous.
    pub fn resolve(&self, registry: &str, repo: Option<&str>) -> Result<Option<Credential>> {
        for secret in &self.pull_secrets {
            let origin = Path::new(&secret.origin);
            if let Some(c) = secret.config.credential(origin, registry, repo)? {
                return Ok(Some(c));
            }
        }
        // docker's config.json knows no namespaced keys: only podman's files get `repo`.
        let docker = self.docker_configs.iter().map(|p| (p, None));
        let podman = self.auth_files.iter().map(|p| (p, repo));
        for (path, repo) in docker.chain(podman) {
            let Some(cfg) = ConfigFile::load(path)? else {
                continue;
            };
            if let Some(c) = cfg.credential(path, registry, repo)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, v: serde_json::Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn keychain_auths() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "config.json",
            serde_json::json!({"auths": {
                "https://index.docker.io/v1/": {"auth": b64("hub:pw")},
                "http://localhost:5000": {"auth": b64("me:p:with:colons").trim_end_matches('=')},
                "reg.io": {"username": "u", "password": "p"},
                "tok.io": {"auth": b64("tu:"), "identitytoken": "refresh"},
                "bad.io": {"auth": "!!!"},
            }}),
        );
        let k = Keychain::docker_dir(dir.path());
        let basic = |u: &str, p: &str| {
            Some(Credential::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(k.resolve("docker.io", None).unwrap(), basic("hub", "pw"));
        assert_eq!(
            k.resolve("index.docker.io", None).unwrap(),
            basic("hub", "pw")
        );
        assert_eq!(
            k.resolve("localhost:5000", None).unwrap(),
            basic("me", "p:with:colons")
        );
        assert_eq!(k.resolve("reg.io", None).unwrap(), basic("u", "p"));
        assert_eq!(
            k.resolve("tok.io", None).unwrap(),
            Some(Credential::IdentityToken {
                username: Some("tu".into()),
                token: "refresh".into()
            })
        );
        assert_eq!(k.resolve("other.io", None).unwrap(), None);
        let err = k.resolve("bad.io", None).unwrap_err().to_string();
        assert!(err.contains("bad.io") && err.contains("base64"), "{err}");
        // Secrets stay out of Debug output.
        assert!(!format!("{:?}", basic("hub", "pw")).contains("pw"));
        // A missing file is anonymous, a broken one an error naming it.
        assert_eq!(
            Keychain::docker_dir(dir.path().join("nope"))
                .resolve("reg.io", None)
                .unwrap(),
            None
        );
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        assert!(k
            .resolve("reg.io", None)
            .unwrap_err()
            .to_string()
            .contains("config.json"));
    }

    #[test]
    fn podman_namespaced_keys_and_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let auth = write(
            dir.path(),
            "auth.json",
            serde_json::json!({"auths": {
                "quay.io": {"auth": b64("top:1")},
                "quay.io/org": {"auth": b64("org:2")},
            }}),
        );
        let k = Keychain {
            auth_files: vec![auth],
            ..Keychain::default()
        };
        let user = |r: &str, repo: Option<&str>| match k.resolve(r, repo).unwrap() {
            Some(Credential::Basic { username, .. }) => username,
            other => panic!("{other:?}"),
        };
        assert_eq!(user("quay.io", Some("org/app")), "org");
        assert_eq!(user("quay.io", Some("other/app")), "top");
        assert_eq!(user("quay.io", None), "top");

        // A helper that is not installed is a clear error naming it.
        let cfg = write(
            dir.path(),
            "config.json",
            serde_json::json!({"credHelpers": {"h.io": "ggfs-test-missing"}}),
        );
        let k = Keychain {
            docker_configs: vec![cfg],
            ..Keychain::default()
        };
        let err = k.resolve("h.io", None).unwrap_err().to_string();
        assert!(err.contains("docker-credential-ggfs-test-missing"), "{err}");
    }
}
