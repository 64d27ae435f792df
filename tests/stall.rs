//! Bounded time against a registry that accepts connections and then says
//! nothing (the process is frozen with SIGSTOP), or that sends the headers
//! and part of a body and then nothing (a proxy in front of it): the CLI
//! fails with one line naming the registry and what stalled, a read in a
//! mount fails with ETIMEDOUT, and both recover once the registry answers
//! again. A body that is slow but moving is not cut. SIGTERM and `ggfs
//! unmount` end a mount whatever requests are stuck.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
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
    read_eventually(&p, b"hello ggfs\n");
}

#[test]
fn sigterm_ends_the_daemon_with_a_read_stuck_and_a_shell_inside() {
    let reg = registry_with_image();
    let stuck = Stuck::start(&reg);
    common::mount::kill(stuck.m.pid(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while stuck.m.pid_alive() {
        assert!(Instant::now() < deadline, "daemon alive 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    stuck.assert_ended();
    reg.resume();
}

/// As SIGTERM: `ggfs unmount` of a mount kept busy by a read stuck on a
/// frozen registry and a shell inside returns within seconds, the daemon
/// gone, the read failed and the mount point free.
#[test]
fn unmount_ends_the_daemon_with_a_read_stuck_and_a_shell_inside() {
    let reg = registry_with_image();
    let stuck = Stuck::start(&reg);
    let mp = stuck.m.mp().to_path_buf();
    let out = within(60, "ggfs unmount with a read stuck", move || {
        ggfs_out(&[std::ffi::OsStr::new("unmount"), mp.as_os_str()])
    });
    assert!(
        out.status.success(),
        "ggfs unmount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stuck.m.pid_alive(),
        "ggfs unmount returned before the daemon exited"
    );
    stuck.assert_ended();
    reg.resume();
}

/// `ggfs unmount` of a busy mount (a shell inside) still pushes the
/// pending commit before it returns, as it promises.
#[test]
fn unmount_of_a_busy_mount_pushes_pending_commits() {
    let reg = registry_with_image();
    // Only the unmount commits.
    let m = Mount::start(reg.addr(), &["--commit-delay", "600"]);
    std::fs::write(m.path("st/app/v1/rootfs/new.txt"), b"committed\n").unwrap();
    let mut inside = sleep_in(&m.path("st/app/v1/rootfs"));
    let mp = m.mp().to_path_buf();
    let out = within(180, "ggfs unmount of a busy mount", move || {
        ggfs_out(&[std::ffi::OsStr::new("unmount"), mp.as_os_str()])
    });
    let _ = inside.kill();
    let _ = inside.wait();
    assert!(
        out.status.success(),
        "ggfs unmount: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    assert!(!m.pid_alive() && !common::mount::is_mounted(m.mp()));
    let fresh = Mount::start(reg.addr(), &["--commit-delay", "manual"]);
    let p = fresh.path("st/app/v1/rootfs/new.txt");
    let read = within(120, "reading the committed file", move || std::fs::read(p));
    assert_eq!(read.unwrap(), b"committed\n", "log:\n{}", m.log());
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

/// A registry that sends a manifest's or a blob's headers and part of its
/// body, then nothing: the CLI fails within a bound with one line naming
/// the registry and saying it stalled.
#[test]
fn cli_fails_fast_and_clearly_on_a_body_that_stalls() {
    let reg = registry_with_image();
    let proxy = StallProxy::start(reg.addr());
    for (pattern, verb, name) in [
        ("/manifests/", "manifest", "st/app:v1".to_string()),
        ("/blobs/", "blob", format!("st/app@{}", layer_digest(&reg))),
    ] {
        proxy.set(pattern, Answer::StallAfter(100));
        let args = ["--timeout", "2", verb, &proxy.reference(&name)].map(String::from);
        let out = within(60, "ggfs on a body that stalls", move || ggfs_out(&args));
        assert!(!out.status.success(), "{verb} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{verb}: one line: {err}");
        assert!(
            err.contains(proxy.addr()) && err.contains("stalled"),
            "{verb}: {err}"
        );
    }
}

/// A layer whose body stalls after its first bytes: the read in the mount
/// that needs it fails with ETIMEDOUT and a log line, and once the
/// registry behaves a later read returns the bytes.
#[test]
fn mount_read_of_a_blob_that_stalls_times_out_then_recovers() {
    let reg = registry_with_image();
    let proxy = StallProxy::start(reg.addr());
    proxy.set(&layer_digest(&reg), Answer::StallAfter(1000));
    let m = Mount::start(proxy.addr(), &["--timeout", "2"]);
    let p = m.path("st/app/v1/rootfs/small.txt");
    let q = p.clone();
    let err = within(120, "a read of a layer that stalls", move || {
        std::fs::read(q).unwrap_err()
    });
    assert_eq!(err.raw_os_error(), Some(110), "ETIMEDOUT: {err}");
    assert!(m.log().contains("stalled"), "{}", m.log());
    proxy.set("/blobs/", Answer::Whole);
    read_eventually(&p, b"hello ggfs\n");
}

/// A body that comes in pieces a second apart, 6 s in all, under
/// `--timeout 3`: slow but moving, it is not cut, and its bytes are right.
#[test]
fn a_slow_but_moving_body_is_not_cut() {
    let reg = registry_with_image();
    let proxy = StallProxy::start(reg.addr());
    let digest = layer_digest(&reg);
    proxy.set(&digest, Answer::Trickle(7));
    let blob = proxy.reference(&format!("st/app@{digest}"));
    let out = within(120, "ggfs blob of a trickling body", move || {
        ggfs_out(&["--timeout", "3", "blob", &blob])
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(common::sha256_digest(&out.stdout), digest);
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

/// The digest of `st/app:v1`'s (one) layer.
fn layer_digest(reg: &Distribution) -> String {
    let m = common::skopeo_inspect_raw(&format!("docker://{}", reg.reference("st/app:v1")));
    m["layers"][0]["digest"].as_str().unwrap().to_string()
}

/// `ggfs args…`, whatever its outcome.
fn ggfs_out<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(common::ggfs_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn ggfs")
}

/// `sleep 300` with its working directory `dir`: a shell inside, say.
fn sleep_in(dir: &std::path::Path) -> Child {
    Command::new("sleep")
        .arg("300")
        .current_dir(dir)
        .spawn()
        .unwrap()
}

/// Reads `p` until it gives `want` (failures are remembered a few
/// seconds), for up to 60 s.
fn read_eventually(p: &std::path::Path, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = p.to_path_buf();
        match within(60, "a read after the registry is back", move || {
            std::fs::read(q)
        }) {
            Ok(b) => {
                assert_eq!(b, want);
                return;
            }
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A mount of a frozen registry, busy with a read stuck in a request and a
/// process whose working directory is inside. No stall deadline to speak
/// of: only the shutdown can end the read.
struct Stuck {
    m: Mount,
    inside: Child,
    read: Receiver<std::io::Result<Vec<u8>>>,
}

impl Stuck {
    fn start(reg: &Distribution) -> Stuck {
        let m = Mount::start(reg.addr(), &["--timeout", "600"]);
        let inside = sleep_in(&m.path("st/app/v1"));
        reg.pause();
        let p = m.path("st/app/v1/rootfs/small.txt");
        let (tx, read) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(std::fs::read(p)));
        // The read is stuck on the frozen registry.
        assert!(read.recv_timeout(Duration::from_secs(2)).is_err());
        Stuck { m, inside, read }
    }

    /// The stuck read returned (an error) and the mount point is free.
    fn assert_ended(&self) {
        let read = self
            .read
            .recv_timeout(Duration::from_secs(30))
            .expect("the stuck read returned");
        assert!(read.is_err(), "a read of a frozen registry succeeded");
        assert!(!common::mount::is_mounted(self.m.mp()));
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        let _ = self.inside.kill();
        let _ = self.inside.wait();
    }
}

/// What [`StallProxy`] does with the answer to a GET whose path contains
/// its pattern.
#[derive(Clone, Copy)]
enum Answer {
    /// Passes it on whole.
    Whole,
    /// Passes on the headers and the first `n` bytes of the body, then
    /// nothing, the connection open until the client hangs up.
    StallAfter(usize),
    /// Passes on the body in `n` pieces, a second apart.
    Trickle(usize),
}

/// A loopback proxy in front of a real registry that misbehaves on some
/// answers as told. One request per connection (`Connection: close` both
/// ways), so each answer is read whole from the registry and its body
/// found without parsing HTTP framing; requests carry no body but one of
/// a `Content-Length`. Serves until the test process ends.
struct StallProxy {
    addr: String,
    rule: Arc<Mutex<(String, Answer)>>,
}

impl StallProxy {
    fn start(upstream: &str) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let rule = Arc::new(Mutex::new((String::new(), Answer::Whole)));
        let (r, up) = (rule.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (r, up) = (r.clone(), up.clone());
                std::thread::spawn(move || proxy_one(client, &up, &r));
            }
        });
        StallProxy { addr, rule }
    }

    /// From now on, GETs whose path contains `pattern` get `answer`.
    fn set(&self, pattern: &str, answer: Answer) {
        *self.rule.lock().unwrap() = (pattern.to_string(), answer);
    }

    fn addr(&self) -> &str {
        &self.addr
    }

    /// `repo:tag` or `repo@digest` through the proxy.
    fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }
}

/// Pass one request to `upstream` and its answer back as `rule` says.
fn proxy_one(mut client: TcpStream, upstream: &str, rule: &Mutex<(String, Answer)>) {
    let Some(head) = read_head(&mut client) else {
        return;
    };
    let mut words = head.split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let answer = match &*rule.lock().unwrap() {
        (pattern, a) if method == "GET" && path.contains(pattern.as_str()) => *a,
        _ => Answer::Whole,
    };
    let Some(resp) = ask(&mut client, upstream, &head) else {
        return;
    };
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |i| i + 4);
    let (head, body) = resp.split_at(split);
    let _ = client.write_all(closing(&String::from_utf8_lossy(head)).as_bytes());
    let _ = match answer {
        Answer::Whole => client.write_all(body),
        Answer::StallAfter(n) => {
            let _ = client.write_all(&body[..n.min(body.len())]);
            // Until the client hangs up (5 minutes: a bound on a broken test).
            let _ = client.set_read_timeout(Some(Duration::from_secs(300)));
            client.read(&mut [0; 1]).map(drop)
        }
        Answer::Trickle(n) => trickle(&mut client, body, n),
    };
}

/// The request `head` (and its body, read from `client`) sent to
/// `upstream`: the whole answer.
fn ask(client: &mut TcpStream, upstream: &str, head: &str) -> Option<Vec<u8>> {
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    client.read_exact(&mut body).ok()?;
    let mut server = TcpStream::connect(upstream).ok()?;
    server.write_all(closing(head).as_bytes()).ok()?;
    server.write_all(&body).ok()?;
    let mut resp = Vec::new();
    server.read_to_end(&mut resp).ok()?;
    Some(resp)
}

/// `body` in `n` pieces, a second apart.
fn trickle(client: &mut TcpStream, body: &[u8], n: usize) -> std::io::Result<()> {
    for (i, piece) in body.chunks(body.len().div_ceil(n).max(1)).enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        client.write_all(piece)?;
    }
    Ok(())
}

/// An HTTP head up to its blank line, or `None` if the peer hung up.
fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An HTTP head with `Connection: close` in place of its own.
fn closing(head: &str) -> String {
    let mut lines: Vec<&str> = head
        .trim_end()
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    lines.join("\r\n") + "\r\n\r\n"
}
