//! Functional image mutations, after go-containerregistry's `mutate`: each
//! returns a new [`Image`] whose new blobs (layers, config, manifest) are
//! served from local temporary files or memory by an [`Overlay`] source and
//! everything else from the base image's source.
//!
//! Configs and manifests are edited as JSON values so fields this crate does
//! not model survive the round trip.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::{media, Platform, RawManifest};
use crate::image::{bytes_stream, file_stream, read_file_range, ByteStream, Image, Source};

use crate::image::newlayer::LocalLayer;

/// A blob held by an [`Overlay`].
#[derive(Clone)]
enum Blob {
    Memory(Bytes),
    File(Arc<tempfile::TempPath>),
}

/// Serves blobs and manifests created by mutations, and delegates
/// everything else to the base image's source.
pub struct Overlay {
    base: Option<Arc<dyn Source>>,
    blobs: HashMap<Digest, Blob>,
    manifests: HashMap<Digest, RawManifest>,
}

impl Overlay {
    fn base(&self, what: &str) -> Result<&Arc<dyn Source>> {
        self.base
            .as_ref()
            .ok_or_else(|| Error::NotFound(format!("{what} in a locally built image")))
    }
}

#[async_trait]
impl Source for Overlay {
    fn name(&self) -> String {
        match &self.base {
            Some(b) => format!("{} (mutated)", b.name()),
            None => "local image".to_string(),
        }
    }

    fn repository(&self) -> Option<&crate::reference::Repository> {
        self.base.as_ref().and_then(|b| b.repository())
    }

    async fn manifest(&self, reference: &str) -> Result<RawManifest> {
        if let Some(m) = Digest::parse(reference)
            .ok()
            .and_then(|d| self.manifests.get(&d))
        {
            return Ok(m.clone());
        }
        self.base(&format!("manifest {reference}"))?
            .manifest(reference)
            .await
    }

    async fn blob(&self, digest: &Digest) -> Result<ByteStream> {
        match self.blobs.get(digest) {
            Some(Blob::Memory(b)) => Ok(bytes_stream(b.clone())),
            Some(Blob::File(p)) => {
                let f = tokio::fs::File::open(p.to_path_buf())
                    .await
                    .map_err(|e| Error::io(format!("layer {digest} at {}", p.display()), e))?;
                Ok(file_stream(f))
            }
            None => self.base(&format!("blob {digest}"))?.blob(digest).await,
        }
    }

    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let ctx = || format!("blob {digest} at {offset}+{len}");
        match self.blobs.get(digest) {
            Some(Blob::Memory(b)) => {
                let end = offset.checked_add(len).filter(|&e| e <= b.len() as u64);
                let end = end.ok_or_else(|| Error::invalid(ctx(), "range past the blob's end"))?;
                Ok(b.slice(offset as usize..end as usize))
            }
            Some(Blob::File(p)) => read_file_range(p, offset, len, &ctx()).await,
            None => {
                self.base(&format!("blob {digest}"))?
                    .blob_range(digest, offset, len)
                    .await
            }
        }
    }

    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        match self.blobs.get(digest) {
            Some(Blob::Memory(b)) => Ok(b.len() as u64),
            Some(Blob::File(p)) => Ok(std::fs::metadata(&**p)
                .map_err(|e| Error::io(p.display().to_string(), e))?
                .len()),
            None => {
                self.base(&format!("blob {digest}"))?
                    .blob_size(digest)
                    .await
            }
        }
    }
}

/// Re-serialise config and manifest and wrap them in a new image view whose
/// overlay serves the new blobs.
fn rebuild(
    base: Option<Arc<dyn Source>>,
    manifest_media_type: &str,
    config: &Value,
    manifest: Value,
    blobs: HashMap<Digest, Blob>,
) -> Result<Image> {
    let config = Bytes::from(serde_json::to_vec(config).expect("json"));
    rebuild_raw(base, manifest_media_type, config, manifest, blobs)
}

/// [`rebuild`] with the config's bytes as they are.
fn rebuild_raw(
    base: Option<Arc<dyn Source>>,
    manifest_media_type: &str,
    config: Bytes,
    mut manifest: Value,
    mut blobs: HashMap<Digest, Blob>,
) -> Result<Image> {
    let config_digest = Digest::of(&config);
    manifest["config"]["digest"] = json!(config_digest);
    manifest["config"]["size"] = json!(config.len());
    let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    let raw = RawManifest::new(bytes, Some(manifest_media_type))?;
    let parsed = raw.image()?;
    blobs.insert(config_digest, Blob::Memory(config.clone()));
    let source = Overlay {
        base,
        blobs,
        manifests: HashMap::from([(raw.digest.clone(), raw.clone())]),
    };
    Ok(Image {
        raw,
        manifest: parsed,
        config,
        source: Arc::new(source),
    })
}

fn json_of(bytes: &[u8], what: &str) -> Result<Value> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::invalid(what, e.to_string()))?;
    if !v.is_object() {
        return Err(Error::invalid(what, "not a JSON object"));
    }
    Ok(v)
}

/// The image's config and manifest as editable JSON.
fn editable(image: &Image) -> Result<(Value, Value)> {
    let config = json_of(
        &image.config,
        &format!("config of image {}", image.digest()),
    )?;
    let manifest = json_of(&image.raw.bytes, &format!("manifest {}", image.digest()))?;
    Ok((config, manifest))
}

/// `slot` as an object, replacing anything else (null, a string) by `{}`.
fn as_object(slot: &mut Value) -> &mut Map<String, Value> {
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("just made an object")
}

fn with_base(
    image: &Image,
    config: &Value,
    manifest: Value,
    blobs: HashMap<Digest, Blob>,
) -> Result<Image> {
    rebuild(
        Some(image.source.clone()),
        &image.raw.media_type,
        config,
        manifest,
        blobs,
    )
}

/// An image with no layers and a minimal config for `platform` (an OCI
/// manifest), the starting point for images built from scratch.
pub fn empty(platform: &Platform) -> Result<Image> {
    let mut config = json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [] },
    });
    if let Some(v) = &platform.variant {
        config["variant"] = json!(v);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": { "mediaType": media::OCI_CONFIG, "digest": Digest::of(b""), "size": 0 },
        "layers": [],
    });
    rebuild(None, media::OCI_MANIFEST, &config, manifest, HashMap::new())
}

/// Append layers on top of `image`: manifest layers, `rootfs.diff_ids` and
/// (when the config keeps one) history are extended.
pub fn append(image: &Image, layers: Vec<LocalLayer>) -> Result<Image> {
    append_with_history(image, layers, "ggfs append", None)
}

/// [`append`] with the history entries' `created_by` and `comment`.
pub fn append_with_history(
    image: &Image,
    layers: Vec<LocalLayer>,
    created_by: &str,
    comment: Option<&str>,
) -> Result<Image> {
    let (mut config, mut manifest) = editable(image)?;
    let base_layers = image.manifest.layers().len();
    let created = now_rfc3339();
    let mut blobs = HashMap::new();
    for layer in layers {
        let mut desc = json!({
            "mediaType": layer.media_type(&image.raw.media_type),
            "digest": layer.digest,
            "size": layer.size,
        });
        if !layer.annotations.is_empty() {
            desc["annotations"] = json!(layer.annotations);
        }
        as_array(&mut manifest["layers"]).push(desc);
        let rootfs = as_object(&mut config["rootfs"]);
        as_array(rootfs.entry("diff_ids").or_insert(Value::Null)).push(json!(layer.diff_id));
        // History must list one non-empty entry per layer; only extend it
        // when that invariant can hold.
        if config["history"].is_array() || base_layers == 0 {
            let mut entry = json!({ "created": created, "created_by": created_by });
            if let Some(c) = comment {
                entry["comment"] = json!(c);
            }
            as_array(&mut config["history"]).push(entry);
        }
        blobs.insert(layer.digest.clone(), Blob::File(layer.file.clone()));
    }
    as_object(&mut config["rootfs"]).insert("type".into(), json!("layers"));
    with_base(image, &config, manifest, blobs)
}

/// `slot` as an array, replacing anything else (null, a string) by `[]`.
fn as_array(slot: &mut Value) -> &mut Vec<Value> {
    if !slot.is_array() {
        *slot = json!([]);
    }
    slot.as_array_mut().expect("just made an array")
}

/// `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
pub fn now_rfc3339() -> String {
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok());
    let t = match epoch.and_then(|s| chrono::DateTime::from_timestamp(s, 0)) {
        Some(t) => t,
        None => chrono::Utc::now(),
    };
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Changes to an image's runtime config. `None`/empty leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct ConfigEdits {
    /// `KEY=VALUE` pairs; an existing KEY is replaced in place.
    pub env: Vec<(String, String)>,
    /// New `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// New `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// Labels added or replaced.
    pub labels: BTreeMap<String, String>,
    /// New `WorkingDir`.
    pub workdir: Option<String>,
    /// New `User`.
    pub user: Option<String>,
    /// `PORT/PROTO` keys added to `ExposedPorts` (those already there stay).
    pub exposed_ports: Vec<String>,
}

/// Apply [`ConfigEdits`] to the image config's `config` section.
pub fn config(image: &Image, edits: &ConfigEdits) -> Result<Image> {
    let (mut cfg, manifest) = editable(image)?;
    let c = as_object(&mut cfg["config"]);
    for (k, v) in &edits.env {
        set_env(c, k, v);
    }
    if let Some(e) = &edits.entrypoint {
        c.insert("Entrypoint".into(), json!(e));
        // As docker and crane do: the old Cmd was arguments for the old
        // entrypoint.
        c.remove("Cmd");
    }
    if let Some(cmd) = &edits.cmd {
        c.insert("Cmd".into(), json!(cmd));
    }
    if !edits.labels.is_empty() {
        let labels = as_object(c.entry("Labels").or_insert(Value::Null));
        for (k, v) in &edits.labels {
            labels.insert(k.clone(), json!(v));
        }
    }
    if let Some(w) = &edits.workdir {
        c.insert("WorkingDir".into(), json!(w));
    }
    if let Some(u) = &edits.user {
        c.insert("User".into(), json!(u));
    }
    if !edits.exposed_ports.is_empty() {
        let ports = as_object(c.entry("ExposedPorts").or_insert(Value::Null));
        for p in &edits.exposed_ports {
            ports.insert(p.clone(), json!({}));
        }
    }
    with_base(image, &cfg, manifest, HashMap::new())
}

fn set_env(c: &mut Map<String, Value>, key: &str, value: &str) {
    let item = json!(format!("{key}={value}"));
    let list = as_array(c.entry("Env").or_insert(Value::Null));
    let prefix = format!("{key}=");
    match list
        .iter_mut()
        .find(|e| e.as_str().is_some_and(|s| s.starts_with(&prefix)))
    {
        Some(slot) => *slot = item,
        None => list.push(item),
    }
}

/// Merge annotations into the manifest.
pub fn annotations(image: &Image, add: &BTreeMap<String, String>) -> Result<Image> {
    let (cfg, mut manifest) = editable(image)?;
    let a = as_object(&mut manifest["annotations"]);
    for (k, v) in add {
        a.insert(k.clone(), json!(v));
    }
    with_base(image, &cfg, manifest, HashMap::new())
}

/// The image with `config` (a JSON object, kept byte for byte) as its
/// config blob; its `rootfs` must be the old one, which the layers match.
pub fn replace_config(image: &Image, config: Bytes) -> Result<Image> {
    let new = json_of(&config, "the new config")?;
    let (old, manifest) = editable(image)?;
    if new["rootfs"] != old["rootfs"] {
        return Err(Error::invalid(
            "the new config",
            "its rootfs (the layers' diff_ids) differs from the image's",
        ));
    }
    rebuild_raw(
        Some(image.source.clone()),
        &image.raw.media_type,
        config,
        manifest,
        HashMap::new(),
    )
}

/// Set the config's os, architecture and variant.
pub fn set_platform(image: &Image, platform: &Platform) -> Result<Image> {
    let (mut cfg, manifest) = editable(image)?;
    let c = cfg.as_object_mut().expect("object");
    c.insert("os".into(), json!(platform.os));
    c.insert("architecture".into(), json!(platform.architecture));
    match &platform.variant {
        Some(v) => c.insert("variant".into(), json!(v)),
        None => c.remove("variant"),
    };
    with_base(image, &cfg, manifest, HashMap::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::Compression;
    use crate::image::newlayer::layer_from_dir;

    #[tokio::test]
    async fn append_and_config_edits() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "data").unwrap();
        let layer = layer_from_dir(d.path(), Compression::Gzip).unwrap();
        let base = empty(&"linux/amd64".parse().unwrap()).unwrap();
        let img = append(&base, vec![layer.clone()]).unwrap();
        let cfg = img.config_file().unwrap();
        assert_eq!(cfg.rootfs().diff_ids(), &[layer.diff_id.to_string()]);
        assert_eq!(cfg.history().as_ref().map(Vec::len), Some(1));
        let layers = img.layers().unwrap();
        assert_eq!(layers[0].digest, layer.digest);
        assert_eq!(layers[0].media_type(), media::OCI_LAYER_GZIP);
        // The overlay serves the layer, verified against the manifest.
        let got = crate::image::read_blob(img.source.as_ref(), &layer.digest, 1 << 20)
            .await
            .unwrap();
        assert_eq!(got.len() as u64, layer.size);
        assert_eq!(
            img.source
                .manifest(img.digest().as_str())
                .await
                .unwrap()
                .digest,
            *img.digest()
        );

        let edits = ConfigEdits {
            env: vec![("A".into(), "1".into()), ("A".into(), "2".into())],
            cmd: Some(vec!["sh".into()]),
            labels: BTreeMap::from([("l".into(), "v".into())]),
            ..Default::default()
        };
        let img2 = config(&img, &edits).unwrap();
        let v: Value = serde_json::from_slice(&img2.config).unwrap();
        assert_eq!(v["config"]["Env"], json!(["A=2"]));
        assert_eq!(v["config"]["Cmd"], json!(["sh"]));
        assert_eq!(v["config"]["Labels"]["l"], "v");
        assert_eq!(img2.layers().unwrap()[0].digest, layer.digest);
        let img3 = set_platform(&img2, &"linux/arm64/v8".parse().unwrap()).unwrap();
        let v: Value = serde_json::from_slice(&img3.config).unwrap();
        assert_eq!(
            (v["architecture"].as_str(), v["variant"].as_str()),
            (Some("arm64"), Some("v8"))
        );
        let img4 = annotations(&img3, &BTreeMap::from([("k".into(), "v".into())])).unwrap();
        assert_eq!(img4.manifest.annotations().as_ref().unwrap()["k"], "v");
        // Layers still come through the chain of overlays.
        assert!(img4.source.blob_size(&layer.digest).await.unwrap() > 0);

        // A new entrypoint drops the old Cmd, unless a Cmd comes with it.
        let ep = |cmd: Option<Vec<String>>| ConfigEdits {
            entrypoint: Some(vec!["/bin/app".into()]),
            cmd,
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&config(&img2, &ep(None)).unwrap().config).unwrap();
        assert_eq!(v["config"]["Entrypoint"], json!(["/bin/app"]));
        assert!(v["config"].get("Cmd").is_none(), "{v}");
        let both = config(&img2, &ep(Some(vec!["-v".into()]))).unwrap();
        let v: Value = serde_json::from_slice(&both.config).unwrap();
        assert_eq!(v["config"]["Cmd"], json!(["-v"]));
    }
}
