//! The fuzz targets in every `cargo test`, without AFL++ (whose build alone
//! takes a quarter of an hour): each target's body (`fuzz/src/targets/`,
//! compiled here from the fuzz crate's own sources) runs on every file of
//! its corpus (`fuzz/corpus/<target>/`), then on a few thousand inputs
//! mutated from them (bit flips, interesting bytes, truncations, splices of
//! two seeds, repeated and inserted runs) by a seeded xorshift, the same
//! inputs every run. A panic (a broken invariant) fails the test naming
//! the target, and the input is written to `target/fuzz-replay/` so it can
//! be added to the corpus as a regression seed.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod ggfs_fuzz;

use std::path::{Path, PathBuf};
use std::time::Instant;

/// Mutated inputs per target.
const MUTATIONS: usize = 10_000;
/// Inputs longer than this are cut (the seeds are at most a few KiB).
const MAX_LEN: usize = 64 << 10;

/// xorshift64*: deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'0', b'{', b'/'];

/// One input derived from `seeds` by one to four mutations.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            // Flip a bit.
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            // An interesting byte.
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            // Cut short.
            2 if !v.is_empty() => {
                let n = rng.below(v.len());
                v.truncate(n);
            }
            // Splice: our head, another seed's tail.
            3 => {
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            // Repeat a run.
            4 if !v.is_empty() => {
                let start = rng.below(v.len());
                let len = 1 + rng.below((v.len() - start).min(512));
                let run = v[start..start + len].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(
                    at..at,
                    run.iter().cycle().take(len * (1 + rng.below(8))).copied(),
                );
            }
            // Insert random bytes.
            5 => {
                let at = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            // Drop a run.
            _ if !v.is_empty() => {
                let start = rng.below(v.len());
                let len = 1 + rng.below((v.len() - start).min(256));
                v.drain(start..start + len);
            }
            _ => {}
        }
    }
    v.truncate(MAX_LEN);
    v
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// Runs `body` on `input`; on a panic saves the input and fails naming it.
fn run_one(target: &str, what: &str, body: fn(&[u8]), input: &[u8]) {
    if std::panic::catch_unwind(|| body(input)).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-replay");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{target}-{}", what.replace(['/', ' '], "-")));
    std::fs::write(&file, input).unwrap();
    panic!(
        "fuzz target {target} panicked on {what} (saved as {}; reproduce with \
         `fuzz/target/release/{target} < FILE`, and add it to fuzz/corpus/{target}/)",
        file.display()
    );
}

fn replay(target: &str, body: fn(&[u8])) {
    let t0 = Instant::now();
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "fuzz/corpus/{target}/ is empty");
    for (path, bytes) in &seeds {
        let name = path.file_name().unwrap().to_string_lossy();
        run_one(target, &format!("seed {name}"), body, bytes);
    }
    let seeds: Vec<Vec<u8>> = seeds.into_iter().map(|(_, b)| b).collect();
    // A seed per target, so adding a target does not change the others' inputs.
    let mut rng = Rng(target.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1);
    for i in 0..MUTATIONS {
        let input = mutate(&mut rng, &seeds);
        run_one(target, &format!("mutation {i}"), body, &input);
    }
    eprintln!(
        "{target}: {} seeds + {MUTATIONS} mutations in {:?}",
        seeds.len(),
        t0.elapsed()
    );
}

/// Every target of the fuzz crate has a corpus and a test here.
#[test]
fn every_target_is_replayed() {
    let bins: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/src/bin"))
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                p.file_stem().unwrap().to_string_lossy().into_owned()
            })
            .collect();
    let mut listed: Vec<&str> = ggfs_fuzz::targets::ALL.iter().map(|(n, _)| *n).collect();
    let mut bins: Vec<&str> = bins.iter().map(String::as_str).collect();
    listed.sort();
    bins.sort();
    assert_eq!(
        listed, bins,
        "fuzz/src/targets/mod.rs ALL and fuzz/src/bin/ differ"
    );
}

macro_rules! targets {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name), ggfs_fuzz::targets::$name::run);
            }
        )*
    };
}

targets!(
    auth,
    estargz,
    layerindex,
    manifest,
    reference,
    server_routes,
    tarindex_build,
    tarindex_decode,
    zran,
    zstd_chunked,
);
