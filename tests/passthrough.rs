//! FUSE passthrough of cached big files: after a file of 1 MiB or more has
//! been read once (its bytes are then all in the cache), the daemon copies
//! them into the cache's `files/` and later opens are answered with that
//! copy as the backing file, so the kernel reads it without asking the
//! daemon (`.ggfs/stats`: `passthrough_opens` up, `lower_reads` unchanged, with
//! the page cache dropped in between). For a plain gzip layer and an
//! eStargz one (ggfs-written, pushed to a real CNCF distribution), through
//! a tag's writable rootfs and an image's read-only one by digest. A write
//! open beside a passthrough read is refused (ETXTBSY: the kernel takes no
//! other open beside one) and works once the reader is gone.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mount::{within, Mount};
use common::{ggfs, pseudo_random, Distribution};

const BIG: usize = 3 << 20;

fn image(reg: &Distribution, dir: &Path, repo: &str, format: &str) -> (Vec<u8>, String) {
    let tree = dir.join(repo.replace('/', "-"));
    std::fs::create_dir_all(tree.join("data")).unwrap();
    let big = pseudo_random(BIG, repo.len() as u64);
    std::fs::write(tree.join("data/big"), &big).unwrap();
    std::fs::write(tree.join("data/small"), b"small\n").unwrap();
    let dst = reg.reference(&format!("{repo}:v1"));
    let tree_s = tree.to_str().unwrap();
    ggfs(&[
        "append",
        "--insecure",
        "-f",
        tree_s,
        "--layer-format",
        format,
        "-t",
        &dst,
    ]);
    let digest = ggfs(&["digest", "--insecure", &dst]).trim().to_string();
    (big, digest)
}

fn stat(m: &Mount, key: &str) -> u64 {
    let text = std::fs::read_to_string(m.path(".ggfs/stats")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in stats:\n{text}"))
}

fn read(p: &Path) -> Vec<u8> {
    let p = p.to_path_buf();
    within(60, "read", move || std::fs::read(&p).unwrap())
}

fn copies(cache: &Path) -> usize {
    let dir = cache.join("files/sha256");
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

/// Wait (bounded) for the cache to hold `n` passthrough copies.
fn wait_copies(cache: &Path, n: usize) {
    let until = Instant::now() + Duration::from_secs(30);
    while copies(cache) < n {
        assert!(
            Instant::now() < until,
            "no passthrough copy in {} after 30 s",
            cache.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Read `file` cold, wait for its copy, drop the page cache and read it
/// again: (READs and passthrough opens of the second read).
fn second_read(
    m: &Mount,
    cache: &Path,
    file: &Path,
    want: &[u8],
    copies_after: usize,
) -> (u64, u64) {
    assert!(
        read(file) == want,
        "{}: wrong bytes on the first read",
        file.display()
    );
    if copies_after > 0 {
        wait_copies(cache, copies_after);
    }
    drop_caches();
    let (r0, p0) = (stat(m, "lower_reads"), stat(m, "passthrough_opens"));
    assert!(
        read(file) == want,
        "{}: wrong bytes on the second read",
        file.display()
    );
    (
        stat(m, "lower_reads") - r0,
        stat(m, "passthrough_opens") - p0,
    )
}

#[test]
fn cached_big_files_are_read_by_the_kernel_from_their_copy() {
    let reg = Distribution::start();
    let dir = common::tempdir();
    let (plain, _) = image(&reg, dir.path(), "pt/plain", "gzip");
    let (esgz, esgz_digest) = image(&reg, dir.path(), "pt/esgz", "estargz");
    let cache = dir.path().join("cache");
    let m = Mount::start_with_cache(reg.addr(), &[], Some(&cache));

    let file = m.path("pt/plain/v1/rootfs/data/big");
    let (reads, pt) = second_read(&m, &cache, &file, &plain, 1);
    assert_eq!(
        (reads, pt),
        (0, 1),
        "plain layer, tag rootfs: READs and passthrough opens"
    );

    let file = m.path(&format!("pt/esgz/{esgz_digest}/rootfs/data/big"));
    let (reads, pt) = second_read(&m, &cache, &file, &esgz, 2);
    assert_eq!(
        (reads, pt),
        (0, 1),
        "eStargz layer, read-only rootfs: READs and passthrough opens"
    );

    // Small files are served as before.
    let (r0, p0) = (stat(&m, "lower_reads"), stat(&m, "passthrough_opens"));
    assert_eq!(read(&m.path("pt/esgz/v1/rootfs/data/small")), b"small\n");
    assert_eq!(stat(&m, "passthrough_opens"), p0);
    assert!(stat(&m, "lower_reads") > r0);

    refuses_a_writer_beside_a_reader(&m.path("pt/plain/v1/rootfs/data/big"), &plain);
}

fn refuses_a_writer_beside_a_reader(file: &Path, want: &[u8]) {
    let mut reader = std::fs::File::open(file).unwrap();
    let mut head = vec![0u8; 4096];
    reader.read_exact(&mut head).unwrap();
    assert_eq!(head, want[..4096]);
    let err = std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ETXTBSY),
        "write open beside a passthrough read: {err}"
    );
    drop(reader);
    let mut w = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    std::io::Write::write_all(&mut w, b"tail").unwrap();
    drop(w);
    let got = read(file);
    assert_eq!(got.len(), want.len() + 4);
    assert!(got[..want.len()] == *want && got.ends_with(b"tail"));
}

#[test]
fn no_passthrough_serves_every_read() {
    let reg = Distribution::start();
    let dir = common::tempdir();
    let (plain, _) = image(&reg, dir.path(), "pt/off", "gzip");
    let cache: PathBuf = dir.path().join("cache");
    let m = Mount::start_with_cache(reg.addr(), &["--no-passthrough"], Some(&cache));
    let file = m.path("pt/off/v1/rootfs/data/big");
    let (reads, pt) = second_read(&m, &cache, &file, &plain, 0);
    assert_eq!(pt, 0);
    assert!(
        reads > 0,
        "with the page cache dropped, a served read asks the daemon"
    );
    assert_eq!(copies(&cache), 0);
}
