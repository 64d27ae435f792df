//! ggfs as a library: a crate depending on it with `default-features =
//! false` compiles none of the CLI's crates (clap, indicatif,
//! tracing-subscriber, anyhow) nor the server's (axum); `features =
//! ["server"]` adds axum only. Read from cargo's own resolution of the
//! lockfile (`scripts/test.sh` also checks that build).

use std::process::Command;

const CLI_CRATES: [&str; 4] = ["clap", "indicatif", "tracing-subscriber", "anyhow"];

/// Crate names in ggfs's normal dependency tree for these cargo flags.
fn deps(flags: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "ggfs",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .args(flags)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn library_features_leave_out_the_cli_and_server() {
    let all = deps(&[]);
    for c in CLI_CRATES.iter().chain(&["axum"]) {
        assert!(
            all.iter().any(|d| d == c),
            "{c} missing from the default build"
        );
    }
    let lib = deps(&["--no-default-features"]);
    for c in CLI_CRATES.iter().chain(&["axum"]) {
        assert!(
            !lib.iter().any(|d| d == c),
            "the library alone pulls in {c}"
        );
    }
    let server = deps(&["--no-default-features", "--features", "server"]);
    assert!(server.iter().any(|d| d == "axum"));
    for c in CLI_CRATES {
        assert!(
            !server.iter().any(|d| d == c),
            "the server feature pulls in {c}"
        );
    }
}
