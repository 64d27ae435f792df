//! `--pull-secret FILE`: the credentials of Kubernetes image pull secrets,
//! as k8schain reads them from a cluster, from a file instead: a Secret of
//! type `kubernetes.io/dockerconfigjson` (or the legacy
//! `kubernetes.io/dockercfg`), or a `List` of them, in JSON or YAML (one
//! document or several), with its payload base64 under `data` or plain under
//! `stringData`.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use ggfs::auth::PullSecret;
use serde::Deserialize as _;
use serde_json::Value;

/// Every pull secret in `file`; an error when it holds none.
pub fn read(file: &Path) -> Result<Vec<PullSecret>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading pull secret {}", file.display()))?;
    let what = || format!("pull secret {}", file.display());
    let mut docs = Vec::new();
    if text.trim_start().starts_with('{') {
        docs.push(
            serde_json::from_str::<Value>(&text)
                .with_context(|| format!("{}: not JSON", what()))?,
        );
    } else {
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).with_context(|| format!("{}: not YAML", what()))?;
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
        bail!("{}: holds no Secret", what());
    }
    Ok(secrets)
}

/// One Secret's credentials.
fn secret(file: &Path, v: &Value) -> Result<PullSecret> {
    let name = v["metadata"]["name"].as_str().unwrap_or("(unnamed)");
    let origin = format!("{} (Secret {name})", file.display());
    if v["kind"].as_str() != Some("Secret") {
        bail!(
            "pull secret {}: a {}, not a Secret",
            file.display(),
            v["kind"].as_str().unwrap_or("document without kind")
        );
    }
    let (key, legacy) = match v["type"].as_str() {
        Some("kubernetes.io/dockerconfigjson") => (".dockerconfigjson", false),
        Some("kubernetes.io/dockercfg") => (".dockercfg", true),
        other => bail!(
            "pull secret {origin}: type {}, not kubernetes.io/dockerconfigjson",
            other.unwrap_or("missing")
        ),
    };
    let payload = if let Some(b64) = v["data"][key].as_str() {
        let b64: String = b64.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .with_context(|| format!("pull secret {origin}: data.{key} is not base64"))?
    } else if let Some(plain) = v["stringData"][key].as_str() {
        plain.as_bytes().to_vec()
    } else {
        bail!("pull secret {origin}: no data.{key}");
    };
    Ok(PullSecret::parse(&origin, &payload, legacy)?)
}
