//! Registry authentication: `WWW-Authenticate` challenges, the docker/podman
//! keychain (config.json `auths`, `credHelpers`, `credsStore`, podman's
//! auth.json), the token endpoint (GET with Basic, or OAuth2 POST), and the
//! `login`/`logout`/`get` helpers behind the CLI.
//!
//! Secrets never reach logs: [`Credential`] and [`Token`] redact themselves
//! in `Debug`.
//!
//! One file per concern, all of it used from here: `challenge.rs`
//! ([`parse_challenges`]), `keychain.rs` ([`Keychain`], [`Credential`]),
//! `config.rs` (docker's config.json and its keys), `helper.rs` (credential
//! helpers), `token.rs` ([`fetch_token`], and the client's token cache) and
//! `login.rs` ([`login`], [`logout`], [`get`]). `pull_secret` (feature
//! `pull-secret`) reads Kubernetes image pull secrets into [`PullSecret`]s.

mod challenge;
mod config;
mod helper;
mod keychain;
mod login;
#[cfg(feature = "pull-secret")]
pub mod pull_secret;
mod token;

pub use challenge::{parse_challenges, pick_challenge, Challenge};
pub use config::{is_registry_key, key_registry, registry_key, DOCKER_HUB_KEY};
pub use keychain::{docker_config_dir, docker_config_path, Credential, Keychain, PullSecret};
pub use login::{get, login, login_with, logout, store, HelperCredentials};
pub(crate) use token::TokenCache;
pub use token::{fetch_token, Token};
