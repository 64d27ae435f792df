//! Which opens of lower files are passed through (passthrough.rs), and the
//! copies in the cache's `files/` they read from.
//!
//! A copy is made once the last open this daemon served of a big file is
//! released and the cache holds all its bytes. Copies wait until the mount
//! has had no request for [`IDLE`]: made at once they would compete with
//! the reads that follow (a `tar` closes hundreds of big files in a row).

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use ggfs::Digest;

use crate::handles::Handle;
use crate::lower::cache::Kind;
use crate::lower::passthrough::{Open, Passthrough, MIN_SIZE};
use crate::lower::tree::DataRef;
use crate::namespace::fs::{Inner, Node};
use crate::upper::rootfs::RootFs;

/// How long the mount must have been quiet before a copy is made.
pub const IDLE: Duration = Duration::from_secs(1);

/// Copies waiting at most.
const MAX_WAITING: usize = 256;

/// A big lower file: its tree, its bytes, its size.
pub struct Lower(Arc<RootFs>, DataRef, u64);

/// Copies waiting for the mount to go quiet, made by one thread.
pub struct Copies {
    epoch: Instant,
    /// When the last request came, in ms after `epoch`.
    last: AtomicU64,
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<(Digest, Lower)>,
    /// Waiting or being made: each file once.
    keys: HashSet<Digest>,
    worker: bool,
}

impl Default for Copies {
    fn default() -> Self {
        Copies {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            queue: Mutex::default(),
            wake: Condvar::new(),
        }
    }
}

impl Copies {
    /// A request arrived.
    pub fn busy(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// How long until the mount has been quiet for [`IDLE`] (zero: now).
    fn quiet_in(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        (last + IDLE).saturating_sub(self.epoch.elapsed())
    }
}

impl Inner {
    /// The passthrough of this connection, when the kernel agreed to it.
    pub(crate) fn passthrough(&self) -> Option<&Passthrough> {
        self.passthrough.get()
    }

    /// `ino` (open as `fh`) when it is a lower file open for reading.
    fn lower_read(&self, ino: u64, fh: u64) -> Option<Lower> {
        self.passthrough()?;
        let lower = match self.handle(fh).as_deref() {
            Some(Handle::Lower(r, d, size)) => Lower(r.clone(), *d, *size),
            Some(_) => return None,
            None => match self.node(ino).ok()? {
                Node::Tree(r, id) => {
                    let n = r.tree.node(id);
                    Lower(r.clone(), n.data?, n.meta.size)
                }
                _ => return None,
            },
        };
        Some(lower)
    }

    /// Count an open of `ino` (open as `fh`) if it is a big lower file:
    /// `Some(backing id)` when the kernel is to read it from its copy in
    /// the cache.
    pub(crate) fn open_backed(&self, ino: u64, fh: u64) -> Option<u32> {
        let lower = self.lower_read(ino, fh).filter(|l| l.2 >= MIN_SIZE)?;
        match self.passthrough()?.open(ino, || self.content_file(&lower)) {
            Open::Backed(id) => Some(id),
            Open::Served => None,
        }
    }

    /// Open `fh` of `ino` is going: after the last one this daemon served
    /// of a big file, a copy of its bytes is queued, so that a later open
    /// is passed through.
    pub(crate) fn release_backed(self: &Arc<Self>, ino: u64, fh: u64) {
        // Small files were never counted: nothing to look up for them.
        let Some(pt) = self.passthrough() else { return };
        if !pt.release(ino) {
            return;
        }
        if let Some(lower) = self.lower_read(ino, fh) {
            self.queue_copy(lower);
        }
    }

    /// The cache's copy of `lower`'s bytes, if it has one of the right size.
    fn content_file(&self, lower: &Lower) -> Option<File> {
        let f = self.cache.open_file(Kind::File, &content_key(lower))?;
        (f.metadata().ok()?.len() == lower.2).then_some(f)
    }

    fn queue_copy(self: &Arc<Self>, lower: Lower) {
        // A second copy of a file this big would crowd out the rest.
        if lower.2 > self.cache.limit() / 8 {
            return;
        }
        let key = content_key(&lower);
        if self.cache.path(Kind::File, &key).exists() {
            return;
        }
        let mut q = lock(&self.copies.queue);
        // Each waiting copy holds its tree: a mount never quiet keeps at
        // most this many; the others are queued at a later release.
        if q.waiting.len() >= MAX_WAITING || !q.keys.insert(key.clone()) {
            return;
        }
        q.waiting.push_back((key, lower));
        if !q.worker {
            let (copies, me) = (self.copies.clone(), Arc::downgrade(self));
            let spawned = std::thread::Builder::new()
                .name("ggfs-copies".into())
                .spawn(move || copy_worker(copies, me));
            q.worker = spawned.is_ok();
        }
        self.copies.wake.notify_one();
    }

    /// Copy `lower`'s bytes into the cache when it holds them all (never
    /// fetching); blocking.
    fn copy_content(&self, lower: &Lower, key: &Digest) {
        let path = self.cache.path(Kind::File, key);
        // `.tmp-`: what a crash leaves, the cache's walk removes.
        let tmp = path.with_file_name(format!(".tmp-{}.{}", key.hex(), std::process::id()));
        let layer = &lower.0.layers[lower.1.layer];
        let made = (|| -> ggfs::Result<bool> {
            let io = |e| ggfs::Error::io(format!("cache file {}", tmp.display()), e);
            std::fs::create_dir_all(path.parent().expect("cache path")).map_err(io)?;
            let f = File::create(&tmp).map_err(io)?;
            if !layer.local_copy(lower.1.entry, &f)? {
                return Ok(false);
            }
            // Whole on disk before it has its name: a crash leaves no
            // short copy for a later mount to trust.
            f.sync_data().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(true)
        })();
        match made {
            Ok(true) => return self.cache.added(lower.2),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "passthrough copy of a file of layer {}: {e}",
                layer.digest()
            ),
        }
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Make the queued copies, each once the mount has been quiet for
/// [`IDLE`]; ends with the daemon (when `inner` is gone).
fn copy_worker(copies: Arc<Copies>, inner: Weak<Inner>) {
    let mut q = lock(&copies.queue);
    loop {
        if inner.strong_count() == 0 {
            return;
        }
        if q.waiting.is_empty() {
            // Woken by a queued copy, or now and then to see whether the
            // daemon is still there.
            q = copies
                .wake
                .wait_timeout(q, Duration::from_secs(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        let wait = copies.quiet_in();
        if !wait.is_zero() {
            drop(q);
            std::thread::sleep(wait);
            q = lock(&copies.queue);
            continue;
        }
        let (key, lower) = q.waiting.pop_front().expect("not empty");
        drop(q);
        if let Some(fs) = inner.upgrade() {
            fs.copy_content(&lower, &key);
        }
        drop(lower);
        q = lock(&copies.queue);
        q.keys.remove(&key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cache key of a lower file's copy: its layer and entry.
fn content_key(lower: &Lower) -> Digest {
    let layer = lower.0.layers[lower.1.layer].digest();
    Digest::of(format!("{layer}#{}", lower.1.entry).as_bytes())
}
