//! Layers as the merge sees them: a list of entries and a way to read a
//! regular file's bytes.
//!
//! eStargz and zstd:chunked layers are read lazily (see `lazy`). A plain
//! layer (tar, tar+gzip, tar+zstd) is fetched once, streaming: one pass
//! hashes the blob, records the sha256 of every 1 MiB block of it, builds
//! the tar index with gzip checkpoints / zstd frame starts
//! (`ggfs::tarindex`) and writes the uncompressed tar. Nothing is served
//! and nothing enters the cache until the blob's digest checked out: then
//! the tar and the index (with the block digests) are published. Reads come
//! from the local tar; once the tar has been evicted, they fetch only the
//! compressed blocks they need by Range, check each against its recorded
//! digest, and inflate from the nearest checkpoint.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use ggfs::digest::Hasher;
use ggfs::image::{Layer, Source};
use ggfs::manifest::Compression;
use ggfs::tarindex::{self, LayerIndex, TarEntry, TarKind};
use ggfs::{Digest, Error, Result};
use tokio::sync::OnceCell;

use crate::cache::{self, Cache};
use crate::lazy::SingleFlight;
use crate::tree::{self, Entry, Kind, Meta};

/// Granularity of verified Range reads of plain layers.
const BLOCK: u64 = 1 << 20;
const INDEX_MAGIC: &[u8; 8] = b"GGFSMNT1";

/// A layer opened for reading.
#[async_trait]
pub trait LayerData: Send + Sync {
    fn digest(&self) -> &Digest;
    /// Entries in the layer's order.
    fn entries(&self) -> &[Entry];
    /// Up to `len` bytes of entry `entry`'s contents at `offset`.
    async fn read(&self, entry: usize, offset: u64, len: u32) -> Result<Bytes>;
}

/// What the first pass over a plain layer leaves in the cache (besides the
/// tar): the tar index and the digests of the blob's 1 MiB blocks.
struct Indexed {
    index: LayerIndex,
    blocks: Vec<Digest>,
}

impl Indexed {
    fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = INDEX_MAGIC.to_vec();
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for b in &self.blocks {
            let raw =
                hex::decode(b.hex()).map_err(|e| Error::invalid("block digest", e.to_string()))?;
            out.extend_from_slice(&raw);
        }
        out.extend_from_slice(&self.index.to_bytes()?);
        Ok(out)
    }

    fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = || Error::invalid("cached layer index", "truncated or not ours");
        let rest = b.strip_prefix(&INDEX_MAGIC[..]).ok_or_else(bad)?;
        let n = u64::from_le_bytes(
            rest.get(..8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        let n = usize::try_from(n).map_err(|_| bad())?;
        let digests = rest
            .get(8..8 + n.checked_mul(32).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let blocks = digests
            .chunks(32)
            .map(|c| Digest::parse(&format!("sha256:{}", hex::encode(c))))
            .collect::<Result<Vec<_>>>()?;
        let index = LayerIndex::from_bytes(&rest[8 + n * 32..])?;
        Ok(Indexed { index, blocks })
    }

    fn entries(&self) -> (Vec<Entry>, Vec<usize>) {
        let mut entries = Vec::new();
        let mut which = Vec::new();
        for (i, t) in self.index.entries.iter().enumerate() {
            if let Some(e) = convert(t) {
                entries.push(e);
                which.push(i);
            }
        }
        (entries, which)
    }
}

/// A plain layer: reads from the cached tar when it is there, else by
/// verified Range reads of the blob.
pub struct PlainLayer {
    digest: Digest,
    indexed: Arc<Indexed>,
    entries: Vec<Entry>,
    /// Index into `indexed.index.entries` of each of `entries`.
    which: Vec<usize>,
    tar: Mutex<Option<Arc<std::fs::File>>>,
    source: Arc<dyn Source>,
    cache: Arc<Cache>,
    kind: cache::Kind,
    /// Size of the blob (the last block may be short).
    size: u64,
    flights: SingleFlight<u64, Bytes>,
}

#[async_trait]
impl LayerData for PlainLayer {
    fn digest(&self) -> &Digest {
        &self.digest
    }

    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    async fn read(&self, entry: usize, offset: u64, len: u32) -> Result<Bytes> {
        let t = self
            .which
            .get(entry)
            .and_then(|&i| self.indexed.index.entries.get(i))
            .ok_or_else(|| Error::NotFound(format!("entry {entry} of layer {}", self.digest)))?;
        if offset >= t.size {
            return Ok(Bytes::new());
        }
        let n = (len as u64).min(t.size - offset) as usize;
        let at = t.offset + offset;
        if let Some(file) = self.local_tar() {
            let digest = self.digest.clone();
            return blocking(move || {
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, at)
                    .map_err(|e| Error::io(format!("cached tar of layer {digest}"), e))?;
                Ok(Bytes::from(buf))
            })
            .await;
        }
        self.read_remote(at, n).await
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("worker task", io::Error::other(e)))?
}

impl PlainLayer {
    /// The cached tar, if it is (still) there.
    fn local_tar(&self) -> Option<Arc<std::fs::File>> {
        use std::os::unix::fs::MetadataExt;
        let mut tar = self.tar.lock().unwrap_or_else(|p| p.into_inner());
        // Evicted from the cache: let go, so its space is really freed.
        if tar
            .as_ref()
            .is_some_and(|f| f.metadata().map_or(true, |m| m.nlink() == 0))
        {
            *tar = None;
        }
        if tar.is_none() {
            let path = self.cache.get(self.kind, &self.digest)?;
            *tar = std::fs::File::open(path).ok().map(Arc::new);
        }
        tar.clone()
    }

    /// `n` uncompressed bytes at `at`, from verified blocks of the blob.
    async fn read_remote(&self, at: u64, n: usize) -> Result<Bytes> {
        let Some((coff, clen)) = self.indexed.index.fetch_range(at, n)? else {
            return Ok(Bytes::new());
        };
        let first = coff / BLOCK;
        let last = (coff + clen).div_ceil(BLOCK);
        let blocks = futures::future::try_join_all((first..last).map(|b| self.block(b))).await?;
        let mut span = BytesMut::new();
        blocks.iter().for_each(|b| span.extend_from_slice(b));
        let span = span.freeze();
        let base = first * BLOCK;
        let indexed = self.indexed.clone();
        let digest = self.digest.clone();
        blocking(move || {
            indexed.index.read_at(at, n, |o, l| {
                let (s, e) = (
                    o.wrapping_sub(base) as usize,
                    (o + l).wrapping_sub(base) as usize,
                );
                if o < base || e > span.len() {
                    return Err(Error::invalid(
                        format!("layer {digest}"),
                        format!("index asked for bytes {o}+{l} outside the fetched span"),
                    ));
                }
                Ok(span.slice(s..e))
            })
        })
        .await
    }

    /// Block `b` of the blob, verified against the digest the first pass
    /// recorded: from the chunk cache or fetched once by Range.
    async fn block(&self, b: u64) -> Result<Bytes> {
        let want = self
            .indexed
            .blocks
            .get(b as usize)
            .ok_or_else(|| Error::invalid(format!("layer {}", self.digest), "block past the end"))?
            .clone();
        if let Some(path) = self.cache.get(cache::Kind::Chunk, &want) {
            if let Ok(bytes) = tokio::fs::read(&path).await {
                return Ok(Bytes::from(bytes));
            }
        }
        let len = BLOCK.min(self.size.saturating_sub(b * BLOCK));
        self.flights
            .run(b, || async {
                let bytes = self.source.blob_range(&self.digest, b * BLOCK, len).await?;
                let actual = Digest::of(&bytes);
                if actual != want {
                    let e = Error::ContentMismatch {
                        what: format!("bytes {}+{len} of blob {}", b * BLOCK, self.digest),
                        expected: want.clone(),
                        actual,
                    };
                    tracing::error!("{e}");
                    return Err(e);
                }
                store(&self.cache, cache::Kind::Chunk, &want, &bytes);
                Ok(bytes)
            })
            .await
            .map_err(|e| Error::invalid(format!("layer {}", self.digest), e.to_string()))
    }
}

/// Keep verified bytes in the cache under their digest (best effort).
pub fn store(cache: &Cache, kind: cache::Kind, d: &Digest, bytes: &[u8]) {
    let path = cache.path(kind, d);
    if path.exists() {
        return;
    }
    let res = ggfs::digest::BlobWriter::create(&path, d.clone(), Some(bytes.len() as u64))
        .and_then(|mut w| {
            w.write_all(bytes).map_err(|e| Error::io("cache", e))?;
            w.commit()
        });
    match res {
        Ok(_) => cache.added(bytes.len() as u64),
        Err(e) => tracing::warn!("caching {d}: {e}"),
    }
}

type OpenCell = Arc<OnceCell<Arc<dyn LayerData>>>;

/// Opens layers once per process (concurrent openers share the work).
pub struct Layers {
    cache: Arc<Cache>,
    /// When lazily read layers are fetched whole in the background.
    when: crate::fetch::When,
    open: Mutex<HashMap<Digest, OpenCell>>,
}

impl Layers {
    pub fn new(cache: Arc<Cache>, when: crate::fetch::When) -> Self {
        Layers {
            cache,
            when,
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
        match crate::lazy::open(layer, self.cache.clone(), self.when).await {
            Ok(Some(l)) => return Ok(l),
            Ok(None) => {}
            // The whole-blob path below verifies everything it serves.
            Err(e) => tracing::warn!(
                "layer {}: lazy open failed, fetching it whole: {e}",
                layer.digest
            ),
        }
        let compression = layer.compression()?;
        // An uncompressed layer's tar is the blob itself.
        let kind = match compression {
            Compression::None => cache::Kind::Blob,
            _ => cache::Kind::Tar,
        };
        let digest = layer.digest.clone();
        let indexed = match self.cached_index(&digest) {
            Some(i) => i,
            None => self
                .first_pass(layer, compression, kind)
                .await
                .inspect_err(|e| {
                    tracing::error!("layer {digest}: {e}");
                })?,
        };
        let (entries, which) = indexed.entries();
        Ok(Arc::new(PlainLayer {
            digest,
            indexed: Arc::new(indexed),
            entries,
            which,
            tar: Mutex::new(None),
            source: layer.source.clone(),
            cache: self.cache.clone(),
            kind,
            size: layer.size(),
            flights: SingleFlight::default(),
        }))
    }

    fn cached_index(&self, digest: &Digest) -> Option<Indexed> {
        let path = self.cache.get(cache::Kind::Index, digest)?;
        let read = std::fs::read(&path).map_err(|e| Error::io(path.display().to_string(), e));
        match read.and_then(|b| Indexed::from_bytes(&b)) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!("ignoring cached index of layer {digest}: {e}");
                None
            }
        }
    }

    async fn first_pass(
        &self,
        layer: &Layer,
        compression: Compression,
        kind: cache::Kind,
    ) -> Result<Indexed> {
        let stream = layer.source.blob(&layer.digest).await?;
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
            stream.map_err(|e: io::Error| e),
        ));
        let cache = self.cache.clone();
        let (digest, size) = (layer.digest.clone(), layer.size());
        blocking(move || first_pass(Box::new(reader), &cache, kind, compression, digest, size))
            .await
    }
}

/// Stream a plain layer once: hash it (whole and per block), index it and
/// write its tar; publish tar and index only if the digest matches.
fn first_pass(
    body: Box<dyn Read + Send>,
    cache: &Cache,
    kind: cache::Kind,
    compression: Compression,
    digest: Digest,
    size: u64,
) -> Result<Indexed> {
    let dest = cache.path(kind, &digest);
    let dir = dest.parent().unwrap_or(cache.root());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir.display().to_string(), e))?;
    let mut hashed = Tee {
        inner: body,
        out: BlockHasher::default(),
    };
    let what = format!("layer {digest}");
    // A tar bigger than half the cache is not kept: reads go by Range.
    let mut tar_out = Capped {
        inner: io::BufWriter::new(tmp.as_file()),
        left: cache.limit() / 2,
        over: false,
    };
    let index = tarindex::index_layer_tee(&mut hashed, compression, &mut tar_out, |_| {})?;
    tar_out
        .inner
        .flush()
        .map_err(|e| Error::io(dest.display().to_string(), e))?;
    let keep_tar = !tar_out.over;
    drop(tar_out);
    // Whatever follows the compressed stream is part of the blob too.
    io::copy(&mut hashed, &mut io::sink()).map_err(|e| ggfs::error::from_io(&what, e))?;
    let blocks = hashed.out.finish(&digest, size)?;
    let indexed = Indexed { index, blocks };
    let bytes = indexed.to_bytes()?;
    if keep_tar {
        let file = tmp
            .persist(&dest)
            .map_err(|e| Error::io(dest.display().to_string(), e.error))?;
        cache.added(file.metadata().map(|m| m.len()).unwrap_or(0));
    } else {
        tracing::info!("{what}: its tar is over half the cache, reads will use ranges");
    }
    let ipath = cache.path(cache::Kind::Index, &digest);
    write_atomic(&ipath, &bytes)?;
    cache.added(bytes.len() as u64);
    Ok(indexed)
}

pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir.display().to_string(), e))?;
    tmp.write_all(bytes)
        .map_err(|e| Error::io(path.display().to_string(), e))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path.display().to_string(), e.error))?;
    Ok(())
}

/// A tar index entry as a tree entry; `None` for what is not served.
fn convert(t: &TarEntry) -> Option<Entry> {
    let path = tree::normalize(&t.path)?;
    let mut hardlink = None;
    let kind = match &t.kind {
        TarKind::File => Kind::File,
        TarKind::Dir => Kind::Dir,
        TarKind::Symlink => Kind::Symlink,
        TarKind::Hardlink => {
            hardlink = Some(tree::normalize(t.link_name.as_deref().unwrap_or_default())?);
            Kind::File
        }
        TarKind::Char => Kind::Char,
        TarKind::Block => Kind::Block,
        TarKind::Fifo => Kind::Fifo,
        TarKind::Unsupported(why) => {
            tracing::warn!("skipping {}: {why}", t.path_lossy());
            return None;
        }
    };
    let link = match kind {
        Kind::Symlink => t.link_name.clone().unwrap_or_default(),
        _ => Vec::new(),
    };
    let size = match (&kind, &hardlink) {
        (Kind::File, None) => t.size,
        (Kind::Symlink, _) => link.len() as u64,
        _ => 0,
    };
    let rdev = match kind {
        Kind::Char | Kind::Block => libc::makedev(t.dev_major, t.dev_minor) as u32,
        _ => 0,
    };
    Some(Entry {
        path,
        hardlink,
        meta: Meta {
            kind,
            mode: t.mode & 0o7777,
            uid: t.uid as u32,
            gid: t.gid as u32,
            mtime: t.mtime,
            mtime_nsec: t.mtime_nsec,
            size,
            link,
            rdev,
            xattrs: t
                .xattrs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
                .collect(),
        },
    })
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

/// Writes until `left` bytes are used up, then discards (and says so).
struct Capped<W> {
    inner: W,
    left: u64,
    over: bool,
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.over && buf.len() as u64 <= self.left {
            self.inner.write_all(buf)?;
            self.left -= buf.len() as u64;
        } else {
            self.over = true;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes a stream whole and per [`BLOCK`].
#[derive(Default)]
struct BlockHasher {
    whole: Hasher,
    block: Hasher,
    blocks: Vec<Digest>,
}

impl Write for BlockHasher {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            let room = (BLOCK - self.block.len()) as usize;
            let take = room.min(buf.len());
            self.whole.update(&buf[..take]);
            self.block.update(&buf[..take]);
            buf = &buf[take..];
            if self.block.len() == BLOCK {
                let full = std::mem::take(&mut self.block);
                self.blocks.push(full.finish());
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlockHasher {
    /// Check the whole blob; the block digests are only returned if it matches.
    fn finish(mut self, digest: &Digest, size: u64) -> Result<Vec<Digest>> {
        if !self.block.is_empty() {
            let last = std::mem::take(&mut self.block);
            self.blocks.push(last.finish());
        }
        self.whole.verify(digest, Some(size))?;
        Ok(self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pass_indexes_verifies_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 30).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o640);
        b.append_data(&mut h, "dir/file", &b"hello"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let blob = gz.finish().unwrap();
        let d = Digest::of(&blob);
        let run = |digest: Digest| {
            first_pass(
                Box::new(std::io::Cursor::new(blob.clone())),
                &cache,
                cache::Kind::Tar,
                Compression::Gzip,
                digest,
                blob.len() as u64,
            )
        };
        // Wrong digest: an error and nothing cached.
        assert!(run(Digest::of(b"other")).is_err());
        assert!(cache
            .path(cache::Kind::Tar, &Digest::of(b"other"))
            .metadata()
            .is_err());
        let indexed = run(d.clone()).unwrap();
        let (entries, _) = indexed.entries();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, b"dir/file");
        assert_eq!(entries[0].meta.mode, 0o640);
        assert_eq!(
            std::fs::read(cache.path(cache::Kind::Tar, &d)).unwrap(),
            tar
        );
        let saved = std::fs::read(cache.path(cache::Kind::Index, &d)).unwrap();
        let back = Indexed::from_bytes(&saved).unwrap();
        assert_eq!(back.blocks, indexed.blocks);
        assert_eq!(back.index, indexed.index);
        assert!(Indexed::from_bytes(&saved[..20]).is_err());
    }

    #[test]
    fn block_digests() {
        let data: Vec<u8> = (0..(BLOCK as usize * 2 + 10)).map(|i| i as u8).collect();
        let mut h = BlockHasher::default();
        for piece in data.chunks(333_333) {
            h.write_all(piece).unwrap();
        }
        let blocks = h.finish(&Digest::of(&data), data.len() as u64).unwrap();
        assert_eq!(blocks.len(), 3);
        assert_eq!(
            blocks[1],
            Digest::of(&data[BLOCK as usize..2 * BLOCK as usize])
        );
        assert_eq!(blocks[2], Digest::of(&data[2 * BLOCK as usize..]));
        let mut h = BlockHasher::default();
        h.write_all(&data).unwrap();
        assert!(h.finish(&Digest::of(b"other"), data.len() as u64).is_err());
    }
}
