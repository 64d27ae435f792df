//! Lazily read layers: eStargz and zstd:chunked. Opening costs the footer
//! and TOC (verified against the layer's annotations); each read fetches
//! only the chunks it needs by Range, verifies them against their
//! `chunkDigest`, and keeps them in the disk cache. Concurrent reads of the
//! same missing chunk share one fetch. When the layer marks files to
//! prefetch (`.prefetch.landmark`), they are fetched in the background.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use ggfs::formats::estargz::{self, Chunk, EntryType, Toc, TocEntry};
use ggfs::formats::zstd_chunked;
use ggfs::image::manifest::Compression;
use ggfs::image::{Layer, Source};
use ggfs::{Digest, Error, Result};
use tokio::sync::OnceCell;

use crate::lower::cache::{self, Cache};
use crate::lower::fetch::{self, Rest, When};
use crate::lower::layer::{blocking, LayerData};
use crate::lower::tree::{self, Entry, Kind, Meta};

/// Files the eStargz format adds to the tar; not part of the image's tree.
const HIDDEN: [&str; 3] = [
    estargz::TOC_TAR_NAME,
    estargz::PREFETCH_LANDMARK,
    estargz::NO_PREFETCH_LANDMARK,
];

/// Largest prefetch range fetched in one request.
const MAX_PREFETCH: u64 = 64 << 20;

type Flight<V> = Arc<OnceCell<std::result::Result<V, Arc<Error>>>>;

/// Runs one computation per key at a time; callers arriving meanwhile share
/// its result. Nothing is kept once it is done.
pub struct SingleFlight<K, V> {
    map: Mutex<HashMap<K, Flight<V>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub async fn run<F, Fut>(&self, key: K, f: F) -> std::result::Result<V, Arc<Error>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V>>,
    {
        let cell = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let out = cell
            .get_or_init(|| async { f().await.map_err(Arc::new) })
            .await
            .clone();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(&key);
        }
        out
    }

    /// Whether a run for `key` is under way.
    pub fn in_flight(&self, key: &K) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(key)
    }
}

pub struct TocLayer {
    digest: Digest,
    toc: Toc,
    source: Arc<dyn Source>,
    cache: Arc<Cache>,
    entries: Vec<Entry>,
    /// TOC index of each entry in `entries`.
    toc_index: Vec<usize>,
    flights: SingleFlight<u64, Bytes>,
    /// The rest of the layer, fetched in the background once in use.
    rest: Rest,
    me: Weak<TocLayer>,
}

/// Whether `layer`'s annotations mark it eStargz or zstd:chunked.
pub fn is_lazy(layer: &Layer) -> bool {
    let ann = layer.descriptor.annotations().as_ref();
    let has = |k: &str| ann.is_some_and(|a| a.contains_key(k));
    has(estargz::TOC_DIGEST_ANNOTATION)
        || has(zstd_chunked::MANIFEST_POSITION_ANNOTATION)
        || has(zstd_chunked::GITHUB_MANIFEST_POSITION_ANNOTATION)
}

/// Open `layer` lazily if it is eStargz or zstd:chunked; `Ok(None)` when it
/// is a plain layer.
pub async fn open(layer: &Layer, cache: Arc<Cache>, when: When) -> Result<Option<Arc<TocLayer>>> {
    let ann = layer.descriptor.annotations().clone();
    let has = |k: &str| ann.as_ref().is_some_and(|a| a.contains_key(k));
    let source = layer.source.clone();
    // The footer and TOC ranges of an earlier open, replayed from the cache
    // (the TOC is verified again all the same).
    let rec = Recorder::load(source.clone(), &cache, &layer.digest);
    let toc = match layer.compression()? {
        Compression::Gzip if has(estargz::TOC_DIGEST_ANNOTATION) => {
            let want = ann
                .as_ref()
                .and_then(|a| a.get(estargz::TOC_DIGEST_ANNOTATION))
                .map(|s| Digest::parse(s))
                .transpose()?;
            estargz::open(&rec, &layer.digest, layer.size(), want.as_ref()).await?
        }
        Compression::Zstd
            if has(zstd_chunked::MANIFEST_POSITION_ANNOTATION)
                || has(zstd_chunked::GITHUB_MANIFEST_POSITION_ANNOTATION) =>
        {
            zstd_chunked::open(&rec, &layer.digest, layer.size(), ann.as_ref()).await?
        }
        _ => return Ok(None),
    };
    let segment = fetch::segment_for(rec.rate());
    tracing::debug!(
        "layer {}: background segments of {segment} bytes",
        layer.digest
    );
    if toc.verified {
        // Its write and fsync are not the first read's to wait for.
        let (c, d) = (cache.clone(), layer.digest.clone());
        tokio::task::spawn_blocking(move || rec.save(&c, &d));
    }
    if !toc.verified {
        tracing::warn!(
            "layer {}: no TOC digest annotation, TOC unverified (chunks still are)",
            layer.digest
        );
    }
    let mut entries = Vec::new();
    let mut toc_index = Vec::new();
    for (i, e) in toc.entries.iter().enumerate() {
        if let Some(entry) = convert(e) {
            entries.push(entry);
            toc_index.push(i);
        }
    }
    // A layer the cache cannot hold is not fetched whole.
    let when = match layer.size() > cache.limit() / 2 {
        true => When::Never,
        false => when,
    };
    let rest = Rest::plan(&toc, when, segment);
    let l = Arc::new_cyclic(|me| TocLayer {
        digest: layer.digest.clone(),
        toc,
        source,
        cache,
        entries,
        toc_index,
        flights: SingleFlight::default(),
        rest,
        me: me.clone(),
    });
    if when == When::After(0) && l.rest.start() {
        l.fetch_rest();
    }
    if let Some(range) = l.toc.prefetch_range().filter(|_| !l.toc.no_prefetch()) {
        let bg = l.clone();
        tokio::spawn(async move {
            if let Err(e) = bg.prefetch(range.end).await {
                tracing::warn!("prefetch of layer {}: {e}", bg.digest);
            }
        });
    }
    Ok(Some(l))
}

/// A `Source` that answers blob ranges it has seen before from memory and
/// records the others, so a layer's footer and TOC can be kept in the cache.
struct Recorder {
    inner: Arc<dyn Source>,
    seen: Mutex<Vec<(u64, u64, Bytes)>>,
    /// Bytes fetched (none: nothing new to save) and the time their
    /// requests took.
    net: Mutex<(u64, std::time::Duration)>,
}

impl Recorder {
    fn load(inner: Arc<dyn Source>, cache: &Cache, digest: &Digest) -> Self {
        let seen = cache
            .get(cache::Kind::Toc, digest)
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| decode_ranges(&b))
            .unwrap_or_default();
        Recorder {
            inner,
            seen: Mutex::new(seen),
            net: Mutex::default(),
        }
    }

    /// Bytes per second the registry's answers came at, if any were
    /// fetched (a round trip and the transfer, as a segment will cost).
    fn rate(&self) -> Option<f64> {
        let (bytes, took) = *self.net.lock().unwrap_or_else(|p| p.into_inner());
        (bytes > 0).then(|| bytes as f64 / took.as_secs_f64().max(1e-4))
    }

    /// Persist what was fetched, if anything new was.
    fn save(&self, cache: &Cache, digest: &Digest) {
        if self.net.lock().unwrap_or_else(|p| p.into_inner()).0 == 0 {
            return;
        }
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (off, len, b) in seen.iter() {
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(b);
        }
        let path = cache.path(cache::Kind::Toc, digest);
        match crate::lower::layer::write_atomic(&path, &out) {
            Ok(()) => cache.added(out.len() as u64),
            Err(e) => tracing::warn!("caching the TOC of layer {digest}: {e}"),
        }
    }
}

fn decode_ranges(mut b: &[u8]) -> Vec<(u64, u64, Bytes)> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let off = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
        let Some(data) = b.get(16..16 + len as usize) else {
            break;
        };
        out.push((off, len, Bytes::copy_from_slice(data)));
        b = &b[16 + len as usize..];
    }
    out
}

#[async_trait]
impl Source for Recorder {
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn manifest(&self, reference: &str) -> Result<ggfs::RawManifest> {
        self.inner.manifest(reference).await
    }
    async fn blob(&self, digest: &Digest) -> Result<ggfs::image::ByteStream> {
        self.inner.blob(digest).await
    }
    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, _, b)) = seen.iter().find(|(o, l, _)| *o == offset && *l == len) {
                return Ok(b.clone());
            }
        }
        let started = std::time::Instant::now();
        let b = self.inner.blob_range(digest, offset, len).await?;
        {
            let mut net = self.net.lock().unwrap_or_else(|p| p.into_inner());
            net.0 += b.len() as u64;
            net.1 += started.elapsed();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.push((offset, len, b.clone()));
        Ok(b)
    }
    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        self.inner.blob_size(digest).await
    }
}

fn convert(e: &TocEntry) -> Option<Entry> {
    let name = estargz::normalize_name(&e.name);
    if HIDDEN.contains(&name) {
        return None;
    }
    let kind = match e.kind {
        EntryType::Dir => Kind::Dir,
        EntryType::Reg | EntryType::Hardlink => Kind::File,
        EntryType::Symlink => Kind::Symlink,
        EntryType::Char => Kind::Char,
        EntryType::Block => Kind::Block,
        EntryType::Fifo => Kind::Fifo,
        EntryType::Chunk => return None,
    };
    let hardlink = (e.kind == EntryType::Hardlink)
        .then(|| tree::normalize(e.link_name.as_bytes()))
        .flatten();
    let link = match kind {
        Kind::Symlink => e.link_name.as_bytes().to_vec(),
        _ => Vec::new(),
    };
    let size = match kind {
        Kind::File => e.size,
        Kind::Symlink => link.len() as u64,
        _ => 0,
    };
    let rdev = match kind {
        Kind::Char | Kind::Block => libc::makedev(e.dev_major, e.dev_minor) as u32,
        _ => 0,
    };
    Some(Entry {
        path: tree::normalize(name.as_bytes())?,
        hardlink,
        meta: Meta {
            kind,
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            mtime: e.modtime,
            mtime_nsec: e.modtime_nsec,
            size,
            link,
            rdev,
            xattrs: e
                .xattrs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
                .collect(),
        },
    })
}

impl TocLayer {
    /// Bytes `from..to` of one verified chunk: read from the disk cache, or
    /// the chunk is fetched (once, however many readers want it) and cached.
    async fn chunk_part(&self, c: &Chunk, from: u64, to: u64) -> Result<Bytes> {
        if c.zeros {
            return Ok(Bytes::from(vec![0u8; (to - from) as usize]));
        }
        if let Some(b) = self.cached_part(c, from, to).await {
            return Ok(b);
        }
        if let Some(s) = self.rest.segment_of(c.blob_offset) {
            if self.rest.started() {
                // The background fetch goes on from here next; if it has
                // this chunk in flight already and is about to bring it,
                // that answers this read (on a slow link, waiting for a
                // whole segment would cost more than asking for the chunk).
                self.rest.hint(s);
                let wait = tokio::time::timeout(fetch::WAIT, self.rest.wait(s));
                if wait.await.unwrap_or(false) {
                    if let Some(b) = self.cached_part(c, from, to).await {
                        return Ok(b);
                    }
                }
            }
        }
        let whole = self
            .flights
            .run(c.blob_offset, || async {
                let bytes = self.toc.read_chunk(self.source.as_ref(), c).await?;
                if let Some(d) = &c.digest {
                    crate::lower::layer::store_later(&self.cache, cache::Kind::Chunk, d, &bytes);
                }
                Ok(bytes)
            })
            .await
            .map_err(|e| Error::invalid(format!("layer {}", self.digest), e.to_string()))?;
        Ok(whole.slice(from as usize..(to as usize).min(whole.len())))
    }

    /// Bytes `from..to` of a chunk the cache holds.
    async fn cached_part(&self, c: &Chunk, from: u64, to: u64) -> Option<Bytes> {
        let d = c.digest.as_ref()?;
        if let Some(b) = self.cache.pending(cache::Kind::Chunk, d) {
            return Some(b.slice((from as usize).min(b.len())..(to as usize).min(b.len())));
        }
        // One open, off the async worker.
        let (cache, d) = (self.cache.clone(), d.clone());
        let part = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let f = cache.open_file(cache::Kind::Chunk, &d)?;
            let mut buf = vec![0u8; (to - from) as usize];
            f.read_exact_at(&mut buf, from).ok()?;
            Some(buf)
        })
        .await;
        part.ok()?.map(Bytes::from)
    }

    /// Fetch the chunks of the layer the cache does not hold, a segment
    /// per request, a few at a time, demand reads steering the order.
    fn fetch_rest(&self) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let worker = || async {
                while let Some(s) = me.rest.claim() {
                    match me.fetch_segment(s).await {
                        Err(_) if crate::STOPPING.load(Ordering::SeqCst) => return,
                        Err(e) => tracing::warn!("background fetch of layer {}: {e}", me.digest),
                        Ok(()) => {}
                    }
                }
            };
            futures::future::join_all((0..fetch::PARALLEL).map(|_| worker())).await;
            if !crate::STOPPING.load(Ordering::SeqCst) {
                tracing::info!("layer {}: background fetch done", me.digest);
            }
        });
    }

    /// One segment: what the cache lacks of it, one request per run of
    /// missing chunks (one, unless a killed fetch left part of it), each
    /// chunk verified and cached off the async workers.
    async fn fetch_segment(self: &Arc<Self>, s: usize) -> Result<()> {
        let _inflight = self.rest.begin(s);
        let me = self.clone();
        let range = self.rest.segments[s].clone();
        let runs = blocking(move || Ok(me.missing_runs(range))).await?;
        for run in runs {
            self.fetch_run(run).await?;
        }
        Ok(())
    }

    /// The runs of consecutive chunks of `range` the cache does not hold.
    fn missing_runs(&self, range: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for i in range {
            let c = &self.rest.chunks[i];
            // Not cached, not being written, not on the wire for a read.
            let missing = !self.flights.in_flight(&c.blob_offset)
                && c.digest.as_ref().is_some_and(|d| {
                    self.cache.pending(cache::Kind::Chunk, d).is_none()
                        && !self.cache.path(cache::Kind::Chunk, d).exists()
                });
            match runs.last_mut() {
                Some(r) if missing && r.end == i => r.end = i + 1,
                _ if missing => runs.push(i..i + 1),
                _ => {}
            }
        }
        runs
    }

    /// Fetch chunks `range` of the rest in one request and cache them.
    async fn fetch_run(self: &Arc<Self>, range: std::ops::Range<usize>) -> Result<()> {
        let chunks = &self.rest.chunks[range.clone()];
        let start = chunks.iter().map(|c| c.blob_offset).min().unwrap_or(0);
        let end = chunks.iter().map(|c| c.blob_end).max().unwrap_or(start);
        let span = self
            .source
            .blob_range(&self.digest, start, end - start)
            .await?;
        let me = self.clone();
        blocking(move || {
            let mut batch = me.cache.batch(cache::Kind::Chunk);
            for c in &me.rest.chunks[range] {
                let Some(d) = c.digest.as_ref() else { continue };
                if me.cache.path(cache::Kind::Chunk, d).exists() {
                    continue;
                }
                let part = &span[(c.blob_offset - start) as usize..(c.blob_end - start) as usize];
                match me.toc.decode_chunk(c, part) {
                    Ok(bytes) => batch.add(d, &bytes),
                    Err(e) => tracing::warn!("background fetch: {e}"),
                }
            }
            batch.commit();
            Ok(())
        })
        .await
    }

    /// Fetch `[0, end)` of the blob in one request and cache every chunk
    /// that lies wholly inside it.
    async fn prefetch(&self, end: u64) -> Result<()> {
        if end > MAX_PREFETCH {
            return Ok(());
        }
        let span = self.source.blob_range(&self.digest, 0, end).await?;
        // The writes (and syncfs) leave the async worker.
        tokio::task::block_in_place(|| {
            let mut batch = self.cache.batch(cache::Kind::Chunk);
            for i in 0..self.toc.entries.len() {
                for c in self.toc.chunks(i) {
                    let Some(d) = c.digest.as_ref().filter(|_| !c.zeros && c.blob_end <= end)
                    else {
                        continue;
                    };
                    if self.cache.path(cache::Kind::Chunk, d).exists() {
                        continue;
                    }
                    let part = &span[c.blob_offset as usize..c.blob_end as usize];
                    match self.toc.decode_chunk(c, part) {
                        Ok(bytes) => batch.add(d, &bytes),
                        Err(e) => tracing::error!("prefetch: {e}"),
                    }
                }
            }
            batch.commit();
        });
        Ok(())
    }
}

#[async_trait]
impl LayerData for TocLayer {
    fn digest(&self) -> &Digest {
        &self.digest
    }

    fn entries(&self) -> Box<dyn Iterator<Item = Entry> + '_> {
        Box::new(self.entries.iter().cloned())
    }

    async fn read(&self, entry: usize, offset: u64, len: u32) -> Result<Bytes> {
        let Some(&ti) = self.toc_index.get(entry) else {
            return Err(Error::NotFound(format!(
                "entry {entry} of layer {}",
                self.digest
            )));
        };
        let ti = self.toc.resolve(ti)?;
        if self.rest.note_read(ti) {
            self.fetch_rest();
        }
        let size = self.toc.entry(ti)?.size;
        let end = offset.saturating_add(len as u64).min(size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let chunks = self.toc.chunks_for_range(ti, offset, end - offset);
        let parts = futures::future::try_join_all(chunks.iter().map(|c| {
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.size) - c.file_offset;
            self.chunk_part(c, from, to)
        }))
        .await?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        parts.iter().for_each(|p| out.extend_from_slice(p));
        if out.len() as u64 != end - offset {
            return Err(Error::invalid(
                format!("{:?} in layer {}", self.toc.entries[ti].name, self.digest),
                "its chunks do not cover the read",
            ));
        }
        Ok(Bytes::from(out))
    }

    fn local_copy(&self, entry: usize, out: &std::fs::File) -> Result<bool> {
        let Some(&ti) = self.toc_index.get(entry) else {
            return Ok(false);
        };
        let ti = self.toc.resolve(ti)?;
        let size = self.toc.entry(ti)?.size;
        let io = |e| Error::io(format!("cached chunks of layer {}", self.digest), e);
        // Zero chunks stay holes of the file this makes as long as it is.
        out.set_len(size).map_err(io)?;
        for c in self.toc.chunks_for_range(ti, 0, size) {
            if c.zeros {
                continue;
            }
            let Some(path) = c
                .digest
                .as_ref()
                .and_then(|d| self.cache.get(cache::Kind::Chunk, d))
            else {
                return Ok(false);
            };
            let chunk = std::fs::File::open(path).map_err(io)?;
            crate::lower::passthrough::copy_range(&chunk, 0, out, c.file_offset, c.size)
                .map_err(io)?;
        }
        Ok(true)
    }
}
