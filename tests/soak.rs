//! Bounded memory in a long-running daemon: a million lookups over many
//! images, with fewer trees allowed in memory than images walked, keep the
//! daemon's RSS flat. Trees beyond the limit are dropped and rebuilt on
//! the next request at the inode numbers they had.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::mount::Mount;
use common::Distribution;

/// Images walked, files in each, trees the daemon may keep.
const IMAGES: usize = 12;
const FILES: usize = 4000;
const MAX_TREES: usize = 4;
const LOOKUPS: u64 = 1_000_000;
/// RSS may grow this much between the first walk and the last (the
/// allocator settling in: trees are built on whichever blocking thread)...
const GROWTH_MIB: u64 = 16;
/// ...and over the second half (half a million lookups) this much: flat,
/// not growing with the lookups. Both ends of that half are taken at rest
/// ([`rest_rss_kib`]):
/// a round's own sample catches trees being built and, under the whole
/// suite's load, varied by 18 MiB within a run (even its floor rose 4 MiB
/// in a run whose RSS at rest ended where it began). The smallest heap
/// allocation is 32 bytes, so anything kept per lookup adds 16 MiB or more
/// over the half: twice this bound.
const LATE_GROWTH_MIB: u64 = 8;
/// At rest: this long after the last lookup, what a build in flight held
/// is handed back (the daemon trims its heap on the first second with no
/// build), and the blocking threads a busy machine made the runtime start
/// (each with its stack) have ended (tokio keeps an idle one 10 s).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(12);

/// RSS at rest: the least of a few samples taken once settled, so that
/// one caught during the prune's own work does not count.
fn rest_rss_kib(pid: u32) -> u64 {
    std::thread::sleep(SETTLE);
    (0..8)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(250));
            rss_kib(pid)
        })
        .min()
        .unwrap_or(0)
}

fn tar_of(files: impl Iterator<Item = (String, Vec<u8>)>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// `IMAGES` images sharing a layer of `FILES` files in 40 directories,
/// each with one file of its own on top.
fn registry_with_images() -> Distribution {
    let reg = Distribution::start();
    let dir = common::tempdir();
    let big = dir.path().join("big.tar");
    let files = (0..FILES).map(|i| (format!("d{}/f{i}", i % 40), i.to_string().into_bytes()));
    std::fs::write(&big, tar_of(files)).unwrap();
    let base = reg.reference("soak/base:v1");
    common::ggfs(&["append", "-f", big.to_str().unwrap(), "-t", &base]);
    for i in 0..IMAGES {
        let own = dir.path().join(format!("own{i}.tar"));
        std::fs::write(
            &own,
            tar_of([(format!("own{i}"), vec![b'x'; i])].into_iter()),
        )
        .unwrap();
        let tag = reg.reference(&format!("soak/img{i}:v1"));
        common::ggfs(&[
            "append",
            "-b",
            &base,
            "-f",
            own.to_str().unwrap(),
            "-t",
            &tag,
        ]);
    }
    reg
}

/// Stat every file below `dir`; the inode numbers seen, summed.
fn walk(dir: &Path) -> (usize, u64) {
    let (mut n, mut sum) = (0, 0u64);
    for d in std::fs::read_dir(dir).unwrap() {
        let d = d.unwrap().path();
        if !d.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&d).unwrap() {
            let md = std::fs::symlink_metadata(f.unwrap().path()).unwrap();
            n += 1;
            sum = sum.wrapping_add(md.ino());
        }
    }
    (n, sum)
}

fn stat(m: &Mount, name: &str) -> u64 {
    let s = std::fs::read_to_string(m.path(".ggfs/stats")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in stats: {s}"))
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap()
}

#[test]
fn a_million_lookups_over_more_images_than_trees_kept_keep_rss_flat() {
    let reg = registry_with_images();
    let limit = MAX_TREES.to_string();
    let m = Mount::start(
        reg.addr(),
        &["--max-trees", &limit, "--fetch-after", "never"],
    );
    let dirs: Vec<_> = (0..IMAGES)
        .map(|i| m.path(&format!("soak/img{i}/v1/rootfs")))
        .collect();
    // The first round builds every tree once and says what each holds.
    let first: Vec<(usize, u64)> = dirs.iter().map(|d| walk(d)).collect();
    assert!(first.iter().all(|(n, _)| *n == FILES), "{first:?}");
    let start_rss = rss_kib(m.pid());
    let start_lookups = stat(&m, "lookups");
    let mut rounds = 0;
    let mut per_round = Vec::new();
    let mut half_rss = None;
    while stat(&m, "lookups") - start_lookups < LOOKUPS {
        if half_rss.is_none() && stat(&m, "lookups") - start_lookups >= LOOKUPS / 2 {
            half_rss = Some(rest_rss_kib(m.pid()));
        }
        // The kernel keeps a tree's entries as long as an image's: drop
        // them (and so its inodes, forgotten here too), so each round asks again.
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        for (d, want) in dirs.iter().zip(&first) {
            assert_eq!(&walk(d), want, "{} after trees were dropped", d.display());
        }
        rounds += 1;
        per_round.push(rss_kib(m.pid()));
        assert!(
            rounds < 200,
            "{} lookups in 200 rounds",
            stat(&m, "lookups")
        );
    }
    // What the daemon holds at rest, not what a tree build in flight does.
    let end_rss = rest_rss_kib(m.pid());
    let half_rss = half_rss.expect("a round ended past half the lookups");
    let built = stat(&m, "trees_built");
    let dropped = stat(&m, "trees_dropped");
    println!(
        "{rounds} rounds, {} lookups, trees built {built} dropped {dropped}, \
         RSS {start_rss} KiB -> {half_rss} KiB at half -> {end_rss} KiB (by round: {per_round:?})",
        stat(&m, "lookups")
    );
    // Trees came and went: more were built than there are images.
    assert!(
        dropped > 0 && built > 2 * IMAGES as u64,
        "built {built} dropped {dropped}"
    );
    assert!(
        end_rss <= start_rss + GROWTH_MIB * 1024,
        "RSS grew from {start_rss} KiB to {end_rss} KiB (by round: {per_round:?})"
    );
    assert!(
        end_rss <= half_rss + LATE_GROWTH_MIB * 1024,
        "RSS at rest rose from {half_rss} KiB to {end_rss} KiB over the second half \
         (by round: {per_round:?})"
    );
    m.unmount().unwrap();
}

/// The daemon's table of namespace inodes follows what the kernel holds,
/// not every name ever looked up: names the kernel forgot (FORGET, here
/// after `drop_caches`) go once unused for `--forget-after` seconds, and a
/// name looked up again comes back at a new number, showing the same.
#[test]
fn names_the_kernel_forgets_are_dropped_and_found_again() {
    const TAGS: usize = 200;
    let reg = Distribution::start();
    let dir = common::tempdir();
    let one = dir.path().join("one.tar");
    std::fs::write(&one, tar_of([("f".to_string(), b"x".to_vec())].into_iter())).unwrap();
    let first = reg.reference("names/app:t0");
    common::ggfs(&["append", "-f", one.to_str().unwrap(), "-t", &first]);
    for i in 1..TAGS {
        common::ggfs(&["tag", &first, &format!("t{i}")]);
    }
    let m = Mount::start(reg.addr(), &["--forget-after", "1"]);
    // statfs's file count is the daemon's count of namespace inodes.
    let inodes = || -> u64 {
        let out = std::process::Command::new("stat")
            .args(["-f", "-c", "%c"])
            .arg(m.mp())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let before = inodes();
    let tag = |i: usize| m.path(&format!("names/app/t{i}"));
    // Each held open while counted: another test's drop_caches must not
    // make the kernel forget them before then.
    let open: Vec<std::fs::File> = (0..TAGS)
        .map(|i| std::fs::File::open(tag(i)).unwrap())
        .collect();
    let numbers: Vec<u64> = open.iter().map(|f| f.metadata().unwrap().ino()).collect();
    let held = inodes();
    assert!(held >= before + TAGS as u64, "{before} -> {held}");
    drop(open);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = inodes();
        if now < before + 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now} namespace inodes 60 s after the kernel dropped {TAGS} tags ({before} before them)"
        );
    }
    let again = std::fs::metadata(tag(7)).unwrap().ino();
    assert_ne!(again, numbers[7], "a forgotten number given out again");
    assert!(!numbers.contains(&again));
    let manifest = std::fs::read(tag(7).join("manifest.json")).unwrap();
    let want = common::ggfs(&["manifest", &reg.reference("names/app:t7")]);
    assert_eq!(String::from_utf8(manifest).unwrap(), want);
}
