//! OCI artifacts that refer to an image (their `subject`): signatures,
//! SBOMs, attached files. `ggfs attach` and the mount's `referrers/` make
//! them the same way: an empty config, the files as layers, and the subject's
//! descriptor. Registries without the referrers API are kept current through
//! the `sha256-<hex>` tag by the registry client.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::{media, RawManifest};
use crate::image::{bytes_stream, Sink};

/// The OCI empty JSON blob (`{}`), the config of every artifact made here.
pub const EMPTY: &[u8] = b"{}";

/// The descriptor of [`EMPTY`].
pub fn empty_descriptor() -> Value {
    json!({"mediaType": media::OCI_EMPTY, "digest": Digest::of(EMPTY), "size": EMPTY.len()})
}

/// A layer descriptor for an attached file, titled as oras does.
pub fn file_layer(media_type: &str, digest: &Digest, size: u64, title: Option<&str>) -> Value {
    let mut layer = json!({"mediaType": media_type, "digest": digest, "size": size});
    if let Some(t) = title {
        layer["annotations"] = json!({"org.opencontainers.image.title": t});
    }
    layer
}

/// The artifact manifest: `layers` (none: the empty blob) referring to
/// `subject`, with `annotations` and a creation time.
pub fn manifest(
    subject: &RawManifest,
    artifact_type: &str,
    mut layers: Vec<Value>,
    mut annotations: BTreeMap<String, String>,
) -> Result<RawManifest> {
    if layers.is_empty() {
        layers.push(empty_descriptor());
    }
    annotations
        .entry("org.opencontainers.image.created".to_string())
        .or_insert_with(|| chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty_descriptor(),
        "layers": layers,
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.bytes.len()},
        "annotations": annotations,
    });
    let bytes =
        serde_json::to_vec(&manifest).map_err(|e| Error::invalid("artifact", e.to_string()))?;
    RawManifest::new(Bytes::from(bytes), None)
}

/// Store a small blob unless the sink has it.
pub async fn put_if_missing(sink: &dyn Sink, digest: &Digest, bytes: Bytes) -> Result<()> {
    if !sink.has_blob(digest).await? {
        let size = bytes.len() as u64;
        sink.put_blob(digest, size, bytes_stream(bytes)).await?;
    }
    Ok(())
}
