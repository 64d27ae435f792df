//! The kernel side. fuser dispatches requests on one thread, so every
//! request is moved, with its `Reply*`, onto the tokio runtime and answered
//! there: a read waiting on the network never holds up another request.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::consts::{FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE};
use fuser::{
    FileAttr, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request,
};

use crate::handles::Handle;
use crate::lower::cache::Cache;
use crate::namespace::fs::{Inner, Key, Node, LONG, SHORT, WRITABLE_TTL};
use crate::namespace::{Fail, Namespace, Res};
use crate::upper::rootfs::{RootFs, SetAttr};

pub struct Fs {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
    /// Read-only requests being answered on the runtime, by FUSE unique:
    /// an INTERRUPT (its caller got a signal) answers one still here with
    /// EINTR at once. The work goes on; its late answer is dropped by the
    /// kernel. Requests that change something are never cut short.
    waiting: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
}

impl Fs {
    pub fn new(
        ns: Namespace,
        cache: Arc<Cache>,
        takeover: crate::namespace::fs::Takeover,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Fs {
            inner: Arc::new(Inner::new(ns, cache, takeover)),
            rt,
            waiting: Arc::default(),
        }
    }

    pub fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    fn spawn<F>(&self, f: impl FnOnce(Arc<Inner>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f(self.inner.clone()));
    }

    /// [`Fs::spawn`] for a read-only request, which an INTERRUPT may answer.
    fn spawn_ro<F>(&self, req: &Request<'_>, f: impl FnOnce(Arc<Inner>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let unique = req.unique();
        let waiting = self.waiting.clone();
        lock(&waiting).insert(unique);
        let work = f(self.inner.clone());
        self.rt.spawn(async move {
            work.await;
            lock(&waiting).remove(&unique);
        });
    }
}

impl Fs {
    /// A request naming `ino` arrived: the mount is busy (passthrough's
    /// copies wait), and a restarted daemon takes up an inode its
    /// predecessor gave out before serving it. On this thread: requests
    /// wait, as they did while no daemon was there.
    fn arrive(&self, ino: u64) {
        self.inner.copies.busy();
        if !self.inner.stale(ino) {
            return;
        }
        let inner = self.inner.clone();
        if let Err(f) = self.rt.block_on(async move { inner.revive(ino).await }) {
            tracing::warn!("inode {ino} of the daemon before: {}", f.msg);
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Protocol 7.33 names fuser 0.15 does not have.
const FUSE_HANDLE_KILLPRIV_V2: u32 = 1 << 28;
const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;

impl Fs {
    /// Run a change: on this thread when it is local work (see
    /// `Inner::change_now`), else on the runtime; `done` replies.
    fn change<T, F, D>(&self, ino: u64, f: F, done: D)
    where
        T: Send + 'static,
        F: FnOnce(&RootFs) -> Res<T> + Send + 'static,
        D: FnOnce(&Inner, Res<T>) + Send + 'static,
    {
        match self.inner.change_now(ino, f) {
            Ok(out) => done(&self.inner, out),
            Err(f) => self.spawn(move |fs| async move {
                let out = fs.change(ino, f).await;
                done(&fs, out)
            }),
        }
    }
}

fn lookup_reply(fs: &Inner, r: Res<(Duration, FileAttr)>, reply: ReplyEntry) {
    match r {
        Ok((ttl, attr)) => {
            fs.looked_up(attr.ino);
            reply.entry(&ttl, &attr, 0)
        }
        Err(f) if f.errno == libc::ENOENT => {
            // A negative entry: the kernel remembers the miss.
            let mut attr = fs.ns_attr(0, false, 0);
            attr.ino = 0;
            reply.entry(&fs.ns.neg_ttl, &attr, 0)
        }
        Err(f) => reply.error(fs.failed("lookup", f)),
    }
}

pub(crate) type Entries = Vec<(u64, fuser::FileType, std::ffi::OsString)>;

/// The kernel need not send FLUSH at close (FOPEN_NOFLUSH, Linux 5.16+;
/// older kernels ignore it): one round trip less per file opened.
const FOPEN_NOFLUSH: u32 = 1 << 5;

/// Flags for an open: no FLUSH unless an edit is applied at close.
/// Reply to an open; one for reading a big lower file on its copy in the
/// cache when passthrough takes it (no page cache of ours beside it).
fn opened(fs: &Inner, ino: u64, fh: u64, flags: u32, write: bool, reply: ReplyOpen) {
    match (!write).then(|| fs.open_backed(ino, fh)).flatten() {
        Some(id) => {
            fs.ns.stats.passthrough_open();
            reply.opened_passthrough(fh, FOPEN_NOFLUSH, id)
        }
        None => reply.opened(fh, open_flags(fs, fh, flags)),
    }
}

fn open_flags(fs: &Inner, fh: u64, flags: u32) -> u32 {
    match fs.handle(fh).as_deref() {
        Some(Handle::Edit(_) | Handle::Ctl(_)) => flags,
        _ => flags | FOPEN_NOFLUSH,
    }
}

fn dir_reply(fs: &Inner, r: Res<Arc<Entries>>, offset: i64, mut reply: ReplyDirectory) {
    match r {
        Ok(entries) => {
            let skip = offset.max(0) as usize;
            for (i, (ino, kind, name)) in entries.iter().enumerate().skip(skip) {
                if reply.add(*ino, (i + 1) as i64, *kind, name) {
                    break;
                }
            }
            reply.ok()
        }
        Err(f) => reply.error(fs.failed("readdir", f)),
    }
}

/// The listing directory `ino` took at its READDIR from offset 0, for a
/// later page (`offset` > 0): pages neither rebuild it nor see it shift.
fn taken_listing(fs: &Inner, ino: u64, offset: i64) -> Option<Arc<Entries>> {
    (offset > 0).then(|| lock(&fs.listings).get(ino))?
}

/// Keep `entries` as directory `ino`'s listing (counted in stats).
fn keep_listing(fs: &Inner, ino: u64, entries: Entries) -> Arc<Entries> {
    fs.ns.stats.listing();
    let e = Arc::new(entries);
    lock(&fs.listings).put(ino, e.clone());
    e
}

fn names_reply(r: Res<Vec<(Vec<u8>, Vec<u8>)>>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(x) => {
            let mut names = Vec::new();
            for (n, _) in &x {
                names.extend_from_slice(n);
                names.push(0);
            }
            xattr_reply(reply, &names, size)
        }
        Err(f) => reply.error(f.errno),
    }
}

fn xattr_reply(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(libc::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, config: &mut fuser::KernelConfig) -> Result<(), i32> {
        // Bigger reads mean fewer chunk lookups and inflates per file.
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        // Reads are answered asynchronously: let the kernel keep more in flight.
        let _ = config.set_max_background(64);
        // Writes drop setuid bits and file capabilities here (handles.rs):
        // the kernel need not ask for security.capability before each one.
        let _ = config.add_capabilities(FUSE_HANDLE_KILLPRIV_V2);
        // O_TRUNC comes with OPEN (not as a SETATTR before it): a tag's
        // manifest.json opened to be rewritten starts empty.
        let _ = config.add_capabilities(fuser::consts::FUSE_ATOMIC_O_TRUNC);
        // A symlink's target never changes in place (a new one is a new
        // inode): the kernel may keep what READLINK said.
        let _ = config.add_capabilities(fuser::consts::FUSE_CACHE_SYMLINKS);
        // Big lower files whose bytes are cached are read by the kernel
        // from their copy (passthrough.rs); one level of stacking below us.
        // Registering a backing file takes CAP_SYS_ADMIN: without root the
        // copies would only take space.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if let Some(dev) = self.inner.dev.get().filter(|_| root) {
            if config.enable_passthrough(1).is_ok() {
                match crate::lower::passthrough::Passthrough::new(dev.as_fd()) {
                    Ok(pt) => drop(self.inner.passthrough.set(pt)),
                    Err(e) => tracing::warn!("passthrough: {e}"),
                }
            }
        }
        Ok(())
    }

    /// The caller of request `unique` got a signal: a read-only request
    /// still waiting (on the network, mostly) is answered EINTR now.
    fn interrupt(&mut self, _req: &Request<'_>, unique: u64, reply: ReplyEmpty) {
        if lock(&self.waiting).remove(&unique) {
            tracing::debug!("request {unique} interrupted");
            reply.error(libc::EINTR);
        } else {
            reply.forget();
        }
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        self.inner.forget(ino, nlookup);
    }

    fn lookup(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.arrive(parent);
        self.inner.ns.stats.lookup();
        // In a built writable tree everything is local: answer here.
        if let Some(r) = self.inner.built_writable(parent) {
            let res = r.lookup(parent, name.as_bytes()).map(|a| (WRITABLE_TTL, a));
            return lookup_reply(&self.inner, res, reply);
        }
        // So is an image's read-only tree once built.
        if let Ok(Node::Tree(r, id)) = self.inner.node(parent) {
            let res = match r.tree.child(id, name.as_bytes()) {
                Some(c) => Ok((LONG, r.lower_attr(c))),
                None => Err(Fail::noent(name.to_string_lossy())),
            };
            return lookup_reply(&self.inner, res, reply);
        }
        let name = name.to_owned();
        self.spawn_ro(req, |fs| async move {
            let res = fs.lookup(parent, &name).await;
            lookup_reply(&fs, res, reply)
        });
    }

    fn getattr(&mut self, req: &Request<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        self.arrive(ino);
        if let Some(r) = self.inner.built_writable(ino) {
            return match self.inner.getattr_w(&r, ino, fh) {
                Ok(attr) => reply.attr(&WRITABLE_TTL, &attr),
                Err(f) => reply.error(f.errno),
            };
        }
        if let Ok(Node::Tree(r, id)) = self.inner.node(ino) {
            return reply.attr(&LONG, &r.lower_attr(id));
        }
        self.spawn_ro(req, |fs| async move {
            match fs.getattr(ino, fh).await {
                Ok((ttl, attr)) => reply.attr(&ttl, &attr),
                Err(f) => reply.error(fs.failed("getattr", f)),
            }
        });
    }

    fn readlink(&mut self, req: &Request<'_>, ino: u64, reply: ReplyData) {
        self.arrive(ino);
        if let Some(r) = self.inner.built_writable(ino) {
            return match r.readlink(ino) {
                Ok(b) => reply.data(&b),
                Err(f) => reply.error(f.errno),
            };
        }
        self.spawn_ro(req, |fs| async move {
            match fs.readlink(ino).await {
                Ok(b) => reply.data(&b),
                Err(f) => reply.error(f.errno),
            }
        });
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        self.arrive(ino);
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if write && self.inner.passthrough().is_some_and(|p| p.backed(ino)) {
            // The kernel takes no other open beside a passthrough one.
            let f = Fail::new(libc::ETXTBSY, "open for reading from the cache's copy");
            return reply.error(self.inner.failed("open for writing", f));
        }
        let now = match self.inner.built_writable(ino) {
            Some(r) if !write => Some(self.inner.open_read(&r, ino)),
            Some(_) => self.inner.open_write_now(ino, flags),
            None => None,
        };
        if let Some(res) = now {
            return match res {
                Ok((fh, fl)) => opened(&self.inner, ino, fh, fl, write, reply),
                Err(f) => reply.error(self.inner.failed("open", f)),
            };
        }
        // An image's read-only tree: nothing to prepare.
        if let (Ok(Node::Tree(..)), false) = (self.inner.node(ino), write) {
            return opened(&self.inner, ino, 0, FOPEN_KEEP_CACHE, false, reply);
        }
        let work = move |fs: Arc<Inner>| async move {
            match fs.open(ino, flags).await {
                Ok((fh, fl)) => opened(&fs, ino, fh, fl, write, reply),
                Err(f) => reply.error(fs.failed("open", f)),
            }
        };
        if write {
            self.spawn(work)
        } else {
            self.spawn_ro(req, work)
        }
    }

    fn read(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        self.arrive(ino);
        if let Some(Handle::Upper(f, _)) = self.inner.handle(fh).as_deref() {
            return match crate::handles::read_at(f, offset.max(0) as u64, size) {
                Ok(b) => reply.data(&b),
                Err(f) => reply.error(f.errno),
            };
        }
        self.spawn_ro(req, |fs| async move {
            match fs.read(ino, fh, offset.max(0) as u64, size).await {
                Ok(b) => reply.data(&b),
                Err(f) => reply.error(fs.failed("read", f)),
            }
        });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.release_backed(ino, fh);
        self.inner.release(fh);
        reply.ok();
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _lock: u64, reply: ReplyEmpty) {
        // Only handles of tag files and ctl get FLUSH: one of a dead
        // daemon's lost what was written to it.
        if self.inner.handle(fh).is_none() && self.inner.earlier_fh(fh) {
            let f = crate::handles::lost_edit();
            return reply.error(self.inner.failed("close", f));
        }
        // Only an edited tag file has work to do at close.
        if !matches!(self.inner.handle(fh).as_deref(), Some(Handle::Edit(_))) {
            return reply.ok();
        }
        self.spawn(|fs| async move {
            let r = fs.flush(fh).await;
            empty_reply(&fs, "close", r, reply)
        });
    }

    /// No OPENDIR is needed: the first answer (ENOSYS) tells the kernel
    /// never to send OPENDIR or RELEASEDIR again on this connection, and
    /// to keep every directory's listing (FOPEN_KEEP_CACHE|FOPEN_CACHE_DIR
    /// by default). A warm `find` then costs no request at all. The kernel
    /// drops a kept listing when this mount changes the directory, or when
    /// its mtime moves: that of a directory whose registry side can change
    /// moves each `--tag-ttl` (namespace/fs.rs `attr`).
    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.error(libc::ENOSYS);
    }

    fn readdir(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        reply: ReplyDirectory,
    ) {
        self.arrive(ino);
        if let Some(e) = taken_listing(&self.inner, ino, offset) {
            return dir_reply(&self.inner, Ok(e), offset, reply);
        }
        if let Some(r) = self.inner.built_writable(ino) {
            let res = r.readdir(ino).map(|e| keep_listing(&self.inner, ino, e));
            return dir_reply(&self.inner, res, offset, reply);
        }
        self.spawn_ro(req, move |fs| async move {
            let res = fs.readdir(ino).await.map(|e| keep_listing(&fs, ino, e));
            dir_reply(&fs, res, offset, reply)
        });
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        // Sizes are the disk cache's: what `df` shows is how full it is.
        let files = self.inner.lock().keys.len() as u64;
        let (limit, used) = (self.inner.cache.limit(), self.inner.cache.used());
        let free = limit.saturating_sub(used) / 4096;
        reply.statfs(limit / 4096, free, free, files, 0, 4096, 255, 4096);
    }

    fn getxattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        self.arrive(ino);
        let name = name.as_bytes().to_vec();
        if let Some(r) = self.inner.built_writable(ino) {
            return match r.xattrs(ino) {
                Ok(x) => match x.iter().find(|(n, _)| *n == name) {
                    Some((_, v)) => xattr_reply(reply, v, size),
                    None => reply.error(libc::ENODATA),
                },
                Err(f) => reply.error(f.errno),
            };
        }
        self.spawn_ro(req, |fs| async move {
            match fs.xattrs(ino).await {
                Ok(x) => match x.iter().find(|(n, _)| *n == name) {
                    Some((_, v)) => xattr_reply(reply, v, size),
                    None => reply.error(libc::ENODATA),
                },
                Err(f) => reply.error(f.errno),
            }
        });
    }

    fn listxattr(&mut self, req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        self.arrive(ino);
        if let Some(r) = self.inner.built_writable(ino) {
            return names_reply(r.xattrs(ino), size, reply);
        }
        self.spawn_ro(req, |fs| async move {
            names_reply(fs.xattrs(ino).await, size, reply)
        });
    }

    fn access(&mut self, _req: &Request<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        self.arrive(ino);
        let writable = matches!(
            self.inner.node(ino),
            Ok(Node::W(..) | Node::Ns(Key::WRootfs(..) | Key::Ctl))
        );
        if mask & libc::W_OK != 0 && !writable {
            reply.error(libc::EROFS)
        } else {
            reply.ok()
        }
    }

    // Changes: only a tag's rootfs/ takes them; everything else is EROFS.

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        self.arrive(ino);
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(timespec),
            mtime: mtime.map(timespec),
        };
        let fetch = a.size.is_some_and(|s| s > 0)
            && self
                .inner
                .built_writable(ino)
                .is_some_and(|r| r.bytes_below(ino));
        // Metadata only (or bytes already up): answered here when it can be.
        if !fetch {
            if let Ok(res) = self.inner.change_now(ino, |r| r.setattr(ino, &a)) {
                return attr_reply(&self.inner, res, reply);
            }
        }
        self.spawn(|fs| async move {
            let res = fs.setattr(ino, a).await;
            attr_reply(&fs, res, reply)
        });
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.arrive(parent);
        let (name, uid, gid) = (name.as_bytes().to_vec(), req.uid(), req.gid());
        self.change(
            parent,
            move |r| r.mknod(parent, &name, mode & !umask, rdev, uid, gid),
            move |fs, r| entry_reply(fs, "mknod", r, reply),
        );
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.arrive(parent);
        if let Ok(Node::Ns(Key::Repo(repo))) = self.inner.node(parent) {
            // REPO/NEWTAG: a tag to write a manifest into.
            let name = name.to_string_lossy().into_owned();
            return self.spawn(|fs| async move {
                let made = match fs.mkdir_tag(&repo, &name).await {
                    Ok(k) => {
                        let ino = fs.ino(k.clone());
                        fs.attr(ino, &Node::Ns(k)).await
                    }
                    Err(f) => Err(f),
                };
                lookup_reply(&fs, made, reply)
            });
        }
        let (name, uid, gid) = (name.as_bytes().to_vec(), req.uid(), req.gid());
        self.change(
            parent,
            move |r| r.mkdir(parent, &name, mode & !umask, uid, gid),
            move |fs, r| entry_reply(fs, "mkdir", r, reply),
        );
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.arrive(parent);
        let name = name.as_bytes().to_vec();
        self.change(
            parent,
            move |r| r.unlink(parent, &name),
            move |fs, r| empty_reply(fs, "unlink", r, reply),
        );
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.arrive(parent);
        if let Ok(Node::Ns(Key::Repo(repo))) = self.inner.node(parent) {
            // A tag made with mkdir and never written just goes.
            let tag = name.to_string_lossy().into_owned();
            if self.inner.rmdir_tag(&repo, &tag) {
                return reply.ok();
            }
            return self.spawn(|fs| async move {
                let r = fs.delete_tag(&repo, &tag).await;
                empty_reply(&fs, "rmdir", r, reply)
            });
        }
        let name = name.as_bytes().to_vec();
        self.change(
            parent,
            move |r| r.rmdir(parent, &name),
            move |fs, r| empty_reply(fs, "rmdir", r, reply),
        );
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.arrive(parent);
        let (name, uid, gid) = (link_name.as_bytes().to_vec(), req.uid(), req.gid());
        let target = target.to_path_buf();
        self.change(
            parent,
            move |r| r.symlink(parent, &name, &target, uid, gid),
            move |fs, r| entry_reply(fs, "symlink", r, reply),
        );
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        self.arrive(parent);
        self.arrive(newparent);
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let op = move |r: &RootFs| r.rename(parent, &name, newparent, &newname, flags);
        let same = |a: Option<Arc<RootFs>>, b: Option<Arc<RootFs>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a, &b),
            _ => false,
        };
        let op = if same(
            self.inner.built_writable(parent),
            self.inner.built_writable(newparent),
        ) {
            match self.inner.change_now(parent, op) {
                Ok(r) => return empty_reply(&self.inner, "rename", r, reply),
                Err(op) => op,
            }
        } else {
            op
        };
        self.spawn(|fs| async move {
            let r = match fs.must_write(newparent).await {
                Ok(to) => {
                    let same = fs
                        .must_write(parent)
                        .await
                        .is_ok_and(|from| Arc::ptr_eq(&from, &to));
                    if same {
                        fs.change(parent, op).await
                    } else {
                        Err(Fail::new(libc::EXDEV, "rename across images"))
                    }
                }
                Err(f) => Err(f),
            };
            empty_reply(&fs, "rename", r, reply)
        });
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.arrive(ino);
        self.arrive(newparent);
        let newname = newname.as_bytes().to_vec();
        self.change(
            ino,
            move |r| r.link(ino, newparent, &newname),
            move |fs, r| entry_reply(fs, "link", r, reply),
        );
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        self.arrive(ino);
        let kill = write_flags & FUSE_WRITE_KILL_SUIDGID != 0;
        if let Some(res) = self.inner.write_now(fh, offset.max(0) as u64, data, kill) {
            return match res {
                Ok(n) => reply.written(n),
                Err(f) => reply.error(self.inner.failed("write", f)),
            };
        }
        let data = data.to_vec();
        self.spawn(|fs| async move {
            match fs.write(ino, fh, offset.max(0) as u64, data, kill).await {
                Ok(n) => reply.written(n),
                Err(f) => reply.error(fs.failed("write", f)),
            }
        });
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        self.arrive(parent);
        if let Ok(Node::Ns(Key::Referrers(repo, subject))) = self.inner.node(parent) {
            // A file copied into referrers/ is attached at close.
            let (key, edit) = self
                .inner
                .open_attach(&repo, &subject, &name.to_string_lossy());
            let ino = self.inner.ino(key);
            let mut attr = self.inner.ns_attr(ino, false, 0);
            attr.perm = 0o644;
            let fh = self.inner.add_handle(Handle::Edit(edit));
            self.inner.looked_up(ino);
            return reply.created(&SHORT, &attr, 0, fh, FOPEN_DIRECT_IO);
        }
        let (name, uid, gid) = (name.as_bytes().to_vec(), req.uid(), req.gid());
        self.change(
            parent,
            move |r| r.create(parent, &name, mode & !umask, uid, gid),
            move |fs, made| match made {
                Ok((attr, file)) => match fs.built_writable(parent) {
                    Some(r) => {
                        let fh = fs.add_handle(Handle::Upper(Arc::new(file), r));
                        reply.created(&WRITABLE_TTL, &attr, 0, fh, FOPEN_NOFLUSH)
                    }
                    None => reply.error(libc::EIO),
                },
                Err(f) => reply.error(fs.failed("create", f)),
            },
        );
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, fh: u64, _datasync: bool, reply: ReplyEmpty) {
        self.arrive(ino);
        self.spawn(|fs| async move {
            let r = fs.fsync(ino, fh).await;
            empty_reply(&fs, "fsync", r, reply)
        });
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.arrive(ino);
        self.spawn(|fs| async move {
            let r = match fs.writable(ino).await {
                Ok(Some(r)) => r.sync_names(ino),
                Ok(None) => Ok(()),
                Err(f) => Err(f),
            };
            empty_reply(&fs, "fsyncdir", r, reply)
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.arrive(ino);
        self.spawn(|fs| async move {
            let r = fs.fallocate(ino, fh, offset, length, mode).await;
            empty_reply(&fs, "fallocate", r, reply)
        });
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.arrive(ino);
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.change(
            ino,
            move |r| r.setxattr(ino, &name, &value, flags),
            move |fs, r| empty_reply(fs, "setxattr", r, reply),
        );
    }

    fn removexattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        self.arrive(ino);
        let name = name.as_bytes().to_vec();
        self.change(
            ino,
            move |r| r.removexattr(ino, &name),
            move |fs, r| empty_reply(fs, "removexattr", r, reply),
        );
    }
}

fn timespec(t: fuser::TimeOrNow) -> libc::timespec {
    match t {
        fuser::TimeOrNow::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        fuser::TimeOrNow::SpecificTime(t) => {
            let (sec, nsec) = match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let (s, n) = (d.as_secs() as i64, d.subsec_nanos() as i64);
                    if n == 0 {
                        (-s, 0)
                    } else {
                        (-s - 1, 1_000_000_000 - n)
                    }
                }
            };
            crate::upper::timespec(sec, nsec)
        }
    }
}

fn attr_reply(fs: &Inner, r: Res<FileAttr>, reply: ReplyAttr) {
    match r {
        Ok(attr) => reply.attr(&WRITABLE_TTL, &attr),
        Err(f) => reply.error(fs.failed("setattr", f)),
    }
}

/// The reply to a change that made an entry in a writable tree.
fn entry_reply(fs: &Inner, what: &str, r: Res<FileAttr>, reply: ReplyEntry) {
    match r {
        Ok(attr) => reply.entry(&WRITABLE_TTL, &attr, 0),
        Err(f) => {
            fs.fail(what, &f);
            reply.error(f.errno)
        }
    }
}

fn empty_reply(fs: &Inner, what: &str, r: Res<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(f) => {
            fs.fail(what, &f);
            reply.error(f.errno)
        }
    }
}
