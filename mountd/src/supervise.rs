//! A mount that outlives its daemon. A small supervising process starts
//! the daemon that serves the mount (the worker), keeps a copy of its
//! /dev/fuse descriptor and of the memfd where it writes the inode numbers
//! it gives out (inolog.rs), and when the worker dies (a crash, an OOM
//! kill, `kill -9`) starts another on the same connection. The kernel
//! keeps the mount meanwhile: requests wait in its queue, and those the
//! dead worker had taken are sent again (FUSE_NOTIFY_RESEND, Linux 6.9+).
//! Readers see a delay, not ENOTCONN.
//!
//! A worker that exits 0 (an unmount, a signal forwarded from here) ends
//! the supervisor too. A worker that keeps dying is given up on after
//! [`MAX_RESTARTS`] within [`RESTART_WINDOW`]: the connection closes and
//! the mount answers ENOTCONN, which the next `ggfs mount` clears.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Restarts allowed within [`RESTART_WINDOW`] before giving up.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// What a worker is told on its command line, beyond the mount's options.
pub enum Start {
    /// The first: mount, then hand the /dev/fuse descriptor over on this
    /// socket; `ready`: the pipe the user's `ggfs mount` waits on.
    First {
        handoff: RawFd,
        ready: Option<RawFd>,
    },
    /// A later one: serve the connection on this descriptor.
    Resume { fuse: RawFd, generation: u64 },
}

/// Run the mount's workers until one ends cleanly. `args`: the worker's
/// command line (without the descriptors, added per `Start`).
pub fn supervise(args: Vec<OsString>, ready: Option<OwnedFd>) -> Result<()> {
    let signals = crate::block_signals()?;
    let (mine, theirs) = socket_pair()?;
    let log = memfd()?;
    let start = Start::First {
        handoff: theirs.as_raw_fd(),
        ready: ready.as_ref().map(|f| f.as_raw_fd()),
    };
    let mut child = spawn(&args, &start, log.as_fd())?;
    drop((theirs, ready));
    let current = Arc::new(AtomicU32::new(child.id()));
    let stopping = Arc::new(AtomicBool::new(false));
    forward_signals(signals, current.clone(), stopping.clone());
    let Some(fuse) = receive_fd(&mine)? else {
        // It failed before mounting, and said why on the ready pipe.
        return exited(child.wait()?);
    };
    let mut restarts: Vec<Instant> = Vec::new();
    for generation in 1.. {
        let status = child.wait()?;
        if status.success() || stopping.load(Ordering::SeqCst) {
            return exited(status);
        }
        let now = Instant::now();
        restarts.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if restarts.len() >= MAX_RESTARTS {
            bail!(
                "the mount's daemon died {} times within {} s (last: {}): giving up; \
                 the mount answers ENOTCONN until `ggfs mount` or `ggfs unmount` clears it",
                MAX_RESTARTS + 1,
                RESTART_WINDOW.as_secs(),
                describe(status)
            );
        }
        restarts.push(now);
        tracing::warn!(
            "the mount's daemon (pid {}) died ({}): starting another on the same connection",
            child.id(),
            describe(status)
        );
        let start = Start::Resume {
            fuse: fuse.as_raw_fd(),
            generation,
        };
        child = spawn(&args, &start, log.as_fd())?;
        current.store(child.id(), Ordering::SeqCst);
    }
    unreachable!("generations run out")
}

fn exited(status: ExitStatus) -> Result<()> {
    match status.success() {
        true => Ok(()),
        false => bail!("the mount's daemon exited: {}", describe(status)),
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// Start a worker: our own executable with `args` and the descriptors of
/// `start` and the inode log, which it inherits.
fn spawn(args: &[OsString], start: &Start, log: BorrowedFd<'_>) -> Result<Child> {
    let log = log.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().context("finding own executable")?);
    cmd.args(args)
        .arg("--worker")
        .arg(format!("--ino-log-fd={log}"));
    let mut keep = vec![log];
    match *start {
        Start::First { handoff, ready } => {
            cmd.arg(format!("--handoff-fd={handoff}"));
            keep.push(handoff);
            if let Some(r) = ready {
                cmd.arg(format!("--ready-fd={r}"));
                keep.push(r);
            }
        }
        Start::Resume { fuse, generation } => {
            cmd.arg(format!("--resume-fd={fuse}"))
                .arg(format!("--generation={generation}"));
            keep.push(fuse);
        }
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            // The worker waits for signals itself (sigwait): unblock them.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd.spawn().context("starting the mount daemon")
}

/// SIGINT/SIGTERM/SIGHUP to the supervisor go to the current worker,
/// which unmounts and exits; no restart follows.
fn forward_signals(set: libc::sigset_t, current: Arc<AtomicU32>, stopping: Arc<AtomicBool>) {
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: `set` is a valid, initialised signal set.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        stopping.store(true, Ordering::SeqCst);
        // SAFETY: a plain kill of our own child.
        unsafe { libc::kill(current.load(Ordering::SeqCst) as i32, sig) };
    });
}

fn socket_pair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair fills two descriptors we then own.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("socketpair");
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn memfd() -> Result<OwnedFd> {
    // SAFETY: a name and flags; the descriptor is ours.
    let fd = unsafe { libc::memfd_create(c"ggfs-inodes".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send `fd` over the socket `sock` (SCM_RIGHTS).
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr over our buffers; CMSG_* address inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), raw);
        if libc::sendmsg(sock.as_raw_fd(), &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The descriptor sent on `sock`, or `None` when the other end closed
/// without sending one.
fn receive_fd(sock: &OwnedFd) -> Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr over our buffers; CMSG_* read inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("receiving the FUSE descriptor");
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if n == 0 || c.is_null() || (*c).cmsg_type != libc::SCM_RIGHTS {
            return Ok(None);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
        Ok(Some(OwnedFd::from_raw_fd(fd)))
    }
}

/// Ask the kernel to send again the requests a dead worker had taken
/// and not answered (FUSE_NOTIFY_RESEND, Linux 6.9+). Without it those
/// wait until their callers are interrupted.
pub fn resend(fuse: BorrowedFd<'_>) {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // struct fuse_out_header { len: u32, error: i32, unique: u64 }
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&16u32.to_ne_bytes());
    h[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: a 16-byte write from our buffer.
    let n = unsafe { libc::write(fuse.as_raw_fd(), h.as_ptr().cast(), h.len()) };
    if n != 16 {
        tracing::warn!(
            "asking the kernel to resend the dead daemon's requests: {} \
             (they wait until interrupted)",
            std::io::Error::last_os_error()
        );
    }
}
