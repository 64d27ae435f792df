//! `ggfs append --layer-format estargz|zstd:chunked` end to end: the layer
//! is pushed to a real registry (CNCF distribution), then
//! - containerd fetches it and ctr-remote converts it (eStargz to
//!   zstd:chunked, zstd:chunked to plain tar: our layer is decompressed)
//!   without error, and the result unpacks to the same tree;
//! - skopeo copies it to an OCI layout and `umoci unpack` gives back the input
//!   tree, metadata included (less the format's own files: the TOC and the
//!   landmark);
//! - a ggfs mount reads one small file fetching under 1% of the layer, and
//!   shows the whole tree;
//! - podman pulls it and its storage holds the input tree;
//! - `--prefetch` puts the named files first, before `.prefetch.landmark`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::mount::{within, Mount};
use common::tree::{assert_same, Mtimes};
use common::{run, skopeo_inspect_raw, umoci_unpack, CountingProxy, Distribution};

const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// The format's own entries, in the tar but not part of the tree.
const FORMAT_FILES: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

fn ggfs(args: &[&str]) -> String {
    run(Command::new(common::ggfs_bin()).args(args))
}

/// The every-file-type fixture plus a 9 MiB incompressible file (three
/// 4 MiB chunks), so the layer is ~15 MB and 1% of it is meaningful.
fn input_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    run(Command::new("cp")
        .arg("-a")
        .arg(common::fixture_rootfs())
        .arg(&tree));
    let big = tree.join("data/multi-9m");
    std::fs::write(&big, common::pseudo_random(9 << 20, 9)).unwrap();
    // The fixture's mtimes are fixed; keep the new file's (and data/'s) too.
    run(Command::new("touch")
        .args(["-h", "-d", "@1700000000"])
        .arg(&big)
        .arg(tree.join("data")));
    tree
}

fn read_string(p: &Path) -> String {
    let p = p.to_path_buf();
    within(60, "read", move || {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    })
}

/// umoci's unpack of `reference` (copied by skopeo), without the format's
/// own files. umoci reads no zstd: with `regzip`, skopeo decompresses the
/// layers and gzips them again on the way.
fn unpack(reference: &str, dir: &Path, regzip: bool) -> PathBuf {
    let layout = dir.join("layout");
    let flags: &[&str] = if regzip {
        &["--dest-compress", "--dest-compress-format", "gzip"]
    } else {
        &[]
    };
    common::skopeo_copy_with(
        flags,
        &format!("docker://{reference}"),
        &format!("oci:{}:t", layout.display()),
    );
    let rootfs = umoci_unpack(&layout, "t", &dir.join("bundle"));
    for f in FORMAT_FILES {
        let _ = std::fs::remove_file(rootfs.join(f));
    }
    rootfs
}

fn check(format: &str, media_type: &str, convert_to: &str) {
    let reg = Distribution::start();
    let work = common::tempdir();
    let tree = input_tree(work.path());
    let repo = format.replace(':', "-");
    let dst = reg.reference(&format!("{repo}:latest"));
    ggfs(&[
        "append",
        "-f",
        tree.to_str().unwrap(),
        "--layer-format",
        format,
        "-t",
        &dst,
    ]);
    let manifest = skopeo_inspect_raw(&format!("docker://{dst}"));
    let layer = &manifest["layers"][0];
    assert_eq!(layer["mediaType"], media_type, "{manifest:#}");
    let ann = &layer["annotations"];
    assert!(ann[TOC_DIGEST].is_string(), "{manifest:#}");
    assert!(ann[UNCOMPRESSED_SIZE].is_string(), "{manifest:#}");
    if format == "zstd:chunked" {
        assert!(
            ann["io.containers.zstd-chunked.manifest-position"].is_string(),
            "{manifest:#}"
        );
    }
    let layer_size = layer["size"].as_u64().unwrap();
    assert!(layer_size > 14 << 20, "layer of {layer_size} bytes");
    ggfs(&["validate", &dst]);

    // (b) skopeo + umoci give back the tree, metadata included.
    let u = common::tempdir();
    let zstd = format == "zstd:chunked";
    assert_same(&unpack(&dst, u.path(), zstd), &tree, Mtimes::NonDirs);

    // (c) our lazy reader, through a mount: one small file costs footer,
    // TOC and one small member; then the whole tree reads back.
    let proxy = CountingProxy::start(reg.addr());
    {
        let m = Mount::start(proxy.addr(), &[]);
        proxy.reset();
        let small = read_string(&m.path(&format!("{repo}/latest/rootfs/small.txt")));
        assert_eq!(small, "hello ggfs\n");
        let down = proxy.bytes_down();
        eprintln!("{format}: small.txt fetched {down} bytes of a {layer_size}-byte layer");
        assert!(
            down * 100 < layer_size,
            "reading one small file fetched {down} bytes of a {layer_size}-byte layer: {:#?}",
            proxy.requests()
        );
        let layer_digest = layer["digest"].as_str().unwrap();
        assert!(
            !proxy
                .requests()
                .iter()
                .any(|r| r.path.ends_with(layer_digest) && r.range.is_none()),
            "the whole layer was fetched: {:#?}",
            proxy.requests()
        );
        assert_same(
            &m.path(&format!("{repo}/latest/rootfs")),
            &tree,
            Mtimes::NonDirs,
        );
    }

    // (a) containerd fetches it, ctr-remote converts it (decompressing
    // every member / frame), pushes the result. eStargz goes to
    // zstd:chunked; zstd:chunked is uncompressed (ctr-remote 0.12's
    // --estargz gzips a zstd layer but keeps its tar+zstd media type).
    let conv = reg.reference(&format!("{repo}-conv:latest"));
    common::Containerd::start().convert(&dst, &conv, &[convert_to]);
    let u2 = common::tempdir();
    assert_same(&unpack(&conv, u2.path(), !zstd), &tree, Mtimes::NonDirs);

    // (d) podman pulls it (containers/storage applies the layer).
    let p = common::tempdir();
    let rootfs = common::podman_rootfs(&dst, p.path());
    for f in FORMAT_FILES {
        let _ = std::fs::remove_file(rootfs.join(f));
    }
    assert_same(&rootfs, &tree, Mtimes::NonDirs);
}

#[test]
fn estargz_append_read_by_ctr_remote_umoci_and_lazily() {
    check(
        "estargz",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "--zstdchunked",
    );
}

#[test]
fn zstd_chunked_append_read_by_ctr_remote_umoci_and_lazily() {
    check(
        "zstd:chunked",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "--uncompress",
    );
}

/// `--prefetch`: the files come first and the mount's prefetch covers them.
#[test]
fn prefetch_files_come_first() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let tree = work.path().join("t");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/late"), b"prefetched\n").unwrap();
    std::fs::write(tree.join("0-first"), common::pseudo_random(1 << 20, 5)).unwrap();
    let dst = reg.reference("pf:latest");
    ggfs(&[
        "append",
        "-f",
        tree.to_str().unwrap(),
        "--layer-format",
        "estargz",
        "--prefetch",
        "a/b/late",
        "-t",
        &dst,
    ]);
    let u = common::tempdir();
    let layout = u.path().join("layout");
    common::skopeo_copy(
        &format!("docker://{dst}"),
        &format!("oci:{}:t", layout.display()),
    );
    let index = skopeo_inspect_raw(&format!("oci:{}:t", layout.display()));
    let digest = index["layers"][0]["digest"].as_str().unwrap();
    let blob = layout.join("blobs/sha256").join(&digest[7..]);
    let listing = run(Command::new("tar").arg("-tzf").arg(&blob));
    let names: Vec<&str> = listing.lines().map(|l| l.trim_end_matches('/')).collect();
    assert_eq!(
        names,
        [
            "a",
            "a/b",
            "a/b/late",
            ".prefetch.landmark",
            "0-first",
            "stargz.index.json"
        ],
        "{listing}"
    );
    let again = u.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    let rootfs = unpack(&dst, &again, false);
    assert_same(&rootfs, &tree, Mtimes::Ignore);
}

/// `ggfs commit --layer-format estargz`, then `zstd:chunked`, from a
/// writable mount: each new layer carries its TOC annotations, a fresh mount
/// reads it lazily and skopeo + umoci see the files.
#[test]
fn commit_writes_estargz_and_zstd_chunked_layers() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let base = work.path().join("base");
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::write(base.join("etc/hello"), b"hello\n").unwrap();
    let tag = reg.reference("w:latest");
    ggfs(&["append", "-f", base.to_str().unwrap(), "-t", &tag]);
    let big = common::pseudo_random(5 << 20, 11);
    for (i, (format, media_type)) in [
        ("estargz", "application/vnd.oci.image.layer.v1.tar+gzip"),
        (
            "zstd:chunked",
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        {
            let m = Mount::start(reg.addr(), &["--commit-delay", "manual"]);
            let dir = m.path(&format!("w/latest/rootfs/c{i}"));
            let (small, bigf, data) = (dir.join("small"), dir.join("big"), big.clone());
            within(60, "write", move || {
                std::fs::create_dir(&dir).unwrap();
                std::fs::write(&small, format!("commit {i}\n")).unwrap();
                std::fs::write(&bigf, data).unwrap();
            });
            let out = Command::new(common::ggfs_bin())
                .arg("commit")
                .arg(m.path("w/latest"))
                .args(["--layer-format", format])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ggfs commit --layer-format {format}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let manifest = skopeo_inspect_raw(&format!("docker://{tag}"));
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), i + 2, "{manifest:#}");
        let layer = &layers[i + 1];
        assert_eq!(layer["mediaType"], media_type, "{manifest:#}");
        assert!(layer["annotations"][TOC_DIGEST].is_string(), "{manifest:#}");
        let layer_size = layer["size"].as_u64().unwrap();

        let proxy = CountingProxy::start(reg.addr());
        let m = Mount::start(proxy.addr(), &[]);
        proxy.reset();
        assert_eq!(
            read_string(&m.path(&format!("w/latest/rootfs/c{i}/small"))),
            format!("commit {i}\n")
        );
        let down = proxy.bytes_down();
        assert!(
            down * 50 < layer_size,
            "{format}: one small file fetched {down} of {layer_size} bytes: {:#?}",
            proxy.requests()
        );
        let p = m.path(&format!("w/latest/rootfs/c{i}/big"));
        assert!(within(60, "read", move || std::fs::read(&p).unwrap()) == big);
    }
    let u = common::tempdir();
    let rootfs = unpack(&tag, u.path(), true);
    assert_eq!(std::fs::read(rootfs.join("c0/big")).unwrap(), big);
    assert_eq!(
        std::fs::read(rootfs.join("c1/small")).unwrap(),
        b"commit 1\n"
    );
    assert_eq!(std::fs::read(rootfs.join("etc/hello")).unwrap(), b"hello\n");
}
