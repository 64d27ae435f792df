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
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

use crate::commit::Journal;
use crate::lower::layer::LayerData;
use crate::lower::tree::{self, DataRef, Kind, NodeId, Tree};
use crate::namespace::inolog::InoLog;
use crate::namespace::{Fail, Res};
use crate::upper::{self, join, split, Upper, WHITEOUT};

mod change;

/// Inodes each writable tree may use.
pub const WRITABLE_RANGE: u64 = 1 << 32;

pub struct RootFs {
    pub tree: Arc<Tree>,
    pub layers: Arc<Vec<Arc<dyn LayerData>>>,
    pub base: u64,
    pub root_ino: u64,
    /// The upper side, for a tag's (writable) rootfs.
    pub w: Option<Work>,
    /// When it was last used ([`now_secs`]), for prune.rs.
    pub used: std::sync::atomic::AtomicU64,
}

/// Seconds since the daemon started: a clock cheap enough for every request.
pub fn now_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
}

/// The writable side of a rootfs.
pub struct Work {
    pub upper: Upper,
    pub journal: Journal,
    /// Changes take it exclusively, data writes shared, so a commit's
    /// snapshot sees no change half made.
    pub lock: tokio::sync::RwLock<()>,
    inos: Mutex<Inos>,
    /// Where upper inodes given out are written, and this tree's base.
    log: Option<(Arc<InoLog>, u64)>,
}

impl Work {
    /// `known`: the upper inodes an earlier daemon gave out (st_ino → ino).
    pub fn new(
        upper: Upper,
        journal: Journal,
        first_free: u64,
        log: Option<(Arc<InoLog>, u64)>,
        known: HashMap<u64, u64>,
    ) -> Self {
        let next = known.values().map(|i| i + 1).fold(first_free, u64::max);
        Work {
            upper,
            journal,
            lock: tokio::sync::RwLock::new(()),
            inos: Mutex::new(Inos {
                next,
                by_upper: known,
                ..Inos::default()
            }),
            log,
        }
    }

    /// The upper file `st_ino` is our `ino` from now on.
    fn upper_is(&self, inos: &mut Inos, st_ino: u64, ino: u64) {
        inos.by_upper.insert(st_ino, ino);
        if let Some((log, base)) = &self.log {
            log.upper(*base, st_ino, ino);
        }
    }

    fn inos(&self) -> std::sync::MutexGuard<'_, Inos> {
        self.inos.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Inos {
    /// Each inode's names, the newest last (a hardlinked file has several).
    paths: HashMap<u64, Vec<Vec<u8>>>,
    /// The inode a name is now: unlinks and renames find it without a scan.
    by_path: HashMap<Vec<u8>, u64>,
    /// Upper inode number → ours.
    by_upper: HashMap<u64, u64>,
    next: u64,
}

fn is_under(p: &[u8], dir: &[u8]) -> bool {
    p == dir || (p.starts_with(dir) && p.get(dir.len()) == Some(&b'/'))
}

impl Inos {
    fn add_path(&mut self, ino: u64, path: &[u8]) {
        if let Some(old) = self.by_path.insert(path.to_vec(), ino) {
            self.unlist(old, path);
        }
        self.paths.entry(ino).or_default().push(path.to_vec());
    }

    fn unlist(&mut self, ino: u64, path: &[u8]) {
        if let Some(v) = self.paths.get_mut(&ino) {
            v.retain(|p| p != path);
        }
    }

    fn remove_path(&mut self, path: &[u8]) {
        if let Some(ino) = self.by_path.remove(path) {
            self.unlist(ino, path);
        }
    }

    /// Everything at or below `from` is now below `to`.
    fn moved(&mut self, from: &[u8], to: &[u8]) {
        self.remove_path(to);
        let under: Vec<(Vec<u8>, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| is_under(p, from))
            .map(|(p, &i)| (p.clone(), i))
            .collect();
        for (old, ino) in under {
            let new = [to, &old[from.len()..]].concat();
            self.by_path.remove(&old);
            self.by_path.insert(new.clone(), ino);
            for p in self.paths.get_mut(&ino).into_iter().flatten() {
                if *p == old {
                    *p = new.clone();
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

/// An entry of a merged listing, as far as the listing tells (no stat).
pub enum Seen {
    /// Upper inode number and type.
    Upper(u64, FileType),
    Lower(NodeId),
}

fn std_type(t: std::fs::FileType) -> FileType {
    use std::os::unix::fs::FileTypeExt;
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
    /// Its bytes in a layer, and how many there are.
    Lower(DataRef, u64),
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
    std_type(md.file_type())
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

    /// Learn again the name of `ino`, one an earlier daemon on this
    /// connection gave out: a lower node by its path in the tree, an upper
    /// file by its inode in the upper directory. False if it has none.
    pub fn relearn(&self, ino: u64) -> bool {
        let Some(w) = &self.w else {
            return false;
        };
        let upper = w
            .inos()
            .by_upper
            .iter()
            .find(|(_, &i)| i == ino)
            .map(|(&s, _)| s);
        let path = match upper {
            Some(st_ino) => w.upper.path_of_ino(st_ino),
            None => self.lower_path(ino),
        };
        let Some(path) = path else {
            return false;
        };
        // What is at the path now says whether it is still `ino`.
        self.find(&path)
            .is_some_and(|at| self.ino_of(&path, &at) == ino)
    }

    /// The path of lower node `ino` in the tree.
    fn lower_path(&self, ino: u64) -> Option<Vec<u8>> {
        let id = NodeId::try_from(ino.checked_sub(self.base)?).ok()?;
        if id == tree::ROOT || id as usize >= self.tree.nodes.len() {
            return None;
        }
        let mut names = Vec::new();
        let mut at = id;
        while at != tree::ROOT {
            let n = self.tree.node(at);
            let (name, _) = self
                .tree
                .node(n.parent)
                .children
                .iter()
                .find(|(_, &c)| c == at)?;
            names.push(name.clone());
            at = n.parent;
        }
        names.reverse();
        Some(names.join(&b'/'))
    }

    pub fn lower_attr(&self, id: NodeId) -> FileAttr {
        let n = self.tree.node(id);
        // The root's count is not known before the tree is: 1 ("not
        // counted") always, so it does not change once it is.
        let nlink = if id == tree::ROOT { 1 } else { n.nlink.max(1) };
        meta_attr(self.ino(id), &n.meta, nlink)
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
        let w = self.w.as_ref().expect("a writable tree");
        let u = &w.upper;
        let mut in_upper = w.journal.materialized();
        let mut id = tree::ROOT;
        let mut dir: Vec<u8> = Vec::new();
        let comps: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        for (i, c) in comps.iter().enumerate() {
            // The tree first: most paths of new files end there, no stat.
            id = self.tree.child(id, c)?;
            let here = join(&dir, c);
            if in_upper && (u.is_opaque(&dir) || u.has_whiteout(&here)) {
                return None;
            }
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
        // Before the first change there is no upper to look in: a stat
        // per open and per attribute of an untouched tree saved.
        let w = self.w.as_ref().expect("a writable tree");
        if w.journal.materialized() {
            if let Some(md) = self.up().lstat(path) {
                return Some(At::Upper(md));
            }
        }
        self.lower_at(path).map(At::Lower)
    }

    fn need(&self, path: &[u8]) -> Res<At> {
        self.find(path)
            .ok_or_else(|| Fail::noent(String::from_utf8_lossy(path)))
    }

    /// Our inode for the entry at `path`, remembered under that path.
    fn ino_of(&self, path: &[u8], at: &At) -> u64 {
        match at {
            At::Upper(md) => self.ino_for(path, Seen::Upper(md.ino(), md_type(md))),
            At::Lower(id) => self.ino_for(path, Seen::Lower(*id)),
        }
    }

    fn ino_for(&self, path: &[u8], seen: Seen) -> u64 {
        if path.is_empty() {
            return self.root_ino;
        }
        let w = self.w.as_ref().expect("a writable tree");
        let mut inos = w.inos();
        let ino = match seen {
            Seen::Lower(id) => self.ino(id),
            Seen::Upper(st_ino, _) => match inos.by_upper.get(&st_ino) {
                Some(&i) => i,
                None => {
                    let i = inos.next;
                    inos.next += 1;
                    w.upper_is(&mut inos, st_ino, i);
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
                    a.nlink = match path.is_empty() {
                        true => 1,
                        false => self.dir_nlink(path, md),
                    };
                }
                a
            }
        }
    }

    /// 2 + subdirectories of a merged directory: the upper's own count,
    /// plus the lower subdirectories neither shadowed nor whited out (no
    /// listing of the upper directory needed).
    fn dir_nlink(&self, path: &[u8], md: &std::fs::Metadata) -> u32 {
        let mut n = md.nlink() as u32;
        let u = self.up();
        if u.is_opaque(path) {
            return n;
        }
        if let Some(id) = self.lower_at(path) {
            for (name, &c) in &self.tree.node(id).children {
                let child = join(path, name);
                if self.tree.node(c).meta.kind == Kind::Dir
                    && !u.has(&child)
                    && !u.has_whiteout(&child)
                {
                    n += 1;
                }
            }
        }
        n
    }

    fn is_dir(&self, at: &At) -> bool {
        match at {
            At::Upper(md) => md.is_dir(),
            At::Lower(id) => self.tree.node(*id).meta.kind == Kind::Dir,
        }
    }

    fn seen_dir(&self, seen: &Seen) -> bool {
        match seen {
            Seen::Upper(_, t) => *t == FileType::Directory,
            Seen::Lower(id) => self.tree.node(*id).meta.kind == Kind::Dir,
        }
    }

    /// The entries of a merged directory: upper ones, then the lower ones
    /// neither shadowed nor whited out (none under an opaque directory).
    pub fn merged(&self, path: &[u8]) -> Vec<(Vec<u8>, Seen)> {
        let mut out = Vec::new();
        let mut hide: HashSet<Vec<u8>> = HashSet::new();
        let listing = self.up().list(path);
        let opaque = listing.as_ref().is_some_and(|l| l.opaque);
        if let Some(l) = listing {
            hide.extend(l.whiteouts);
            for (name, st_ino, t) in l.entries {
                hide.insert(name.clone());
                out.push((name, Seen::Upper(st_ino, std_type(t))));
            }
        }
        if !opaque {
            if let Some(id) = self.lower_at(path) {
                for (name, &c) in &self.tree.node(id).children {
                    if !hide.contains(&name[..]) {
                        out.push((name.to_vec(), Seen::Lower(c)));
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
        for (name, seen) in self.merged(&path) {
            let child = join(&path, &name);
            let kind = match &seen {
                Seen::Upper(_, t) => *t,
                Seen::Lower(id) => file_type(&self.tree.node(*id).meta.kind),
            };
            let cino = self.ino_for(&child, seen);
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
        let node = self.tree.node(id);
        node.data
            .map(|d| Data::Lower(d, node.meta.size))
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
}

/// `rootfs/` before its tree is built: what the built root answers too (a
/// merged root keeps implicit metadata), so a reader never sees it change.
pub fn root_attr(ino: u64) -> FileAttr {
    meta_attr(ino, &tree::Meta::implicit_dir(), 1)
}

fn meta_attr(ino: u64, m: &tree::Meta, nlink: u32) -> FileAttr {
    let t = time(m.mtime, m.mtime_nsec as i64);
    FileAttr {
        ino,
        size: m.size,
        blocks: m.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(&m.kind),
        perm: (m.mode & 0o7777) as u16,
        nlink,
        uid: m.uid,
        gid: m.gid,
        rdev: m.rdev,
        blksize: 4096,
        flags: 0,
    }
}
