//! Chunked upload sessions remembered across processes, so that rerunning a
//! copy or push after the registry (or ggfs) died mid-blob goes on from the
//! bytes the registry already holds instead of sending the blob again.
//!
//! One small JSON file per (registry, repository, digest) in a directory
//! only its user can read (`0700`, files `0600`, written by rename so a
//! crash leaves the old record or the new one). A record holds the upload
//! URL the registry gave and how many bytes it confirmed; never a
//! credential or token. The upload URL may let whoever reads it append to
//! that one session (distribution's `_state=` is a signed offset, not a
//! credential), hence the modes. Nothing read back is trusted: the registry
//! is asked what the session holds, every byte still goes through the
//! digest check, and the registry verifies the digest before the blob
//! appears. While a process uploads a blob it holds a lock (`flock`) on
//! the record's `.lock` file: another process uploading the same blob to
//! the same repository at the same time neither resumes nor records that
//! session (two writers of one session would break each other's).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use url::Url;

use crate::digest::Digest;

/// Records older than this are dropped: distribution purges upload
/// sessions after a week by default.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where upload records live.
#[derive(Debug)]
pub(super) struct Records {
    dir: PathBuf,
}

/// A held upload lock; released when dropped (the descriptor closes).
pub(super) struct Claim(#[allow(dead_code)] std::fs::File);

/// Which blob upload a record is for.
pub(super) struct Key<'a> {
    pub registry: &'a str,
    pub repository: &'a str,
    pub digest: &'a Digest,
    pub size: u64,
}

#[derive(Serialize, Deserialize)]
struct Record {
    registry: String,
    repository: String,
    digest: String,
    size: u64,
    location: String,
    held: u64,
}

impl Records {
    pub(super) fn new(dir: PathBuf) -> Records {
        Records { dir }
    }

    /// The lock for `key`'s upload, unless another process holds it (or
    /// there is no directory to keep it in): then `None`, and the upload
    /// goes on without a record.
    pub(super) fn claim(&self, key: &Key) -> Option<Claim> {
        self.make_dir().ok()?;
        let path = self.path(key).with_extension("lock");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ok()?;
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        // SAFETY: flock on a descriptor this File owns; no memory involved.
        let locked = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        // The holder removes the lock file when done: a lock taken on the
        // file it removed is no claim (the path names another by now).
        let ino = |m: std::fs::Metadata| (m.dev(), m.ino());
        let current = f.metadata().ok().map(ino) == std::fs::metadata(&path).ok().map(ino);
        (locked && current).then_some(Claim(f))
    }

    fn path(&self, key: &Key) -> PathBuf {
        let mut h = Sha256::new();
        for part in [key.registry, key.repository, key.digest.as_str()] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        self.dir.join(format!("{}.json", hex::encode(h.finalize())))
    }

    /// The session recorded for `key`: its URL and the bytes it held.
    pub(super) fn load(&self, key: &Key) -> Option<(Url, u64)> {
        let text = std::fs::read(self.path(key)).ok()?;
        let r: Record = serde_json::from_slice(&text).ok()?;
        let same = r.registry == key.registry
            && r.repository == key.repository
            && r.digest == key.digest.as_str()
            && r.size == key.size;
        let url = Url::parse(&r.location).ok()?;
        (same && r.held <= r.size).then_some((url, r.held))
    }

    /// Best effort: remember that the session at `location` holds `held`
    /// bytes. A failure to write only costs the resume, so it is logged.
    pub(super) fn save(&self, key: &Key, location: &Url, held: u64) {
        if !location.username().is_empty() || location.password().is_some() {
            // Never write credentials to disk; such a session is not resumed.
            return;
        }
        let r = Record {
            registry: key.registry.to_string(),
            repository: key.repository.to_string(),
            digest: key.digest.to_string(),
            size: key.size,
            location: location.to_string(),
            held,
        };
        if let Err(e) = self.write(&self.path(key), &r) {
            tracing::debug!(dir = %self.dir.display(), error = %e, "upload record not written");
        }
    }

    /// Forget `key`'s record (its session is no good), keeping the lock.
    pub(super) fn forget(&self, key: &Key) {
        let _ = std::fs::remove_file(self.path(key));
    }

    /// The upload is over: its record goes, and its lock file (call with
    /// the claim held, as the last thing done under it).
    pub(super) fn remove(&self, key: &Key) {
        let path = self.path(key);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("lock"));
    }

    fn write(&self, path: &Path, r: &Record) -> std::io::Result<()> {
        self.make_dir()?;
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(r)?)?;
        drop(f);
        std::fs::rename(&tmp, path)
    }

    /// Make the directory (`0700`), refusing one others may write to: what
    /// it holds says where our uploads go on.
    fn make_dir(&self) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let mode = std::fs::metadata(&self.dir)?.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "{} is writable by others (mode {:o})",
                self.dir.display(),
                mode & 0o777
            )));
        }
        self.prune();
        Ok(())
    }

    /// Drop records too old to name a live session (and stray temp files).
    fn prune(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in dir.flatten() {
            let modified = entry.metadata().and_then(|m| m.modified());
            let old = modified.is_ok_and(|m| now.duration_since(m).unwrap_or_default() > MAX_AGE);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: &Digest) -> Key<'_> {
        Key {
            registry: "127.0.0.1:5000",
            repository: "a/b",
            digest: d,
            size: 100,
        }
    }

    #[test]
    fn records_round_trip_privately_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(dir.path().join("ggfs/uploads"));
        let d = Digest::of(b"x");
        let url = Url::parse("http://127.0.0.1:5000/v2/a/b/blobs/uploads/u?_state=s").unwrap();
        assert!(records.load(&key(&d)).is_none());
        records.save(&key(&d), &url, 40);
        assert_eq!(records.load(&key(&d)), Some((url, 40)));
        let file = records.path(&key(&d));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&records.dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // Another size is another blob upload: not resumed.
        let other = Key {
            size: 99,
            ..key(&d)
        };
        assert!(records.load(&other).is_none());
        records.remove(&key(&d));
        assert!(records.load(&key(&d)).is_none());
    }

    #[test]
    fn one_claim_per_blob_upload_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(dir.path().to_path_buf());
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let first = records.claim(&key(&a)).expect("free");
        assert!(records.claim(&key(&a)).is_none(), "claimed twice");
        assert!(records.claim(&key(&b)).is_some(), "another blob is free");
        drop(first);
        let again = records.claim(&key(&a)).expect("released on drop");
        // Done: the lock file goes with the record, and a later upload
        // claims afresh.
        records.remove(&key(&a));
        assert!(!records.path(&key(&a)).with_extension("lock").exists());
        drop(again);
        assert!(records.claim(&key(&a)).is_some());
    }

    #[test]
    fn credentials_in_a_location_are_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(dir.path().to_path_buf());
        let d = Digest::of(b"x");
        let url = Url::parse("http://user:pw@127.0.0.1:5000/v2/a/b/blobs/uploads/u").unwrap();
        records.save(&key(&d), &url, 40);
        assert!(records.load(&key(&d)).is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_torn_or_lying_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(dir.path().to_path_buf());
        let d = Digest::of(b"x");
        std::fs::write(records.path(&key(&d)), b"{\"registry\":").unwrap();
        assert!(records.load(&key(&d)).is_none());
        let url = Url::parse("http://127.0.0.1:5000/u").unwrap();
        records.save(&key(&d), &url, 101); // more than the blob
        assert!(records.load(&key(&d)).is_none());
    }
}
