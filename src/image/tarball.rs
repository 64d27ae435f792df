//! `docker save` tarballs: read as a [`Source`] and written by [`write()`].
//!
//! Reading indexes the tar once (entry name → offset and size in the file)
//! and serves blobs by seeking, for both the old layout (`<id>/layer.tar`,
//! `<id>.json`) and the newer one (`blobs/sha256/<hex>`). The manifest.json
//! entries have no registry manifest, so a Docker schema-2 manifest is
//! synthesised for each, deterministically (same tar, same digest).
//!
//! Writing emits, like crane, the layer blobs as they are (compressed) plus
//! `manifest.json` listing them, and also `index.json`/`oci-layout` over the
//! same blobs as modern `docker save` does, so the tar is an OCI layout too.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::digest::{Digest, Hasher};
use crate::error::{from_io, Error, Result};
use crate::image::layout::{CONTAINERD_NAME, REF_NAME};
use crate::image::manifest::{media, Compression, RawManifest};
use crate::image::{file_stream, read_file_range, ByteStream, Image, Source, MAX_CONFIG_SIZE};
use crate::reference::Reference;

/// Symlink hops followed inside the tar (old docker save links shared layers).
const MAX_LINK_HOPS: usize = 8;

/// One record of `manifest.json`.
#[derive(Debug, Deserialize, Serialize)]
struct SaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    offset: u64,
    size: u64,
}

enum TarEntry {
    File(Span),
    Link(String),
}

/// A docker-save tarball opened for reading.
pub struct Tarball {
    path: PathBuf,
    images: Vec<SavedImage>,
    blobs: HashMap<Digest, Span>,
}

/// One image of the tarball: its tags and synthesised manifest.
#[derive(Clone, Debug)]
pub struct SavedImage {
    /// `RepoTags` from manifest.json.
    pub tags: Vec<String>,
    /// A Docker schema 2 manifest made for the image's config and layers.
    pub manifest: RawManifest,
}

/// The synthesised manifest, fields in the registry's usual order.
#[derive(Serialize)]
struct Schema2 {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Desc,
    layers: Vec<Desc>,
}

#[derive(Serialize)]
struct Desc {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    size: u64,
    digest: Digest,
}

impl Tarball {
    /// Index the tarball and synthesise a manifest per manifest.json record.
    /// Layers whose digest cannot be known otherwise (compressed, under a
    /// name that is not a digest) are hashed once here.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let label = format!("tarball:{}", path.display());
        let entries = index_tar(&path).map_err(|e| from_io(label.clone(), e))?;
        let mut reader = Reader {
            file: File::open(&path).map_err(|e| Error::io(label.clone(), e))?,
            entries,
            label: label.clone(),
        };
        let listing = reader.read_entry("manifest.json", 16 << 20)?;
        let saves: Vec<SaveEntry> = serde_json::from_slice(&listing)
            .map_err(|e| Error::invalid(format!("manifest.json of {label}"), e.to_string()))?;
        let mut blobs = HashMap::new();
        let images = saves
            .iter()
            .map(|s| reader.image(s, &mut blobs))
            .collect::<Result<_>>()?;
        Ok(Self {
            path,
            images,
            blobs,
        })
    }

    /// The tarball's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its images, in manifest.json order.
    pub fn images(&self) -> &[SavedImage] {
        &self.images
    }

    /// The image for a reference: a digest of a synthesised manifest, a
    /// RepoTag (`busybox:1`, or any spelling of the same reference), or `""`
    /// when the tarball holds exactly one image.
    pub fn find(&self, reference: &str) -> Result<&SavedImage> {
        let not_found = || Error::NotFound(format!("{reference:?} in {}", self.label()));
        if let Ok(d) = Digest::parse(reference) {
            return self
                .images
                .iter()
                .find(|i| i.manifest.digest == d)
                .ok_or_else(not_found);
        }
        if reference.is_empty() {
            return match self.images.as_slice() {
                [only] => Ok(only),
                _ => Err(Error::invalid(
                    self.label(),
                    format!("holds {} images; name one by tag", self.images.len()),
                )),
            };
        }
        let wanted = Reference::parse(reference).ok();
        self.images
            .iter()
            .find(|i| {
                i.tags.iter().any(|t| {
                    t == reference || (wanted.is_some() && Reference::parse(t).ok() == wanted)
                })
            })
            .ok_or_else(not_found)
    }

    fn label(&self) -> String {
        format!("tarball:{}", self.path.display())
    }

    fn span(&self, digest: &Digest) -> Result<Span> {
        self.blobs
            .get(digest)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("blob {digest} in {}", self.label())))
    }
}

/// Walk the tar once, recording where each file's bytes are.
fn index_tar(path: &Path) -> io::Result<HashMap<String, TarEntry>> {
    let mut archive = tar::Archive::new(File::open(path)?);
    let mut map = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let Some(name) = clean(&entry.path()?) else {
            continue;
        };
        let kind = entry.header().entry_type();
        let value = if kind.is_file() || kind.is_contiguous() {
            TarEntry::File(Span {
                offset: entry.raw_file_position(),
                size: entry.size(),
            })
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name()?.unwrap_or_default().into_owned();
            // Symlinks are relative to their directory; hardlinks to the root.
            let base = if kind.is_symlink() {
                Path::new(&name)
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(target)
            } else {
                target
            };
            match clean(&base) {
                Some(t) => TarEntry::Link(t),
                None => continue,
            }
        } else {
            continue;
        };
        map.insert(name, value);
    }
    Ok(map)
}

/// `./a/../b` → `b`, `None` for paths escaping the root.
fn clean(p: &Path) -> Option<String> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    let s: PathBuf = parts.iter().collect();
    let s = s.to_str()?.to_string();
    (!s.is_empty()).then_some(s)
}

/// Synchronous access to the tar while opening it.
struct Reader {
    file: File,
    entries: HashMap<String, TarEntry>,
    label: String,
}

impl Reader {
    fn span(&self, name: &str) -> Result<Span> {
        let mut name = name.to_string();
        for _ in 0..MAX_LINK_HOPS {
            match self.entries.get(&name) {
                Some(TarEntry::File(s)) => return Ok(*s),
                Some(TarEntry::Link(t)) => name = t.clone(),
                None => break,
            }
        }
        Err(Error::NotFound(format!("{name:?} in {}", self.label)))
    }

    fn read_entry(&mut self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let span = self.span(name)?;
        if span.size > limit {
            return Err(Error::TooLarge {
                what: format!("{name} in {}", self.label),
                size: span.size,
                limit,
            });
        }
        let mut buf = vec![0; span.size as usize];
        self.read_at(span, &mut buf)
            .map_err(|e| Error::io(format!("{name} in {}", self.label), e))?;
        Ok(buf)
    }

    fn read_at(&mut self, span: Span, buf: &mut [u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(span.offset))?;
        self.file.read_exact(buf)
    }

    fn image(&mut self, s: &SaveEntry, blobs: &mut HashMap<Digest, Span>) -> Result<SavedImage> {
        let config = self.read_entry(&s.config, MAX_CONFIG_SIZE)?;
        let config_digest = Digest::of(&config);
        blobs.insert(config_digest.clone(), self.span(&s.config)?);
        let diff_ids = diff_ids(&config, &s.config, &self.label)?;
        let mut layers = Vec::new();
        for (i, name) in s.layers.iter().enumerate() {
            let (desc, span) = self.layer(name, diff_ids.get(i))?;
            blobs.insert(desc.digest.clone(), span);
            layers.push(desc);
        }
        let manifest = Schema2 {
            schema_version: 2,
            media_type: media::DOCKER_MANIFEST,
            config: Desc {
                media_type: media::DOCKER_CONFIG,
                size: config.len() as u64,
                digest: config_digest,
            },
            layers,
        };
        let bytes = serde_json::to_vec(&manifest).expect("json");
        Ok(SavedImage {
            tags: s.repo_tags.clone().unwrap_or_default(),
            manifest: RawManifest::new(Bytes::from(bytes), Some(media::DOCKER_MANIFEST))?,
        })
    }

    /// A layer's descriptor: the digest from its name when it is a blob
    /// path, the DiffID when it is an uncompressed tar, else hashed.
    fn layer(&mut self, name: &str, diff_id: Option<&Digest>) -> Result<(Desc, Span)> {
        let span = self.span(name)?;
        let mut head = vec![0; span.size.min(8) as usize];
        self.read_at(span, &mut head)
            .map_err(|e| Error::io(format!("{name} in {}", self.label), e))?;
        let compression = Compression::sniff(&head);
        let digest = match (digest_from_name(name), compression, diff_id) {
            (Some(d), _, _) => d,
            (None, Compression::None, Some(d)) => d.clone(),
            _ => self.hash(name, span)?,
        };
        let desc = Desc {
            media_type: compression.layer_media_type(true),
            size: span.size,
            digest,
        };
        Ok((desc, span))
    }

    fn hash(&mut self, name: &str, span: Span) -> Result<Digest> {
        let ctx = |e| Error::io(format!("hashing {name} in {}", self.label), e);
        self.file.seek(SeekFrom::Start(span.offset)).map_err(ctx)?;
        let h = Hasher::read_all((&mut self.file).take(span.size)).map_err(ctx)?;
        if h.len() != span.size {
            return Err(Error::invalid(
                format!("{name} in {}", self.label),
                "truncated",
            ));
        }
        Ok(h.finish())
    }
}

fn diff_ids(config: &[u8], name: &str, label: &str) -> Result<Vec<Digest>> {
    let v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| Error::invalid(format!("config {name} in {label}"), e.to_string()))?;
    let ids = v["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ids.iter()
        .map(|d| Digest::parse(d.as_str().unwrap_or_default()))
        .collect()
}

/// The digest a blob's name states: `blobs/sha256/<hex>` (docker save, OCI)
/// or `<hex>.tar.gz` (crane). Trusted only until the bytes are read: layer
/// readers verify them against it.
fn digest_from_name(name: &str) -> Option<Digest> {
    if let Some(rest) = name.strip_prefix("blobs/") {
        let (alg, hex) = rest.split_once('/')?;
        return Digest::parse(&format!("{alg}:{hex}")).ok();
    }
    let hex = name.strip_suffix(".tar.gz")?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}

#[async_trait]
impl Source for Tarball {
    fn name(&self) -> String {
        self.label()
    }

    async fn manifest(&self, reference: &str) -> Result<RawManifest> {
        Ok(self.find(reference)?.manifest.clone())
    }

    async fn blob(&self, digest: &Digest) -> Result<ByteStream> {
        let span = self.span(digest)?;
        let ctx = |e| Error::io(format!("blob {digest} in {}", self.label()), e);
        let mut f = tokio::fs::File::open(&self.path).await.map_err(ctx)?;
        f.seek(SeekFrom::Start(span.offset)).await.map_err(ctx)?;
        Ok(file_stream(f.take(span.size)))
    }

    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let span = self.span(digest)?;
        let what = format!("blob {digest} in {} at {offset}+{len}", self.label());
        if offset.checked_add(len).is_none_or(|end| end > span.size) {
            return Err(Error::invalid(
                what,
                format!("range past the blob's end ({} bytes)", span.size),
            ));
        }
        read_file_range(&self.path, span.offset + offset, len, &what).await
    }

    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        Ok(self.span(digest)?.size)
    }
}

/// Where [`write_to`] puts the tarball.
pub enum Dest {
    /// A file, written beside its final name and renamed into place only
    /// when complete, so a failed write leaves no file.
    Path(PathBuf),
    /// Standard output.
    Stdout,
}

/// Write `image` as a docker-load compatible tarball to `dest`.
pub async fn write_to(image: &Image, dest: Dest, tags: &[String]) -> Result<()> {
    write_all_to(&[(image.clone(), tags.to_vec())], dest).await
}

/// Write several images (each with its RepoTags) into one tarball at `dest`;
/// blobs they share are stored once.
pub async fn write_all_to(images: &[(Image, Vec<String>)], dest: Dest) -> Result<()> {
    match dest {
        Dest::Stdout => {
            let mut out = write_all(images, io::BufWriter::new(io::stdout())).await?;
            out.flush()
                .map_err(|e| Error::io("writing tarball to stdout", e))
        }
        Dest::Path(path) => {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let tmp = tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(&dir)
                .map_err(|e| Error::io(dir.display().to_string(), e))?;
            let tmp = write_all(images, tmp).await?;
            tmp.as_file()
                .sync_data()
                .map_err(|e| Error::io(path.display().to_string(), e))?;
            tmp.persist(&path)
                .map_err(|e| Error::io(path.display().to_string(), e.error))?;
            Ok(())
        }
    }
}

/// Write `image` as a docker-save tarball to `out` (blocking writes happen
/// on a blocking thread) and hand `out` back. `tags` are full references
/// (`repo:tag`) for manifest.json's RepoTags. Every blob is verified as it
/// streams; a bad one fails the write.
pub async fn write<W: Write + Send + 'static>(image: &Image, out: W, tags: &[String]) -> Result<W> {
    write_all(&[(image.clone(), tags.to_vec())], out).await
}

/// [`write()`] for several images.
pub async fn write_all<W: Write + Send + 'static>(
    images: &[(Image, Vec<String>)],
    out: W,
) -> Result<W> {
    let images = images.to_vec();
    tokio::task::spawn_blocking(move || write_blocking(&images, out))
        .await
        .map_err(|e| Error::invalid("writing tarball", e.to_string()))?
}

fn blob_name(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm(), d.hex())
}

/// Runs on a blocking thread of the runtime: blobs stream from their async
/// sources through a bridge.
fn write_blocking<W: Write>(images: &[(Image, Vec<String>)], out: W) -> Result<W> {
    let handle = tokio::runtime::Handle::current();
    let mut b = tar::Builder::new(out);
    let werr = |e| Error::io("writing tarball", e);
    dir_entry(&mut b, "blobs/").map_err(werr)?;
    dir_entry(&mut b, "blobs/sha256/").map_err(werr)?;
    let mut written = std::collections::HashSet::new();
    // Every layer blob to write, each once, in order: opened ahead.
    let mut at = std::collections::HashMap::new();
    let mut blobs = Vec::new();
    for (image, _) in images {
        for layer in image.layers()? {
            if !at.contains_key(&layer.digest) {
                at.insert(layer.digest.clone(), blobs.len());
                blobs.push(layer);
            }
        }
    }
    let mut ahead = super::ahead::Ahead::new(blobs, super::export::AHEAD);
    let mut listing = Vec::new();
    let mut index = Vec::new();
    for (image, tags) in images {
        let config_digest = image.config_digest()?;
        if written.insert(config_digest.clone()) {
            file_entry(&mut b, &blob_name(&config_digest), &image.config).map_err(werr)?;
        }
        let layers = image.layers()?;
        for layer in &layers {
            if !written.insert(layer.digest.clone()) {
                continue;
            }
            let stream = ahead.open(at[&layer.digest])?;
            let reader = tokio_util::io::SyncIoBridge::new_with_handle(
                tokio_util::io::StreamReader::new(stream),
                handle.clone(),
            );
            let mut h = header(layer.size());
            b.append_data(&mut h, blob_name(&layer.digest), reader)
                .map_err(|e| from_io(format!("layer {}", layer.digest), e))?;
        }
        if written.insert(image.digest().clone()) {
            file_entry(&mut b, &blob_name(image.digest()), &image.raw.bytes).map_err(werr)?;
        }
        listing.push(json!({
            "Config": blob_name(&config_digest),
            "RepoTags": tags,
            "Layers": layers.iter().map(|l| blob_name(&l.digest)).collect::<Vec<_>>(),
        }));
        index.extend(index_entries(image, tags));
    }
    let index = json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": index });
    for (name, value) in [("manifest.json", json!(listing)), ("index.json", index)] {
        let bytes = serde_json::to_vec(&value).expect("json");
        file_entry(&mut b, name, &bytes).map_err(werr)?;
    }
    file_entry(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(werr)?;
    b.into_inner().map_err(werr)
}

/// index.json entries naming the image once per tag, as docker save does.
fn index_entries(image: &Image, tags: &[String]) -> Vec<serde_json::Value> {
    let desc = |annotations: Option<serde_json::Value>| {
        let mut d = json!({
            "mediaType": image.raw.media_type,
            "digest": image.digest(),
            "size": image.raw.bytes.len(),
        });
        if let Some(a) = annotations {
            d["annotations"] = a;
        }
        d
    };
    if tags.is_empty() {
        return vec![desc(None)];
    }
    tags.iter()
        .map(|t| {
            let tag = Reference::parse(t)
                .ok()
                .and_then(|r| r.tag)
                .unwrap_or_else(|| t.clone());
            desc(Some(json!({ CONTAINERD_NAME: t, REF_NAME: tag })))
        })
        .collect()
}

/// A header with fixed metadata, so output depends only on the image.
fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn file_entry<W: Write>(b: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    b.append_data(&mut header(bytes.len() as u64), name, bytes)
}

fn dir_entry<W: Write>(b: &mut tar::Builder<W>, name: &str) -> io::Result<()> {
    let mut h = header(0);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Directory);
    b.append_data(&mut h, name, io::empty())
}

/// Open a tarball as a shareable source.
pub fn open(path: impl AsRef<Path>) -> Result<Arc<Tarball>> {
    Ok(Arc::new(Tarball::open(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{mutate, newlayer};

    #[tokio::test]
    async fn write_then_read_back() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("f"), "data").unwrap();
        let layer = newlayer::layer_from_dir(&root, Compression::Gzip).unwrap();
        let base = mutate::empty(&"linux/amd64".parse().unwrap()).unwrap();
        let img = mutate::append(&base, vec![layer.clone()]).unwrap();

        let path = d.path().join("img.tar");
        let tags = vec!["example.com/a/b:v1".to_string()];
        write_to(&img, Dest::Path(path.clone()), &tags)
            .await
            .unwrap();

        let t = Tarball::open(&path).unwrap();
        let m = t.manifest("example.com/a/b:v1").await.unwrap();
        assert_eq!(t.manifest("").await.unwrap().digest, m.digest);
        assert_eq!(
            t.manifest(m.digest.as_str()).await.unwrap().digest,
            m.digest
        );
        assert!(t.manifest("other:v1").await.unwrap_err().is_not_found());
        let src: Arc<dyn Source> = Arc::new(t);
        let back = crate::image::fetch_image(src, "example.com/a/b:v1", None)
            .await
            .unwrap();
        assert_eq!(back.config, img.config);
        let l = &back.layers().unwrap()[0];
        assert_eq!(l.digest, layer.digest);
        assert_eq!(l.diff_id.as_ref(), Some(&layer.diff_id));
        let bytes = crate::image::read_blob(back.source.as_ref(), &l.digest, 1 << 20)
            .await
            .unwrap();
        assert_eq!(bytes.len() as u64, layer.size);
        let r = back.source.blob_range(&l.digest, 1, 2).await.unwrap();
        assert_eq!(&r[..], &bytes[1..3]);
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = header(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_old_layout_with_symlinked_and_compressed_layers() {
        let a = tar_of(&[("a", b"A")]);
        let b_plain = tar_of(&[("b", b"B")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b_plain).unwrap();
        let b = gz.finish().unwrap();
        let (da, db) = (Digest::of(&a), Digest::of(&b_plain));
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [da, db, da] },
        }))
        .unwrap();
        let listing = serde_json::to_vec(&json!([{
            "Config": "cfg.json",
            "RepoTags": ["x/y:1"],
            "Layers": ["aaa/layer.tar", "bbb.tar.gz", "ccc/layer.tar"],
        }]))
        .unwrap();
        let mut tb = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("aaa/layer.tar", &a[..]),
            ("bbb.tar.gz", &b[..]),
            ("cfg.json", &config[..]),
            ("manifest.json", &listing[..]),
        ] {
            tb.append_data(&mut header(data.len() as u64), name, data)
                .unwrap();
        }
        let mut h = header(0);
        h.set_entry_type(tar::EntryType::Symlink);
        tb.append_link(&mut h, "ccc/layer.tar", "../aaa/layer.tar")
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("old.tar");
        std::fs::write(&path, tb.into_inner().unwrap()).unwrap();

        let t = Tarball::open(&path).unwrap();
        let again = Tarball::open(&path).unwrap();
        assert_eq!(
            t.images()[0].manifest.digest,
            again.images()[0].manifest.digest
        );
        let src: Arc<dyn Source> = Arc::new(t);
        let img = crate::image::fetch_image(src, "docker.io/x/y:1", None)
            .await
            .unwrap();
        let layers = img.layers().unwrap();
        let digests: Vec<_> = layers.iter().map(|l| l.digest.clone()).collect();
        assert_eq!(digests, [da.clone(), Digest::of(&b), da]);
        assert_eq!(layers[0].media_type(), media::DOCKER_LAYER);
        assert_eq!(layers[1].media_type(), media::DOCKER_LAYER_GZIP);
        for l in &layers {
            let got = crate::image::read_blob(img.source.as_ref(), &l.digest, 1 << 20)
                .await
                .unwrap();
            assert_eq!(got.len() as u64, l.size());
        }

        // Two images in one tarball, the shared layers stored once.
        let two = d.path().join("two.tar");
        let images = [
            (img.clone(), vec!["x/y:1".into()]),
            (img.clone(), vec!["x/z:2".into()]),
        ];
        write_all_to(&images, Dest::Path(two.clone()))
            .await
            .unwrap();
        let t2 = Tarball::open(&two).unwrap();
        assert_eq!(t2.images().len(), 2);
        assert_eq!(t2.find("x/z:2").unwrap().manifest.digest, img.raw.digest);
        assert!(t2.find("").is_err(), "ambiguous");
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(File::open(&two).unwrap());
        for e in ar.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().to_string_lossy().into_owned());
        }
        let blobs = names
            .iter()
            .filter(|n| n.starts_with("blobs/sha256/") && n.len() > 13);
        assert_eq!(
            blobs.count(),
            4,
            "config, 2 distinct layers, manifest: {names:?}"
        );
    }

    #[test]
    fn digests_from_names() {
        let hex = "a".repeat(64);
        let want = Some(Digest::parse(&format!("sha256:{hex}")).unwrap());
        assert_eq!(digest_from_name(&format!("blobs/sha256/{hex}")), want);
        assert_eq!(digest_from_name(&format!("{hex}.tar.gz")), want);
        assert_eq!(digest_from_name("abc/layer.tar"), None);
        assert_eq!(digest_from_name("blobs/sha256/xyz"), None);
    }
}
