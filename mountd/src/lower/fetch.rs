//! Fetching the rest of a lazily read layer in the background, once its
//! tree is in real use (a few of its files read): one Range request per
//! 1-2 MiB segment of the blob, a few in flight, instead of one per file.
//! Demand reads go first: a read that misses tells the fetcher where it
//! is, so the next segment fetched is the one it is reading through, and
//! a read whose chunk is in a segment already in flight waits a moment
//! for that segment before asking for the chunk itself. Chunks are
//! verified and cached one by one, so an interrupted fetch resumes where
//! the cache stops. A chunk a demand read has on the wire, or is writing
//! to the cache, is not asked for again by a segment.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use ggfs::formats::estargz::{Chunk, Toc};
use tokio::sync::watch;

/// Compressed bytes asked for in one background request (more when one
/// chunk is bigger): about [`SEGMENT_TIME`] of transfer at the rate the
/// layer's TOC came, between these bounds. Short segments keep a demand
/// read that shares a slow link with them from waiting long; long ones
/// cost fewer requests where a request costs more than its bytes. Over a
/// 20 ms, 200 Mbit/s link a container start took ~1.5 s with 1 MiB
/// against ~2.0 s with 2 MiB; on loopback a whole-tree read took ~20% more
/// time with 1 MiB than with 2 MiB.
const MIN_SEGMENT: u64 = 1 << 20;
const MAX_SEGMENT: u64 = 2 << 20;
const SEGMENT_TIME: f64 = 0.1;

/// The segment size for a link that brought the TOC at `rate` bytes/s
/// (`None`: it came from the cache, nothing measured).
pub fn segment_for(rate: Option<f64>) -> u64 {
    rate.map_or(MAX_SEGMENT, |r| {
        ((r * SEGMENT_TIME) as u64).clamp(MIN_SEGMENT, MAX_SEGMENT)
    })
}

/// Background requests in flight at once: enough to fill a long link,
/// few enough that a demand read's request gets its share of it.
pub const PARALLEL: usize = 3;
/// How long a demand read waits for a segment in flight that holds its
/// chunk before asking for the chunk itself.
pub const WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Files of a layer read before the rest of it is fetched, by default:
/// more than a look at one file, less than any program starting.
pub const DEFAULT_AFTER: usize = 4;

/// When to fetch the rest of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// After this many distinct files of the layer have been read (0: as
    /// soon as the layer is opened).
    After(usize),
    Never,
}

impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            When::After(n) => write!(f, "{n}"),
            When::Never => f.write_str("never"),
        }
    }
}

impl std::str::FromStr for When {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" | "off" => Ok(When::Never),
            n => n
                .parse()
                .map(When::After)
                .map_err(|_| format!("{n:?}: a number of files, or `never`")),
        }
    }
}

/// The plan and progress of one layer's background fetch.
pub struct Rest {
    /// Chunks with bytes to fetch, in blob order, one per compressed span.
    pub chunks: Vec<Chunk>,
    /// Each segment is a range of `chunks`, fetched in one request.
    pub segments: Vec<Range<usize>>,
    when: When,
    read: Mutex<HashSet<usize>>,
    started: AtomicBool,
    claimed: Mutex<Vec<bool>>,
    hint: AtomicUsize,
    inflight: Mutex<HashMap<usize, watch::Receiver<()>>>,
}

impl Rest {
    pub fn plan(toc: &Toc, when: When, segment: u64) -> Rest {
        let mut chunks: Vec<Chunk> = (0..toc.entries.len())
            .flat_map(|i| toc.chunks(i).iter())
            .filter(|c| !c.zeros && c.digest.is_some() && c.blob_end > c.blob_offset)
            .cloned()
            .collect();
        // Hardlinks and repeated contents are one chunk in the cache.
        let mut seen = HashSet::new();
        chunks.retain(|c| c.digest.as_ref().is_some_and(|d| seen.insert(d.clone())));
        chunks.sort_by_key(|c| c.blob_offset);
        let mut segments = Vec::new();
        let mut start = 0;
        for i in 1..=chunks.len() {
            let end = i == chunks.len()
                || chunks[i].blob_end.saturating_sub(chunks[start].blob_offset) > segment;
            if end {
                segments.push(start..i);
                start = i;
            }
        }
        let n = segments.len();
        Rest {
            chunks,
            segments,
            when,
            read: Mutex::new(HashSet::new()),
            started: AtomicBool::new(false),
            claimed: Mutex::new(vec![false; n]),
            hint: AtomicUsize::new(0),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// Note a read of file `entry`; true exactly once, when the fetch of
    /// the rest should start.
    pub fn note_read(&self, entry: usize) -> bool {
        if self.started.load(Ordering::Relaxed) {
            return false;
        }
        let When::After(n) = self.when else {
            return false;
        };
        let mut read = lock(&self.read);
        read.insert(entry);
        read.len() >= n && self.start()
    }

    /// True exactly once: for the caller that starts the fetch.
    pub fn start(&self) -> bool {
        self.when != When::Never && !self.started.swap(true, Ordering::SeqCst)
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// The segment holding the chunk that starts at `blob_offset`.
    pub fn segment_of(&self, blob_offset: u64) -> Option<usize> {
        let i = self
            .chunks
            .binary_search_by_key(&blob_offset, |c| c.blob_offset)
            .ok()?;
        let s = self.segments.partition_point(|r| r.end <= i);
        (s < self.segments.len()).then_some(s)
    }

    /// A demand read is at segment `s`: fetch from there on next.
    pub fn hint(&self, s: usize) {
        self.hint.store(s, Ordering::Relaxed);
    }

    /// The next segment to fetch: the first unclaimed one from the hint
    /// on, else the first unclaimed one.
    pub fn claim(&self) -> Option<usize> {
        let mut claimed = lock(&self.claimed);
        let from = self.hint.load(Ordering::Relaxed).min(claimed.len());
        let s = (from..claimed.len())
            .chain(0..from)
            .find(|&s| !claimed[s])?;
        claimed[s] = true;
        Some(s)
    }

    /// Mark segment `s` in flight until the guard is dropped.
    pub fn begin(&self, s: usize) -> Inflight<'_> {
        let (tx, rx) = watch::channel(());
        lock(&self.inflight).insert(s, rx);
        Inflight {
            rest: self,
            s,
            _tx: tx,
        }
    }

    /// Wait for segment `s` if it is in flight; false when it was not.
    pub async fn wait(&self, s: usize) -> bool {
        let rx = lock(&self.inflight).get(&s).cloned();
        match rx {
            Some(mut rx) => {
                // Ends when the fetcher drops its sender: done or failed.
                let _ = rx.changed().await;
                true
            }
            None => false,
        }
    }
}

/// A segment in flight; dropping it (done, failed or cancelled) wakes its
/// waiters.
pub struct Inflight<'a> {
    rest: &'a Rest,
    s: usize,
    _tx: watch::Sender<()>,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        lock(&self.rest.inflight).remove(&self.s);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_the_link_between_bounds() {
        assert_eq!(segment_for(None), MAX_SEGMENT);
        // A 408 KB TOC in 45 ms (20 ms away, 200 Mbit/s, a busy link).
        assert_eq!(segment_for(Some(408e3 / 0.045)), MIN_SEGMENT);
        assert_eq!(segment_for(Some(15e6)), 1_500_000);
        // Loopback.
        assert_eq!(segment_for(Some(400e6)), MAX_SEGMENT);
    }
}
