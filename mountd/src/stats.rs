//! Counters behind `MOUNT/.ggfs/stats`: every registry request and byte goes
//! through [`CountingSource`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use ggfs::image::{ByteStream, Source};
use ggfs::{Digest, RawManifest, Result};

use crate::lower::cache::Cache;

#[derive(Default, Clone)]
struct BlobStat {
    size: Option<u64>,
    fetched: u64,
    requests: u64,
}

#[derive(Default)]
pub struct Stats {
    requests: AtomicU64,
    /// Directory listings built (one per reading the kernel could not answer
    /// from the listing it keeps, not per page).
    listings: AtomicU64,
    /// LOOKUPs answered, merged trees built and dropped (prune.rs).
    lookups: AtomicU64,
    trees_built: AtomicU64,
    trees_dropped: AtomicU64,
    /// READs of an image's files answered, and opens passed through to the cache's copy (the
    /// kernel reads those itself: no READ comes here).
    reads: AtomicU64,
    passthrough_opens: AtomicU64,
    blobs: Mutex<BTreeMap<Digest, BlobStat>>,
}

impl Stats {
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn listing(&self) {
        self.listings.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lookup(&self) {
        self.lookups.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn passthrough_open(&self) {
        self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Merged trees built so far.
    pub fn built(&self) -> u64 {
        self.trees_built.load(Ordering::Relaxed)
    }

    pub fn tree_built(&self) {
        self.trees_built.fetch_add(1, Ordering::Relaxed);
    }

    pub fn trees_dropped(&self, n: usize) {
        self.trees_dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Remember a blob's size (from its descriptor) for the percentage.
    pub fn note_size(&self, digest: &Digest, size: u64) {
        self.with(digest, |b| b.size = Some(size));
    }

    fn with(&self, digest: &Digest, f: impl FnOnce(&mut BlobStat)) {
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        f(blobs.entry(digest.clone()).or_default());
    }

    fn blob_request(&self, digest: &Digest) {
        self.request();
        self.with(digest, |b| b.requests += 1);
    }

    fn fetched(&self, digest: &Digest, n: u64) {
        self.with(digest, |b| b.fetched += n);
    }

    /// The text served as `.ggfs/stats`.
    pub fn render(&self, cache: &Cache) -> String {
        let mut out = String::new();
        let blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let total: u64 = blobs.values().map(|b| b.fetched).sum();
        let _ = writeln!(out, "requests {}", self.requests.load(Ordering::Relaxed));
        let _ = writeln!(out, "bytes_fetched {total}");
        let _ = writeln!(out, "cache_hits {}", cache.hits.load(Ordering::Relaxed));
        let _ = writeln!(out, "cache_misses {}", cache.misses.load(Ordering::Relaxed));
        let _ = writeln!(out, "cache_bytes {}", cache.used());
        let _ = writeln!(out, "cache_limit {}", cache.limit());
        let _ = writeln!(out, "listings {}", self.listings.load(Ordering::Relaxed));
        let _ = writeln!(out, "lookups {}", self.lookups.load(Ordering::Relaxed));
        let built = self.trees_built.load(Ordering::Relaxed);
        let _ = writeln!(out, "trees_built {built}");
        let dropped = self.trees_dropped.load(Ordering::Relaxed);
        let _ = writeln!(out, "trees_dropped {dropped}");
        let _ = writeln!(out, "lower_reads {}", self.reads.load(Ordering::Relaxed));
        let pt = self.passthrough_opens.load(Ordering::Relaxed);
        let _ = writeln!(out, "passthrough_opens {pt}");
        for (d, b) in blobs.iter().filter(|(_, b)| b.requests > 0) {
            let size = b.size.map_or("-".to_string(), |s| s.to_string());
            let pct = match b.size {
                Some(s) if s > 0 => format!("{:.2}", b.fetched as f64 * 100.0 / s as f64),
                _ => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "blob {d} size {size} fetched {} percent {pct} requests {}",
                b.fetched, b.requests
            );
        }
        out
    }
}

/// A `Source` that counts what it fetches.
pub struct CountingSource {
    inner: Arc<dyn Source>,
    stats: Arc<Stats>,
}

impl CountingSource {
    pub fn wrap(inner: Arc<dyn Source>, stats: Arc<Stats>) -> Arc<dyn Source> {
        Arc::new(CountingSource { inner, stats })
    }
}

#[async_trait]
impl Source for CountingSource {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn manifest(&self, reference: &str) -> Result<RawManifest> {
        self.stats.request();
        self.inner.manifest(reference).await
    }

    async fn blob(&self, digest: &Digest) -> Result<ByteStream> {
        self.stats.blob_request(digest);
        let stream = self.inner.blob(digest).await?;
        let stats = self.stats.clone();
        let d = digest.clone();
        Ok(Box::pin(stream.inspect(move |chunk| {
            if let Ok(c) = chunk {
                stats.fetched(&d, c.len() as u64);
            }
        })))
    }

    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        self.stats.blob_request(digest);
        let bytes = self.inner.blob_range(digest, offset, len).await?;
        self.stats.fetched(digest, bytes.len() as u64);
        Ok(bytes)
    }

    async fn blob_size(&self, digest: &Digest) -> Result<u64> {
        self.stats.request();
        self.inner.blob_size(digest).await
    }
}
