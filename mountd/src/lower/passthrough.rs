//! FUSE passthrough (Linux 6.9+): a lower file whose bytes are all in the
//! cache is opened on a backing file, so the kernel reads it from there
//! (and from that file's page cache) without a round trip to this daemon.
//!
//! The kernel holds one backing file per inode while it is open that way
//! and refuses (EIO) any other kind of open beside it, and the reverse: so
//! every open of a big lower file is counted here, and an inode takes the
//! mode of its first open until its last one is released.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

/// Files smaller than this are served as before (the kernel's page cache
/// keeps them across opens): a copy of each in the cache would cost more
/// than the reads it saves.
pub const MIN_SIZE: u64 = 1 << 20;

/// `_IOW(229, 1, struct fuse_backing_map)` and `_IOW(229, 2, uint32_t)`.
const BACKING_OPEN: libc::c_ulong = 0x4010_e501;
const BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

/// How an inode is open now.
enum Mode {
    /// Through this daemon (`opens` of them).
    Served(u32),
    /// On backing file `id`.
    Backed { id: u32, opens: u32 },
}

/// What [`Passthrough::open`] decided.
pub enum Open {
    /// Reply with this backing id.
    Backed(u32),
    /// Serve it as before.
    Served,
}

pub struct Passthrough {
    dev: OwnedFd,
    inodes: Mutex<HashMap<u64, Mode>>,
}

impl Passthrough {
    /// On the connection `dev` (a /dev/fuse descriptor), duplicated.
    pub fn new(dev: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Passthrough {
            dev: dev.try_clone_to_owned()?,
            inodes: Mutex::default(),
        })
    }

    /// Count an open of `ino`: on a backing file when it is not open
    /// otherwise and `content` gives one (called only then), else served.
    pub fn open(&self, ino: u64, content: impl FnOnce() -> Option<File>) -> Open {
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        match inodes.get_mut(&ino) {
            Some(Mode::Backed { id, opens }) => {
                *opens += 1;
                return Open::Backed(*id);
            }
            Some(Mode::Served(opens)) => {
                *opens += 1;
                return Open::Served;
            }
            None => {}
        }
        let backed = content().and_then(|f| match self.register(&f) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!("passthrough for inode {ino}: {e}");
                None
            }
        });
        let (mode, open) = match backed {
            Some(id) => (Mode::Backed { id, opens: 1 }, Open::Backed(id)),
            None => (Mode::Served(1), Open::Served),
        };
        inodes.insert(ino, mode);
        open
    }

    /// Whether `ino` is open on a backing file now (a write must not open
    /// it beside that).
    pub fn backed(&self, ino: u64) -> bool {
        let inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        matches!(inodes.get(&ino), Some(Mode::Backed { .. }))
    }

    /// One open of `ino` released; `true` when it was the last one served
    /// by this daemon (the time to see whether its bytes are all local).
    pub fn release(&self, ino: u64) -> bool {
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        let last = match inodes.get_mut(&ino) {
            Some(Mode::Backed { opens, .. } | Mode::Served(opens)) => {
                *opens -= 1;
                *opens == 0
            }
            None => return false,
        };
        if !last {
            return false;
        }
        match inodes.remove(&ino) {
            Some(Mode::Backed { id, .. }) => {
                // The kernel keeps its own reference while the file is
                // open: the id is only a name for the next open.
                self.unregister(id);
                false
            }
            _ => true,
        }
    }

    fn register(&self, f: &File) -> io::Result<u32> {
        let map = BackingMap {
            fd: f.as_fd().as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: the ioctl reads a fuse_backing_map we own for its duration.
        let id = unsafe { libc::ioctl(self.dev.as_raw_fd(), BACKING_OPEN as _, &map) };
        match id {
            id if id > 0 => Ok(id as u32),
            _ => Err(io::Error::last_os_error()),
        }
    }

    fn unregister(&self, id: u32) {
        // SAFETY: the ioctl reads one u32 we own for its duration.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), BACKING_CLOSE as _, &id) };
        if r < 0 {
            let e = io::Error::last_os_error();
            tracing::debug!("closing backing file {id}: {e}");
        }
    }
}

/// Copy `len` bytes at `at` of `src` to `out` at `out_at`, in the kernel
/// (`copy_file_range`), or through a buffer where it cannot.
pub fn copy_range(src: &File, at: u64, out: &File, out_at: u64, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (at as i64, out_at as i64);
    let mut left = len;
    while left > 0 {
        let want = left.min(1 << 30) as usize;
        // SAFETY: two descriptors we hold and offsets we own.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                out.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match n {
            n if n > 0 => left -= n as u64,
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                        copy_buffered(src, off_in as u64, out, off_out as u64, left)
                    }
                    _ => Err(e),
                };
            }
        }
    }
    Ok(())
}

fn copy_buffered(src: &File, at: u64, out: &File, out_at: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        src.read_exact_at(&mut buf[..n], at + done)?;
        out.write_all_at(&buf[..n], out_at + done)?;
        done += n as u64;
    }
    Ok(())
}
