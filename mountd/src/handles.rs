//! Open files: a handle on a writable tree's upper copy or on lower bytes,
//! and `.ggfs/ctl`, whose reply is what `ggfs commit` reads back.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fuser::consts::{FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE};

use crate::lower::tree::{self, DataRef};
use crate::namespace::fs::{slice, Inner, Key, Node};
use crate::namespace::{Fail, Res};
use crate::upper::rootfs::{io_fail, Data, RootFs};

/// An open file.
pub enum Handle {
    /// Its upper copy.
    Upper(Arc<std::fs::File>, Arc<RootFs>),
    /// Its bytes in a lower layer, and their length.
    Lower(Arc<RootFs>, DataRef, u64),
    /// `.ggfs/ctl`: the reply to the request written.
    Ctl(Arc<Mutex<Vec<u8>>>),
    /// A tag's manifest.json or config.json being written.
    Edit(crate::namespace::edit::Edit),
}

impl Inner {
    pub(crate) fn handle(&self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        h.get(&fh).cloned()
    }

    pub(crate) fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut hs = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        hs.insert(fh, Arc::new(h));
        fh
    }

    /// `close`: a tag's file written is pushed now, and close says how it went.
    pub async fn flush(&self, fh: u64) -> Res<()> {
        match self.handle(fh).as_deref() {
            Some(Handle::Edit(e)) => self.apply_edit(e).await,
            _ => Ok(()),
        }
    }

    pub fn release(&self, fh: u64) {
        let mut hs = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        hs.remove(&fh);
    }

    /// Open: (file handle, flags). Digest-addressed content keeps the
    /// kernel's page cache across opens; stats are read fresh; a writable
    /// tree's files get a handle on their upper copy or lower bytes.
    pub async fn open(&self, ino: u64, flags: i32) -> Res<(u64, u32)> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if let Some(r) = self.writable(ino).await? {
            if write {
                let _g = r.w.as_ref().expect("writable").lock.write().await;
                let truncate = flags & libc::O_TRUNC != 0;
                if !truncate && r.bytes_below(ino) {
                    r.bring_up(ino).await?;
                }
                let f = tokio::task::block_in_place(|| r.open_write(ino, truncate))?;
                return Ok((self.add_handle(Handle::Upper(Arc::new(f), r.clone())), 0));
            }
            return self.open_read(&r, ino);
        }
        let node = self.node(ino)?;
        if let (Node::Ns(key), true) = (&node, write) {
            if let Some(e) = self.open_edit(key, flags & libc::O_TRUNC != 0).await? {
                return Ok((self.add_handle(Handle::Edit(e)), FOPEN_DIRECT_IO));
            }
        }
        if let Node::Ns(Key::Ctl) = node {
            let reply = Arc::new(Mutex::new(Vec::new()));
            return Ok((self.add_handle(Handle::Ctl(reply)), FOPEN_DIRECT_IO));
        }
        if write {
            return Err(Fail::new(
                libc::EROFS,
                "read-only: only a tag's rootfs/ takes changes",
            ));
        }
        Ok(match node {
            Node::Ns(Key::Stats | Key::Status) => (0, FOPEN_DIRECT_IO),
            _ => (0, FOPEN_KEEP_CACHE),
        })
    }

    /// Open a writable tree's file for reading: its upper copy, or its
    /// bytes below (which the kernel may keep cached: they never change).
    pub(crate) fn open_read(&self, r: &Arc<RootFs>, ino: u64) -> Res<(u64, u32)> {
        Ok(match r.data_for_read(ino)? {
            Data::Upper(f) => (self.add_handle(Handle::Upper(Arc::new(f), r.clone())), 0),
            Data::Lower(d, size) => (
                self.add_handle(Handle::Lower(r.clone(), d, size)),
                FOPEN_KEEP_CACHE,
            ),
        })
    }

    /// Open a built writable tree's file for writing on this thread, when
    /// that needs no fetching and no waiting; `None`: use [`Inner::open`].
    pub(crate) fn open_write_now(&self, ino: u64, flags: i32) -> Option<Res<(u64, u32)>> {
        let r = self.built_writable(ino)?;
        let truncate = flags & libc::O_TRUNC != 0;
        let _g = r.w.as_ref()?.lock.try_write().ok()?;
        if !truncate && r.bytes_below(ino) {
            return None;
        }
        Some(
            r.open_write(ino, truncate)
                .map(|f| (self.add_handle(Handle::Upper(Arc::new(f), r.clone())), 0)),
        )
    }

    /// Handle `fh`; for one an earlier daemon on this connection opened,
    /// the file opened again, kept under `fh` until it is released.
    pub(crate) async fn handle_or_reopen(
        &self,
        ino: u64,
        fh: u64,
        write: bool,
    ) -> Res<Option<Arc<Handle>>> {
        if let Some(h) = self.handle(fh) {
            return Ok(Some(h));
        }
        if !self.earlier_fh(fh) {
            return Ok(None);
        }
        let flags = if write {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        let (new, _) = self.open(ino, flags).await?;
        let mut hs = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let h = hs.remove(&new);
        match h.as_deref() {
            // Its bytes were in the dead daemon's memory.
            Some(Handle::Edit(_) | Handle::Ctl(_)) => Err(lost_edit()),
            Some(_) => {
                hs.insert(fh, h.clone().expect("a handle"));
                Ok(h)
            }
            None => Ok(None),
        }
    }

    /// Whether `fh` is a handle an earlier daemon on this connection opened.
    pub(crate) fn earlier_fh(&self, fh: u64) -> bool {
        fh != 0 && fh < self.fh_base
    }

    pub async fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Res<Bytes> {
        if let Some(h) = self.handle_or_reopen(ino, fh, false).await? {
            return match &*h {
                Handle::Upper(f, _) => read_at(f, offset, size),
                Handle::Lower(r, d, _) => self.read_lower(r, *d, offset, size).await,
                Handle::Ctl(reply) => {
                    let reply = reply.lock().unwrap_or_else(|p| p.into_inner());
                    Ok(slice(&reply, offset, size))
                }
                Handle::Edit(e) => Ok(slice(&e.bytes(), offset, size)),
            };
        }
        match self.node(ino)? {
            Node::Tree(r, id) => {
                let n = r.tree.node(id);
                let Some(data) = n.data else {
                    return Err(Fail::new(libc::EISDIR, "not a regular file"));
                };
                self.read_lower(&r, data, offset, size).await
            }
            Node::W(..) => Err(Fail::new(libc::EBADF, "read without an open handle")),
            Node::Ns(key) => self.read_ns(&key, offset, size).await,
        }
    }

    /// Write to an open upper copy, on this thread when no commit holds the
    /// tree (`None` then).
    pub(crate) fn write_now(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_suid: bool,
    ) -> Option<Res<u32>> {
        let h = self.handle(fh)?;
        let Handle::Upper(f, r) = &*h else {
            return None;
        };
        let w = r.w.as_ref()?;
        let _g = w.lock.try_read().ok()?;
        Some(write_at(r, f, offset, data, kill_suid))
    }

    pub(crate) async fn read_lower(
        &self,
        r: &RootFs,
        d: DataRef,
        offset: u64,
        size: u32,
    ) -> Res<Bytes> {
        self.ns.stats.read();
        let layer = &r.layers[d.layer];
        layer.read(d.entry, offset, size).await.map_err(|e| {
            tracing::error!("read of layer {}: {e}", layer.digest());
            Fail::from(e)
        })
    }

    pub async fn write(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
        kill_suid: bool,
    ) -> Res<u32> {
        let h = self
            .handle_or_reopen(ino, fh, true)
            .await?
            .ok_or_else(|| Fail::new(libc::EBADF, "write to a file not open for writing"))?;
        match &*h {
            Handle::Upper(f, r) => {
                let _g = r.w.as_ref().expect("writable").lock.read().await;
                tokio::task::block_in_place(|| write_at(r, f, offset, &data, kill_suid))
            }
            Handle::Ctl(reply) => {
                let len = data.len() as u32;
                let answer = self.control(&data).await;
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                *reply.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
                Ok(len)
            }
            Handle::Edit(e) => Ok(e.write(offset, &data)),
            Handle::Lower(..) => Err(Fail::new(libc::EBADF, "file not open for writing")),
        }
    }

    pub async fn fsync(&self, ino: u64, fh: u64) -> Res<()> {
        if let Some(h) = self.handle_or_reopen(ino, fh, true).await? {
            if let Handle::Upper(f, r) = &*h {
                let (f, r) = (f.clone(), r.clone());
                return tokio::task::spawn_blocking(move || {
                    f.sync_all().map_err(|e| io_fail("fsync", e))?;
                    r.sync_names(ino)
                })
                .await
                .map_err(|e| Fail::new(libc::EIO, e.to_string()))?;
            }
        }
        Ok(())
    }

    pub async fn fallocate(
        &self,
        ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
    ) -> Res<()> {
        let h = self
            .handle_or_reopen(ino, fh, true)
            .await?
            .ok_or_else(|| Fail::new(libc::EBADF, "fallocate on a file not open for writing"))?;
        let Handle::Upper(f, r) = &*h else {
            return Err(Fail::new(libc::EBADF, "file not open for writing"));
        };
        let w = r.w.as_ref().expect("writable");
        let _g = w.lock.read().await;
        w.journal
            .touch(&w.upper, &r.tree.node(tree::ROOT).meta)
            .map_err(|e| io_fail("journal", e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, length) };
        if rc != 0 {
            return Err(io_fail("fallocate", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Up to `size` bytes at `offset` of a local file.
pub(crate) fn read_at(f: &std::fs::File, offset: u64, size: u32) -> Res<Bytes> {
    let mut buf = vec![0u8; size as usize];
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_fail("read", e)),
        }
    }
    buf.truncate(n);
    Ok(Bytes::from(buf))
}

/// What the kernel leaves to us with FUSE_HANDLE_KILLPRIV_V2 (which spares
/// a GETXATTR round trip per write): a write drops file capabilities, and
/// setuid/setgid when the kernel says so (a writer without CAP_FSETID).
/// The daemon writes as root, so the upper file system would not.
fn kill_privs(f: &std::fs::File, kill_suid: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    let mode = f.metadata()?.permissions().mode();
    let setgid = libc::S_ISGID | libc::S_IXGRP;
    let drop = libc::S_ISUID
        | if mode & setgid == setgid {
            libc::S_ISGID
        } else {
            0
        };
    if kill_suid && mode & drop != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & !drop & 0o7777))?;
    }
    let name = c"security.capability";
    // SAFETY: a valid descriptor and NUL-terminated name.
    if unsafe { libc::fremovexattr(f.as_raw_fd(), name.as_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) {
            return Err(e);
        }
    }
    Ok(())
}

/// A write to an upper copy: the image is marked changed first.
fn write_at(r: &RootFs, f: &std::fs::File, offset: u64, data: &[u8], kill: bool) -> Res<u32> {
    let w = r.w.as_ref().expect("writable");
    w.journal
        .touch(&w.upper, &r.tree.node(tree::ROOT).meta)
        .map_err(|e| io_fail("journal", e))?;
    kill_privs(f, kill).map_err(|e| io_fail("write", e))?;
    f.write_all_at(data, offset)
        .map(|_| data.len() as u32)
        .map_err(|e| io_fail("write", e))
}

/// A tag file (or `.ggfs/ctl`) written through a daemon that died: what
/// was written is gone with it, and its close must say so.
pub(crate) fn lost_edit() -> Fail {
    Fail::new(
        libc::EIO,
        "opened before the mount's daemon restarted: what was written to it is lost",
    )
}
