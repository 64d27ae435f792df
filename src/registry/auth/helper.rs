//! docker credential helpers (`docker-credential-<name>`): asked for a
//! registry's credentials, told to store or erase them.

use std::io::Write;
use std::process::{Command, Stdio};

use super::config::registry_key;
use super::Credential;
use crate::error::{Error, Result};

/// The server address a helper is asked about.
fn helper_server(registry: &str) -> String {
    registry_key(registry)
}

/// `docker-credential-<helper> get`. "credentials not found" is anonymous.
pub(super) fn helper_get(helper: &str, registry: &str) -> Result<Option<Credential>> {
    let server = helper_server(registry);
    let cfg = serde_json::json!({ "credHelpers": { server.clone(): helper } });
    let reader = std::io::Cursor::new(cfg.to_string());
    use docker_credential::{CredentialRetrievalError as E, DockerCredential as D};
    match docker_credential::get_credential_from_reader(reader, &server) {
        Ok(D::UsernamePassword(username, password)) => {
            Ok(Some(Credential::Basic { username, password }))
        }
        Ok(D::IdentityToken(token)) => Ok(Some(Credential::IdentityToken {
            username: None,
            token,
        })),
        Err(E::HelperFailure { stdout, stderr, .. })
            if (stdout.clone() + &stderr)
                .to_lowercase()
                .contains("credentials not found") =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::auth(
            registry,
            format!(
                "credential helper docker-credential-{helper}: {}",
                first_line(&e.to_string())
            ),
        )),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Run `docker-credential-<helper> <verb>` with `input` on stdin.
pub(super) fn helper_run(helper: &str, verb: &str, input: &str) -> Result<String> {
    let name = format!("docker-credential-{helper}");
    let ctx = || format!("credential helper {name} {verb}");
    let mut child = Command::new(&name)
        .arg(verb)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(ctx(), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| Error::io(ctx(), e))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::io(ctx(), e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        return Err(Error::invalid(ctx(), msg.trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
