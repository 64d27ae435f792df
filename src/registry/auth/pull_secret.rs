//! Kubernetes image pull secrets (`--pull-secret FILE` of the CLI and the
//! mount): their credentials, as k8schain reads them from a cluster, from
//! a file instead: a Secret of
//! type `kubernetes.io/dockerconfigjson` (or the legacy
//! `kubernetes.io/dockercfg`), or a `List` of them, in JSON or YAML (one
//! document or several), with its payload base64 under `data` or plain under
//! `stringData`.

use std::path::Path;

use base64::Engine as _;
use serde::Deserialize as _;
use serde_json::Value;

use crate::registry::auth::PullSecret;
use crate::{Error, Result};

fn bad(file: &Path, why: impl Into<String>) -> Error {
    Error::invalid(format!("pull secret {}", file.display()), why)
}

/// Every pull secret in `file`; an error when it holds none.
pub fn read(file: &Path) -> Result<Vec<PullSecret>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::io(format!("reading pull secret {}", file.display()), e))?;
    let mut docs = Vec::new();
    if text.trim_start().starts_with('{') {
        docs.push(
            serde_json::from_str::<Value>(&text)
                .map_err(|e| bad(file, format!("not JSON: {e}")))?,
        );
    } else {
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).map_err(|e| bad(file, format!("not YAML: {e}")))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let mut secrets = Vec::new();
    for doc in docs {
        match doc["kind"].as_str() {
            Some("List") => {
                for item in doc["items"].as_array().into_iter().flatten() {
                    secrets.push(secret(file, item)?);
                }
            }
            _ => secrets.push(secret(file, &doc)?),
        }
    }
    if secrets.is_empty() {
        return Err(bad(file, "holds no Secret"));
    }
    Ok(secrets)
}

/// One Secret's credentials.
fn secret(file: &Path, v: &Value) -> Result<PullSecret> {
    let name = v["metadata"]["name"].as_str().unwrap_or("(unnamed)");
    let origin = format!("{} (Secret {name})", file.display());
    if v["kind"].as_str() != Some("Secret") {
        let kind = v["kind"].as_str().unwrap_or("document without kind");
        return Err(bad(file, format!("a {kind}, not a Secret")));
    }
    let (key, legacy) = match v["type"].as_str() {
        Some("kubernetes.io/dockerconfigjson") => (".dockerconfigjson", false),
        Some("kubernetes.io/dockercfg") => (".dockercfg", true),
        other => {
            let t = other.unwrap_or("missing");
            return Err(Error::invalid(
                format!("pull secret {origin}"),
                format!("type {t}, not kubernetes.io/dockerconfigjson"),
            ));
        }
    };
    let payload = if let Some(b64) = v["data"][key].as_str() {
        let b64: String = b64.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| {
                Error::invalid(
                    format!("pull secret {origin}"),
                    format!("data.{key} is not base64"),
                )
            })?
    } else if let Some(plain) = v["stringData"][key].as_str() {
        plain.as_bytes().to_vec()
    } else {
        return Err(Error::invalid(
            format!("pull secret {origin}"),
            format!("no data.{key}"),
        ));
    };
    PullSecret::parse(&origin, &payload, legacy)
}
