//! A merged root filesystem as the mount shows it: the image's layers,
//! merged read-only into a [`Tree`], and for a tag's `rootfs/` an upper
//! directory on top that takes every change, overlayfs-style.
//!
//! Inodes: lower node `id` is `base + id` whether or not it has been copied
//! up (a copy-up keeps its inode); entries made in the upper directory get
//! numbers after the tree's. A writable tree knows each inode by the paths
//! it was last looked up at, since every upper operation is by path.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};
use futures::StreamExt;

use crate::commit::Journal;
use crate::layer::LayerData;
use crate::ns::{Fail, Res};
use crate::tree::{self, DataRef, Kind, NodeId, Tree};
use crate::upper::{self, join, split, Upper, OPAQUE, ORIGIN, PRIVATE, WHITEOUT};

/// Inodes each writable tree may use.
pub const WRITABLE_RANGE: u64 = 1 << 32;

pub struct RootFs {
    pub tree: Arc<Tree>,
    pub layers: Arc<Vec<Arc<dyn LayerData>>>,
    pub base: u64,
    pub root_ino: u64,
    /// The upper side, for a tag's (writable) rootfs.
    pub w: Option<Work>,
}

/// The writable side of a rootfs.
pub struct Work {
    pub upper: Upper,
    pub journal: Journal,
    /// Changes take it exclusively, data writes shared, so a commit's
    /// snapshot sees no change half made.
    pub lock: tokio::sync::RwLock<()>,
    inos: Mutex<Inos>,
}

impl Work {
    pub fn new(upper: Upper, journal: Journal, first_free: u64) -> Self {
        Work {
            upper,
            journal,
            lock: tokio::sync::RwLock::new(()),
            inos: Mutex::new(Inos {
                next: first_free,
                ..Inos::default()
            }),
        }
    }

    fn inos(&self) -> std::sync::MutexGuard<'_, Inos> {
        self.inos.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Inos {
    paths: HashMap<u64, Vec<Vec<u8>>>,
    /// Upper inode number → ours.
    by_upper: HashMap<u64, u64>,
    next: u64,
}

impl Inos {
    fn add_path(&mut self, ino: u64, path: &[u8]) {
        let v = self.paths.entry(ino).or_default();
        if let Some(i) = v.iter().position(|p| p == path) {
            v.remove(i);
        }
        v.push(path.to_vec());
    }

    fn remove_path(&mut self, path: &[u8]) {
        for v in self.paths.values_mut() {
            v.retain(|p| p != path);
        }
    }

    /// Everything at or below `from` is now below `to`.
    fn moved(&mut self, from: &[u8], to: &[u8]) {
        self.remove_path(to);
        for v in self.paths.values_mut() {
            for p in v.iter_mut() {
                if p == from || (p.starts_with(from) && p.get(from.len()) == Some(&b'/')) {
                    *p = [to, &p[from.len()..]].concat();
                }
            }
        }
    }
}

/// Where an entry of the merged view lives.
pub enum At {
    Upper(std::fs::Metadata),
    Lower(NodeId),
}

/// What a `setattr` changes.
#[derive(Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<libc::timespec>,
    pub mtime: Option<libc::timespec>,
}

/// Where an open file's bytes come from.
pub enum Data {
    Upper(std::fs::File),
    Lower(DataRef),
}

pub fn io_fail(what: impl std::fmt::Display, e: io::Error) -> Fail {
    Fail::new(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

fn erofs() -> Fail {
    Fail::new(libc::EROFS, "read-only: an image by digest never changes")
}

pub fn file_type(k: &Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

fn md_type(md: &std::fs::Metadata) -> FileType {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else if t.is_char_device() {
        FileType::CharDevice
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else if t.is_fifo() {
        FileType::NamedPipe
    } else if t.is_socket() {
        FileType::Socket
    } else {
        FileType::RegularFile
    }
}

/// The attributes of an upper entry.
pub fn attr_of(ino: u64, md: &std::fs::Metadata) -> FileAttr {
    FileAttr {
        ino,
        size: md.len(),
        blocks: md.len().div_ceil(512),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.mtime(), md.mtime_nsec()),
        kind: md_type(md),
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

/// A name a writer may create: the kernel never sends `/`, `.` or `..`;
/// `.wh.` names are how layers record deletions.
fn check_name(name: &[u8]) -> Res<()> {
    if name.starts_with(WHITEOUT) {
        return Err(Fail::new(
            libc::EPERM,
            format!(
                "{}: names starting with .wh. are reserved for layer whiteouts",
                String::from_utf8_lossy(name)
            ),
        ));
    }
    Ok(())
}

impl RootFs {
    pub fn ino(&self, id: NodeId) -> u64 {
        if id == tree::ROOT {
            self.root_ino
        } else {
            self.base + id as u64
        }
    }

    /// Whether `ino` is one of this writable tree's inodes.
    pub fn knows(&self, ino: u64) -> bool {
        match &self.w {
            Some(w) => ino == self.root_ino || w.inos().paths.contains_key(&ino),
            None => false,
        }
    }

    pub fn lower_attr(&self, id: NodeId) -> FileAttr {
        let n = self.tree.node(id);
        let m = &n.meta;
        let t = time(m.mtime, m.mtime_nsec as i64);
        FileAttr {
            ino: self.ino(id),
            size: m.size,
            blocks: m.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: file_type(&m.kind),
            perm: (m.mode & 0o7777) as u16,
            nlink: n.nlink.max(1),
            uid: m.uid,
            gid: m.gid,
            rdev: m.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn work(&self) -> Res<&Work> {
        self.w.as_ref().ok_or_else(erofs)
    }

    fn up(&self) -> &Upper {
        &self.w.as_ref().expect("a writable tree").upper
    }

    pub fn path_of(&self, ino: u64) -> Res<Vec<u8>> {
        if ino == self.root_ino {
            return Ok(Vec::new());
        }
        let w = self.work()?;
        let inos = w.inos();
        inos.paths
            .get(&ino)
            .and_then(|v| v.last().cloned())
            .ok_or_else(|| Fail::new(libc::ENOENT, format!("inode {ino} has no name any more")))
    }

    /// The lower node at `path` unless a whiteout, an opaque directory or
    /// an upper non-directory above it hides it (the upper entry at `path`
    /// itself does not count: it shadows the node, which is still there).
    pub fn lower_at(&self, path: &[u8]) -> Option<NodeId> {
        let u = self.up();
        let mut in_upper = u.has(b"");
        let mut id = tree::ROOT;
        let mut dir: Vec<u8> = Vec::new();
        let comps: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        for (i, c) in comps.iter().enumerate() {
            let here = join(&dir, c);
            if in_upper && (u.is_opaque(&dir) || u.has_whiteout(&here)) {
                return None;
            }
            id = self.tree.child(id, c)?;
            if in_upper && i + 1 < comps.len() {
                match u.lstat(&here) {
                    Some(md) if !md.is_dir() => return None,
                    Some(_) => {}
                    None => in_upper = false,
                }
            }
            dir = here;
        }
        Some(id)
    }

    pub fn find(&self, path: &[u8]) -> Option<At> {
        let (_, name) = split(path);
        if name.starts_with(WHITEOUT) {
            return None;
        }
        if let Some(md) = self.up().lstat(path) {
            return Some(At::Upper(md));
        }
        self.lower_at(path).map(At::Lower)
    }

    fn need(&self, path: &[u8]) -> Res<At> {
        self.find(path)
            .ok_or_else(|| Fail::noent(String::from_utf8_lossy(path)))
    }

    /// Our inode for the entry at `path`, remembered under that path.
    fn ino_of(&self, path: &[u8], at: &At) -> u64 {
        if path.is_empty() {
            return self.root_ino;
        }
        let mut inos = self.up_inos();
        let ino = match at {
            At::Lower(id) => self.ino(*id),
            At::Upper(md) => match inos.by_upper.get(&md.ino()) {
                Some(&i) => i,
                None => {
                    let i = inos.next;
                    inos.next += 1;
                    inos.by_upper.insert(md.ino(), i);
                    i
                }
            },
        };
        inos.add_path(ino, path);
        ino
    }

    fn up_inos(&self) -> std::sync::MutexGuard<'_, Inos> {
        self.w.as_ref().expect("a writable tree").inos()
    }

    fn attr(&self, ino: u64, path: &[u8], at: &At) -> FileAttr {
        match at {
            At::Lower(id) => FileAttr {
                ino,
                ..self.lower_attr(*id)
            },
            At::Upper(md) => {
                let mut a = attr_of(ino, md);
                if md.is_dir() {
                    let subdirs = self
                        .merged(path)
                        .iter()
                        .filter(|(_, a)| self.is_dir(a))
                        .count();
                    a.nlink = 2 + subdirs as u32;
                }
                a
            }
        }
    }

    fn is_dir(&self, at: &At) -> bool {
        match at {
            At::Upper(md) => md.is_dir(),
            At::Lower(id) => self.tree.node(*id).meta.kind == Kind::Dir,
        }
    }

    /// The entries of a merged directory: upper ones, then the lower ones
    /// neither shadowed nor whited out (none under an opaque directory).
    pub fn merged(&self, path: &[u8]) -> Vec<(Vec<u8>, At)> {
        let mut out = Vec::new();
        let mut hide: HashSet<Vec<u8>> = HashSet::new();
        let listing = self.up().list(path);
        let opaque = listing.as_ref().is_some_and(|l| l.opaque);
        if let Some(l) = listing {
            hide.extend(l.whiteouts);
            for (name, md) in l.entries {
                hide.insert(name.clone());
                out.push((name, At::Upper(md)));
            }
        }
        if !opaque {
            if let Some(id) = self.lower_at(path) {
                for (name, &c) in &self.tree.node(id).children {
                    if !hide.contains(&name[..]) {
                        out.push((name.to_vec(), At::Lower(c)));
                    }
                }
            }
        }
        out
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Res<FileAttr> {
        let path = join(&self.path_of(parent)?, name);
        let at = self.need(&path)?;
        let ino = self.ino_of(&path, &at);
        Ok(self.attr(ino, &path, &at))
    }

    pub fn getattr(&self, ino: u64) -> Res<FileAttr> {
        let path = self.path_of(ino)?;
        let at = self.need(&path)?;
        Ok(self.attr(ino, &path, &at))
    }

    pub fn readdir(&self, ino: u64) -> Res<Vec<(u64, FileType, std::ffi::OsString)>> {
        let path = self.path_of(ino)?;
        let parent = if path.is_empty() {
            self.root_ino
        } else {
            let (d, _) = split(&path);
            let at = self.need(d)?;
            self.ino_of(d, &at)
        };
        let mut out = vec![
            (ino, FileType::Directory, ".".into()),
            (parent, FileType::Directory, "..".into()),
        ];
        for (name, at) in self.merged(&path) {
            let child = join(&path, &name);
            let kind = match &at {
                At::Upper(md) => md_type(md),
                At::Lower(id) => file_type(&self.tree.node(*id).meta.kind),
            };
            let cino = self.ino_of(&child, &at);
            out.push((cino, kind, OsStr::from_bytes(&name).to_owned()));
        }
        Ok(out)
    }

    pub fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        let path = self.path_of(ino)?;
        match self.need(&path)? {
            At::Upper(_) => std::fs::read_link(self.up().path(&path))
                .map(|p| p.as_os_str().as_bytes().to_vec())
                .map_err(|e| io_fail("readlink", e)),
            At::Lower(id) => {
                let m = &self.tree.node(id).meta;
                if m.kind != Kind::Symlink {
                    return Err(Fail::new(libc::EINVAL, "not a symlink"));
                }
                Ok(m.link.clone())
            }
        }
    }

    pub fn xattrs(&self, ino: u64) -> Res<Vec<(Vec<u8>, Vec<u8>)>> {
        let path = self.path_of(ino)?;
        match self.need(&path)? {
            At::Upper(_) => {
                upper::xattrs(&self.up().path(&path)).map_err(|e| io_fail("listxattr", e))
            }
            At::Lower(id) => Ok(self.tree.node(id).meta.xattrs.clone()),
        }
    }

    /// Where reading `ino` gets its bytes, for a reader.
    pub fn data_for_read(&self, ino: u64) -> Res<Data> {
        let path = self.path_of(ino)?;
        match self.need(&path)? {
            At::Lower(id) => self.lower_data(id),
            At::Upper(md) if md.is_file() => match self.up().origin(&path) {
                Some(origin) => self.origin_data(&origin),
                None => std::fs::File::open(self.up().path(&path))
                    .map(Data::Upper)
                    .map_err(|e| io_fail("open", e)),
            },
            At::Upper(_) => Err(Fail::new(libc::EISDIR, "not a regular file")),
        }
    }

    fn lower_data(&self, id: NodeId) -> Res<Data> {
        self.tree
            .node(id)
            .data
            .map(Data::Lower)
            .ok_or_else(|| Fail::new(libc::EISDIR, "not a regular file"))
    }

    pub fn origin_data(&self, origin: &[u8]) -> Res<Data> {
        let id = self.tree.resolve(origin).ok_or_else(|| {
            Fail::new(
                libc::EIO,
                format!(
                    "the lower file {} that a changed file reads from is gone",
                    String::from_utf8_lossy(origin)
                ),
            )
        })?;
        self.lower_data(id)
    }

    // ---- changes; callers hold `lock` exclusively ----

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
            self.up_inos().by_upper.insert(md.ino(), self.ino(id));
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
        for (name, at) in self.merged(path) {
            let child = join(path, &name);
            if self.is_dir(&at) {
                self.copy_up_tree(&child)?;
            } else if let At::Lower(_) = at {
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
        let Data::Lower(data) = self.origin_data(&origin)? else {
            unreachable!("origin_data gives lower data")
        };
        let size = self
            .tree
            .node(self.tree.resolve(&origin).unwrap_or(0))
            .meta
            .size;
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

    /// Apply a `setattr`: metadata changes copy up no bytes; a size change
    /// fetches them first (unless the file is cut to nothing).
    pub async fn setattr(&self, ino: u64, a: &SetAttr) -> Res<FileAttr> {
        let path = self.path_of(ino)?;
        self.touch()?;
        self.copy_up(&path)?;
        let full = self.up().path(&path);
        let fail = |e| io_fail(format!("setattr {}", String::from_utf8_lossy(&path)), e);
        if let Some(size) = a.size {
            if size > 0 {
                self.fill_data(&path).await?;
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&full)
                .map_err(fail)?;
            f.set_len(size).map_err(fail)?;
            if size == 0 && self.up().origin(&path).is_some() {
                xattr::remove(&full, ORIGIN).map_err(fail)?;
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

    /// Open for writing: copied up with its bytes (none if truncating).
    pub async fn open_write(&self, ino: u64, truncate: bool) -> Res<std::fs::File> {
        let path = self.path_of(ino)?;
        if self.is_dir(&self.need(&path)?) {
            return Err(Fail::new(libc::EISDIR, "is a directory"));
        }
        self.touch()?;
        self.copy_up(&path)?;
        let full = self.up().path(&path);
        let fail = |e| io_fail(format!("open {}", full.display()), e);
        if truncate {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&full)
                .and_then(|f| f.set_len(0))
                .map_err(fail)?;
            if self.up().origin(&path).is_some() {
                xattr::remove(&full, ORIGIN).map_err(fail)?;
            }
        } else {
            self.fill_data(&path).await?;
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
        xattr::set(self.up().path(&path), OsStr::from_bytes(name), value)
            .map_err(|e| io_fail("setxattr", e))
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
