//! Layers as the merge sees them: a list of entries and a way to read a
//! regular file's bytes. A plain layer (tar, tar+gzip, tar+zstd) is fetched
//! in one streaming pass that hashes the compressed bytes, writes the
//! uncompressed tar to the cache and indexes its entries; the tar only
//! becomes visible in the cache once the blob's digest checked out, so every
//! byte served from it is verified. Later mounts re-index the cached tar
//! without touching the network.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use ggfs::digest::Hasher;
use ggfs::image::Layer;
use ggfs::manifest::Compression;
use ggfs::{Digest, Error, Result};
use tokio::sync::OnceCell;

use crate::cache::{self, Cache};
use crate::tree::{self, Entry, Kind, Meta};

/// A layer opened for reading.
#[async_trait]
pub trait LayerData: Send + Sync {
    fn digest(&self) -> &Digest;
    /// Entries in the layer's order.
    fn entries(&self) -> &[Entry];
    /// Up to `len` bytes of entry `entry`'s contents at `offset`.
    async fn read(&self, entry: usize, offset: u64, len: u32) -> Result<Bytes>;
}

/// A layer whose uncompressed tar sits, verified, in the cache.
pub struct TarLayer {
    digest: Digest,
    file: Arc<std::fs::File>,
    entries: Vec<Entry>,
    offsets: Vec<u64>,
}

#[async_trait]
impl LayerData for TarLayer {
    fn digest(&self) -> &Digest {
        &self.digest
    }

    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    async fn read(&self, entry: usize, offset: u64, len: u32) -> Result<Bytes> {
        let (Some(e), Some(&start)) = (self.entries.get(entry), self.offsets.get(entry)) else {
            return Err(Error::NotFound(format!(
                "entry {entry} of layer {}",
                self.digest
            )));
        };
        let size = e.meta.size;
        if offset >= size {
            return Ok(Bytes::new());
        }
        let n = (len as u64).min(size - offset) as usize;
        let file = self.file.clone();
        let digest = self.digest.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, start + offset)
                .map_err(|e| Error::io(format!("cached tar of layer {digest}"), e))?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| Error::io("read task", io::Error::other(e)))?
    }
}

/// Opens layers once per process (concurrent openers share the work).
pub struct Layers {
    cache: Arc<Cache>,
    open: Mutex<HashMap<Digest, Arc<OnceCell<Arc<dyn LayerData>>>>>,
}

impl Layers {
    pub fn new(cache: Arc<Cache>) -> Self {
        Layers {
            cache,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub async fn open(&self, layer: &Layer) -> Result<Arc<dyn LayerData>> {
        let cell = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.entry(layer.digest.clone()).or_default().clone()
        };
        cell.get_or_try_init(|| self.open_uncached(layer))
            .await
            .cloned()
    }

    async fn open_uncached(&self, layer: &Layer) -> Result<Arc<dyn LayerData>> {
        match crate::lazy::open(layer, self.cache.clone()).await {
            Ok(Some(l)) => return Ok(l),
            Ok(None) => {}
            // The whole-blob path below verifies everything it serves.
            Err(e) => tracing::warn!(
                "layer {}: lazy open failed, fetching it whole: {e}",
                layer.digest
            ),
        }
        let compression = layer.compression()?;
        let kind = match compression {
            Compression::None => cache::Kind::Blob,
            _ => cache::Kind::Tar,
        };
        let digest = layer.digest.clone();
        if let Some(path) = self.cache.get(kind, &digest) {
            let d = digest.clone();
            let opened = tokio::task::spawn_blocking(move || index_file(&path, d)).await;
            match opened.map_err(|e| Error::io("index task", io::Error::other(e)))? {
                Ok(l) => return Ok(Arc::new(l)),
                Err(e) => tracing::warn!("cached tar of {digest} unreadable, refetching: {e}"),
            }
        }
        let stream = layer.source.blob(&digest).await?;
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
            stream.map_err(|e: io::Error| e),
        ));
        let cache = self.cache.clone();
        let size = layer.size();
        let fetched = tokio::task::spawn_blocking(move || {
            fetch_blocking(Box::new(reader), &cache, kind, compression, digest, size)
        })
        .await
        .map_err(|e| Error::io("fetch task", io::Error::other(e)))?;
        match fetched {
            Ok(l) => Ok(Arc::new(l)),
            Err(e) => {
                tracing::error!("layer {}: {e}", layer.digest);
                Err(e)
            }
        }
    }
}

/// Stream a layer blob once: hash it, decompress it into a temporary tar
/// file, index it, and publish the tar only if the digest matches.
fn fetch_blocking(
    body: Box<dyn Read + Send>,
    cache: &Cache,
    kind: cache::Kind,
    compression: Compression,
    digest: Digest,
    size: u64,
) -> Result<TarLayer> {
    let dest = cache.path(kind, &digest);
    let dir = dest.parent().unwrap_or(cache.root());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir.display().to_string(), e))?;
    let mut hashed = Tee {
        inner: body,
        out: HashWriter(Hasher::new()),
    };
    let what = format!("layer {digest}");
    let indexed = {
        let tar_out = io::BufWriter::new(tmp.as_file());
        let mut decoded = decoder(compression, &mut hashed, &what)?;
        let mut teed = Tee {
            inner: &mut decoded,
            out: tar_out,
        };
        let indexed = index_stream(&mut teed, &what)?;
        // Past the tar's end blocks: keep reading so the whole stream is
        // hashed and written.
        io::copy(&mut teed, &mut io::sink()).map_err(|e| ggfs::error::from_io(&what, e))?;
        teed.out
            .flush()
            .map_err(|e| Error::io(dest.display().to_string(), e))?;
        indexed
    };
    io::copy(&mut hashed, &mut io::sink()).map_err(|e| ggfs::error::from_io(&what, e))?;
    hashed.out.0.verify(&digest, Some(size))?;
    let file = tmp
        .persist(&dest)
        .map_err(|e| Error::io(dest.display().to_string(), e.error))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    cache.added(len);
    let (entries, offsets) = indexed.into_iter().unzip();
    Ok(TarLayer {
        digest,
        file: Arc::new(file),
        entries,
        offsets,
    })
}

/// Index a cached, already verified tar.
fn index_file(path: &Path, digest: Digest) -> Result<TarLayer> {
    let what = format!("cached tar of layer {digest}");
    let file = std::fs::File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let mut archive = tar::Archive::new(&file);
    let mut indexed = Vec::new();
    let entries = archive
        .entries_with_seek()
        .map_err(|e| ggfs::error::from_io(&what, e))?;
    for ent in entries {
        let mut ent = ent.map_err(|e| ggfs::error::from_io(&what, e))?;
        if let Some(x) = convert(&mut ent, &what)? {
            indexed.push(x);
        }
    }
    let (entries, offsets) = indexed.into_iter().unzip();
    Ok(TarLayer {
        digest,
        file: Arc::new(file),
        entries,
        offsets,
    })
}

fn index_stream(r: &mut dyn Read, what: &str) -> Result<Vec<(Entry, u64)>> {
    let mut archive = tar::Archive::new(r);
    let mut out = Vec::new();
    for ent in archive
        .entries()
        .map_err(|e| ggfs::error::from_io(what, e))?
    {
        let mut ent = ent.map_err(|e| ggfs::error::from_io(what, e))?;
        if let Some(x) = convert(&mut ent, what)? {
            out.push(x);
        }
    }
    Ok(out)
}

/// A tar entry as a tree entry plus its data offset; `None` for entries
/// that are not files (pax global headers, unknown types).
fn convert<R: Read>(ent: &mut tar::Entry<R>, what: &str) -> Result<Option<(Entry, u64)>> {
    let bad = |e: io::Error| Error::invalid(what.to_string(), e.to_string());
    let raw_path = ent.path_bytes().into_owned();
    let Some(path) = tree::normalize(&raw_path) else {
        tracing::warn!(
            "{what}: skipping {:?}: escapes the root",
            String::from_utf8_lossy(&raw_path)
        );
        return Ok(None);
    };
    let h = ent.header();
    let et = h.entry_type();
    let mut hardlink = None;
    let kind = match et {
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Char => Kind::Char,
        tar::EntryType::Block => Kind::Block,
        tar::EntryType::Fifo => Kind::Fifo,
        tar::EntryType::Link => {
            let target = ent
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default();
            hardlink = tree::normalize(&target);
            Kind::File
        }
        _ => return Ok(None),
    };
    let link = match kind {
        Kind::Symlink => ent
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let rdev = match kind {
        Kind::Char | Kind::Block => {
            let major = h.device_major().map_err(bad)?.unwrap_or(0);
            let minor = h.device_minor().map_err(bad)?.unwrap_or(0);
            libc::makedev(major, minor) as u32
        }
        _ => 0,
    };
    let mut meta = Meta {
        kind,
        mode: h.mode().map_err(bad)? & 0o7777,
        uid: h.uid().map_err(bad)? as u32,
        gid: h.gid().map_err(bad)? as u32,
        mtime: h.mtime().map_err(bad)? as i64,
        mtime_nsec: 0,
        size: if hardlink.is_some() { 0 } else { ent.size() },
        link,
        rdev,
        xattrs: Vec::new(),
    };
    let offset = ent.raw_file_position();
    apply_pax(ent, &mut meta).map_err(bad)?;
    if meta.kind != Kind::File {
        meta.size = match meta.kind {
            Kind::Symlink => meta.link.len() as u64,
            _ => 0,
        };
    }
    let entry = Entry {
        path,
        hardlink,
        meta,
    };
    Ok(Some((entry, offset)))
}

/// PAX records the header cannot carry: sub-second mtimes and xattrs.
fn apply_pax<R: Read>(ent: &mut tar::Entry<R>, meta: &mut Meta) -> io::Result<()> {
    let Some(exts) = ent.pax_extensions()? else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext?;
        let key = ext.key_bytes();
        if key == b"mtime" {
            if let Some((s, ns)) = parse_pax_time(ext.value_bytes()) {
                meta.mtime = s;
                meta.mtime_nsec = ns;
            }
        } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            meta.xattrs
                .push((name.to_vec(), ext.value_bytes().to_vec()));
        }
    }
    Ok(())
}

/// `seconds[.fraction]`, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ns: u32 = format!("{digits:0<9}").parse().ok()?;
    if secs < 0 && ns > 0 {
        return Some((secs - 1, 1_000_000_000 - ns));
    }
    Some((secs, ns))
}

/// Copies everything read from `inner` into `out`.
struct Tee<R, W> {
    inner: R,
    out: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

struct HashWriter(Hasher);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A decompressing reader over `r`. Gzip layers may hold several members
/// (eStargz does), hence the multi-member decoder.
fn decoder<'a>(c: Compression, r: &'a mut dyn Read, what: &str) -> Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(r).map_err(|e| Error::io(what.to_string(), e))?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1700000000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
