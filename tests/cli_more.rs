//! More of issue 9's CLI against the real registry (CNCF distribution),
//! results read back by skopeo: gcrane's `copy -r`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{sha256_digest, skopeo_raw, Distribution};

/// `ggfs args…`, its output whatever the exit status.
fn ggfs_output(args: &[&str]) -> Output {
    Command::new(common::ggfs_bin())
        .args(args)
        .output()
        .unwrap()
}

/// `ggfs args…` expected to succeed; returns its stderr.
fn ggfs_stderr(args: &[&str]) -> String {
    let out = ggfs_output(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ggfs {args:?} failed: {err}");
    err
}

/// sha256 of the manifest bytes skopeo reads at `docker://image`.
fn skopeo_digest(image: &str) -> String {
    sha256_digest(skopeo_raw(&format!("docker://{image}")).as_bytes())
}

/// A one-file image built by umoci, pushed by skopeo to `at`.
fn push_image(work: &Path, name: &str, content: &str, at: &str) {
    let tree = work.join(format!("{name}-tree"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("file"), content).unwrap();
    let layout = work.join(format!("{name}-layout"));
    common::umoci_image_from(&layout, "t", &tree);
    common::push_oci_layout(&layout, "t", at);
}

/// The repositories distribution's own catalog lists.
fn catalog(reg: &Distribution) -> Vec<String> {
    let (status, body) = common::http_get(reg.addr(), "/v2/_catalog").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut names: Vec<String> = v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn copy_recursive_copies_every_repository_below_the_prefix_once() {
    let src = Distribution::start();
    let dst = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    push_image(w, "a1", "one\n", &src.reference("proj/a:v1"));
    push_image(w, "a2", "two\n", &src.reference("proj/a:v2"));
    common::skopeo_copy(
        &format!("docker://{}", src.reference("proj/a:v1")),
        &format!("docker://{}", src.reference("proj/a:latest")),
    );
    let layout = w.join("index-layout");
    common::index_two_platforms(&layout, "t");
    common::push_oci_layout(&layout, "t", &src.reference("proj/sub/b:t"));
    push_image(w, "c", "outside\n", &src.reference("other/c:x"));
    // A repository whose name only starts like the prefix is not below it.
    push_image(w, "d", "lookalike\n", &src.reference("projx/d:y"));

    let from = src.reference("proj");
    let to = dst.reference("mirror");
    let err = ggfs_stderr(&["copy", "-r", &from, &to, "-j", "3"]);
    assert!(
        err.contains("2 repositories, copied 3 images (4 tags), skipped 0 tags"),
        "{err}"
    );

    assert_eq!(catalog(&dst), ["mirror/a", "mirror/sub/b"]);
    for (s, d) in [
        ("proj/a:v1", "mirror/a:v1"),
        ("proj/a:v2", "mirror/a:v2"),
        ("proj/a:latest", "mirror/a:latest"),
        ("proj/sub/b:t", "mirror/sub/b:t"),
    ] {
        assert_eq!(
            skopeo_digest(&src.reference(s)),
            skopeo_digest(&dst.reference(d)),
            "{s} vs {d}"
        );
    }
    // The index's children came along: skopeo reads each one by digest.
    let index: serde_json::Value = serde_json::from_str(&skopeo_raw(&format!(
        "docker://{}",
        dst.reference("mirror/sub/b:t")
    )))
    .unwrap();
    for child in index["manifests"].as_array().unwrap() {
        let digest = child["digest"].as_str().unwrap();
        let at = format!("{}@{digest}", dst.reference("mirror/sub/b"));
        assert_eq!(skopeo_digest(&at), digest);
    }

    // Again: nothing new to copy.
    let err = ggfs_stderr(&["cp", "-r", &from, &to]);
    assert!(
        err.contains(
            "2 repositories, copied 0 images (0 tags), skipped 4 tags already at the destination"
        ),
        "{err}"
    );
    assert!(!err.contains(" -> "), "{err}");

    // A moved tag is copied again, the others skipped.
    push_image(w, "a3", "three\n", &src.reference("proj/a:v2"));
    let err = ggfs_stderr(&["cp", "-r", &from, &to]);
    assert!(
        err.contains("copied 1 images (1 tags), skipped 3 tags"),
        "{err}"
    );
    assert_eq!(
        skopeo_digest(&src.reference("proj/a:v2")),
        skopeo_digest(&dst.reference("mirror/a:v2"))
    );

    // A whole registry: every repository, the same names.
    let dst2 = Distribution::start();
    let err = ggfs_stderr(&["cp", "-r", src.addr(), dst2.addr()]);
    assert!(
        err.contains("4 repositories, copied 5 images (6 tags)"),
        "{err}"
    );
    assert_eq!(catalog(&dst2), catalog(&src));
    assert_eq!(
        skopeo_digest(&src.reference("other/c:x")),
        skopeo_digest(&dst2.reference("other/c:x"))
    );

    // A prefix with nothing below it: one line naming it.
    let err = common::ggfs_fails(&["cp", "-r", &src.reference("nothing"), &to]);
    assert!(err.contains("nothing"), "{err}");
}
