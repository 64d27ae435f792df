//! A file over 4 GiB served by a real FUSE mount of a real registry: its
//! size and the bytes at offsets on both sides of 2^32 (where a 32-bit
//! offset or size would wrap) must be exact. The mount's cache is too small
//! to keep the layer's tar, so every read goes by verified Range requests
//! to the gzip blob, from checkpoints past 4 GiB of uncompressed data.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{CountingProxy, Distribution};

const GIB4: u64 = 1 << 32;
/// 4 GiB + 4 KiB: mostly a hole, so the source costs no disk.
const SIZE: u64 = GIB4 + 4096;

/// Distinct marker strings and where they sit in the big file: at 0, ending
/// at byte 2^32 - 1, starting at 2^32, and ending at the last byte.
fn markers() -> Vec<(u64, &'static [u8])> {
    vec![
        (0, b"<start of big file>"),
        (GIB4 - 13, b"<below 4 GiB>"),
        (GIB4, b"<at 4 GiB>"),
        (SIZE - 12, b"<end marker>"),
    ]
}

/// What the big file holds at `[off, off + len)`: zeros and the markers
/// (short at its end).
fn expected(off: u64, len: usize) -> Vec<u8> {
    let len = (len as u64).min(SIZE.saturating_sub(off)) as usize;
    let mut out = vec![0u8; len];
    for (at, m) in markers() {
        for (i, &b) in m.iter().enumerate() {
            let pos = at + i as u64;
            if pos >= off && pos < off + len as u64 {
                out[(pos - off) as usize] = b;
            }
        }
    }
    out
}

/// A sparse source tree: `big` (SIZE bytes, markers written) and a small
/// file after it in the tar, so its data sits past 4 GiB in the layer too.
fn write_tree(dir: &Path) {
    let big = std::fs::File::create(dir.join("big")).unwrap();
    big.set_len(SIZE).unwrap();
    for (at, m) in markers() {
        big.write_all_at(m, at).unwrap();
    }
    std::fs::write(dir.join("small.txt"), b"after the big one\n").unwrap();
    let used = big.metadata().map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(used.unwrap() < 1 << 20, "source file is not sparse");
}

fn mountd() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "ggfs-mountd"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p ggfs-mountd failed");
    common::mountd_bin()
}

/// A mount of `registry` at `dir/mnt`, cache in `dir/cache`; unmounted on
/// drop (lazily, if the daemon does not answer).
struct Mount {
    mp: PathBuf,
    log: PathBuf,
}

impl Mount {
    fn start(registry: &str, dir: &Path, cache_size: &str) -> Mount {
        let mp = dir.join("mnt");
        std::fs::create_dir(&mp).unwrap();
        let log = dir.join("mountd.log");
        let out = Command::new(mountd())
            .args(["mount", registry])
            .arg(&mp)
            .args(["--insecure", "--cache-size", cache_size, "--cache-dir"])
            .arg(dir.join("cache"))
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null())
            .output()
            .expect("run ggfs-mountd");
        let m = Mount { mp, log };
        assert!(
            out.status.success(),
            "mount failed: {}\nlog: {}",
            String::from_utf8_lossy(&out.stderr),
            m.log()
        );
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new(common::mountd_bin())
            .arg("unmount")
            .arg(&self.mp)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mp)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Up to `len` bytes of `file` at `off` by pread (repeated while it
/// returns short counts, as it may on FUSE), failing after `secs`.
fn pread(file: &Path, off: u64, len: usize, secs: u64) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = file.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], off + got as u64).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        let _ = tx.send(buf);
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|e| panic!("pread {len} at {off}: {e}"))
}

/// Assert `got` (read at `off`) is what the file holds there, naming the
/// first differing offset instead of printing megabytes of zeros.
fn assert_bytes(got: &[u8], off: u64, want_len: usize) {
    let want = expected(off, want_len);
    assert_eq!(
        got.len(),
        want.len(),
        "length of the read at {off} (+{want_len})"
    );
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let end = (i + 32).min(got.len());
        panic!(
            "read at {off} differs from offset {}: got {:?}, want {:?}",
            off + i as u64,
            String::from_utf8_lossy(&got[i..end]),
            String::from_utf8_lossy(&want[i..end]),
        );
    }
}

#[test]
fn file_over_4gib_reads_right_on_both_sides_of_2_pow_32() {
    let t0 = Instant::now();
    let reg = Distribution::start();
    let work = common::tempdir();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_tree(&src);
    let image = reg.reference("large/file:v1");
    // TMPDIR: the CLI's layer temp file stays inside the test's dir.
    common::run(
        Command::new(common::ggfs_bin())
            .args(["append", "-f"])
            .arg(&src)
            .args(["-t", &image])
            .env("TMPDIR", work.path()),
    );
    std::fs::remove_dir_all(&src).unwrap();
    eprintln!("pushed in {:?}", t0.elapsed());
    let manifest = common::skopeo_inspect_raw(&format!("docker://{image}"));
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();
    assert!(
        layer_size < 64 << 20,
        "layer of zeros is {layer_size} bytes"
    );

    // Cache of 64 MiB: the 4 GiB tar is over half of it, so it is not kept.
    let proxy = CountingProxy::start(reg.addr());
    let m = Mount::start(proxy.addr(), work.path(), "64M");
    let root = m.mp.join("large/file/v1/rootfs");
    let big = root.join("big");
    let md = std::fs::metadata(&big).unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert_eq!(md.len(), SIZE);
    eprintln!("indexed in {:?}", t0.elapsed());
    assert!(
        m.log().contains("reads will use ranges"),
        "tar was kept: {}",
        m.log()
    );
    proxy.reset();
    let small = std::fs::read(root.join("small.txt")).unwrap();
    assert_eq!(small, b"after the big one\n");

    for (at, marker) in markers() {
        assert_bytes(&pread(&big, at, marker.len(), 120), at, marker.len());
    }
    // Reads spanning 2^32 with the surrounding zeros, of sizes FUSE splits.
    for (off, len) in [
        (GIB4 - 7, 20),
        (GIB4 - 64, 128),
        (GIB4 - 70_000, 200_000),
        (GIB4 - 1, 2),
    ] {
        assert_bytes(&pread(&big, off, len, 120), off, len);
    }
    // Reads running past the end are short, ones at or past it empty.
    assert_bytes(&pread(&big, SIZE - 4096, 8192, 120), SIZE - 4096, 8192);
    assert!(pread(&big, SIZE, 10, 120).is_empty());
    assert!(pread(&big, SIZE + GIB4, 10, 120).is_empty());
    eprintln!("checked in {:?}", t0.elapsed());
    // Every byte above came from verified Range reads of the blob.
    let blob_gets: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/blobs/"))
        .collect();
    assert!(!blob_gets.is_empty(), "no blob reads at all");
    assert!(
        blob_gets.iter().all(|r| r.range.is_some()),
        "whole-blob fetches: {blob_gets:#?}"
    );
    drop(m);
    let cache = work.path().join("cache");
    let used = dir_size(&cache);
    assert!(used < 80 << 20, "cache holds {used} bytes");
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(md) if md.is_dir() => dir_size(&e.path()),
                    Ok(md) => md.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
