//! Bounded time against a registry that accepts connections and then says
//! nothing (the process is frozen with SIGSTOP): the CLI fails with one
//! line naming the registry and what stalled, a read in a mount fails with
//! ETIMEDOUT, and both recover once the registry answers again.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mount::{within, Mount};
use common::Distribution;

#[test]
fn cli_fails_fast_and_clearly_on_a_stalled_registry() {
    let reg = registry_with_image();
    reg.pause();
    let image = reg.reference("st/app:v1");
    let out = within(120, "ggfs manifest on a frozen registry", move || {
        Command::new(common::ggfs_bin())
            .args(["--timeout", "2", "manifest", &image])
            .stdin(Stdio::null())
            .output()
            .expect("spawn ggfs")
    });
    reg.resume();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(reg.addr()) && err.contains("stalled"), "{err}");
    let out = Command::new(common::ggfs_bin())
        .args(["manifest", &reg.reference("st/app:v1")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "after resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mount_read_times_out_then_recovers() {
    let reg = registry_with_image();
    let m = Mount::start(reg.addr(), &["--timeout", "2"]);
    reg.pause();
    let p = m.path("st/app/v1/rootfs/small.txt");
    let q = p.clone();
    let err = within(120, "a read in a mount of a frozen registry", move || {
        std::fs::read(q).unwrap_err()
    });
    reg.resume();
    assert_eq!(err.raw_os_error(), Some(110), "ETIMEDOUT: {err}");
    assert!(m.log().contains("stalled"), "{}", m.log());
    // Failures are remembered a few seconds; then the next read goes through.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = p.clone();
        match within(60, "a read after resume", move || std::fs::read(q)) {
            Ok(b) => {
                assert_eq!(b, b"hello ggfs\n");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn sigterm_ends_the_daemon_with_a_read_stuck_and_a_shell_inside() {
    let reg = registry_with_image();
    // No stall deadline to speak of: only the shutdown can end the read.
    let m = Mount::start(reg.addr(), &["--timeout", "600"]);
    // A process whose working directory is inside: the mount is busy.
    let mut inside = Command::new("sleep")
        .arg("300")
        .current_dir(m.path("st/app/v1"))
        .spawn()
        .unwrap();
    reg.pause();
    let p = m.path("st/app/v1/rootfs/small.txt");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(std::fs::read(p)));
    // The read is stuck on the frozen registry.
    assert!(rx.recv_timeout(Duration::from_secs(2)).is_err());
    common::mount::kill(m.pid(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.pid_alive() {
        assert!(Instant::now() < deadline, "daemon alive 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let read = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the stuck read returned");
    assert!(read.is_err(), "a read of a frozen registry succeeded");
    assert!(!common::mount::is_mounted(m.mp()));
    let _ = inside.kill();
    let _ = inside.wait();
    reg.resume();
}

/// A reader stuck on a frozen registry is killed with SIGINT (Ctrl-C) or
/// SIGTERM: it returns at once though its request is with the daemon (the
/// daemon answers the kernel's INTERRUPT with EINTR; its fetch goes on and
/// its late answer is dropped), and the mount goes on serving once the
/// registry answers. A signal the reader handles (SIGWINCH: ignored, not
/// fatal) does not turn into an error: the read is restarted and succeeds.
#[test]
fn a_reader_killed_mid_fetch_returns_at_once() {
    let reg = registry_with_image();
    let m = Mount::start(reg.addr(), &["--timeout", "600"]);
    reg.pause();
    let p = m.path("st/app/v1/rootfs/small.txt");
    for sig in ["INT", "TERM"] {
        let mut cat = Command::new("cat")
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            cat.try_wait().unwrap().is_none(),
            "cat of a frozen registry finished"
        );
        common::mount::kill(cat.id(), sig);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(st) = cat.try_wait().unwrap() {
                assert!(!st.success(), "SIG{sig}: cat succeeded");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cat still running 5 s after SIG{sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A harmless signal mid-read: the read restarts, and once the registry
    // answers it returns the bytes.
    let out = common::tempdir();
    let dst = out.path().join("out");
    let mut cat = Command::new("sh")
        .arg("-c")
        .arg("trap '' WINCH; exec cat \"$0\" > \"$1\"")
        .arg(&p)
        .arg(&dst)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    common::mount::kill(cat.id(), "WINCH");
    std::thread::sleep(Duration::from_millis(300));
    reg.resume();
    let st = within(120, "the read after SIGWINCH", move || cat.wait().unwrap());
    assert!(st.success(), "a harmless signal failed the read");
    assert_eq!(std::fs::read(&dst).unwrap(), b"hello ggfs\n");
    assert!(m.pid_alive());
}

/// A registry with the every-file-type fixture at `st/app:v1`.
fn registry_with_image() -> Distribution {
    let reg = Distribution::start();
    let layout = common::tempdir();
    let l = layout.path().join("l");
    common::umoci_image(&l, "latest");
    common::push_oci_layout(&l, "latest", &reg.reference("st/app:v1"));
    reg
}
