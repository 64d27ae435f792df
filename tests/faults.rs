//! Faults. A destination registry killed in the middle of a copy: the copy
//! fails naming it, the tag never appears half-pushed, and rerunning the
//! command once the registry is back finishes the job without sending the
//! blobs that already landed; the result is the source's image, whole. A
//! registry killed under a mount: an error for what needs it, the right
//! bytes once it is back. A full cache disk: reads still right. A registry
//! answering 503 to everything: the CLI and a mount give up after the
//! retry policy's tries, with an error naming it, the status and the
//! retries. A source registry killed mid-copy: the copy fails naming it,
//! no tag moves, and the rerun sends only the blobs still missing.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{CountingProxy, Distribution};

const LAYER: usize = 6 << 20;

/// Three directories, each a layer of incompressible bytes.
fn three_layer_image(reg: &Distribution, image: &str) {
    let work = common::tempdir();
    let mut args = vec!["append".to_string()];
    for i in 0..3 {
        let dir = work.path().join(format!("l{i}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("data"), common::pseudo_random(LAYER, 100 + i)).unwrap();
        args.extend(["-f".into(), dir.display().to_string()]);
    }
    args.extend([
        "--layer-format".into(),
        "none".into(),
        "-t".into(),
        reg.reference(image),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::ggfs(&args);
}

/// `ggfs copy -j 1 SRC DST` (one blob at a time), once a layer and a half
/// has gone up through `proxy`: still running.
fn copy_until_sent(src: &str, dst: &str, proxy: &CountingProxy) -> std::process::Child {
    let mut copy = Command::new(common::ggfs_bin())
        .args(["copy", "-j", "1", src, dst])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while proxy.bytes_up() < (LAYER + LAYER / 2) as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "copy never got going"
        );
        assert!(
            copy.try_wait().unwrap().is_none(),
            "copy ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    copy
}

#[test]
fn copy_killed_mid_push_resumes_without_resending() {
    let src = Distribution::start();
    three_layer_image(&src, "f/app:v1");
    let mut dst = Distribution::start();
    let proxy = CountingProxy::start(dst.addr());
    let target = format!("{}/f/app:v1", proxy.addr());

    // One blob at a time; kill the registry once the first layer is in.
    let copy = copy_until_sent(&src.reference("f/app:v1"), &target, &proxy);
    dst.kill();
    let out = copy.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "copy succeeded with the registry killed"
    );
    assert!(err.contains(proxy.addr()), "{err}");

    dst.restart();
    let (code, _) = common::http_get(dst.addr(), "/v2/f/app/manifests/v1").unwrap();
    assert_eq!(code, 404, "the tag moved before all blobs were pushed");
    proxy.reset();
    common::ggfs(&["copy", "-j", "1", &src.reference("f/app:v1"), &target]);
    let up = proxy.bytes_up();
    assert!(
        up < (2 * LAYER) as u64 + (LAYER / 2) as u64,
        "the rerun sent {up} bytes: the layer already pushed went again"
    );
    common::ggfs(&["validate", &target]);
    assert_same_image(&target, &src.reference("f/app:v1"));
}

/// Upload chunk size of the resume test: its big layer is several chunks.
const CHUNK: usize = 1 << 20;
const BIG: usize = 5 * CHUNK + 12_345;

/// `f/big:v1` on `reg`: two small layers and one of `BIG` bytes (plus
/// its tar headers). Copy sends the biggest blob first. Returns the big
/// layer's digest and every blob's (digest, size), config included.
fn big_layer_image(reg: &Distribution) -> (String, Vec<(String, u64)>) {
    let work = common::tempdir();
    let mut args = vec!["append".to_string()];
    for (i, len) in [100_000, 100_000, BIG].into_iter().enumerate() {
        let dir = work.path().join(format!("l{i}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("data"), common::pseudo_random(len, i as u64)).unwrap();
        args.extend(["-f".into(), dir.display().to_string()]);
    }
    args.extend(["--layer-format", "none", "-t"].map(String::from));
    args.push(reg.reference("f/big:v1"));
    common::ggfs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let m: serde_json::Value =
        serde_json::from_str(&common::ggfs(&["manifest", &reg.reference("f/big:v1")])).unwrap();
    let desc = |d: &serde_json::Value| {
        let digest = d["digest"].as_str().unwrap().to_string();
        (digest, d["size"].as_u64().unwrap())
    };
    let mut blobs: Vec<_> = m["layers"].as_array().unwrap().iter().map(desc).collect();
    let big = blobs[2].0.clone();
    blobs.push(desc(&m["config"]));
    (big, blobs)
}

/// `a` and `b` name the same image (their manifests' digests).
fn assert_same_image(a: &str, b: &str) {
    assert_eq!(common::ggfs(&["digest", a]), common::ggfs(&["digest", b]));
}

/// `ggfs ARGS` in the background, its stderr kept for a failure message.
fn spawn_ggfs(args: &[&str]) -> std::process::Child {
    Command::new(common::ggfs_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `ggfs` with its cache (and so its upload records) in `cache`.
fn ggfs_cached(cache: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::ggfs_bin());
    cmd.env("XDG_CACHE_HOME", cache).args(args);
    cmd
}

/// The upload records in `cache`, as JSON (every file there, `.lock`s
/// too, is `0600`).
fn upload_records(cache: &std::path::Path) -> Vec<serde_json::Value> {
    let Ok(dir) = std::fs::read_dir(cache.join("ggfs/uploads")) else {
        return Vec::new();
    };
    let mut records = Vec::new();
    for e in dir {
        let path = e.unwrap().path();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        if path.extension().is_some_and(|x| x == "json") {
            records.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
        }
    }
    records
}

/// A copy whose target registry was killed -9 after it took 3 PATCH
/// chunks of the big layer, then restarted on the same storage.
struct BrokenOff {
    src: Distribution,
    dst: Distribution,
    proxy: CountingProxy,
    big: String,
    blobs: Vec<(String, u64)>,
    /// The cache dir (upload records) both runs use.
    work: tempfile::TempDir,
    /// Blobs the target held before the rerun.
    present: Vec<String>,
}

impl BrokenOff {
    fn target(&self) -> String {
        format!("{}/f/big:v1", self.proxy.addr())
    }

    /// `ggfs copy -j 1` of the image to the target, 1 MiB chunks.
    fn copy(&self) -> Command {
        let (chunk, source) = (CHUNK.to_string(), self.src.reference("f/big:v1"));
        let args = ["--upload-chunk-size", &chunk, "copy", "-j", "1", &source];
        let mut cmd = ggfs_cached(self.work.path(), &args);
        cmd.arg(self.target());
        cmd
    }

    fn start() -> BrokenOff {
        let src = Distribution::start();
        let (big, blobs) = big_layer_image(&src);
        let dst = Distribution::start();
        let proxy = CountingProxy::start(dst.addr());
        let mut b = BrokenOff {
            src,
            dst,
            proxy,
            big,
            blobs,
            work: common::tempdir(),
            present: Vec::new(),
        };
        b.proxy.hold_after("PATCH", 3);
        let mut copy = b
            .copy()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !b.proxy.holding() {
            assert!(t0.elapsed() < Duration::from_secs(120), "no 4th PATCH");
            assert!(copy.try_wait().unwrap().is_none(), "copy ended early");
            std::thread::sleep(Duration::from_millis(5));
        }
        b.dst.kill();
        b.proxy.release();
        let out = copy.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "copy succeeded with the registry killed"
        );
        b.dst.restart();
        let dst = b.dst.addr().to_string();
        b.present = b
            .blobs
            .iter()
            .map(|(d, _)| d.clone())
            .filter(|d| {
                common::http_get(&dst, &format!("/v2/f/big/blobs/{d}"))
                    .unwrap()
                    .0
                    == 200
            })
            .collect();
        b
    }

    /// Run the copy again, through a freshly counted proxy.
    fn rerun(&self) -> Vec<common::ProxyRequest> {
        self.proxy.reset();
        common::run(&mut self.copy());
        self.proxy.requests()
    }

    /// No blob the target held before the rerun went again.
    fn assert_present_not_sent(&self, requests: &[common::ProxyRequest]) {
        for d in &self.present {
            let hex = d.trim_start_matches("sha256:");
            let sent = requests.iter().filter(|r| {
                r.path.contains(hex) && matches!(r.method.as_str(), "PUT" | "PATCH" | "POST")
            });
            assert_eq!(sent.count(), 0, "{d} was already there: {requests:?}");
        }
    }

    /// The target is the source's image, blobs verified, no record left.
    fn assert_whole(&self) {
        let left: Vec<_> = std::fs::read_dir(self.work.path().join("ggfs/uploads"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.is_empty(),
            "record or lock left after success: {left:?}"
        );
        common::ggfs(&["validate", &self.target()]);
        assert_same_image(&self.target(), &self.src.reference("f/big:v1"));
    }
}

/// The target registry killed -9 after it took 3 PATCH chunks of a
/// chunked upload: the copy fails, the session is recorded (0600, its
/// offset, no credential), and the rerun, on the restarted registry, asks
/// the session what it holds and PATCHes on from byte 3 MiB with no new
/// session for that blob, sending less than the blob; blobs already in the
/// target are not sent again. The target's image is the source's, whole.
#[test]
fn chunked_upload_killed_mid_blob_resumes_from_the_registry_offset() {
    let b = BrokenOff::start();
    let records = upload_records(b.work.path());
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["digest"], b.big.as_str());
    assert_eq!(records[0]["held"], 3 * CHUNK as u64);
    let text = records[0].to_string().to_ascii_lowercase();
    assert!(
        !text.contains("authorization") && !text.contains("token"),
        "{text}"
    );
    // -j 1, biggest first: the big layer was the first blob sent, so
    // none had landed.
    assert!(
        b.present.is_empty(),
        "{:?} (big layer {})",
        b.present,
        b.big
    );

    let requests = b.rerun();
    b.assert_present_not_sent(&requests);
    let patches: Vec<_> = requests.iter().filter(|r| r.method == "PATCH").collect();
    let first = patches.first().and_then(|r| r.content_range.clone());
    let want = format!("{}-{}", 3 * CHUNK, 4 * CHUNK - 1);
    assert_eq!(first.as_deref(), Some(&*want));
    assert_eq!(patches.len(), 3, "{patches:?}"); // 3 MiB held of 5 MiB and a bit
    let posts = requests.iter().filter(|r| r.method == "POST").count();
    let absent_small = b.blobs.len() - b.present.len() - 1;
    assert_eq!(
        posts, absent_small,
        "a new session was opened for the big layer"
    );
    let up = b.proxy.bytes_up();
    println!(
        "rerun: {} PATCHes from {first:?}, {posts} POSTs, {up} bytes up",
        patches.len()
    );
    let small: u64 = b
        .blobs
        .iter()
        .filter(|(d, _)| *d != b.big)
        .map(|(_, s)| s)
        .sum();
    assert!(
        up < (BIG - 3 * CHUNK) as u64 + small + 65_536,
        "the rerun sent {up} bytes"
    );
    assert!(
        up < BIG as u64,
        "the rerun sent {up} bytes, the blob is {BIG}"
    );
    b.assert_whole();
}

/// The recorded session gone from the registry (its upload directory
/// removed while the registry was down): the rerun is told so (404) and
/// starts that blob afresh, from byte 0 in a new session; the image is
/// still whole.
#[test]
fn a_recorded_upload_the_registry_lost_starts_afresh() {
    let b = BrokenOff::start();
    assert_eq!(upload_records(b.work.path()).len(), 1);
    let uploads = b
        .dst
        .storage()
        .join("docker/registry/v2/repositories/f/big/_uploads");
    assert!(uploads.is_dir(), "{}", uploads.display());
    std::fs::remove_dir_all(&uploads).unwrap();

    let requests = b.rerun();
    b.assert_present_not_sent(&requests);
    let first = requests.iter().find(|r| r.method == "PATCH");
    let first = first.and_then(|r| r.content_range.as_deref());
    assert_eq!(first, Some(&*format!("0-{}", CHUNK - 1)), "{requests:?}");
    let posts = requests.iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, b.blobs.len() - b.present.len(), "{requests:?}");
    b.assert_whole();
}

/// An eStargz image of `files` (name, bytes) pushed as `image`.
fn estargz_image(reg: &Distribution, image: &str, files: &[(&str, Vec<u8>)]) {
    let work = common::tempdir();
    for (name, data) in files {
        std::fs::write(work.path().join(name), data).unwrap();
    }
    common::ggfs(&[
        "append",
        "--layer-format",
        "estargz",
        "-f",
        work.path().to_str().unwrap(),
        "-t",
        &reg.reference(image),
    ]);
}

fn read(p: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let p = p.to_path_buf();
    common::mount::within(120, "read", move || std::fs::read(p))
}

/// The registry killed under a mount: a read that needs it fails with an
/// error (not wrong bytes, not a hang), what was already read still reads,
/// and once the registry is back the same read returns the right bytes.
#[test]
fn registry_killed_under_a_mount_then_back() {
    let mut reg = Distribution::start();
    let (a, b) = (
        common::pseudo_random(300_000, 1),
        common::pseudo_random(300_000, 2),
    );
    estargz_image(
        &reg,
        "f/lazy:v1",
        &[("a.bin", a.clone()), ("b.bin", b.clone())],
    );
    let m = common::mount::Mount::start(reg.addr(), &["--fetch-after", "never"]);
    let rootfs = m.path("f/lazy/v1/rootfs");
    assert_eq!(read(&rootfs.join("a.bin")).unwrap(), a);
    reg.kill();
    let e = read(&rootfs.join("b.bin")).expect_err("read with the registry gone");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ETIMEDOUT)),
        "{e}"
    );
    assert_eq!(read(&rootfs.join("a.bin")).unwrap(), a, "cached bytes lost");
    reg.restart();
    assert_eq!(read(&rootfs.join("b.bin")).unwrap(), b);
    assert!(m.pid_alive());
}

/// The registry killed while a read's response is on the wire (a 48 MB file
/// at 8 MB/s, more than the sockets between them can hold): that read fails
/// with an error, never short or wrong bytes, and once the registry is back
/// the same file reads whole.
#[test]
fn registry_killed_mid_read_fails_that_read_then_serves_it() {
    let mut reg = Distribution::start();
    let big = common::pseudo_random(48 << 20, 7);
    estargz_image(&reg, "f/inflight:v1", &[("big.bin", big.clone())]);
    let link = common::Wan {
        delay: Duration::ZERO,
        rate: 8_000_000,
    };
    let proxy = CountingProxy::start_wan(reg.addr(), link);
    let m = common::mount::Mount::start(proxy.addr(), &["--fetch-after", "never"]);
    let file = m.path("f/inflight/v1/rootfs/big.bin");
    std::fs::metadata(&file).unwrap();
    proxy.reset();
    let reader = std::thread::spawn({
        let file = file.clone();
        move || std::fs::read(file)
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.bytes_down() < 2 << 20 {
        assert!(Instant::now() < deadline, "the read never got under way");
        std::thread::sleep(Duration::from_millis(10));
    }
    reg.kill();
    let got = common::mount::within(120, "the read in flight", move || reader.join().unwrap());
    let e = got.expect_err("a read whose registry died under it");
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ETIMEDOUT)),
        "{e}"
    );
    reg.restart();
    assert!(read(&file).unwrap() == big, "wrong bytes after the restart");
    assert!(m.pid_alive());
}

/// A cache on a full disk (a 1 MiB tmpfs): reads still return the right
/// bytes from the network, and what could not be written whole is never
/// taken from the cache later (a second mount on it reads right too).
#[test]
fn full_cache_disk_still_serves_right_bytes() {
    let reg = Distribution::start();
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}.bin"), common::pseudo_random(700_000, 10 + i)))
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    estargz_image(&reg, "f/full:v1", &refs);
    let work = common::tempdir();
    let cache = work.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    common::run(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&cache),
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(cache.clone());
    for round in 0..2 {
        let m = common::mount::Mount::start_with_cache(
            reg.addr(),
            &["--fetch-after", "never"],
            Some(&cache),
        );
        for (name, data) in &files {
            let got = read(&m.path(&format!("f/full/v1/rootfs/{name}")))
                .unwrap_or_else(|e| panic!("round {round}: {name}: {e}\n{}", m.log()));
            assert!(got == *data, "round {round}: {name} differs");
        }
        if round == 0 {
            let log = m.log();
            assert!(
                log.contains("No space left on device"),
                "the cache never filled up: {log}"
            );
        }
    }
}

/// Tries one request gets before its error is final (the CLI's and the
/// daemon's policy).
fn tries() -> usize {
    ggfs::registry::RetryPolicy::default().attempts as usize
}

/// `ggfs args…` that must end within 60 s (it may fail): its output.
fn ggfs_within(what: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(common::ggfs_bin());
    cmd.args(args).stdin(Stdio::null());
    common::mount::within(60, what, move || cmd.output().unwrap())
}

/// The one-line stderr of a failed run, which has no panic in it.
fn failure(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A small one-layer image pushed as `image`.
fn small_image(reg: &Distribution, image: &str, seed: u64) {
    let work = common::tempdir();
    std::fs::write(
        work.path().join("data"),
        common::pseudo_random(10_000, seed),
    )
    .unwrap();
    let dir = work.path().display().to_string();
    common::ggfs(&["append", "-f", &dir, "-t", &reg.reference(image)]);
}

/// A registry that answers every request 503 (its backend is gone): the
/// CLI gives up after the retry policy's tries, no more, with one line
/// naming the registry, the status and the retries; a copy from it leaves
/// the target's tag where it was.
#[test]
fn a_registry_answering_503_fails_the_cli_after_bounded_retries() {
    let bad = common::Unavailable::start();
    let source = bad.reference("f/app:v1");
    let manifest_path = "/v2/f/app/manifests/v1";

    let err = failure(&ggfs_within(
        "manifest of a 503 registry",
        &["manifest", &source],
    ));
    println!("manifest: {err}");
    for want in [bad.addr(), "503", "UNAVAILABLE: backend registry is down"] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    assert!(err.contains(&format!("tried {} times", tries())), "{err}");
    let seen = bad.requests();
    assert_eq!(seen.len(), tries(), "{seen:?}");
    assert!(seen.iter().all(|r| r.path == manifest_path), "{seen:?}");

    let dst = Distribution::start();
    small_image(&dst, "x:y", 7);
    let before = common::ggfs(&["digest", &dst.reference("x:y")]);
    let proxy = CountingProxy::start(dst.addr());
    bad.reset();
    let target = format!("{}/x:y", proxy.addr());
    let err = failure(&ggfs_within(
        "copy from a 503 registry",
        &["copy", &source, &target],
    ));
    println!("copy: {err}");
    assert!(err.contains(bad.addr()) && err.contains("503"), "{err}");
    assert!(err.contains(&format!("tried {} times", tries())), "{err}");
    let seen = bad.requests();
    assert_eq!(seen.len(), tries(), "{seen:?}");
    assert!(seen.iter().all(|r| r.path == manifest_path), "{seen:?}");
    let writes: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| !matches!(r.method.as_str(), "GET" | "HEAD"))
        .collect();
    assert!(writes.is_empty(), "the target was written to: {writes:?}");
    assert_eq!(common::ggfs(&["digest", &dst.reference("x:y")]), before);
}

/// A mount of a registry whose backend is gone (its `/v2/` answers, all
/// else is 503): a tag's manifest.json fails with EIO (not a hang, not
/// ENOENT: the tag may well exist), and the daemon's log names the
/// registry and the status. A registry answering 503 to `/v2/` too is not
/// mounted at all: one line naming it and the status.
#[test]
fn a_registry_answering_503_under_a_mount_is_eio() {
    let bad = common::Unavailable::start_answering_ping();
    let m = common::mount::Mount::start(bad.addr(), &[]);
    bad.reset();
    let p = m.path("f/app/v1/manifest.json");
    let t0 = Instant::now();
    let e = read(&p).expect_err("manifest.json of a 503 registry");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}\n{}", m.log());
    let seen = bad.requests();
    println!("{} requests in {:?}: {seen:?}", seen.len(), t0.elapsed());
    // Each request the lookup made was tried as the policy says, no more.
    let mut paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    for p in &paths {
        let n = paths.iter().filter(|q| q == &p).count();
        assert!(n <= tries(), "{p} asked {n} times: {seen:?}");
    }
    let tag = paths
        .iter()
        .filter(|q| **q == "/v2/f/manifests/app")
        .count();
    assert_eq!(tag, tries(), "{seen:?}");
    assert!(seen.len() <= 3 * tries(), "{seen:?}");
    let log = m.log();
    assert!(
        log.lines()
            .any(|l| l.contains(bad.addr()) && l.contains("503")),
        "{log}"
    );
    assert!(m.pid_alive());

    let down = common::Unavailable::start();
    let work = common::tempdir();
    let mp = work.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let args = ["mount", down.addr(), mp.to_str().unwrap(), "--insecure"];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let t0 = Instant::now();
    let out = common::mount::run_mountd(&args, &[]);
    let err = failure(&out);
    println!("mount in {:?}: {err}", t0.elapsed());
    assert!(err.contains(down.addr()) && err.contains("503"), "{err}");
    assert!(err.contains(&format!("tried {} times", tries())), "{err}");
    assert_eq!(err.matches(down.addr()).count(), 1, "{err}");
    assert!(!common::mount::is_mounted(&mp));
    // The ping, and the catalog asked for beside it.
    let seen = down.requests();
    let pings = seen.iter().filter(|r| r.path == "/v2/").count();
    assert_eq!(pings, tries(), "{seen:?}");
    assert!(seen.len() <= 2 * tries(), "{seen:?}");
}

/// The SOURCE registry killed -9 while a copy is half-way through its
/// blobs: the copy fails naming the source, the target's tag does not
/// exist (no partial image tagged), and once the source is back on the
/// same storage the rerun finishes without sending again the blobs that
/// landed; the target's manifest is the source's byte for byte and its
/// blobs verify.
#[test]
fn source_killed_mid_copy_resumes_without_resending() {
    let mut src = Distribution::start();
    three_layer_image(&src, "f/app:v1");
    let src_proxy = CountingProxy::start(src.addr());
    let dst = Distribution::start();
    let dst_proxy = CountingProxy::start(dst.addr());
    let (source, target) = (
        format!("{}/f/app:v1", src_proxy.addr()),
        format!("{}/f/app:v1", dst_proxy.addr()),
    );
    let raw = common::skopeo_raw(&format!("docker://{}", src.reference("f/app:v1")));
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let blobs: Vec<(String, u64)> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .chain([&m["config"]])
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_string(),
                d["size"].as_u64().unwrap(),
            )
        })
        .collect();

    // One blob at a time; kill the source once a layer and a half went
    // up to the target: the first layer is in, the second under way.
    let copy = copy_until_sent(&source, &target, &dst_proxy);
    src.kill();
    let down = src_proxy.bytes_down();
    let out = common::mount::within(60, "the copy with its source killed", move || {
        copy.wait_with_output().unwrap()
    });
    let err = failure(&out);
    println!("killed after {down} bytes down from the source: {err}");
    assert!(
        err.contains(src_proxy.addr()),
        "the source is not named: {err}"
    );
    assert!(down < (3 * LAYER) as u64, "the source sent it all: {down}");
    let (code, _) = common::http_get(dst.addr(), "/v2/f/app/manifests/v1").unwrap();
    assert_eq!(code, 404, "the tag exists though blobs are missing");
    let present: Vec<&String> = blobs
        .iter()
        .map(|(d, _)| d)
        .filter(|d| {
            common::http_get(dst.addr(), &format!("/v2/f/app/blobs/{d}"))
                .unwrap()
                .0
                == 200
        })
        .collect();
    assert!(!present.is_empty(), "no blob landed before the kill");
    assert!(
        present.len() < blobs.len(),
        "every blob landed before the kill"
    );

    src.restart();
    dst_proxy.reset();
    common::ggfs(&["copy", "-j", "1", &source, &target]);
    let requests = dst_proxy.requests();
    for d in &present {
        let hex = d.trim_start_matches("sha256:");
        let sent = requests.iter().filter(|r| {
            r.path.contains(hex) && matches!(r.method.as_str(), "PUT" | "PATCH" | "POST")
        });
        assert_eq!(sent.count(), 0, "{d} was already there: {requests:?}");
    }
    let posts = requests.iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, blobs.len() - present.len(), "{requests:?}");
    let absent: u64 = blobs
        .iter()
        .filter(|(d, _)| !present.contains(&d))
        .map(|(_, s)| s)
        .sum();
    let up = dst_proxy.bytes_up();
    println!(
        "{} of {} blobs present after the kill; rerun: {posts} POSTs, {up} bytes up for {absent} absent",
        present.len(),
        blobs.len()
    );
    assert!(up < absent + 65_536, "the rerun sent {up} bytes");

    let dst_raw = common::skopeo_raw(&format!("docker://{}", dst.reference("f/app:v1")));
    assert_eq!(dst_raw, raw, "the target's manifest differs");
    let work = common::tempdir();
    let layout = work.path().join("oci");
    common::skopeo_copy_with(
        &[
            "--preserve-digests",
            "--dest-oci-accept-uncompressed-layers",
        ],
        &format!("docker://{}", dst.reference("f/app:v1")),
        &format!("oci:{}:v1", layout.display()),
    );
    // skopeo verified every blob it fetched; check the copies it wrote.
    let blob = |d: &str| {
        let path = layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let copied = blob(index["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(
        copied,
        raw.as_bytes(),
        "skopeo's copy of the manifest differs"
    );
    for (d, size) in &blobs {
        let bytes = blob(d);
        assert_eq!(bytes.len() as u64, *size, "{d}");
        assert_eq!(common::sha256_digest(&bytes), *d);
    }
    common::ggfs(&["validate", &target]);
}

/// Copy streams a blob on as it comes in: with the source's answer held
/// 3 MiB into the 5 MiB layer, the target has already been sent 2 MiB of
/// it, both in one PUT (the default 16 MiB chunk size) and in a PATCH of
/// a chunked upload (4 MiB chunks). Buffering a blob or a chunk before
/// sending it, as before, sent none: over a WAN that made the transfer
/// down and the transfer up take turns. Both copies end whole.
#[test]
fn copy_sends_a_blob_on_while_it_is_still_coming_in() {
    let src = Distribution::start();
    let (big, _) = big_layer_image(&src);
    let src_proxy = CountingProxy::start(src.addr());
    let dst = Distribution::start();
    let dst_proxy = CountingProxy::start(dst.addr());
    let source = format!("{}/f/big:v1", src_proxy.addr());
    for (repo, chunk) in [("f/put", None), ("f/patch", Some(4 << 20))] {
        src_proxy.reset();
        dst_proxy.reset();
        src_proxy.pause_down_at(3 << 20);
        let target = format!("{}/{repo}:v1", dst_proxy.addr());
        let mut cmd = Command::new(common::ggfs_bin());
        if let Some(c) = chunk {
            cmd.args(["--upload-chunk-size", &c.to_string()]);
        }
        let mut copy = cmd
            .args(["copy", "-j", "1", &source, &target])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while dst_proxy.bytes_up() < 2 << 20 {
            if t0.elapsed() > Duration::from_secs(60) || copy.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (down, up) = (src_proxy.bytes_down(), dst_proxy.bytes_up());
        src_proxy.resume_down();
        let out = copy.wait_with_output().unwrap();
        assert!(
            down <= 3 << 20 && up >= 2 << 20,
            "{repo}: {up} bytes sent up while {down} had come down of layer {big}"
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sent = dst_proxy.requests();
        let method = if chunk.is_some() { "PATCH" } else { "PUT" };
        assert!(
            sent.iter()
                .any(|r| r.method == method && !r.path.contains("manifests")),
            "{repo}: no blob {method} in {sent:?}"
        );
        assert_same_image(&target, &src.reference("f/big:v1"));
    }
}

/// `export` and a tarball `pull` open the next layers while one is still
/// coming in (over a WAN each GET waits a round trip for its first byte),
/// and `validate` reads four layers at once: with the registry's answers
/// held 100 KB into a six-layer image, the registry has been asked for
/// four layers, not one. All end well, the export byte for byte as without
/// the hold.
#[test]
fn export_pull_and_validate_ask_for_the_next_layers_while_one_is_read() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let mut args = vec!["append".to_string()];
    for i in 0..6u64 {
        let dir = work.path().join(format!("l{i}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), common::pseudo_random(300_000, i)).unwrap();
        args.extend(["-f".into(), dir.display().to_string()]);
    }
    args.extend(["-t".into(), reg.reference("f/six:v1")]);
    common::ggfs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let direct = work.path().join("direct.tar");
    common::ggfs(&[
        "export",
        &reg.reference("f/six:v1"),
        &direct.display().to_string(),
    ]);

    let proxy = CountingProxy::start(reg.addr());
    let image = format!("{}/f/six:v1", proxy.addr());
    for verb in ["export", "pull", "validate"] {
        let out = work.path().join(format!("{verb}.tar"));
        proxy.reset();
        proxy.pause_down_at(100_000);
        let mut args = vec![verb, &image];
        let out_arg = out.display().to_string();
        if verb != "validate" {
            args.push(&out_arg);
        }
        let run = spawn_ggfs(&args);
        let blob_gets = || {
            let reqs = proxy.requests();
            reqs.iter()
                .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
                .count()
        };
        let t0 = Instant::now();
        while blob_gets() < 5 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (gets, down) = (blob_gets(), proxy.bytes_down());
        proxy.resume_down();
        let done = run.wait_with_output().unwrap();
        // The config and the layer being read, and three ahead.
        assert!(
            gets >= 5 && down <= 100_000,
            "{verb}: {gets} blob GETs with {down} bytes down"
        );
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        if verb == "export" {
            assert!(
                std::fs::read(&out).unwrap() == std::fs::read(&direct).unwrap(),
                "export differs"
            );
        }
    }
}

/// A download that breaks off mid-blob while its upload streams on is
/// resumed by Range and the upload goes on: the copy ends whole, having
/// asked the source for the rest of the layer once.
#[test]
fn a_download_broken_off_under_a_streaming_upload_resumes() {
    let src = Distribution::start();
    let (big, _) = big_layer_image(&src);
    let src_proxy = CountingProxy::start(src.addr());
    let dst = Distribution::start();
    let source = format!("{}/f/big:v1", src_proxy.addr());
    let target = dst.reference("f/big:v1");
    src_proxy.cut_down_at(2 << 20);
    let mut run = spawn_ggfs(&["copy", "-j", "1", &source, &target]);
    let t0 = Instant::now();
    while run.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = run.kill();
            panic!("the copy hung after its download broke off");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex = big.trim_start_matches("sha256:");
    let reqs = src_proxy.requests();
    let resumed: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.contains(hex) && r.range.is_some())
        .collect();
    assert_eq!(resumed.len(), 1, "{reqs:#?}");
    assert_same_image(&target, &src.reference("f/big:v1"));
}

/// A copy asks the target about every blob at once before sending any
/// (existence checks are cheap, and one at a time in transfer slots a
/// commit onto a 20-layer image spent 6 round trips on them): even with
/// one job, every HEAD comes before the first upload.
#[test]
fn copy_asks_about_every_blob_before_sending_any() {
    let src = Distribution::start();
    let (_, blobs) = big_layer_image(&src);
    let dst = Distribution::start();
    let proxy = CountingProxy::start(dst.addr());
    let target = format!("{}/f/big:v1", proxy.addr());
    common::ggfs(&["copy", "-j", "1", &src.reference("f/big:v1"), &target]);
    let reqs = proxy.requests();
    let is_blob = |r: &&common::ProxyRequest| r.path.contains("/blobs/");
    let heads: Vec<usize> = (0..reqs.len())
        .filter(|&i| reqs[i].method == "HEAD" && is_blob(&&reqs[i]))
        .collect();
    let first_upload = reqs.iter().position(|r| r.method == "POST");
    assert_eq!(heads.len(), blobs.len(), "{reqs:#?}");
    assert!(
        first_upload.is_some_and(|p| heads.iter().all(|&h| h < p)),
        "{reqs:#?}"
    );
}

/// Copying an index moves the blobs of all its platforms in one wave:
/// with one job, every blob's HEAD (both platforms) comes before the first
/// upload, and every child manifest goes up after the last blob, the index
/// (its tag) last. The copy is whole: skopeo reads it back.
#[test]
fn an_index_is_copied_in_one_wave_of_blobs_then_its_manifests() {
    let src = Distribution::start();
    let work = common::tempdir();
    let layout = work.path().join("layout");
    common::index_two_platforms(&layout, "t");
    common::push_oci_layout(&layout, "t", &src.reference("f/idx:t"));
    let dst = Distribution::start();
    let proxy = CountingProxy::start(dst.addr());
    let target = format!("{}/f/idx:t", proxy.addr());
    common::ggfs(&["copy", "-j", "1", &src.reference("f/idx:t"), &target]);
    let reqs = proxy.requests();
    let at = |pred: &dyn Fn(&common::ProxyRequest) -> bool| -> Vec<usize> {
        (0..reqs.len()).filter(|&i| pred(&reqs[i])).collect()
    };
    let heads = at(&|r| r.method == "HEAD" && r.path.contains("/blobs/"));
    let uploads = at(&|r| r.path.contains("/blobs/uploads/"));
    let manifests = at(&|r| r.method == "PUT" && r.path.contains("/manifests/"));
    // Two configs and two layers.
    assert_eq!(heads.len(), 4, "{reqs:#?}");
    assert!(heads.iter().max() < uploads.iter().min(), "{reqs:#?}");
    assert_eq!(manifests.len(), 3, "{reqs:#?}");
    assert!(uploads.iter().max() < manifests.iter().min(), "{reqs:#?}");
    assert!(
        reqs[*manifests.last().unwrap()]
            .path
            .ends_with("/manifests/t"),
        "{reqs:#?}"
    );
    let out = work.path().join("back");
    let status = Command::new("skopeo")
        .args(["copy", "-q", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{}", dst.reference("f/idx:t")))
        .arg(format!("oci:{}:t", out.display()))
        .status()
        .unwrap();
    assert!(status.success());
}

/// A copy opens the target's upload (its POST) while the source is still
/// being asked for the blob, not after: with the source's blob GETs held,
/// the target has been asked to start an upload all the same.
#[test]
fn copy_opens_the_upload_while_the_source_is_asked() {
    let src = Distribution::start();
    big_layer_image(&src);
    let src_proxy = CountingProxy::start(src.addr());
    let dst = Distribution::start();
    let dst_proxy = CountingProxy::start(dst.addr());
    // The manifest passes; every blob GET after it is held.
    src_proxy.hold_after("GET", 1);
    let source = format!("{}/f/big:v1", src_proxy.addr());
    let target = format!("{}/f/big:v1", dst_proxy.addr());
    let mut copy = spawn_ggfs(&["copy", "-j", "1", &source, &target]);
    let posted = || dst_proxy.requests().iter().any(|r| r.method == "POST");
    let t0 = Instant::now();
    while !posted() && t0.elapsed() < Duration::from_secs(30) {
        if copy.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = src_proxy.holding();
    let _ = copy.kill();
    let _ = copy.wait();
    assert!(
        held,
        "no blob GET reached the source: {:#?}",
        src_proxy.requests()
    );
    assert!(
        posted(),
        "no upload opened while the source was asked: {:#?}",
        dst_proxy.requests()
    );
}
