//! The upper directory of a writable rootfs, on disk in OCI layer form, so a
//! commit is a walk of it: changed and new entries at their paths,
//! `.wh.<name>` files for deletions, `.wh..wh..opq` in directories whose
//! lower contents are hidden. A file whose metadata changed but whose bytes
//! did not is a sparse file of the right size naming the lower path its
//! bytes come from in the `user.ggfs.origin` xattr ("metacopy").
//!
//! Every change lands in one atomic step (a rename out of `work/`, a create,
//! an unlink), so a crash at any instant leaves the old state or the new
//! one. Where two steps are needed, the order keeps the visible tree whole:
//! an upper entry wins over a whiteout of the same name, so a whiteout is
//! made before the entry it replaces goes.

pub mod rootfs;
pub mod work;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::lower::tree::{Kind, Meta};

pub const WHITEOUT: &[u8] = b".wh.";
pub const OPAQUE: &[u8] = b".wh..wh..opq";
/// The lower path a metacopy file's bytes come from.
pub const ORIGIN: &str = "user.ggfs.origin";
/// xattrs of ours, never shown, never accepted from a writer, never committed.
pub const PRIVATE: &str = "user.ggfs.";

pub struct Upper {
    root: PathBuf,
    work: PathBuf,
    seq: AtomicU64,
}

/// `a/b` + `c` → `a/b/c`.
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

/// `a/b/c` → (`a/b`, `c`).
pub fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

pub fn whiteout_of(path: &[u8]) -> Vec<u8> {
    let (dir, name) = split(path);
    join(dir, &[WHITEOUT, name].concat())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Set atime and mtime without following a symlink; `None` leaves one as is.
pub fn set_times(
    path: &Path,
    atime: Option<libc::timespec>,
    mtime: Option<libc::timespec>,
) -> io::Result<()> {
    let omit = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    };
    let ts = [atime.unwrap_or(omit), mtime.unwrap_or(omit)];
    let c = cstr(path)?;
    // SAFETY: a valid path and two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn timespec(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    }
}

pub fn lchown(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::lchown(path, uid, gid)
}

pub fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
}

pub fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: a valid path.
    check(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) })
}

/// rename(2) that fails with EEXIST rather than replace `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid paths.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
}

pub fn fsync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The xattrs of `path` (not following symlinks), ours left out.
pub fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in xattr::list(path)? {
        if name.as_bytes().starts_with(PRIVATE.as_bytes()) {
            continue;
        }
        if let Some(v) = xattr::get(path, &name)? {
            out.push((name.as_bytes().to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

impl Upper {
    pub fn new(dir: &Path) -> Self {
        Upper {
            root: dir.join("root"),
            work: dir.join("work"),
            seq: AtomicU64::new(0),
        }
    }

    /// Create the directories, the root with `meta`'s owner, mode and times;
    /// empty `work/` of what a crash left there.
    pub fn create(&self, meta: &Meta) -> io::Result<()> {
        if !self.root.exists() {
            let tmp = self.tmp();
            std::fs::create_dir_all(&self.work)?;
            std::fs::create_dir(&tmp)?;
            apply_meta(&tmp, meta)?;
            std::fs::rename(&tmp, &self.root)?;
        }
        self.clear_work()
    }

    pub fn clear_work(&self) -> io::Result<()> {
        if self.work.exists() {
            std::fs::remove_dir_all(&self.work)?;
        }
        std::fs::create_dir_all(&self.work)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(rel))
        }
    }

    /// A fresh name in `work/` for an entry being prepared.
    pub fn tmp(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.work.join(format!("{}-{n}", std::process::id()))
    }

    /// The path (relative) of the upper entry with inode `st_ino`: a walk
    /// of the upper directory, for a restarted daemon relearning names.
    pub fn path_of_ino(&self, st_ino: u64) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let mut dirs = vec![Vec::new()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(self.path(&dir)) else {
                continue;
            };
            for e in entries.flatten() {
                let rel = join(&dir, e.file_name().as_bytes());
                let Ok(md) = e.metadata() else { continue };
                if md.ino() == st_ino {
                    return Some(rel);
                }
                if md.is_dir() {
                    dirs.push(rel);
                }
            }
        }
        None
    }

    pub fn lstat(&self, rel: &[u8]) -> Option<std::fs::Metadata> {
        std::fs::symlink_metadata(self.path(rel)).ok()
    }

    pub fn has(&self, rel: &[u8]) -> bool {
        self.lstat(rel).is_some()
    }

    pub fn has_whiteout(&self, rel: &[u8]) -> bool {
        self.has(&whiteout_of(rel))
    }

    pub fn is_opaque(&self, dir: &[u8]) -> bool {
        self.has(&join(dir, OPAQUE))
    }

    /// Entries of an upper directory: real entries (name, inode, type, from
    /// the listing alone: no stat), and the names whited out; `None` when
    /// the directory is not in the upper.
    pub fn list(&self, dir: &[u8]) -> Option<Listing> {
        use std::os::unix::fs::DirEntryExt;
        let rd = std::fs::read_dir(self.path(dir)).ok()?;
        let mut l = Listing::default();
        for e in rd.flatten() {
            let name = e.file_name().as_bytes().to_vec();
            if name == OPAQUE {
                l.opaque = true;
            } else if let Some(gone) = name.strip_prefix(WHITEOUT) {
                l.whiteouts.push(gone.to_vec());
            } else if let Ok(t) = e.file_type() {
                l.entries.push((name, e.ino(), t));
            }
        }
        Some(l)
    }

    /// Mark `rel` deleted for the layers below.
    pub fn add_whiteout(&self, rel: &[u8]) -> io::Result<()> {
        match std::fs::File::create_new(self.path(&whiteout_of(rel))) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn remove_whiteout(&self, rel: &[u8]) -> io::Result<()> {
        match std::fs::remove_file(self.path(&whiteout_of(rel))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Put a prepared entry at `rel`. With `keep_times` the parent's times
    /// are restored (a copy-up changes nothing a reader can see).
    pub fn install(&self, tmp: &Path, rel: &[u8], keep_times: bool) -> io::Result<()> {
        let dest = self.path(rel);
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        let before = keep_times
            .then(|| std::fs::symlink_metadata(&parent))
            .transpose()?;
        rename_noreplace(tmp, &dest)?;
        if let Some(md) = before {
            restore_times(&parent, &md)?;
        }
        Ok(())
    }

    /// The lower path a metacopy file's bytes come from.
    pub fn origin(&self, rel: &[u8]) -> Option<Vec<u8>> {
        xattr::get(self.path(rel), ORIGIN).ok().flatten()
    }
}

/// What [`Upper::list`] finds.
#[derive(Default)]
pub struct Listing {
    pub entries: Vec<(Vec<u8>, u64, std::fs::FileType)>,
    pub whiteouts: Vec<Vec<u8>>,
    pub opaque: bool,
}

pub fn restore_times(path: &Path, md: &std::fs::Metadata) -> io::Result<()> {
    set_times(
        path,
        Some(timespec(md.atime(), md.atime_nsec())),
        Some(timespec(md.mtime(), md.mtime_nsec())),
    )
}

/// Give a freshly made entry a lower entry's owner, mode, xattrs and times.
pub fn apply_meta(path: &Path, m: &Meta) -> io::Result<()> {
    lchown(path, Some(m.uid), Some(m.gid))?;
    if m.kind != Kind::Symlink {
        chmod(path, m.mode)?;
    }
    for (k, v) in &m.xattrs {
        xattr::set(path, OsStr::from_bytes(k), v)?;
    }
    let t = timespec(m.mtime, m.mtime_nsec as i64);
    set_times(path, Some(t), Some(t))
}

/// Make an entry of `m`'s kind at `path` (a regular file sized but empty).
pub fn make_like(path: &Path, m: &Meta) -> io::Result<()> {
    match m.kind {
        Kind::Dir => std::fs::create_dir(path),
        Kind::File => std::fs::File::create_new(path)?.set_len(m.size),
        Kind::Symlink => std::os::unix::fs::symlink(OsStr::from_bytes(&m.link), path),
        Kind::Char => mknod(path, libc::S_IFCHR | 0o600, m.rdev as u64),
        Kind::Block => mknod(path, libc::S_IFBLK | 0o600, m.rdev as u64),
        Kind::Fifo => mknod(path, libc::S_IFIFO | 0o600, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(join(b"", b"a"), b"a");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(whiteout_of(b"a/b"), b"a/.wh.b");
        assert_eq!(whiteout_of(b"b"), b".wh.b");
    }

    #[test]
    fn listing_separates_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let u = Upper::new(d.path());
        u.create(&Meta::implicit_dir()).unwrap();
        std::fs::write(u.path(b"f"), b"x").unwrap();
        u.add_whiteout(b"gone").unwrap();
        u.add_whiteout(b"gone").unwrap();
        std::fs::write(u.path(OPAQUE), b"").unwrap();
        let l = u.list(b"").unwrap();
        assert_eq!(l.entries.len(), 1);
        assert_eq!(l.whiteouts, vec![b"gone".to_vec()]);
        assert!(l.opaque && u.has_whiteout(b"gone") && u.is_opaque(b""));
        u.remove_whiteout(b"gone").unwrap();
        assert!(!u.has_whiteout(b"gone"));
    }
}
