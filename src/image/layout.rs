//! OCI image-layout directories (`oci-layout`, `index.json`,
//! `blobs/<alg>/<hex>`) as a [`Source`] and a [`Sink`], compatible with what
//! umoci, skopeo (`oci:DIR:TAG`) and containerd read and write.
//!
//! Tags are the `org.opencontainers.image.ref.name` annotation of an
//! index.json entry. Blobs are written through [`BlobWriter`] (verified,
//! temporary file renamed into place) and index.json is replaced atomically.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::digest::{BlobWriter, Digest};
use crate::error::{from_io, Error, Result};
use crate::image::manifest::{media, RawManifest, MAX_MANIFEST_SIZE};
use crate::image::{file_stream, read_file_range, ByteStream, Sink, Source};

/// The annotation that names an index.json entry (the "tag").
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd names entries with the full image name instead.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
const LAYOUT_VERSION: &str = "1.0.0";

/// An OCI image-layout directory.
pub struct Layout {
    root: PathBuf,
    /// Serialises index.json read-modify-write cycles within this process;
    /// an flock on the layout directory does so across processes.
    index_lock: Mutex<()>,
    /// The last manifest stored without a tag since the last tagged one:
    /// [`Sink::finish`] lists it in index.json unnamed (the top manifest of
    /// an untagged copy comes last, after the children of an index).
    untagged: Mutex<Option<RawManifest>>,
}

/// One entry of index.json, as far as lookups need it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The manifest's digest.
    pub digest: Digest,
    /// `mediaType`, when the entry gives one.
    pub media_type: Option<String>,
    /// The manifest's size.
    pub size: u64,
    /// The entry's tag (`org.opencontainers.image.ref.name`, or containerd's name annotation).
    pub name: Option<String>,
}

impl Layout {
    /// Open an existing layout; fails unless `oci-layout` and `index.json` exist.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let marker = root.join("oci-layout");
        let text = std::fs::read(&marker).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!(
                "OCI layout {} (no oci-layout file)",
                root.display()
            )),
            _ => Error::io(marker.display().to_string(), e),
        })?;
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::invalid(marker.display().to_string(), e.to_string()))?;
        if v.get("imageLayoutVersion")
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(Error::invalid(
                marker.display().to_string(),
                "no imageLayoutVersion",
            ));
        }
        let layout = Self::unchecked(root);
        layout.read_index()?;
        Ok(layout)
    }

    /// Open a layout, creating the directory, `oci-layout` and an empty
    /// `index.json` where missing.
    pub fn create(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| Error::io(blobs.display().to_string(), e))?;
        let layout = Self::unchecked(root);
        let marker = layout.root.join("oci-layout");
        if !marker.exists() {
            let v = json!({ "imageLayoutVersion": LAYOUT_VERSION });
            layout.write_atomic(&marker, &serde_json::to_vec(&v).expect("json"))?;
        }
        if !layout.index_path().exists() {
            let v = json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [] });
            layout.write_index(&v)?;
        }
        Self::open(&layout.root)
    }

    fn unchecked(root: PathBuf) -> Self {
        Self {
            root,
            index_lock: Mutex::new(()),
            untagged: Mutex::new(None),
        }
    }

    /// `oci:/path`, for messages.
    pub fn label(&self) -> String {
        format!("oci:{}", self.root.display())
    }

    /// The layout's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives: `blobs/<alg>/<hex>`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn read_index(&self) -> Result<Value> {
        let path = self.index_path();
        let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid(path.display().to_string(), e.to_string()))?;
        if !v.get("manifests").is_some_and(Value::is_array) {
            return Err(Error::invalid(
                path.display().to_string(),
                "no \"manifests\" array",
            ));
        }
        Ok(v)
    }

    fn write_index(&self, v: &Value) -> Result<()> {
        let bytes = serde_json::to_vec(v).expect("json");
        self.write_atomic(&self.index_path(), &bytes)
    }

    /// Write a small file via a temporary file and rename, so readers never
    /// see it half written.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let ctx = || path.display().to_string();
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.root)
            .map_err(|e| Error::io(ctx(), e))?;
        tmp.write_all(bytes).map_err(|e| Error::io(ctx(), e))?;
        tmp.as_file().sync_data().map_err(|e| Error::io(ctx(), e))?;
        tmp.persist(path).map_err(|e| Error::io(ctx(), e.error))?;
        Ok(())
    }

    /// The entries of index.json, in order.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let index = self.read_index()?;
        self.parse_entries(&index)
    }

    fn parse_entries(&self, index: &Value) -> Result<Vec<Entry>> {
        let what = self.index_path().display().to_string();
        manifests(index)
            .iter()
            .map(|m| parse_entry(m, &what))
            .collect()
    }

    /// The tags (ref.name annotations) present in index.json.
    pub fn tags(&self) -> Result<Vec<String>> {
        Ok(self.entries()?.into_iter().filter_map(|e| e.name).collect())
    }

    /// Find the entry for a tag, or for `""` the only entry.
    pub fn resolve_tag(&self, tag: &str) -> Result<Entry> {
        let index = self.read_index()?;
        let entries = self.parse_entries(&index)?;
        if tag.is_empty() {
            if let [only] = entries.as_slice() {
                return Ok(only.clone());
            }
            let tags: Vec<&str> = entries.iter().filter_map(|e| e.name.as_deref()).collect();
            return Err(Error::invalid(
                format!("OCI layout {}", self.root.display()),
                format!(
                    "holds {} manifests; name one of the tags {tags:?}",
                    entries.len()
                ),
            ));
        }
        // ref.name first; containerd's full-name annotation as a fallback.
        let by_ref = entries.iter().position(|e| e.name.as_deref() == Some(tag));
        let by_containerd = || {
            manifests(&index)
                .iter()
                .position(|m| m["annotations"][CONTAINERD_NAME].as_str() == Some(tag))
        };
        match by_ref.or_else(by_containerd) {
            Some(i) => Ok(entries[i].clone()),
            None => Err(Error::NotFound(format!(
                "tag {tag:?} in OCI layout {}",
                self.root.display()
            ))),
        }
    }

    /// Point `tag` at a manifest: replaces the entry carrying that tag (in
    /// place) or appends one. index.json is rewritten atomically.
    pub fn set_tag(&self, manifest: &RawManifest, tag: &str) -> Result<()> {
        let mut entry = index_entry(manifest);
        entry["annotations"] = json!({ REF_NAME: tag });
        self.update_index(|list| {
            let named = |m: &Value| m["annotations"][REF_NAME].as_str() == Some(tag);
            match list.iter().position(named) {
                Some(i) => {
                    list[i] = entry;
                    let mut first = true;
                    list.retain(|m| !named(m) || std::mem::take(&mut first));
                }
                None => list.push(entry),
            }
            true
        })
    }

    /// List a manifest in index.json without a name, unless it is listed.
    pub fn add_unnamed(&self, manifest: &RawManifest) -> Result<()> {
        self.update_index(|list| {
            if list.iter().any(|m| m["digest"] == manifest.digest.as_str()) {
                return false;
            }
            list.push(index_entry(manifest));
            true
        })
    }

    /// Read-modify-write of index.json's manifests under both locks (this
    /// process's and the directory's flock); `edit` says whether to write.
    fn update_index(&self, edit: impl FnOnce(&mut Vec<Value>) -> bool) -> Result<()> {
        let _guard = self.index_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _dir_lock = self.lock_dir()?;
        let mut index = self.read_index()?;
        let list = index["manifests"].as_array_mut().ok_or_else(|| {
            Error::invalid(
                self.index_path().display().to_string(),
                "no \"manifests\" array",
            )
        })?;
        if edit(list) {
            self.write_index(&index)?;
        }
        Ok(())
    }

    /// An exclusive flock on the layout directory, released on drop.
    fn lock_dir(&self) -> Result<std::fs::File> {
        let ctx = |e| Error::io(format!("locking {}", self.root.display()), e);
        let dir = std::fs::File::open(&self.root).map_err(ctx)?;
        dir.lock().map_err(ctx)?;
        Ok(dir)
    }

    /// Read a whole blob that must be small (manifests), verified.
    fn read_small_blob(&self, digest: &Digest) -> Result<Bytes> {
        let path = self.blob_path(digest);
        let meta = std::fs::metadata(&path).map_err(|e| self.blob_err(digest, e))?;
        if meta.len() > MAX_MANIFEST_SIZE {
            return Err(Error::TooLarge {
                what: format!("manifest {digest} in {}", self.label()),
                size: meta.len(),
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| self.blob_err(digest, e))?;
        digest.verify(&bytes)?;
        Ok(Bytes::from(bytes))
    }

    fn blob_err(&self, digest: &Digest, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(format!("blob {digest} in {}", self.label()))
        } else {
            Error::io(self.blob_path(digest).display().to_string(), e)
        }
    }

    fn manifest_by_digest(&self, digest: &Digest) -> Result<RawManifest> {
        let bytes = self.read_small_blob(digest)?;
        // The index entry, if any, knows the media type better than a sniff.
        let mt = self
            .entries()?
            .into_iter()
            .find(|e| &e.digest == digest)
            .and_then(|e| e.media_type);
        RawManifest::verified(bytes, mt.as_deref(), digest)
    }
}

/// index.json's `manifests` (read_index has checked it is an array).
fn manifests(index: &Value) -> &[Value] {
    index["manifests"].as_array().map_or(&[], Vec::as_slice)
}

/// An unnamed index.json entry for `manifest`.
fn index_entry(manifest: &RawManifest) -> Value {
    json!({
        "mediaType": manifest.media_type,
        "digest": manifest.digest,
        "size": manifest.bytes.len(),
    })
}

fn parse_entry(m: &Value, what: &str) -> Result<Entry> {
    let bad = |r: &str| Error::invalid(format!("{what} entry"), r.to_string());
    let digest = m["digest"].as_str().ok_or_else(|| bad("no digest"))?;
    Ok(Entry {
        digest: Digest::parse(digest)?,
        media_type: m["mediaType"].as_str().map(str::to_string),
        size: m["size"].as_u64().ok_or_else(|| bad("no size"))?,
        name: m["annotations"][REF_NAME].as_str().map(str::to_string),
    })
}

#[async_trait]
impl Source for Layout {
    fn name(&self) -> String {
        self.label()
    }

    async fn manifest(&self, reference: &str) -> Result<RawManifest> {
        if let Ok(digest) = Digest::parse(reference) {
            return self.manifest_by_digest(&digest);
        }
        let entry = self.resolve_tag(reference)?;
        let bytes = self.read_small_blob(&entry.digest)?;
        if bytes.len() as u64 != entry.size {
            return Err(Error::SizeMismatch {
                digest: entry.digest,
                expected: entry.size,
                actual: bytes.len() as u64,
            });
        }
        RawManifest::verified(bytes, entry.media_type.as_deref(), &entry.digest)
    }

    async fn blob(&self, digest: &Digest) -> Result<ByteStream> {
        let file = tokio::fs::File::open(self.blob_path(digest))
            .await
            .map_err(|e| self.blob_err(digest, e))?;
        Ok(file_stream(file))
    }

    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let size = self.blob_size(digest).await?;
        let what = format!("blob {digest} in {} at {offset}+{len}", self.label());
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::invalid(
                what,
                format!("range past the blob's end ({size} bytes)"),
            ));
        }
        read_file_range(&self.blob_path(digest), offset, len, &what).await
    }

    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        let meta = tokio::fs::metadata(self.blob_path(digest))
            .await
            .map_err(|e| self.blob_err(digest, e))?;
        Ok(meta.len())
    }
}

#[async_trait]
impl Sink for Layout {
    fn name(&self) -> String {
        self.label()
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool> {
        Ok(tokio::fs::try_exists(self.blob_path(digest))
            .await
            .unwrap_or(false))
    }

    async fn put_blob(&self, digest: &Digest, size: u64, mut data: ByteStream) -> Result<()> {
        if self.has_blob(digest).await? {
            return Ok(());
        }
        let ctx = || format!("writing blob {digest} to {}", self.label());
        let mut writer = BlobWriter::create(self.blob_path(digest), digest.clone(), Some(size))?;
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| from_io(ctx(), e))?;
            writer.write_all(&chunk).map_err(|e| Error::io(ctx(), e))?;
        }
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| Error::invalid(ctx(), e.to_string()))??;
        Ok(())
    }

    async fn put_manifest(&self, manifest: &RawManifest, tag: Option<&str>) -> Result<()> {
        let path = self.blob_path(&manifest.digest);
        if !path.exists() {
            let size = manifest.bytes.len() as u64;
            let mut w = BlobWriter::create(&path, manifest.digest.clone(), Some(size))?;
            w.write_all(&manifest.bytes)
                .map_err(|e| Error::io(path.display().to_string(), e))?;
            w.commit()?;
        }
        let mut untagged = self.untagged.lock().unwrap_or_else(|p| p.into_inner());
        match tag {
            Some(tag) => {
                *untagged = None;
                self.set_tag(manifest, tag)
            }
            None => {
                *untagged = Some(manifest.clone());
                Ok(())
            }
        }
    }

    /// Record an untagged copy's top manifest in index.json, without a name,
    /// as skopeo does for `oci:DIR`; nothing when index.json already lists it.
    async fn finish(&self) -> Result<()> {
        let pending = self
            .untagged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match pending {
            Some(m) => self.add_unnamed(&m),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(bytes: &'static [u8]) -> ByteStream {
        crate::image::bytes_stream(Bytes::from_static(bytes))
    }

    #[tokio::test]
    async fn round_trip_and_retag() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::create(dir.path().join("l")).unwrap();
        let d = Digest::of(b"layer");
        l.put_blob(&d, 5, stream(b"layer")).await.unwrap();
        assert_eq!(l.blob_size(&d).await.unwrap(), 5);
        assert_eq!(&l.blob_range(&d, 1, 3).await.unwrap()[..], b"aye");
        assert!(l.blob_range(&d, 4, 2).await.is_err());

        let bad = Digest::of(b"other");
        let err = l.put_blob(&bad, 5, stream(b"layer")).await.unwrap_err();
        assert!(err.to_string().contains("failed verification"), "{err}");
        assert!(!l.blob_path(&bad).exists());

        let m1 = RawManifest::new(
            Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#),
            None,
        )
        .unwrap();
        let m2 = RawManifest::new(
            Bytes::from_static(br#"{"schemaVersion":2,"layers":[ ]}"#),
            None,
        )
        .unwrap();
        l.put_manifest(&m1, Some("a")).await.unwrap();
        l.put_manifest(&m1, Some("b")).await.unwrap();
        l.put_manifest(&m2, Some("a")).await.unwrap();
        assert_eq!(l.tags().unwrap(), ["a", "b"]);
        assert_eq!(l.manifest("a").await.unwrap().digest, m2.digest);
        assert_eq!(
            l.manifest(m1.digest.as_str()).await.unwrap().digest,
            m1.digest
        );
        assert!(l.manifest("zzz").await.unwrap_err().is_not_found());
        assert!(l.manifest("").await.is_err(), "two entries: ambiguous");

        // An untagged copy: children first, the top last, then finish.
        let l2 = Layout::create(dir.path().join("l2")).unwrap();
        l2.put_manifest(&m1, None).await.unwrap();
        l2.put_manifest(&m2, None).await.unwrap();
        l2.finish().await.unwrap();
        l2.finish().await.unwrap();
        let entries = l2.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((&entries[0].digest, &entries[0].name), (&m2.digest, &None));
        assert_eq!(l2.manifest("").await.unwrap().digest, m2.digest);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_writers() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::sync::Arc::new(Layout::create(dir.path()).unwrap());
        let data = Bytes::from(vec![7u8; 1 << 20]);
        let d = Digest::of(&data);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (l, data, d) = (l.clone(), data.clone(), d.clone());
            tasks.push(tokio::spawn(async move {
                let chunks: Vec<std::io::Result<Bytes>> = data
                    .chunks(4096)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                l.put_blob(
                    &d,
                    data.len() as u64,
                    Box::pin(futures::stream::iter(chunks)),
                )
                .await
                .unwrap();
                let body = format!(r#"{{"schemaVersion":2,"layers":[],"n":{i}}}"#);
                let m = RawManifest::new(Bytes::from(body), None).unwrap();
                l.put_manifest(&m, Some(&format!("t{i}"))).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(std::fs::read(l.blob_path(&d)).unwrap(), data);
        assert_eq!(l.tags().unwrap().len(), 8, "no index.json update lost");
        let stray: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .collect();
        assert!(stray.is_empty());
    }
}
