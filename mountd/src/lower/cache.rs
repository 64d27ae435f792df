//! Content-addressed disk cache shared by mounts and kept across restarts.
//! Files live at `<root>/<kind>/sha256/<hex>` and only appear there whole
//! and verified (written to a temporary file, then renamed). Use refreshes a
//! file's mtime; when the total passes the limit the least recently used
//! files go. Readers keep open descriptors, so eviction never pulls bytes
//! from under a read in progress.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use ggfs::{Digest, Error, Result};

/// What a cached file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A whole blob, verified against its digest.
    Blob,
    /// The uncompressed tar of a layer blob (keyed by the blob's digest),
    /// written in the same pass that verified the blob.
    Tar,
    /// A verified chunk of an eStargz / zstd:chunked layer, keyed by its
    /// `chunkDigest`.
    Chunk,
    /// The tar index and block digests of a plain layer (keyed by its digest).
    Index,
    /// The footer and TOC byte ranges of an eStargz / zstd:chunked layer.
    Toc,
    /// A big file's bytes, copied from the cached tar or chunks that hold
    /// them, for FUSE passthrough (keyed by its layer and entry).
    File,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Tar => "tar",
            Kind::Chunk => "chunks",
            Kind::Index => "index",
            Kind::Toc => "toc",
            Kind::File => "files",
        }
    }
}

/// How stale a file's mtime (its last use) may get before a use refreshes it.
const REFRESH_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Cache {
    root: PathBuf,
    limit: u64,
    /// Shared with an eviction running on its own thread.
    used: Arc<AtomicU64>,
    evicting: Arc<AtomicBool>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Bytes on their way to disk (see [`Cache::pending`]).
    writing: std::sync::Mutex<HashMap<(Kind, Digest), Bytes>>,
}

impl Cache {
    /// Open (creating) the cache at `root`, counting what is already there.
    pub fn open(root: &Path, limit: u64) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root.display().to_string(), e))?;
        private(root)?;
        let used = files(root).iter().map(|(_, size, _)| size).sum();
        let cache = Cache {
            root: root.to_path_buf(),
            limit,
            used: Arc::new(AtomicU64::new(used)),
            evicting: Arc::new(AtomicBool::new(false)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            writing: Default::default(),
        };
        if cache.used() > limit && !cache.evicting.swap(true, Ordering::AcqRel) {
            evict(&cache.root, limit, &cache.used);
            cache.evicting.store(false, Ordering::Release);
        }
        Ok(cache)
    }

    /// Verified bytes whose cache write has not landed yet: a big file's
    /// next READ comes while its chunk is still being written, and must
    /// not fetch it again.
    pub fn pending(&self, kind: Kind, digest: &Digest) -> Option<Bytes> {
        let writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        writing.get(&(kind, digest.clone())).cloned()
    }

    /// Hold `bytes` as pending until the returned guard is dropped.
    pub fn writing(self: &Arc<Self>, kind: Kind, digest: &Digest, bytes: &Bytes) -> Writing {
        let key = (kind, digest.clone());
        let mut writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        writing.insert(key.clone(), bytes.clone());
        Writing {
            cache: self.clone(),
            key,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Where a file of `kind` for `digest` lives (whether or not present).
    pub fn path(&self, kind: Kind, digest: &Digest) -> PathBuf {
        self.root
            .join(kind.dir())
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// The cached file, if present, marked as recently used.
    pub fn get(&self, kind: Kind, digest: &Digest) -> Option<PathBuf> {
        self.open_file(kind, digest)
            .map(|_| self.path(kind, digest))
    }

    /// [`Cache::get`], the file opened for reading.
    pub fn open_file(&self, kind: Kind, digest: &Digest) -> Option<std::fs::File> {
        match std::fs::File::open(self.path(kind, digest)) {
            Ok(f) => {
                // Its owner may set the time on a read-only descriptor. Once
                // a minute is enough for the LRU order, and spares an inode
                // write per READ of a chunk a big file is read through.
                let stale = f.metadata().and_then(|m| m.modified()).map_or(true, |t| {
                    t.elapsed().map_or(true, |age| age > REFRESH_AFTER)
                });
                if stale {
                    let _ = f.set_modified(SystemTime::now());
                }
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(f)
            }
            Err(_) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Record that a file of `size` bytes was committed. Past the limit an
    /// eviction starts on a thread of its own: its walk of the cache never
    /// holds up the async workers that answer readers.
    pub fn added(&self, size: u64) {
        let used = self.used.fetch_add(size, Ordering::Relaxed) + size;
        if used <= self.limit || self.evicting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (root, limit) = (self.root.clone(), self.limit);
        let (used, evicting) = (self.used.clone(), self.evicting.clone());
        let spawned = std::thread::Builder::new()
            .name("cache-evict".into())
            .spawn(move || {
                evict(&root, limit, &used);
                evicting.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!("cache: cannot start eviction: {e}");
            self.evicting.store(false, Ordering::Release);
        }
    }

    /// Wait for a running eviction (tests).
    #[cfg(test)]
    fn settle(&self) {
        while self.evicting.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Remove least recently used files until usage is under 90% of the limit.
fn evict(root: &Path, limit: u64, used_now: &AtomicU64) {
    let mut all = files(root);
    all.sort_by_key(|(_, _, mtime)| *mtime);
    let target = limit / 10 * 9;
    let mut used: u64 = all.iter().map(|(_, s, _)| s).sum();
    for (path, size, _) in all {
        if used <= target {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            tracing::debug!("cache: evicted {}", path.display());
            used -= size;
        }
    }
    used_now.store(used, Ordering::Relaxed);
}

/// What is read back from the cache is trusted (it was verified on the way
/// in), so only the daemon's user may write there: the directory must be
/// that user's, and is made 0700.
fn private(root: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let what = || format!("cache dir {}", root.display());
    let md = std::fs::metadata(root).map_err(|e| Error::io(what(), e))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        return Err(Error::invalid(
            what(),
            format!(
                "is owned by uid {}, not this user ({me}): another user could plant bytes in it",
                md.uid()
            ),
        ));
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(what(), e))?;
    }
    Ok(())
}

/// Every committed file under `root`: path, size, mtime. Temporary files
/// (`.tmp-*`) left by a crash are removed on the way. `upper/` (changes
/// not yet pushed, and their journals) is not the cache's to count or evict.
fn files(root: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = ["blobs", "tar", "chunks", "index", "toc", "files"]
        .iter()
        .map(|k| root.join(k))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for ent in rd.flatten() {
            let path = ent.path();
            let Ok(md) = ent.metadata() else { continue };
            if md.is_dir() {
                stack.push(path);
            } else if ent.file_name().to_string_lossy().starts_with(".tmp-") {
                let stale = md
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if stale {
                    let _ = std::fs::remove_file(&path);
                }
            } else {
                let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((path, md.len(), mtime));
            }
        }
    }
    out
}

/// Parse `--cache-size`: bytes with an optional K/M/G/T suffix (powers of 1024).
/// Bytes already verified against their digests (the callers decode and
/// check chunks first) put in the cache together: each written to a temporary
/// file as it comes, then one `syncfs` makes them all durable before any
/// of them gets its name, so a crash leaves temporaries (removed by the
/// cache's walk), never a named file short of its bytes. An fdatasync each
/// would flush the device once per file: 5,000 times for one eStargz
/// layer's chunks here (ext4 without a journal).
pub struct Batch<'a> {
    cache: &'a Cache,
    kind: Kind,
    files: Vec<(tempfile::NamedTempFile, PathBuf, u64)>,
}

impl Cache {
    /// A [`Batch`] of files of `kind`.
    pub fn batch(&self, kind: Kind) -> Batch<'_> {
        Batch {
            cache: self,
            kind,
            files: Vec::new(),
        }
    }
}

impl Batch<'_> {
    /// Write `bytes`, verified against `d` by the caller (who has checked
    /// that the cache lacks them): not hashed a second time.
    pub fn add(&mut self, d: &Digest, bytes: &[u8]) {
        let path = self.cache.path(self.kind, d);
        let written = (|| {
            let dir = path.parent().expect("cache path");
            let io = |e| Error::io(dir.display().to_string(), e);
            std::fs::create_dir_all(dir).map_err(io)?;
            let mut tmp = tempfile::Builder::new()
                .prefix(".tmp-")
                .tempfile_in(dir)
                .map_err(io)?;
            std::io::Write::write_all(&mut tmp, bytes).map_err(io)?;
            Ok::<_, Error>(tmp)
        })();
        match written {
            Ok(tmp) => self.files.push((tmp, path, bytes.len() as u64)),
            Err(e) => tracing::warn!("caching {d}: {e}"),
        }
    }

    /// Make what was added durable, then name it (best effort).
    pub fn commit(self) {
        if self.files.is_empty() {
            return;
        }
        if let Err(e) = syncfs(&self.cache.root) {
            // Not known to be on disk: not named (the temporaries go).
            tracing::warn!("caching {} files: syncfs: {e}", self.files.len());
            return;
        }
        for (tmp, path, len) in self.files {
            match tmp.persist(&path) {
                Ok(_) => self.cache.added(len),
                Err(e) => tracing::warn!("caching {}: {}", path.display(), e.error),
            }
        }
    }
}

fn syncfs(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: a descriptor we hold.
    match unsafe { libc::syncfs(d.as_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Bytes held as pending while their cache write runs.
pub struct Writing {
    cache: Arc<Cache>,
    key: (Kind, Digest),
}

impl Drop for Writing {
    fn drop(&mut self) {
        let mut writing = self.cache.writing.lock().unwrap_or_else(|p| p.into_inner());
        writing.remove(&self.key);
    }
}

pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['b', 'B']).unwrap_or(t);
    let t = t.strip_suffix(['i']).unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?} (want e.g. 10G, 512M)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// `$XDG_CACHE_HOME/ggfs`, else `~/.cache/ggfs`.
/// (The CLI keeps its upload records there too.)
pub fn default_dir() -> PathBuf {
    ggfs::registry::default_cache_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn cache_dir_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("c");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        Cache::open(&root, 1 << 20).unwrap();
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 2500).unwrap();
        let ds: Vec<Digest> = (0..3u8).map(|i| Digest::of(&[i])).collect();
        for (i, d) in ds.iter().enumerate() {
            let p = cache.path(Kind::Blob, d);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
            if i == 1 {
                // Touch the first one: now the second is the oldest.
                assert!(cache.get(Kind::Blob, &ds[0]).is_some());
            }
            cache.added(1000);
        }
        cache.settle();
        assert!(cache.path(Kind::Blob, &ds[0]).exists());
        assert!(!cache.path(Kind::Blob, &ds[1]).exists());
        assert!(cache.path(Kind::Blob, &ds[2]).exists());
        assert_eq!(cache.used(), 2000);
    }
}
