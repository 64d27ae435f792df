//! Changes to a writable tree, overlayfs-style: an entry is copied up
//! (metadata only; a regular file's bytes stay below until it is opened for
//! writing) before it changes, deletions leave whiteouts, and a directory
//! that moves is copied up whole and made opaque. Callers hold the tree's
//! `lock` exclusively.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use fuser::FileAttr;
use futures::StreamExt;

use super::{check_name, io_fail, At, Data, RootFs, Seen, SetAttr, Work};
use crate::lower::tree::{self, Kind, NodeId};
use crate::namespace::{Fail, Res};
use crate::upper::{self, join, split, OPAQUE, ORIGIN, PRIVATE};

impl RootFs {
    /// The upper directory exists and the image is marked changed, before
    /// any change lands.
    fn touch(&self) -> Res<&Work> {
        let w = self.work()?;
        w.journal
            .touch(&w.upper, &self.tree.node(tree::ROOT).meta)
            .map_err(|e| io_fail("preparing the upper directory", e))?;
        Ok(w)
    }

    /// `parent/name` for an entry about to be made: a valid name, free.
    fn new_path(&self, parent: u64, name: &[u8]) -> Res<Vec<u8>> {
        check_name(name)?;
        let path = join(&self.path_of(parent)?, name);
        if self.find(&path).is_some() {
            return Err(Fail::new(libc::EEXIST, "exists"));
        }
        Ok(path)
    }

    /// Make sure the directory `dir` (and every one above it) is in the upper.
    fn copy_up_dir(&self, dir: &[u8]) -> Res<()> {
        if dir.is_empty() {
            return Ok(());
        }
        match self.up().lstat(dir) {
            Some(md) if md.is_dir() => return Ok(()),
            Some(_) => return Err(Fail::new(libc::ENOTDIR, "not a directory")),
            None => {}
        }
        self.copy_up_dir(split(dir).0)?;
        let id = self
            .lower_at(dir)
            .ok_or_else(|| Fail::noent(String::from_utf8_lossy(dir)))?;
        self.copy_up_node(dir, id)
    }

    /// The entry at `path` in the upper (a regular file as metacopy: no
    /// bytes fetched); its metadata.
    pub fn copy_up(&self, path: &[u8]) -> Res<std::fs::Metadata> {
        if let Some(md) = self.up().lstat(path) {
            return Ok(md);
        }
        let id = self
            .lower_at(path)
            .ok_or_else(|| Fail::noent(String::from_utf8_lossy(path)))?;
        self.copy_up_dir(split(path).0)?;
        self.copy_up_node(path, id)?;
        self.up()
            .lstat(path)
            .ok_or_else(|| Fail::new(libc::EIO, "copy-up vanished"))
    }

    fn copy_up_node(&self, path: &[u8], id: NodeId) -> Res<()> {
        let u = self.up();
        let node = self.tree.node(id);
        let m = &node.meta;
        let tmp = u.tmp();
        let fail = |e| io_fail(format!("copy-up of {}", String::from_utf8_lossy(path)), e);
        upper::make_like(&tmp, m).map_err(fail)?;
        if m.kind == Kind::File {
            xattr::set(&tmp, ORIGIN, path).map_err(fail)?;
        }
        upper::apply_meta(&tmp, m).map_err(fail)?;
        u.install(&tmp, path, true).map_err(fail)?;
        if let Some(md) = u.lstat(path) {
            let w = self.w.as_ref().expect("a writable tree");
            w.upper_is(&mut w.inos(), md.ino(), self.ino(id));
        }
        if m.kind == Kind::File && node.nlink > 1 {
            self.copy_up_aliases(path, id)?;
        }
        Ok(())
    }

    /// The other visible names of a lower hardlinked file become links to
    /// its upper copy, so they keep sharing one inode.
    fn copy_up_aliases(&self, path: &[u8], id: NodeId) -> Res<()> {
        let u = self.up();
        for alias in self.tree.paths_of(id) {
            if alias == path || u.has(&alias) || self.lower_at(&alias) != Some(id) {
                continue;
            }
            self.copy_up_dir(split(&alias).0)?;
            let tmp = u.tmp();
            let fail = |e| io_fail("copy-up of a hardlink", e);
            std::fs::hard_link(u.path(path), &tmp).map_err(fail)?;
            u.install(&tmp, &alias, true).map_err(fail)?;
        }
        Ok(())
    }

    /// Copy up a directory and everything below it, then hide the lower
    /// side: the upper copy stands alone (needed to move it).
    fn copy_up_tree(&self, path: &[u8]) -> Res<()> {
        self.copy_up(path)?;
        let u = self.up();
        if u.is_opaque(path) || self.lower_at(path).is_none() {
            return Ok(());
        }
        for (name, seen) in self.merged(path) {
            let child = join(path, &name);
            if self.seen_dir(&seen) {
                self.copy_up_tree(&child)?;
            } else if let Seen::Lower(_) = seen {
                self.copy_up(&child)?;
            }
        }
        let dir = u.path(path);
        let md = std::fs::symlink_metadata(&dir).map_err(|e| io_fail("copy-up", e))?;
        std::fs::File::create(u.path(&join(path, OPAQUE))).map_err(|e| io_fail("copy-up", e))?;
        upper::restore_times(&dir, &md).map_err(|e| io_fail("copy-up", e))
    }

    /// Fill a metacopy file with its lower bytes (fetched, verified), then
    /// drop its origin: only then do its own bytes count.
    pub async fn fill_data(&self, path: &[u8]) -> Res<()> {
        let u = self.up();
        let Some(origin) = u.origin(path) else {
            return Ok(());
        };
        let Data::Lower(data, size) = self.origin_data(&origin)? else {
            unreachable!("origin_data gives lower data")
        };
        let full = u.path(path);
        let fail = |e| io_fail(format!("copy-up of {}", full.display()), e);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&full)
            .map_err(fail)?;
        let before = file.metadata().map_err(fail)?;
        let layer = self.layers[data.layer].clone();
        const STEP: u64 = 1 << 20;
        let mut reads = futures::stream::iter((0..size).step_by(STEP as usize))
            .map(|off| {
                let layer = layer.clone();
                async move {
                    let n = STEP.min(size - off) as u32;
                    (off, layer.read(data.entry, off, n).await)
                }
            })
            .buffered(4);
        while let Some((off, got)) = reads.next().await {
            let b = got.map_err(Fail::from)?;
            file.write_all_at(&b, off).map_err(fail)?;
        }
        file.sync_all().map_err(fail)?;
        upper::restore_times(&full, &before).map_err(fail)?;
        xattr::remove(&full, ORIGIN).map_err(fail)
    }

    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Res<(FileAttr, std::fs::File)> {
        let path = self.new_path(parent, name)?;
        self.touch()?;
        self.copy_up_dir(split(&path).0)?;
        let u = self.up();
        let tmp = u.tmp();
        let fail = |e| io_fail("create", e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        upper::lchown(&tmp, Some(uid), Some(gid)).map_err(fail)?;
        upper::chmod(&tmp, mode).map_err(fail)?;
        self.place(&tmp, &path, false)?;
        Ok((self.lookup_path(&path)?, file))
    }

    /// Put a prepared entry at `path`, replacing the whiteout there if any.
    /// A directory over a deleted lower entry hides whatever was below.
    fn place(&self, tmp: &std::path::Path, path: &[u8], dir: bool) -> Res<()> {
        let u = self.up();
        let fail = |e| io_fail(String::from_utf8_lossy(path), e);
        if dir && u.has_whiteout(path) {
            std::fs::File::create(tmp.join(OsStr::from_bytes(OPAQUE))).map_err(fail)?;
        }
        u.install(tmp, path, false).map_err(fail)?;
        u.remove_whiteout(path).map_err(fail)
    }

    fn lookup_path(&self, path: &[u8]) -> Res<FileAttr> {
        let at = self.need(path)?;
        let ino = self.ino_of(path, &at);
        Ok(self.attr(ino, path, &at))
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Res<FileAttr> {
        self.make(parent, name, uid, gid, |tmp| {
            std::fs::create_dir(tmp)?;
            upper::chmod(tmp, mode)
        })
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> Res<FileAttr> {
        if mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0 {
            return Err(Fail::new(
                libc::EPERM,
                "a 0/0 character device is how overlayfs records a whiteout",
            ));
        }
        self.make(parent, name, uid, gid, |tmp| {
            upper::mknod(tmp, (mode & libc::S_IFMT) | 0o600, rdev as u64)?;
            upper::chmod(tmp, mode)
        })
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &std::path::Path,
        uid: u32,
        gid: u32,
    ) -> Res<FileAttr> {
        self.make(parent, name, uid, gid, |tmp| {
            std::os::unix::fs::symlink(target, tmp)
        })
    }

    fn make(
        &self,
        parent: u64,
        name: &[u8],
        uid: u32,
        gid: u32,
        f: impl FnOnce(&std::path::Path) -> io::Result<()>,
    ) -> Res<FileAttr> {
        let path = self.new_path(parent, name)?;
        self.touch()?;
        self.copy_up_dir(split(&path).0)?;
        let tmp = self.up().tmp();
        let fail = |e| io_fail(String::from_utf8_lossy(&path), e);
        f(&tmp).map_err(fail)?;
        upper::lchown(&tmp, Some(uid), Some(gid)).map_err(fail)?;
        let dir = std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_dir());
        self.place(&tmp, &path, dir)?;
        self.lookup_path(&path)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Res<FileAttr> {
        let src = self.path_of(ino)?;
        if self.is_dir(&self.need(&src)?) {
            return Err(Fail::new(libc::EPERM, "hard link to a directory"));
        }
        let dst = self.new_path(newparent, newname)?;
        self.touch()?;
        self.copy_up(&src)?;
        self.copy_up_dir(split(&dst).0)?;
        let u = self.up();
        let fail = |e| io_fail("link", e);
        std::fs::hard_link(u.path(&src), u.path(&dst)).map_err(fail)?;
        u.remove_whiteout(&dst).map_err(fail)?;
        self.lookup_path(&dst)
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Res<()> {
        let path = join(&self.path_of(parent)?, name);
        let at = self.need(&path)?;
        if self.is_dir(&at) {
            return Err(Fail::new(libc::EISDIR, "is a directory"));
        }
        self.touch()?;
        self.copy_up_dir(split(&path).0)?;
        let lower = self.lower_at(&path);
        if let (At::Lower(id), true) = (&at, lower.is_some()) {
            // Its other names stay: they must keep sharing one inode.
            if self.tree.node(*id).nlink > 1 {
                self.copy_up(&path)?;
            }
        }
        let u = self.up();
        let fail = |e| io_fail("unlink", e);
        if lower.is_some() {
            u.add_whiteout(&path).map_err(fail)?;
        }
        if let Some(md) = u.lstat(&path) {
            std::fs::remove_file(u.path(&path)).map_err(fail)?;
            if md.nlink() == 1 {
                self.up_inos().by_upper.remove(&md.ino());
            }
        }
        self.up_inos().remove_path(&path);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Res<()> {
        let path = join(&self.path_of(parent)?, name);
        let at = self.need(&path)?;
        if !self.is_dir(&at) {
            return Err(Fail::new(libc::ENOTDIR, "not a directory"));
        }
        if !self.merged(&path).is_empty() {
            return Err(Fail::new(libc::ENOTEMPTY, "directory not empty"));
        }
        self.touch()?;
        self.copy_up_dir(split(&path).0)?;
        let u = self.up();
        let fail = |e| io_fail("rmdir", e);
        if self.lower_at(&path).is_some() {
            u.add_whiteout(&path).map_err(fail)?;
        }
        if u.has(&path) {
            std::fs::remove_dir_all(u.path(&path)).map_err(fail)?;
        }
        self.up_inos().remove_path(&path);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Res<()> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(Fail::new(libc::EINVAL, "rename flags other than NOREPLACE"));
        }
        check_name(newname)?;
        let src = join(&self.path_of(parent)?, name);
        let dst = join(&self.path_of(newparent)?, newname);
        let sat = self.need(&src)?;
        let src_dir = self.is_dir(&sat);
        if let Some(dat) = self.find(&dst) {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Fail::new(libc::EEXIST, "exists"));
            }
            if self.same_inode(&sat, &dat) {
                return Ok(());
            }
            match (src_dir, self.is_dir(&dat)) {
                (true, false) => return Err(Fail::new(libc::ENOTDIR, "not a directory")),
                (false, true) => return Err(Fail::new(libc::EISDIR, "is a directory")),
                (true, true) if !self.merged(&dst).is_empty() => {
                    return Err(Fail::new(libc::ENOTEMPTY, "directory not empty"))
                }
                _ => {}
            }
        }
        self.touch()?;
        self.copy_up_dir(split(&src).0)?;
        self.copy_up_dir(split(&dst).0)?;
        if src_dir {
            self.copy_up_tree(&src)?;
        } else {
            self.copy_up(&src)?;
        }
        let u = self.up();
        let fail = |e| io_fail("rename", e);
        if src_dir && u.lstat(&dst).is_some_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(u.path(&dst)).map_err(fail)?;
        }
        // The upper entry wins over its whiteout until the rename moves it:
        // `src` disappears and `dst` appears in one step.
        if self.lower_at(&src).is_some() {
            u.add_whiteout(&src).map_err(fail)?;
        }
        std::fs::rename(u.path(&src), u.path(&dst)).map_err(fail)?;
        u.remove_whiteout(&dst).map_err(fail)?;
        self.up_inos().moved(&src, &dst);
        Ok(())
    }

    fn same_inode(&self, a: &At, b: &At) -> bool {
        match (a, b) {
            (At::Lower(x), At::Lower(y)) => x == y,
            (At::Upper(x), At::Upper(y)) => x.ino() == y.ino(),
            _ => false,
        }
    }

    /// Whether changing `ino`'s bytes must first fetch them from below.
    pub fn bytes_below(&self, ino: u64) -> bool {
        let Ok(path) = self.path_of(ino) else {
            return false;
        };
        match self.find(&path) {
            Some(At::Lower(id)) => self.tree.node(id).meta.kind == Kind::File,
            Some(At::Upper(md)) => md.is_file() && self.up().origin(&path).is_some(),
            None => false,
        }
    }

    /// Bring `ino`'s bytes up (fetched, verified), so it can change.
    pub async fn bring_up(&self, ino: u64) -> Res<()> {
        let path = self.path_of(ino)?;
        self.touch()?;
        self.copy_up(&path)?;
        self.fill_data(&path).await
    }

    /// Apply a `setattr`: metadata changes copy up no bytes; a size other
    /// than 0 needs them up first ([`RootFs::bring_up`]).
    pub fn setattr(&self, ino: u64, a: &SetAttr) -> Res<FileAttr> {
        let path = self.path_of(ino)?;
        self.touch()?;
        self.copy_up(&path)?;
        let full = self.up().path(&path);
        let fail = |e| io_fail(format!("setattr {}", String::from_utf8_lossy(&path)), e);
        if let Some(size) = a.size {
            if size > 0 && self.up().origin(&path).is_some() {
                return Err(Fail::new(libc::EIO, "resize before the bytes are up"));
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&full)
                .map_err(fail)?;
            f.set_len(size).map_err(fail)?;
            if self.up().origin(&path).is_some() {
                xattr::remove(&full, ORIGIN).map_err(fail)?;
            }
        }
        if a.uid.is_some() || a.gid.is_some() || a.size.is_some() {
            // As a write does (FUSE_HANDLE_KILLPRIV_V2 leaves it to us).
            match xattr::remove(&full, "security.capability") {
                Err(e) if !matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => {
                    return Err(fail(e))
                }
                _ => {}
            }
        }
        if a.uid.is_some() || a.gid.is_some() {
            upper::lchown(&full, a.uid, a.gid).map_err(fail)?;
        }
        if let Some(mode) = a.mode {
            if !std::fs::symlink_metadata(&full).map_err(fail)?.is_symlink() {
                upper::chmod(&full, mode).map_err(fail)?;
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            upper::set_times(&full, a.atime, a.mtime).map_err(fail)?;
        }
        self.getattr(ino)
    }

    /// Open for writing: copied up (truncated, or with its bytes already up:
    /// [`RootFs::bring_up`]).
    pub fn open_write(&self, ino: u64, truncate: bool) -> Res<std::fs::File> {
        let path = self.path_of(ino)?;
        if self.is_dir(&self.need(&path)?) {
            return Err(Fail::new(libc::EISDIR, "is a directory"));
        }
        self.touch()?;
        self.copy_up(&path)?;
        let full = self.up().path(&path);
        let fail = |e| io_fail(format!("open {}", full.display()), e);
        let origin = self.up().origin(&path).is_some();
        if truncate {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&full)
                .and_then(|f| f.set_len(0))
                .map_err(fail)?;
            if origin {
                xattr::remove(&full, ORIGIN).map_err(fail)?;
            }
        } else if origin {
            return Err(Fail::new(
                libc::EIO,
                "open for writing before the bytes are up",
            ));
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&full)
            .map_err(fail)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Res<()> {
        if name.starts_with(PRIVATE.as_bytes()) {
            return Err(Fail::new(libc::EPERM, "user.ggfs.* xattrs are ggfs's own"));
        }
        let path = self.path_of(ino)?;
        let had = self.xattrs(ino)?.iter().any(|(n, _)| n == name);
        if flags & libc::XATTR_CREATE != 0 && had {
            return Err(Fail::new(libc::EEXIST, "xattr exists"));
        }
        if flags & libc::XATTR_REPLACE != 0 && !had {
            return Err(Fail::new(libc::ENODATA, "no such xattr"));
        }
        self.touch()?;
        self.copy_up(&path)?;
        let full = self.up().path(&path);
        // An access ACL that says no more than the mode is the mode, as on
        // a kernel file system: `cp -a` sets one on every file.
        if name == b"system.posix_acl_access" {
            if let Some(perm) = minimal_acl(value) {
                let md = std::fs::symlink_metadata(&full).map_err(|e| io_fail("setxattr", e))?;
                let _ = xattr::remove(&full, OsStr::from_bytes(name));
                return upper::chmod(&full, (md.mode() & 0o7000) | perm)
                    .map_err(|e| io_fail("setxattr", e));
            }
        }
        xattr::set(&full, OsStr::from_bytes(name), value).map_err(|e| io_fail("setxattr", e))
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Res<()> {
        let path = self.path_of(ino)?;
        if name.starts_with(PRIVATE.as_bytes()) || !self.xattrs(ino)?.iter().any(|(n, _)| n == name)
        {
            return Err(Fail::new(libc::ENODATA, "no such xattr"));
        }
        self.touch()?;
        self.copy_up(&path)?;
        xattr::remove(self.up().path(&path), OsStr::from_bytes(name))
            .map_err(|e| io_fail("removexattr", e))
    }

    /// `fsync`: the file, and each directory its names are in.
    pub fn sync_names(&self, ino: u64) -> Res<()> {
        let Some(w) = &self.w else { return Ok(()) };
        let paths = w.inos().paths.get(&ino).cloned().unwrap_or_default();
        for p in paths {
            let dir = w.upper.path(split(&p).0);
            if dir.exists() {
                upper::fsync_dir(&dir).map_err(|e| io_fail("fsync", e))?;
            }
        }
        Ok(())
    }
}

/// The permission bits of a POSIX access ACL (xattr form: version 2, then
/// tag/perm/id entries) with only the owner, group and other entries; `None`
/// for any other ACL.
fn minimal_acl(v: &[u8]) -> Option<u32> {
    const USER_OBJ: u16 = 0x01;
    const GROUP_OBJ: u16 = 0x04;
    const OTHER: u16 = 0x20;
    if v.len() != 4 + 3 * 8 || v[..4] != 2u32.to_le_bytes() {
        return None;
    }
    let mut mode = 0;
    for e in v[4..].chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]) as u32 & 7;
        mode |= match tag {
            USER_OBJ => perm << 6,
            GROUP_OBJ => perm << 3,
            OTHER => perm,
            _ => return None,
        };
    }
    Some(mode)
}

#[cfg(test)]
mod tests {
    #[test]
    fn minimal_acls_are_modes() {
        let acl = |entries: &[(u16, u16)]| {
            let mut v = 2u32.to_le_bytes().to_vec();
            for (tag, perm) in entries {
                v.extend_from_slice(&tag.to_le_bytes());
                v.extend_from_slice(&perm.to_le_bytes());
                v.extend_from_slice(&u32::MAX.to_le_bytes());
            }
            v
        };
        assert_eq!(
            super::minimal_acl(&acl(&[(1, 6), (4, 4), (0x20, 4)])),
            Some(0o644)
        );
        assert_eq!(
            super::minimal_acl(&acl(&[(1, 7), (4, 5), (0x20, 0)])),
            Some(0o750)
        );
        // A named user makes it a real ACL.
        let named = acl(&[(1, 6), (2, 6), (4, 4), (0x10, 6), (0x20, 4)]);
        assert_eq!(super::minimal_acl(&named), None);
        assert_eq!(super::minimal_acl(b"junk"), None);
    }
}
