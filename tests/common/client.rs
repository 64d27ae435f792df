//! Registry-client test helpers shared by tests/registry.rs and tests/auth.rs:
//! a repository handle, in-memory blob streams and a minimal image manifest.

use bytes::Bytes;
use ggfs::error::Error;
use ggfs::image::manifest::{media, RawManifest};
use ggfs::image::{ByteStream, Sink};
use ggfs::registry::{Client, RegistryRepo};
use ggfs::{Digest, Repository};

/// A config blob small enough to push anywhere.
pub const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

pub fn repo(c: &Client, registry: &str, name: &str) -> RegistryRepo {
    c.repo(&Repository::new(registry, name).unwrap())
}

/// `b` as a one-chunk blob stream.
pub fn stream_of(b: &'static [u8]) -> ByteStream {
    ggfs::image::bytes_stream(Bytes::from_static(b))
}

/// Pushes `bytes` as a blob; returns its digest.
pub async fn put(r: &RegistryRepo, bytes: &'static [u8]) -> Result<Digest, Error> {
    let d = Digest::of(bytes);
    r.put_blob(&d, bytes.len() as u64, stream_of(bytes)).await?;
    Ok(d)
}

/// An OCI image manifest over `config` and `layers` (digest, size).
pub fn image_manifest(config: &Digest, config_len: usize, layers: &[(Digest, u64)]) -> RawManifest {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, s)| serde_json::json!({"mediaType": media::OCI_LAYER, "digest": d, "size": s}))
        .collect();
    RawManifest::from_json(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": config, "size": config_len},
        "layers": layers,
    }))
    .unwrap()
}
