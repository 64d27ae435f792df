//! Layers as the merge sees them: a list of entries and a way to read a
//! regular file's bytes.
//!
//! eStargz and zstd:chunked layers are read lazily (see `lazy`). A plain
//! layer (tar, tar+gzip, tar+zstd) needs its index (`ggfs::formats::layerindex`: the
//! tar index with gzip checkpoints / zstd frame starts, and the sha256 of
//! every 1 MiB block of the blob). It comes from the cache, else from an
//! index artifact among the image's referrers, else from a first pass
//! that streams the blob once, hashing it, indexing it and writing the
//! uncompressed tar: nothing from that pass is served or cached until the
//! blob's digest checked out. Reads come from the local tar; without one
//! (evicted, too big, or the index came from an artifact) they fetch only
//! the compressed blocks they need by Range, check each against its
//! recorded digest, and inflate from the nearest checkpoint.
//!
//! An index from an artifact is taken on trust for where files sit; once
//! every block of the blob has been read, the blob is hashed whole and the
//! index audited against one built from it (`Audit`); a layer that fails
//! answers EIO from then on.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use ggfs::formats::layerindex::{self, LayerIndexFile, MAX_READ};
use ggfs::formats::tarindex::{TarEntry, TarKind};
use ggfs::image::manifest::{self, Compression, Descriptor, ImageIndex};
use ggfs::image::{Layer, Source};
use ggfs::{Digest, Error, RawManifest, Result};
use tokio::sync::OnceCell;

use crate::lower::cache::{self, Cache};
use crate::lower::lazy::SingleFlight;
use crate::lower::tree::{self, Entry, Kind, Meta};
use crate::namespace::{Memo, Namespace};

/// Cached index files: this magic, then 1 if this machine built the index
/// from the verified blob (0: from an artifact, not yet audited), then the
/// `LayerIndexFile` bytes. (GGFSMNT1, before index artifacts, is read as
/// missing: the layer streams once more.)
const CACHE_MAGIC: &[u8; 8] = b"GGFSMNT2";

/// A layer opened for reading.
#[async_trait]
pub trait LayerData: Send + Sync {
    fn digest(&self) -> &Digest;
    /// Entries in the layer's order, made again on each call where the
    /// layer does not keep them (only building the tree needs them).
    fn entries(&self) -> Box<dyn Iterator<Item = Entry> + '_>;
    /// Up to `len` bytes of entry `entry`'s contents at `offset`.
    async fn read(&self, entry: usize, offset: u64, len: u32) -> Result<Bytes>;
    /// Write entry `entry`'s contents to `out` (at 0) from the cache alone,
    /// never fetching: `Ok(false)` when some of them are not there. On a
    /// blocking thread; for FUSE passthrough.
    fn local_copy(&self, _entry: usize, _out: &std::fs::File) -> Result<bool> {
        Ok(false)
    }
    /// `len` bytes of the blob itself at `at`, each checked before it is
    /// served, when the layer knows how (`None`: it does not).
    async fn blob_range(&self, _at: u64, _len: u64) -> Result<Option<Bytes>> {
        Ok(None)
    }
}

/// The image a layer is opened for: where its index artifact may be found
/// among the referrers, and what a pushed one refers to.
pub struct Origin<'a> {
    pub ns: &'a Namespace,
    pub repo: &'a str,
    pub image: &'a RawManifest,
}

fn cache_bytes(f: &LayerIndexFile, verified: bool) -> Result<Vec<u8>> {
    let mut out = CACHE_MAGIC.to_vec();
    out.push(u8::from(verified));
    out.extend_from_slice(&f.to_bytes()?);
    Ok(out)
}

/// A cached index of `layer`, and whether it was verified here.
fn from_cache(b: &[u8], layer: &Layer, c: Compression) -> Result<(LayerIndexFile, bool)> {
    let bad = || Error::invalid("cached layer index", "not ours (an older format?)");
    let rest = b.strip_prefix(&CACHE_MAGIC[..]).ok_or_else(bad)?;
    let (&verified, rest) = rest.split_first().ok_or_else(bad)?;
    let f = LayerIndexFile::from_bytes(rest, &layer.digest, layer.size(), c)?;
    Ok((f, verified == 1))
}

/// The index entries the tree shows (each converted, then dropped).
fn which_of(f: &LayerIndexFile) -> Vec<usize> {
    let entries = f.index.entries.iter().enumerate();
    entries
        .filter(|(_, t)| convert(t).is_some())
        .map(|(i, _)| i)
        .collect()
}

/// Entries the tree shows, and the index entry each one is.
#[cfg(test)]
fn entries_of(f: &LayerIndexFile) -> (Vec<Entry>, Vec<usize>) {
    let mut entries = Vec::new();
    let mut which = Vec::new();
    for (i, t) in f.index.entries.iter().enumerate() {
        if let Some(e) = convert(t) {
            entries.push(e);
            which.push(i);
        }
    }
    (entries, which)
}

/// A plain layer: reads from the cached tar when it is there, else by
/// verified Range reads of the blob.
pub struct PlainLayer {
    digest: Digest,
    file: Arc<LayerIndexFile>,
    /// Index into `file.index.entries` of each entry the tree shows. The
    /// entries themselves are not kept but made from the index as the tree
    /// is built: a copy of every entry took a third of the memory of a
    /// layer of a million files.
    which: Vec<usize>,
    tar: Mutex<Option<Arc<std::fs::File>>>,
    blocks: Arc<Blocks>,
    kind: cache::Kind,
    /// Set for an index taken from an artifact, until it is audited.
    audit: Option<Arc<Audit>>,
}

#[async_trait]
impl LayerData for PlainLayer {
    fn digest(&self) -> &Digest {
        &self.digest
    }

    fn entries(&self) -> Box<dyn Iterator<Item = Entry> + '_> {
        // Each of `which` converted when the layer was opened, so it does
        // again, the same (and without logging: that was for the others).
        let index = &self.file.index.entries;
        Box::new(self.which.iter().filter_map(|&i| convert(&index[i])))
    }

    async fn read(&self, entry: usize, offset: u64, len: u32) -> Result<Bytes> {
        if let Some(why) = self.audit.as_ref().and_then(|a| a.bad.get()) {
            return Err(Error::invalid(
                format!("layer {}", self.digest),
                why.clone(),
            ));
        }
        let t = self
            .which
            .get(entry)
            .and_then(|&i| self.file.index.entries.get(i))
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

    /// From the blob's verified blocks (and the block cache).
    async fn blob_range(&self, at: u64, len: u64) -> Result<Option<Bytes>> {
        let bs = self.file.block_size;
        let end = (at + len).min(self.file.size);
        if at >= end {
            return Ok(Some(Bytes::new()));
        }
        let (first, last) = (at / bs, end.div_ceil(bs));
        let blocks = futures::future::try_join_all((first..last).map(|b| self.blocks.get(b)));
        let mut span = BytesMut::new();
        blocks.await?.iter().for_each(|b| span.extend_from_slice(b));
        slice_span(&span.freeze(), first * bs, at, end - at, &self.digest).map(Some)
    }

    fn local_copy(&self, entry: usize, out: &std::fs::File) -> Result<bool> {
        let t = self
            .which
            .get(entry)
            .and_then(|&i| self.file.index.entries.get(i));
        let (Some(t), Some(tar)) = (t, self.local_tar()) else {
            return Ok(false);
        };
        crate::lower::passthrough::copy_range(&tar, t.offset, out, 0, t.size)
            .map_err(|e| Error::io(format!("cached tar of layer {}", self.digest), e))?;
        Ok(true)
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
            let path = self.blocks.cache.get(self.kind, &self.digest)?;
            *tar = std::fs::File::open(path).ok().map(Arc::new);
        }
        tar.clone()
    }

    /// `n` uncompressed bytes at `at`, from verified blocks of the blob, in
    /// pieces no longer than an audit covers.
    async fn read_remote(&self, at: u64, n: usize) -> Result<Bytes> {
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let len = (n - out.len()).min(MAX_READ as usize);
            let piece = self.read_piece(at + out.len() as u64, len).await?;
            if piece.is_empty() {
                break;
            }
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    async fn read_piece(&self, at: u64, n: usize) -> Result<Bytes> {
        let Some((coff, clen)) = self.file.index.fetch_range(at, n)? else {
            return Ok(Bytes::new());
        };
        let bs = self.file.block_size;
        let first = coff / bs;
        let last = (coff + clen).div_ceil(bs);
        if last - first > STREAM_OVER && self.file.index.compression == Compression::Zstd {
            return self.stream_zstd(at, n, coff, first..last).await;
        }
        let blocks = futures::future::try_join_all((first..last).map(|b| self.block(b))).await?;
        let mut span = BytesMut::new();
        blocks.iter().for_each(|b| span.extend_from_slice(b));
        let span = span.freeze();
        let base = first * bs;
        let file = self.file.clone();
        blocking(move || {
            file.index
                .read_at(at, n, |o, l| slice_span(&span, base, o, l, &file.layer))
        })
        .await
    }

    /// A zstd read whose span (from its frame's start: a single-frame
    /// layer's start) is long: its blocks stream through the decoder a few
    /// at a time, fetched `STREAM_AHEAD` ahead, instead of all being held.
    async fn stream_zstd(
        &self,
        at: u64,
        n: usize,
        coff: u64,
        blocks: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(STREAM_AHEAD);
        let skip = (coff - blocks.start * self.file.block_size) as usize;
        let file = self.file.clone();
        let decode = blocking(move || {
            let src = ChannelReader {
                rx,
                cur: Bytes::new(),
                skip,
            };
            file.index.zstd_read_from(at, n, src)
        });
        let feed = async {
            let mut fetched = futures::stream::iter(blocks)
                .map(|b| self.block(b))
                .buffered(STREAM_AHEAD);
            while let Some(r) = fetched.next().await {
                let r = r.map_err(io::Error::other);
                let failed = r.is_err();
                // The decoder stops early (or failed): nothing more to feed.
                if tx.send(r).await.is_err() || failed {
                    break;
                }
            }
            drop(tx);
        };
        let (out, ()) = tokio::join!(decode, feed);
        out
    }

    /// Block `b`, verified; counted towards the audit, which starts once
    /// every block has been read.
    async fn block(&self, b: u64) -> Result<Bytes> {
        let bytes = self.blocks.get(b).await?;
        if let Some(a) = &self.audit {
            if a.saw(b) {
                let (blocks, a) = (self.blocks.clone(), a.clone());
                tokio::spawn(async move { a.run(blocks).await });
            }
        }
        Ok(bytes)
    }
}

/// Bytes `o..o+l` of the blob out of a fetched span starting at `base`.
fn slice_span(span: &Bytes, base: u64, o: u64, l: u64, layer: &Digest) -> Result<Bytes> {
    let (s, e) = (
        o.wrapping_sub(base) as usize,
        (o + l).wrapping_sub(base) as usize,
    );
    if o < base || e > span.len() || s > e {
        return Err(Error::invalid(
            format!("layer {layer}"),
            format!("index asked for bytes {o}+{l} outside the fetched span"),
        ));
    }
    Ok(span.slice(s..e))
}

/// The blob's blocks, each verified against the index file's digest: from
/// the chunk cache or fetched once by Range.
struct Blocks {
    file: Arc<LayerIndexFile>,
    source: Arc<dyn Source>,
    cache: Arc<Cache>,
    flights: SingleFlight<u64, Bytes>,
}

impl Blocks {
    async fn get(&self, b: u64) -> Result<Bytes> {
        let layer = &self.file.layer;
        let (at, len) = self
            .file
            .block_range(b)
            .ok_or_else(|| Error::invalid(format!("layer {layer}"), "block past the end"))?;
        let want = &self.file.blocks[b as usize];
        if let Some(path) = self.cache.get(cache::Kind::Chunk, want) {
            if let Ok(bytes) = tokio::fs::read(&path).await {
                return Ok(Bytes::from(bytes));
            }
        }
        self.flights
            .run(b, || async {
                let bytes = self.source.blob_range(layer, at, len).await?;
                self.file.verify_block(b, &bytes).inspect_err(|e| {
                    tracing::error!("{e}");
                })?;
                store(&self.cache, cache::Kind::Chunk, want, &bytes);
                Ok(bytes)
            })
            .await
            .map_err(|e| Error::invalid(format!("layer {layer}"), e.to_string()))
    }

    /// `len` bytes at `at` of the blob, from verified blocks, for a
    /// blocking thread.
    fn read(&self, rt: &tokio::runtime::Handle, at: u64, len: u64) -> Result<Bytes> {
        let bs = self.file.block_size;
        let (first, last) = (at / bs, (at + len).div_ceil(bs));
        let mut span = BytesMut::new();
        for b in first..last {
            span.extend_from_slice(&rt.block_on(self.get(b))?);
        }
        slice_span(&span.freeze(), first * bs, at, len, &self.file.layer)
    }
}

/// Blocks in a zstd read longer than this stream through the decoder.
const STREAM_OVER: u64 = 8;
/// Blocks fetched ahead of the decoder (and held) in such a read.
const STREAM_AHEAD: usize = 4;

/// Blocks arriving on a channel as one stream, less `skip` leading bytes
/// (the span starts inside its first block).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    skip: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    let mut b = b?;
                    let s = self.skip.min(b.len());
                    self.skip -= s;
                    self.cur = b.split_off(s);
                }
                None => return Ok(0),
            }
        }
        let k = buf.len().min(self.cur.len());
        buf[..k].copy_from_slice(&self.cur.split_to(k));
        Ok(k)
    }
}

/// The blocks, in order, as one stream.
struct BlockReader<'a> {
    blocks: &'a Blocks,
    rt: tokio::runtime::Handle,
    next: u64,
    cur: Bytes,
}

impl Read for BlockReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cur.is_empty() {
            if self.next as usize >= self.blocks.file.blocks.len() {
                return Ok(0);
            }
            self.cur = self.rt.block_on(self.blocks.get(self.next))?;
            self.next += 1;
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// The check of an index taken from an artifact: which blocks have been
/// read (and verified against the digests it names), and the verdict once
/// all have been: the whole blob's digest, and the index against one
/// built from the blob.
struct Audit {
    seen: Mutex<(Vec<bool>, usize)>,
    started: AtomicBool,
    bad: OnceLock<String>,
    compression: Compression,
}

impl Audit {
    fn new(blocks: usize, compression: Compression) -> Self {
        Audit {
            seen: Mutex::new((vec![false; blocks], 0)),
            started: AtomicBool::new(false),
            bad: OnceLock::new(),
            compression,
        }
    }

    /// Note block `b` read; true (once) when that completes the blob.
    fn saw(&self, b: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (marks, count) = &mut *seen;
        if let Some(m) = marks.get_mut(b as usize).filter(|m| !**m) {
            *m = true;
            *count += 1;
        }
        *count == marks.len() && !self.started.swap(true, Ordering::SeqCst)
    }

    async fn run(self: Arc<Self>, blocks: Arc<Blocks>) {
        let layer = blocks.file.layer.clone();
        let me = self.clone();
        let rt = tokio::runtime::Handle::current();
        match blocking(move || me.check(&blocks, &rt)).await {
            Ok(()) => {
                tracing::info!("layer {layer}: whole blob verified, its index artifact audited")
            }
            Err(e) => {
                tracing::error!("layer {layer}: index artifact failed its audit: {e}");
                let _ = self.bad.set(format!("failed its audit: {e}"));
            }
        }
    }

    /// Hash and index the blob from its blocks, compare, and cache the
    /// index built here (right whatever the artifact said) as verified.
    fn check(&self, blocks: &Blocks, rt: &tokio::runtime::Handle) -> Result<()> {
        let claimed = &blocks.file;
        let reader = BlockReader {
            blocks,
            rt: rt.clone(),
            next: 0,
            cur: Bytes::new(),
        };
        let (layer, size) = (&claimed.layer, claimed.size);
        let built = LayerIndexFile::build(reader, self.compression, layer, size, io::sink());
        let path = blocks.cache.path(cache::Kind::Index, layer);
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let verdict = layerindex::audit(claimed, &built, |o, l| blocks.read(rt, o, l));
        write_atomic(&path, &cache_bytes(&built, true)?)?;
        let left = verdict?;
        if left > 0 {
            tracing::warn!("layer {layer}: {left} bytes far from any checkpoint were not audited");
        }
        Ok(())
    }
}

/// Keep verified bytes in the cache under their digest (best effort).
pub fn store(cache: &Cache, kind: cache::Kind, d: &Digest, bytes: &[u8]) {
    let path = cache.path(kind, d);
    if path.exists() {
        return;
    }
    // Called from async code too: the write and its fsync leave the worker
    // (a no-op on a blocking thread).
    let res = tokio::task::block_in_place(|| {
        ggfs::digest::BlobWriter::create(&path, d.clone(), Some(bytes.len() as u64)).and_then(
            |mut w| {
                w.write_all(bytes).map_err(|e| Error::io("cache", e))?;
                w.commit()
            },
        )
    });
    match res {
        Ok(_) => cache.added(bytes.len() as u64),
        Err(e) => tracing::warn!("caching {d}: {e}"),
    }
}

/// [`store`] on a blocking thread, not waited for: a reader has its bytes
/// before their write and fsync, and [`Cache::pending`] has them until the
/// write lands.
pub fn store_later(cache: &Arc<Cache>, kind: cache::Kind, d: &Digest, bytes: &Bytes) {
    let pending = cache.writing(kind, d, bytes);
    let (cache, d, bytes) = (cache.clone(), d.clone(), bytes.clone());
    tokio::task::spawn_blocking(move || {
        store(&cache, kind, &d, &bytes);
        drop(pending);
    });
}

type OpenCell = Arc<OnceCell<Arc<dyn LayerData>>>;
/// Index blobs the image's index artifacts list: (layer digest, blob).
type Listed = Arc<Vec<(Digest, Descriptor)>>;

/// Opens layers once per process (concurrent openers share the work).
pub struct Layers {
    cache: Arc<Cache>,
    /// When lazily read layers are fetched whole in the background.
    when: crate::lower::fetch::When,
    open: Mutex<HashMap<Digest, OpenCell>>,
    /// Push the index of a layer a first pass verified as an artifact of
    /// the image (mount option --push-index).
    pub push_index: AtomicBool,
    artifacts: Memo<(String, Digest), Listed>,
}

impl Layers {
    pub fn new(cache: Arc<Cache>, when: crate::lower::fetch::When) -> Self {
        Layers {
            cache,
            when,
            open: Mutex::new(HashMap::new()),
            push_index: AtomicBool::new(false),
            artifacts: Memo::default(),
        }
    }

    /// Open `layer` (of the image `origin`, when known: its referrers may
    /// hold the layer's index).
    pub async fn open(
        &self,
        layer: &Layer,
        origin: Option<&Origin<'_>>,
    ) -> Result<Arc<dyn LayerData>> {
        let cell = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.entry(layer.digest.clone()).or_default().clone()
        };
        cell.get_or_try_init(|| self.open_uncached(layer, origin))
            .await
            .cloned()
    }

    /// Layer `digest`, if it is open.
    pub fn opened(&self, digest: &Digest) -> Option<Arc<dyn LayerData>> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(digest)?.get().cloned()
    }

    /// Forget the open layers nothing else holds (prune.rs): the next
    /// open reads their indexes back from the cache.
    pub fn drop_unused(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, cell| {
            Arc::strong_count(cell) > 1 || cell.get().is_some_and(|l| Arc::strong_count(l) > 1)
        });
    }

    async fn open_uncached(
        &self,
        layer: &Layer,
        origin: Option<&Origin<'_>>,
    ) -> Result<Arc<dyn LayerData>> {
        match crate::lower::lazy::open(layer, self.cache.clone(), self.when).await {
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
        let (file, verified) = match self.cached_index(layer, compression) {
            Some(i) => i,
            None => match self.artifact_index(layer, compression, origin).await {
                Some(f) => (f, false),
                None => {
                    let f = self
                        .first_pass(layer, compression, kind)
                        .await
                        .inspect_err(|e| tracing::error!("layer {digest}: {e}"))?;
                    self.maybe_push(origin, &f);
                    (f, true)
                }
            },
        };
        let which = which_of(&file);
        let audit = (!verified).then(|| Arc::new(Audit::new(file.blocks.len(), compression)));
        let file = Arc::new(file);
        Ok(Arc::new(PlainLayer {
            digest,
            blocks: Arc::new(Blocks {
                file: file.clone(),
                source: layer.source.clone(),
                cache: self.cache.clone(),
                flights: SingleFlight::default(),
            }),
            file,
            which,
            tar: Mutex::new(None),
            kind,
            audit,
        }))
    }

    fn cached_index(&self, layer: &Layer, c: Compression) -> Option<(LayerIndexFile, bool)> {
        let digest = &layer.digest;
        let path = self.cache.get(cache::Kind::Index, digest)?;
        let read = std::fs::read(&path).map_err(|e| Error::io(path.display().to_string(), e));
        match read.and_then(|b| from_cache(&b, layer, c)) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!("ignoring cached index of layer {digest}: {e}");
                None
            }
        }
    }

    /// The layer's index from an index artifact of the image, if one lists
    /// it and its blob parses; cached (as not verified here). A bad one is
    /// logged and skipped: the first pass does without.
    async fn artifact_index(
        &self,
        layer: &Layer,
        c: Compression,
        origin: Option<&Origin<'_>>,
    ) -> Option<LayerIndexFile> {
        let o = origin?;
        let listed = match self.listed(o).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "image {}: looking for index artifacts: {}",
                    o.image.digest,
                    e.msg
                );
                return None;
            }
        };
        let source = o.ns.source(o.repo);
        for (_, blob) in listed.iter().filter(|(l, _)| *l == layer.digest) {
            let d = layer.digest.clone();
            match layerindex::fetch(source.as_ref(), blob, &d, layer.size(), c).await {
                Ok(f) => {
                    tracing::info!("layer {d}: using index artifact blob {}", blob.digest());
                    let path = self.cache.path(cache::Kind::Index, &d);
                    match cache_bytes(&f, false).and_then(|b| write_atomic(&path, &b).map(|_| b)) {
                        Ok(b) => self.cache.added(b.len() as u64),
                        Err(e) => tracing::warn!("caching the index of layer {d}: {e}"),
                    }
                    return Some(f);
                }
                Err(e) => tracing::warn!("layer {d}: ignoring index blob {}: {e}", blob.digest()),
            }
        }
        None
    }

    /// Every index blob the image's index artifacts list, newest artifact
    /// first (memoized per image as its referrers are).
    async fn listed(&self, o: &Origin<'_>) -> Result<Listed, crate::namespace::Fail> {
        let key = (o.repo.to_string(), o.image.digest.clone());
        self.artifacts
            .get(&key, o.ns.tag_ttl, o.ns.neg_ttl, || async {
                let refs = o.ns.referrers(o.repo, &o.image.digest).await?;
                let index: ImageIndex = serde_json::from_slice(&refs.json)
                    .map_err(|e| Error::invalid("referrers index", e.to_string()))?;
                let source = o.ns.source(o.repo);
                let mut out = Vec::new();
                let is_ours = |d: &&Descriptor| {
                    d.artifact_type().as_ref().map(|t| t.to_string()).as_deref()
                        == Some(layerindex::ARTIFACT_TYPE)
                };
                for d in index.manifests().iter().rev().filter(is_ours) {
                    let Ok(digest) = manifest::digest_of(d) else {
                        continue;
                    };
                    match source.manifest(digest.as_str()).await {
                        Ok(raw) => out.extend(layerindex::listed(&raw)),
                        Err(e) => tracing::warn!("index artifact {digest}: {e}"),
                    }
                }
                Ok(Arc::new(out))
            })
            .await
    }

    /// With --push-index, publish a freshly verified index as an artifact
    /// of the image, in the background; a failure is only a warning.
    fn maybe_push(&self, origin: Option<&Origin<'_>>, f: &LayerIndexFile) {
        let Some(o) = origin.filter(|_| self.push_index.load(Ordering::Relaxed)) else {
            return;
        };
        let sink = match o.ns.sink(o.repo) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("pushing the index of layer {}: {e}", f.layer),
        };
        let (subject, f, repo) = (o.image.clone(), f.clone(), o.repo.to_string());
        tokio::spawn(async move {
            match layerindex::push(sink.as_ref(), &subject, std::slice::from_ref(&f)).await {
                Ok(raw) => tracing::info!(
                    "layer {}: pushed its index as {repo}@{} (referring to {})",
                    f.layer,
                    raw.digest,
                    subject.digest
                ),
                Err(e) => tracing::warn!("pushing the index of layer {}: {e}", f.layer),
            }
        });
    }

    async fn first_pass(
        &self,
        layer: &Layer,
        compression: Compression,
        kind: cache::Kind,
    ) -> Result<LayerIndexFile> {
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
) -> Result<LayerIndexFile> {
    let dest = cache.path(kind, &digest);
    let dir = dest.parent().unwrap_or(cache.root());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir.display().to_string(), e))?;
    let what = format!("layer {digest}");
    // A tar bigger than half the cache is not kept: reads go by Range.
    let mut tar_out = Capped {
        inner: io::BufWriter::new(tmp.as_file()),
        left: cache.limit() / 2,
        over: false,
    };
    let file = LayerIndexFile::build(body, compression, &digest, size, &mut tar_out)?;
    tar_out
        .inner
        .flush()
        .map_err(|e| Error::io(dest.display().to_string(), e))?;
    let keep_tar = !tar_out.over;
    drop(tar_out);
    let bytes = cache_bytes(&file, true)?;
    if keep_tar {
        let f = tmp
            .persist(&dest)
            .map_err(|e| Error::io(dest.display().to_string(), e.error))?;
        cache.added(f.metadata().map(|m| m.len()).unwrap_or(0));
    } else {
        tracing::info!("{what}: its tar is over half the cache, reads will use ranges");
    }
    let ipath = cache.path(cache::Kind::Index, &digest);
    write_atomic(&ipath, &bytes)?;
    cache.added(bytes.len() as u64);
    Ok(file)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip_layer() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o640);
        b.append_data(&mut h, "dir/file", &b"hello"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn first_pass_indexes_verifies_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 30).unwrap();
        let blob = gzip_layer();
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
        let file = run(d.clone()).unwrap();
        let (entries, _) = entries_of(&file);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, b"dir/file");
        assert_eq!(entries[0].meta.mode, 0o640);
        let saved = std::fs::read(cache.path(cache::Kind::Index, &d)).unwrap();
        let desc = serde_json::json!({
            "mediaType": ggfs::image::manifest::media::OCI_LAYER_GZIP,
            "digest": d, "size": blob.len(),
        });
        let layer = Layer {
            digest: d.clone(),
            descriptor: serde_json::from_value(desc).unwrap(),
            diff_id: None,
            source: Arc::new(ggfs::image::layout::Layout::create(dir.path().join("l")).unwrap()),
        };
        let (back, verified) = from_cache(&saved, &layer, Compression::Gzip).unwrap();
        assert!(verified);
        assert_eq!(back, file);
        assert!(from_cache(&saved[..20], &layer, Compression::Gzip).is_err());
        let unverified = cache_bytes(&file, false).unwrap();
        assert!(
            !from_cache(&unverified, &layer, Compression::Gzip)
                .unwrap()
                .1
        );
    }
}
