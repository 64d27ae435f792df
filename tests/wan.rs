//! The lazy path across a simulated wide-area link (a proxy that adds
//! 10 ms each way and shares 200 Mbit/s, or slower): what a mount asks a
//! registry for, counted at the proxy. A first file costs a handful of
//! requests, a whole eStargz tree a number that does not grow with its
//! file count, and the tree read equals umoci's unpack while the rest of
//! the layer is fetched in the background.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::mount::{assert_same_tree, within, Mount};
use common::{CountingProxy, Distribution, Wan};

/// Files in the many-files fixture: far more than the requests allowed.
const FILES: usize = 1500;

/// `src:latest` (plain gzip, umoci) and `esgz:latest` (ctr-remote) of a
/// tree of FILES small files and a few large ones, mostly incompressible.
struct Fixture {
    reg: Distribution,
    /// umoci's unpack of `src:latest`.
    expected: PathBuf,
    layer_size: u64,
    _dirs: Vec<tempfile::TempDir>,
}

fn fixture() -> Fixture {
    let reg = Distribution::start();
    let dir = common::tempdir();
    let tree = dir.path().join("tree");
    for i in 0..FILES {
        let sub = tree.join(format!("d{:02}", i % 40));
        std::fs::create_dir_all(&sub).unwrap();
        let len = 512 + (i * 7919) % 12_000;
        let body = common::pseudo_random(len, i as u64);
        std::fs::write(sub.join(format!("f{i:04}")), body).unwrap();
    }
    std::fs::create_dir_all(tree.join("big")).unwrap();
    for i in 0..3 {
        let body = common::pseudo_random(3 << 20, 1000 + i);
        std::fs::write(tree.join(format!("big/b{i}")), body).unwrap();
    }
    std::fs::write(tree.join("small.txt"), "hello ggfs\n").unwrap();
    let layout = dir.path().join("oci");
    common::umoci_image_from(&layout, "latest", &tree);
    common::push_oci_layout(&layout, "latest", &reg.reference("src:latest"));
    let m = common::estargz_image(&reg, "src:latest", "esgz:latest");
    let layer_size = m["layers"][0]["size"].as_u64().unwrap();
    let unpacked = common::tempdir();
    let bundle = unpacked.path().join("bundle");
    common::run(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:latest", layout.display()))
            .arg(&bundle),
    );
    Fixture {
        reg,
        expected: bundle.join("rootfs"),
        layer_size,
        _dirs: vec![dir, unpacked],
    }
}

fn paths(proxy: &CountingProxy) -> Vec<String> {
    proxy
        .requests()
        .iter()
        .map(|r| format!("{} {} {:?}", r.method, r.path, r.range))
        .collect()
}

fn stat_key(p: &Path) -> (u32, u32, u32, u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p).unwrap();
    (
        md.mode(),
        md.uid(),
        md.gid(),
        md.nlink(),
        md.mtime(),
        md.ctime(),
    )
}

#[test]
fn first_file_in_a_handful_of_requests_whole_tree_in_segments() {
    let fx = fixture();
    let proxy = CountingProxy::start_wan(fx.reg.addr(), Wan::typical());
    let m = Mount::start(proxy.addr(), &[]);

    // A plain gzip tag's listing (ls -la) does not stream its layer.
    let tag = m.path("src/latest");
    common::run(Command::new("ls").arg("-la").arg(&tag));
    assert!(
        proxy.bytes_down() < 64 << 10,
        "ls -la of a tag fetched {} bytes: {:#?}",
        proxy.bytes_down(),
        paths(&proxy)
    );

    // Ping and catalog (side by side), the manifest, config and the
    // layer's tail (footer + TOC, side by side), the file's chunk.
    proxy.reset();
    let root = m.path("esgz/latest/rootfs");
    let before = stat_key(&root);
    assert_eq!(
        std::fs::read_to_string(root.join("small.txt")).unwrap(),
        "hello ggfs\n"
    );
    let seen = paths(&proxy);
    assert!(seen.len() <= 4, "{seen:#?}");
    assert!(!seen.iter().any(|p| p.contains("/tags/list")), "{seen:#?}");
    assert!(
        proxy.bytes_down() * 100 < fx.layer_size,
        "{} bytes of a {}-byte layer: {seen:#?}",
        proxy.bytes_down(),
        fx.layer_size
    );

    // The whole tree: the layer in 1-2 MiB segments, plus the few files
    // read before the background fetch started and those read while it
    // caught up; never a request per file.
    assert_same_tree(&root, &fx.expected);
    let seen = paths(&proxy);
    let segments = (fx.layer_size >> 20) as usize + 1;
    assert!(
        seen.len() <= segments + FILES / 20,
        "{} requests for {FILES} files in {segments} segments: {seen:#?}",
        seen.len()
    );
    assert!(
        proxy.bytes_down() < fx.layer_size + fx.layer_size / 4,
        "{} bytes for a {}-byte layer",
        proxy.bytes_down(),
        fx.layer_size
    );
    assert!(m.log().contains("background fetch done"), "{}", m.log());
    // rootfs/ answers the same before and after its tree is built, and a
    // plain layer's too once read.
    assert_eq!(stat_key(&root), before);
    let plain = stat_key(&tag.join("rootfs"));
    assert_eq!(
        std::fs::read_to_string(tag.join("rootfs/small.txt")).unwrap(),
        "hello ggfs\n"
    );
    assert_eq!(stat_key(&tag.join("rootfs")), plain);
}

#[test]
fn reads_are_served_while_the_rest_is_fetched_and_an_interrupted_fetch_resumes() {
    let fx = fixture();
    // 2 MB/s: the background fetch takes seconds, reads go on meanwhile.
    let slow = Wan {
        delay: Duration::from_millis(10),
        rate: 2_000_000,
    };
    let proxy = CountingProxy::start_wan(fx.reg.addr(), slow);
    let cache = common::tempdir();
    let m = Mount::start_with_cache(proxy.addr(), &["--fetch-after", "0"], Some(cache.path()));
    let small = m.path("esgz/latest/rootfs/small.txt");
    let got = within(60, "a read during the fetch", move || {
        std::fs::read_to_string(small)
    });
    assert_eq!(got.unwrap(), "hello ggfs\n");
    let f = "d07/f0007";
    assert_eq!(
        std::fs::read(m.path(&format!("esgz/latest/rootfs/{f}"))).unwrap(),
        std::fs::read(fx.expected.join(f)).unwrap()
    );
    assert!(
        proxy.bytes_down() < fx.layer_size / 2,
        "the reads waited for the whole layer: {} of {} bytes",
        proxy.bytes_down(),
        fx.layer_size
    );
    // Interrupt the fetch part-way: what is cached stays, the rest resumes.
    // Only committed files count: a batch of chunks is written to `.tmp-*`
    // files and named after one syncfs, so a kill before that keeps none.
    let cached = |dir: &Path| committed_size(dir);
    within(60, "some of the layer cached", {
        let dir = cache.path().to_path_buf();
        move || {
            while cached(&dir) < 2 << 20 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    m.kill9();
    let kept = cached(cache.path());
    assert!(kept < fx.layer_size, "the fetch finished before the kill");
    drop(m);
    let fast = CountingProxy::start_wan(fx.reg.addr(), Wan::typical());
    let m = Mount::start_with_cache(fast.addr(), &[], Some(cache.path()));
    assert_same_tree(&m.path("esgz/latest/rootfs"), &fx.expected);
    let refetched = fast.bytes_down();
    assert!(
        refetched + (1 << 20) < fx.layer_size,
        "fetched {refetched} bytes again of a {}-byte layer, {kept} bytes were cached: {:#?}",
        fx.layer_size,
        paths(&fast)
    );
}
#[test]
fn a_file_shared_by_estargz_and_zstdchunked_images_is_fetched_once() {
    let fx = fixture();
    common::zstdchunked_image(&fx.reg, "src:latest", "zchunked:latest");
    let proxy = CountingProxy::start_wan(fx.reg.addr(), Wan::typical());
    let m = Mount::start(proxy.addr(), &["--fetch-after", "never"]);
    let files = ["d07/f0007", "big/b1"];
    for f in files {
        let got = std::fs::read(m.path(&format!("esgz/latest/rootfs/{f}"))).unwrap();
        assert_eq!(got, std::fs::read(fx.expected.join(f)).unwrap(), "{f}");
    }
    // The big file's READs (128 KiB each) come while its chunk is still
    // being written to the cache: they are answered from memory, so no
    // range is asked for twice.
    let ranges: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter_map(|r| r.range)
        .collect();
    let mut distinct = ranges.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ranges.len(), "{:#?}", paths(&proxy));
    // The other image's TOC, then the same files: chunks are cached by
    // their digest, so no byte of them is fetched again.
    std::fs::metadata(m.path("zchunked/latest/rootfs/small.txt")).unwrap();
    proxy.reset();
    for f in files {
        let got = std::fs::read(m.path(&format!("zchunked/latest/rootfs/{f}"))).unwrap();
        assert_eq!(got, std::fs::read(fx.expected.join(f)).unwrap(), "{f}");
    }
    let seen = paths(&proxy);
    assert!(seen.is_empty(), "fetched again: {seen:#?}");
}

/// Bytes of the committed files under `dir`: the temporary files of a
/// batch not yet named (`.tmp-*`) are removed by the next daemon.
fn committed_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
        .map(|e| match e.metadata() {
            Ok(md) if md.is_dir() => committed_size(&e.path()),
            Ok(md) => md.len(),
            Err(_) => 0,
        })
        .sum()
}
