//! Index artifacts: `ggfs index push` (and a mount's `--push-index`)
//! publish a plain layer's index as an OCI referrer; a mount with an empty
//! cache that finds one reads a file by a few verified Range requests
//! instead of streaming the whole layer. A wrong artifact never yields
//! wrong bytes that stay unnoticed: a wrong block digest is EIO at once, a
//! lying tar index is caught by the audit once the whole blob was read.
//! Real registry (CNCF distribution, no referrers API: the `sha256-<hex>`
//! tag fallback), real FUSE mounts.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mount::{within, Mount};
use common::{CountingProxy, Distribution};
use ggfs::formats::layerindex::{self, LayerIndexFile};
use ggfs::image::manifest::{Compression, Parsed};
use ggfs::registry::{Client, ClientOptions};

const SMALL: &[u8] = b"hello index artifact\n";
/// Big enough that one file is a small part of the layer.
const BIG_LEN: usize = 40 << 20;
/// Enough for two checkpoints, small enough to read whole.
const AUDIT_LEN: usize = 6 << 20;

/// Pushes a one-layer tar+gzip image of `big.txt` (`len` bytes of
/// compressible text) and `small.txt`; returns (layer digest, size).
fn push_plain_image(reg: &Distribution, image: &str, len: usize) -> (String, u64) {
    let work = common::tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let text: Vec<u8> = common::pseudo_random(len, 7)
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if i % 64 == 63 {
                b'\n'
            } else {
                b"acgt"[(b & 3) as usize]
            }
        })
        .collect();
    std::fs::write(src.join("big.txt"), &text).unwrap();
    std::fs::write(src.join("small.txt"), SMALL).unwrap();
    common::run(
        Command::new(common::ggfs_bin())
            .args(["append", "-f"])
            .arg(&src)
            .args(["-t", &reg.reference(image)])
            .env("TMPDIR", work.path()),
    );
    let m = common::skopeo_inspect_raw(&format!("docker://{}", reg.reference(image)));
    let layer = &m["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    (
        layer["digest"].as_str().unwrap().to_string(),
        layer["size"].as_u64().unwrap(),
    )
}

fn ggfs(args: &[&str]) -> String {
    common::run(Command::new(common::ggfs_bin()).args(args))
}

/// Push an index artifact of `repo:tag`'s one layer built by the library,
/// changed by `edit` first (to make a lying one).
fn push_edited_index(reg: &Distribution, repo: &str, tag: &str, edit: fn(&mut LayerIndexFile)) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::new(ClientOptions::default()).unwrap();
        let r = common::client::repo(&client, reg.addr(), repo);
        let subject = ggfs::image::Source::manifest(&r, tag).await.unwrap();
        let Parsed::Image(m) = subject.parse().unwrap() else {
            panic!("not an image")
        };
        let desc = &m.layers()[0];
        let digest = ggfs::image::manifest::digest_of(desc).unwrap();
        let blob = std::fs::read(reg.blob_path(digest.as_str())).unwrap();
        let mut f = LayerIndexFile::build(
            &blob[..],
            Compression::Gzip,
            &digest,
            desc.size(),
            std::io::sink(),
        )
        .unwrap();
        edit(&mut f);
        layerindex::push(&r, &subject, &[f]).await.unwrap();
    });
}

fn read(p: &Path) -> std::io::Result<Vec<u8>> {
    let p = p.to_path_buf();
    within(120, "read", move || std::fs::read(p))
}

/// Reads small.txt through a fresh mount (empty cache) behind a counting
/// proxy and checks it took a few Range requests, not the layer.
fn assert_first_read_is_by_ranges(reg: &Distribution, image_path: &str, layer: &str, size: u64) {
    let proxy = CountingProxy::start(reg.addr());
    let m = Mount::start(proxy.addr(), &[]);
    proxy.reset();
    let got = read(&m.path(&format!("{image_path}/rootfs/small.txt")))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert_eq!(got, SMALL);
    let reqs = proxy.requests();
    let down = proxy.bytes_down();
    eprintln!(
        "first file on a fresh machine: {} requests, {down} bytes down, layer {size} bytes: {reqs:#?}",
        reqs.len()
    );
    let whole: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.contains(layer) && r.range.is_none())
        .collect();
    assert!(whole.is_empty(), "the layer was fetched whole: {whole:#?}");
    assert!(
        reqs.iter().any(|r| r.path.contains(layer)),
        "no range of the layer read: {reqs:#?}"
    );
    assert!(reqs.len() <= 12, "{} requests: {reqs:#?}", reqs.len());
    assert!(down * 4 < size, "{down} bytes of a {size}-byte layer");
    assert!(m.log().contains("using index artifact"), "{}", m.log());
}

#[test]
fn pushed_index_is_listed_and_lets_a_fresh_mount_read_by_ranges() {
    let reg = Distribution::start();
    let (layer, size) = push_plain_image(&reg, "idx/plain:v1", BIG_LEN);
    let out = ggfs(&["index", "push", &reg.reference("idx/plain:v1")]);
    let artifact = out.trim().rsplit('@').next().unwrap().to_string();
    assert!(artifact.starts_with("sha256:"), "{out}");
    let refs = ggfs(&["refs", &reg.reference("idx/plain:v1")]);
    assert!(
        refs.contains(&format!("{artifact} {}", layerindex::ARTIFACT_TYPE)),
        "{refs}"
    );
    assert_first_read_is_by_ranges(&reg, "idx/plain/v1", &layer, size);
}

#[test]
fn mount_option_pushes_the_index_after_a_first_pass() {
    let reg = Distribution::start();
    let (layer, size) = push_plain_image(&reg, "idx/auto:v1", BIG_LEN);
    {
        let m = Mount::start(reg.addr(), &["--push-index"]);
        assert_eq!(
            read(&m.path("idx/auto/v1/rootfs/small.txt")).unwrap(),
            SMALL
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ggfs(&["refs", &reg.reference("idx/auto:v1")]).contains(layerindex::ARTIFACT_TYPE) {
            assert!(Instant::now() < deadline, "never pushed: {}", m.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_first_read_is_by_ranges(&reg, "idx/auto/v1", &layer, size);
}

#[test]
fn wrong_block_digest_in_an_index_artifact_gives_eio() {
    let reg = Distribution::start();
    let (layer, _) = push_plain_image(&reg, "idx/bad:v1", BIG_LEN);
    push_edited_index(&reg, "idx/bad", "v1", |f| {
        for b in &mut f.blocks {
            *b = ggfs::Digest::of(b"not this block");
        }
    });
    let m = Mount::start(reg.addr(), &[]);
    let err = read(&m.path("idx/bad/v1/rootfs/small.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "want EIO, got {err}");
    let log = m.log();
    assert!(log.contains("using index artifact"), "{log}");
    assert!(
        log.contains(&layer) && log.contains("failed verification"),
        "{log}"
    );
}

#[test]
fn lying_tar_index_is_caught_once_the_whole_blob_was_read() {
    let reg = Distribution::start();
    push_plain_image(&reg, "idx/lie:v1", AUDIT_LEN);
    // small.txt said to start where big.txt does: the blocks are right,
    // the mapping is not.
    push_edited_index(&reg, "idx/lie", "v1", |f| {
        let at = |f: &LayerIndexFile, name: &str| {
            f.index
                .entries
                .iter()
                .position(|e| e.path.ends_with(name.as_bytes()))
                .unwrap()
        };
        let (big, small) = (at(f, "big.txt"), at(f, "small.txt"));
        f.index.entries[small].offset = f.index.entries[big].offset;
    });
    let m = Mount::start(reg.addr(), &[]);
    // Reading big.txt reads every block of the blob: the audit runs, finds
    // the lie, and from then on the layer answers EIO (maybe already to the
    // end of this read). small.txt is not read before: the kernel would
    // keep what it got.
    match read(&m.path("idx/lie/v1/rootfs/big.txt")) {
        Ok(big) => assert_eq!(big.len(), AUDIT_LEN),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    let small = m.path("idx/lie/v1/rootfs/small.txt");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m.log().contains("failed its audit") {
        assert!(Instant::now() < deadline, "no audit verdict: {}", m.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let err = read(&small).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "want EIO, got {err}");
}

#[test]
fn honest_index_passes_its_audit() {
    let reg = Distribution::start();
    push_plain_image(&reg, "idx/ok:v1", AUDIT_LEN);
    ggfs(&["index", "push", &reg.reference("idx/ok:v1")]);
    let m = Mount::start(reg.addr(), &[]);
    assert_eq!(
        read(&m.path("idx/ok/v1/rootfs/big.txt")).unwrap().len(),
        AUDIT_LEN
    );
    assert_eq!(read(&m.path("idx/ok/v1/rootfs/small.txt")).unwrap(), SMALL);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m.log().contains("index artifact audited") {
        assert!(
            !m.log().contains("failed its audit") && Instant::now() < deadline,
            "{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(read(&m.path("idx/ok/v1/rootfs/small.txt")).unwrap(), SMALL);
}

/// Peak resident memory of a process, from /proc (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// A single-frame tar+zstd layer has no restart point but its start: the
/// last file, read by Range through an index artifact, streams the whole
/// blob through the decoder. It must not be held (the whole span and its
/// decompressed copy would be ~100 MiB): the daemon's peak RSS stays under
/// 64 MiB with a 48 MiB incompressible layer, and the bytes are right.
#[test]
fn single_frame_zstd_read_by_ranges_keeps_memory_bounded() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut big = std::fs::File::create(src.join("big.bin")).unwrap();
    let random = std::fs::File::open("/dev/urandom").unwrap();
    std::io::copy(&mut std::io::Read::take(random, 48 << 20), &mut big).unwrap();
    std::fs::write(src.join("z-tail.txt"), SMALL).unwrap();
    let image = reg.reference("zst/one:t");
    common::run(
        Command::new(common::ggfs_bin())
            .args(["append", "--layer-format", "zstd", "-f"])
            .arg(&src)
            .args(["-t", &image])
            .env("TMPDIR", work.path()),
    );
    ggfs(&["index", "push", &image]);
    let m = Mount::start(reg.addr(), &[]);
    let got =
        read(&m.path("zst/one/t/rootfs/z-tail.txt")).unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert_eq!(got, SMALL);
    let peak = peak_rss(m.pid());
    assert!(peak < 64 << 20, "daemon peak RSS {} MiB", peak >> 20);
    assert!(
        !m.log().contains("streaming"),
        "the layer was streamed whole: {}",
        m.log()
    );
}
