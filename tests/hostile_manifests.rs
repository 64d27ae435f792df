//! Manifests and indexes crafted to attack, against the CLI and the mount:
//! indexes nesting deeper than any image needs, and fanning out to the
//! same child over and over (2^depth paths through a handful of
//! manifests), wrong media types, a manifest of thousands of layers (all
//! on the real distribution registry), and what no registry here stores
//! (over 4 MiB, JSON nested past serde_json's limit), served by a hostile
//! server: every command returns, with an error naming what is at fault.

mod common;

use std::io::{Read, Write};

use common::mount::{within, Mount};
use common::{ggfs, ggfs_fails, CountingProxy, Distribution};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A minimal HTTP/1.0 PUT of `body`: the status.
fn http_put(addr: &str, path: &str, content_type: &str, body: &[u8]) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// PUTs `json` as a manifest of `repo` (by digest, and as `tag` if given);
/// returns its descriptor.
fn put(
    reg: &Distribution,
    repo: &str,
    mt: &str,
    json: &serde_json::Value,
    tag: Option<&str>,
) -> serde_json::Value {
    let body = serde_json::to_vec(json).unwrap();
    let digest = common::sha256_digest(&body);
    for r in std::iter::once(digest.as_str()).chain(tag) {
        let status = http_put(reg.addr(), &format!("/v2/{repo}/manifests/{r}"), mt, &body);
        assert_eq!(status, 201, "PUT {repo}:{r}: {}", reg.log());
    }
    serde_json::json!({"mediaType": mt, "digest": digest, "size": body.len()})
}

/// A one-file image `repo:base` on `reg`; returns its manifest's bytes.
fn base_image(reg: &Distribution, repo: &str) -> Vec<u8> {
    let work = common::tempdir();
    std::fs::write(work.path().join("hello"), b"hello\n").unwrap();
    ggfs(&[
        "append",
        "-f",
        work.path().to_str().unwrap(),
        "-t",
        &reg.reference(&format!("{repo}:base")),
    ]);
    base_manifest(reg, repo)
}

/// The bytes of `repo:base`'s manifest.
fn base_manifest(reg: &Distribution, repo: &str) -> Vec<u8> {
    ggfs(&["manifest", &reg.reference(&format!("{repo}:base"))]).into_bytes()
}

/// An index of `depth` levels above the base image, each listing the level
/// below twice: `depth + 1` manifests, 2^depth paths to the image.
fn doubling_index(reg: &Distribution, repo: &str, depth: usize, tag: &str) -> Vec<String> {
    let body = base_image(reg, repo);
    let mut child = serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": common::sha256_digest(&body),
        "size": body.len(),
        "platform": {"os": "linux", "architecture": "amd64"},
    });
    let mut digests = Vec::new();
    for level in 1..=depth {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [child, child],
        });
        let t = (level == depth).then_some(tag);
        child = put(reg, repo, OCI_INDEX, &index, t);
        digests.push(child["digest"].as_str().unwrap().to_string());
    }
    digests
}

/// Indexes listing the same child over and over: a copy fetches each
/// manifest once (not once per path: 2^10 here) and copies the image
/// whole; past 16 levels of nesting it stops, naming the index and the
/// depth, instead of walking 2^24 paths.
#[test]
fn doubling_indexes_copy_once_and_stop_deep() {
    let src = Distribution::start();
    let dst = Distribution::start();
    let proxy = CountingProxy::start(src.addr());
    doubling_index(&src, "h/dag", 10, "ten");
    let from = format!("{}/h/dag:ten", proxy.addr());
    within(120, "copy", {
        let (from, to) = (from.clone(), dst.reference("h/dag:ten"));
        move || ggfs(&["copy", &from, &to])
    });
    let gets = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/manifests/"))
        .count();
    assert!(gets <= 2 * 11, "{gets} manifest GETs for 11 manifests");
    assert_eq!(
        ggfs(&["digest", &dst.reference("h/dag:ten")]),
        ggfs(&["digest", &src.reference("h/dag:ten")])
    );
    let base = common::sha256_digest(&base_manifest(&src, "h/dag"));
    ggfs(&["validate", &dst.reference(&format!("h/dag@{base}"))]);

    let deep = doubling_index(&src, "h/deep", 24, "deep");
    let err = within(120, "copy", {
        let (from, to) = (src.reference("h/deep:deep"), dst.reference("h/deep:deep"));
        move || ggfs_fails(&["copy", &from, &to])
    });
    assert!(err.contains("16"), "{err}");
    // The 17th index from the top (the 8th above the image) is named.
    assert!(err.contains(&deep[deep.len() - 17][7..19]), "{err}");
    let (code, _) = common::http_get(dst.addr(), "/v2/h/deep/manifests/deep").unwrap();
    assert_eq!(code, 404, "a tag was pushed for a copy that failed");

    // The mount walks nested indexes lazily, a directory per index entry
    // (one manifest fetched per directory entered): every level of the 24
    // answers, the same child listed twice is two directories, and the
    // image at the bottom reads.
    let m = Mount::start(src.addr(), &[]);
    let mut dir = m.path("h/deep/deep");
    for level in (0..24).rev() {
        let d = dir.clone();
        let mut names: Vec<String> = within(60, "readdir", move || {
            std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sha256:") || n.starts_with("linux-"))
                .collect()
        });
        names.sort();
        assert_eq!(names.len(), 2, "level {level}: {names:?}");
        dir = dir.join(&names[0]);
    }
    let hello = within(60, "read", move || std::fs::read(dir.join("rootfs/hello")));
    assert_eq!(hello.unwrap(), b"hello\n");
    assert!(m.pid_alive());
}
