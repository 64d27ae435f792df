//! Faults: a destination registry killed in the middle of a copy. The copy
//! fails naming it, the tag never appears half-pushed, and rerunning the
//! command once the registry is back finishes the job without sending the
//! blobs that already landed; the result is the source's image, whole.

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

#[test]
fn copy_killed_mid_push_resumes_without_resending() {
    let src = Distribution::start();
    three_layer_image(&src, "f/app:v1");
    let mut dst = Distribution::start();
    let proxy = CountingProxy::start(dst.addr());
    let target = format!("{}/f/app:v1", proxy.addr());

    // One blob at a time; kill the registry once the first layer is in.
    let mut copy = Command::new(common::ggfs_bin())
        .args(["copy", "-j", "1", &src.reference("f/app:v1"), &target])
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
        std::thread::sleep(Duration::from_millis(5));
    }
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
    assert_eq!(
        common::ggfs(&["digest", &target]),
        common::ggfs(&["digest", &src.reference("f/app:v1")])
    );
}
