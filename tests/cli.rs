//! The `ggfs` binary against real registries (CNCF distribution and the
//! embedded one) and real third-party tools (skopeo, umoci).

mod common;

use std::process::Command;

use common::tree::assert_same_tree;
use common::{ggfs, ggfs_fails, run, umoci_unpack, untar, Distribution};

fn skopeo_digest(image: &str) -> String {
    common::sha256_digest(common::skopeo_raw(image).as_bytes())
}

/// An image made by umoci and pushed by skopeo: ggfs copies it with identical
/// digests, exports the same files umoci unpacks, and pulls a layout and a
/// tarball that skopeo reads back to the same digest / files.
#[test]
fn umoci_image_pushed_by_skopeo_is_copied_exported_and_pulled() {
    let (a, b) = (Distribution::start(), Distribution::start());
    let work = common::tempdir();
    let layout = work.path().join("layout");
    common::umoci_image(&layout, "t");
    common::push_oci_layout(&layout, "t", &a.reference("src/img:t"));
    let src = a.reference("src/img:t");
    let want = skopeo_digest(&format!("docker://{src}"));
    assert_eq!(ggfs(&["digest", &src]).trim(), want);

    ggfs(&["copy", &src, &b.reference("dst/img:t")]);
    assert_eq!(
        skopeo_digest(&format!("docker://{}", b.reference("dst/img:t"))),
        want
    );
    let manifest = ggfs(&["manifest", &b.reference("dst/img:t")]);
    assert_eq!(
        common::sha256_digest(manifest.as_bytes()),
        want,
        "manifest bytes changed"
    );

    let tar = work.path().join("export.tar");
    ggfs(&["export", &src, tar.to_str().unwrap()]);
    let exported = untar(&tar, &work.path().join("exported"));
    let unpacked = umoci_unpack(&layout, "t", &work.path().join("bundle"));
    assert_same_tree(&exported, &unpacked, true);

    let pulled = work.path().join("pulled");
    ggfs(&["pull", "--format", "oci", &src, pulled.to_str().unwrap()]);
    assert_eq!(skopeo_digest(&format!("oci:{}:t", pulled.display())), want);
    let again = umoci_unpack(&pulled, "t", &work.path().join("bundle2"));
    assert_same_tree(&again, &unpacked, true);

    let saved = work.path().join("saved.tar");
    ggfs(&["pull", &src, saved.to_str().unwrap()]);
    let from_archive = work.path().join("from-archive");
    common::skopeo_copy(
        &format!("docker-archive:{}", saved.display()),
        &format!("oci:{}:t", from_archive.display()),
    );
    let third = umoci_unpack(&from_archive, "t", &work.path().join("bundle3"));
    assert_same_tree(&third, &unpacked, true);
}

/// An image built and pushed by ggfs is pulled by skopeo and unpacked by
/// umoci with the files it was built from.
#[test]
fn image_pushed_by_ggfs_is_pulled_by_skopeo_and_unpacked_by_umoci() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let dst = reg.reference("built/app:v1");
    let rootfs = common::fixture_rootfs();
    ggfs(&["append", "-f", rootfs.to_str().unwrap(), "-t", &dst]);
    let layout = work.path().join("layout");
    common::skopeo_copy(
        &format!("docker://{dst}"),
        &format!("oci:{}:v1", layout.display()),
    );
    let unpacked = umoci_unpack(&layout, "v1", &work.path().join("bundle"));
    assert_same_tree(&unpacked, rootfs, true);
    ggfs(&["validate", &dst]);
}

/// A copy to another repository of the same registry mounts every blob:
/// the registry sees mount requests and no blob bytes.
#[test]
fn copy_within_a_registry_mounts_blobs_instead_of_uploading() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let layout = work.path().join("layout");
    common::umoci_image(&layout, "t");
    common::push_oci_layout(&layout, "t", &reg.reference("a/img:t"));
    let proxy = common::CountingProxy::start(reg.addr());
    let src = format!("{}/a/img:t", proxy.addr());
    let dst = format!("{}/b/img:t", proxy.addr());
    ggfs(&["copy", &src, &dst]);
    let reqs = proxy.requests();
    let mounts = reqs
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("mount="))
        .count();
    let uploads: Vec<_> = reqs
        .iter()
        .filter(|r| r.method == "PATCH" || (r.method == "PUT" && r.path.contains("/blobs/")))
        .collect();
    assert_eq!(mounts, 2, "config and layer mounted: {reqs:?}");
    assert!(uploads.is_empty(), "blob bytes were uploaded: {uploads:?}");
    assert!(
        proxy.bytes_up() < 64 * 1024,
        "{} bytes sent",
        proxy.bytes_up()
    );
    assert_eq!(
        skopeo_digest(&format!("docker://{}", reg.reference("b/img:t"))),
        skopeo_digest(&format!("docker://{}", reg.reference("a/img:t")))
    );
}

/// A whole index is copied with its digest; --platform copies one image.
#[test]
fn copy_index_whole_or_one_platform() {
    let (a, b) = (Distribution::start(), Distribution::start());
    let work = common::tempdir();
    let layout = work.path().join("layout");
    common::index_two_platforms(&layout, "multi");
    common::push_oci_layout(&layout, "multi", &a.reference("idx/img:multi"));
    let src = a.reference("idx/img:multi");
    ggfs(&["copy", &src, &b.reference("idx/all:multi")]);
    assert_eq!(
        ggfs(&["digest", &b.reference("idx/all:multi")]),
        ggfs(&["digest", &src])
    );

    ggfs(&[
        "--platform",
        "linux/arm64",
        "copy",
        &src,
        &b.reference("idx/arm:t"),
    ]);
    let arm = ggfs(&["--platform", "linux/arm64", "digest", &src]);
    assert_ne!(arm, ggfs(&["digest", &src]));
    assert_eq!(ggfs(&["digest", &b.reference("idx/arm:t")]), arm);
    let cfg: serde_json::Value =
        serde_json::from_str(&ggfs(&["config", &b.reference("idx/arm:t")])).unwrap();
    assert_eq!(cfg["architecture"], "arm64");
}

/// The embedded registry: ggfs pushes and copies into it, skopeo reads it,
/// tags list, delete removes.
#[test]
fn embedded_registry_serves_ggfs_and_skopeo() {
    let server = common::GgfsRegistry::start();
    let addr = server.addr.clone();
    let work = common::tempdir();
    let dir = work.path().join("d");
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/hello"), "hello\n").unwrap();
    ggfs(&[
        "append",
        "-f",
        dir.to_str().unwrap(),
        "-t",
        &format!("{addr}/e/app:v1"),
    ]);
    ggfs(&[
        "copy",
        &format!("{addr}/e/app:v1"),
        &format!("{addr}/e/app:v2"),
    ]);
    ggfs(&["tag", &format!("{addr}/e/app:v1"), "v3"]);
    assert_eq!(ggfs(&["ls", &format!("{addr}/e/app")]), "v1\nv2\nv3\n");
    assert_eq!(ggfs(&["catalog", &addr]), "e/app\n");
    let layout = work.path().join("l");
    common::skopeo_copy(
        &format!("docker://{addr}/e/app:v2"),
        &format!("oci:{}:v2", layout.display()),
    );
    let unpacked = umoci_unpack(&layout, "v2", &work.path().join("b"));
    assert_eq!(
        std::fs::read_to_string(unpacked.join("etc/hello")).unwrap(),
        "hello\n"
    );
    ggfs(&["delete", &format!("{addr}/e/app:v3")]);
    assert_eq!(ggfs(&["ls", &format!("{addr}/e/app")]), "v1\nv2\n");
}

/// Bad input: one clear line, non-zero exit, nothing half-written.
#[test]
fn bad_input_gives_one_line_errors_and_writes_nothing() {
    let reg = Distribution::start();
    let work = common::tempdir();
    assert!(ggfs_fails(&["manifest", "UPPER/Case:x"]).contains("repository component"));
    assert!(ggfs_fails(&["manifest", "foo@sha256:abc"]).contains("64 hex digits"));
    assert!(ggfs_fails(&["digest", &reg.reference("no/such:tag")]).contains("not found"));
    assert!(ggfs_fails(&["--platform", "linux", "digest", "x"]).contains("platform"));

    let layout = work.path().join("layout");
    common::umoci_image(&layout, "t");
    common::push_oci_layout(&layout, "t", &reg.reference("c/img:t"));
    let m: serde_json::Value =
        serde_json::from_str(&ggfs(&["manifest", &reg.reference("c/img:t")])).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let data = reg.blob_path(&layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let out = work.path().join("out.tar");
    let err = ggfs_fails(&["export", &reg.reference("c/img:t"), out.to_str().unwrap()]);
    assert!(
        err.contains(&layer) || err.contains("verification") || err.contains("corrupt"),
        "{err}"
    );
    assert!(!out.exists(), "a partial export was left behind");
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let err = ggfs_fails(&[
        "blob",
        &format!(
            "{}@{layer}",
            reg.reference("c/img").trim_end_matches(":latest")
        ),
    ]);
    assert!(err.contains("verification"), "{err}");
    let pulled = work.path().join("pulled");
    ggfs_fails(&[
        "pull",
        "--format",
        "oci",
        &reg.reference("c/img:t"),
        pulled.to_str().unwrap(),
    ]);
    let blob_file = pulled
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    assert!(
        !blob_file.exists(),
        "an unverified blob was written to the layout"
    );
}

/// Basic auth: credentials from `ggfs auth login` (a docker config.json) are
/// used by later commands; wrong ones fail clearly.
#[test]
fn basic_auth_with_login_and_docker_config() {
    let reg = Distribution::start_htpasswd("alice", "s3cret");
    let cfg = common::tempdir();
    let env = |c: &mut Command| {
        c.env("DOCKER_CONFIG", cfg.path());
    };
    let mut cmd = Command::new(common::ggfs_bin());
    env(&mut cmd);
    let out = cmd.args(["catalog", reg.addr()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(reg.addr()));

    let mut cmd = Command::new(common::ggfs_bin());
    env(&mut cmd);
    let out = cmd
        .args(["auth", "login", reg.addr(), "-u", "alice", "-p", "wrong"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "login with a wrong password succeeded"
    );

    // -p works, with a warning that the password shows in the process list;
    // --password-stdin, the way to prefer, warns of nothing.
    let mut cmd = Command::new(common::ggfs_bin());
    env(&mut cmd);
    let out = cmd
        .args(["auth", "login", reg.addr(), "-u", "alice", "-p", "s3cret"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("process list") && err.contains("--password-stdin"),
        "{err}"
    );
    let config = std::fs::read_to_string(cfg.path().join("config.json")).unwrap();
    assert!(config.contains(reg.addr()));
    let mut cmd = Command::new(common::ggfs_bin());
    env(&mut cmd);
    let mut child = cmd
        .args([
            "auth",
            "login",
            reg.addr(),
            "-u",
            "alice",
            "--password-stdin",
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");

    let dir = common::tempdir();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    let mut cmd = Command::new(common::ggfs_bin());
    env(&mut cmd);
    run(cmd.args([
        "append",
        "-f",
        dir.path().to_str().unwrap(),
        "-t",
        &reg.reference("p/img:t"),
    ]));
    let mut cmd = Command::new(common::ggfs_bin());
    env(&mut cmd);
    assert_eq!(
        run(cmd.args(["ls", &format!("{}/p/img", reg.addr())])),
        "t\n"
    );
}

/// `attach` pushes an artifact with a subject; `refs` finds it through the
/// referrers API (embedded registry) and through the `sha256-<hex>` tag
/// fallback (distribution 2.8 has no API), filtered by artifact type.
#[test]
fn attach_and_refs_on_both_registries() {
    let dist = Distribution::start();
    let server = common::GgfsRegistry::start();
    let embedded = server.addr.clone();
    let work = common::tempdir();
    std::fs::write(work.path().join("f"), "content\n").unwrap();
    std::fs::write(work.path().join("sbom.json"), "{\"sbom\":true}\n").unwrap();
    for reg in [dist.addr(), embedded.as_str()] {
        let image = format!("{reg}/r/img:v1");
        ggfs(&[
            "append",
            "-f",
            work.path().join("f").to_str().unwrap(),
            "-t",
            &image,
        ]);
        assert_eq!(
            ggfs(&["refs", &image]),
            "",
            "{reg}: referrers before attaching"
        );
        let sbom = ggfs(&[
            "attach",
            &image,
            "--artifact-type",
            "application/vnd.example.sbom",
            "-f",
            work.path().join("sbom.json").to_str().unwrap(),
        ]);
        let sig = ggfs(&[
            "attach",
            &image,
            "--artifact-type",
            "application/vnd.example.sig",
        ]);
        let digest_of = |out: &str| out.trim().rsplit_once('@').unwrap().1.to_string();
        let all = ggfs(&["refs", &image]);
        assert!(
            all.contains(&format!(
                "{} application/vnd.example.sbom",
                digest_of(&sbom)
            )),
            "{reg}: {all}"
        );
        assert!(
            all.contains(&format!("{} application/vnd.example.sig", digest_of(&sig))),
            "{reg}: {all}"
        );
        let only = ggfs(&[
            "refs",
            &image,
            "--artifact-type",
            "application/vnd.example.sig",
        ]);
        assert_eq!(
            only.trim(),
            format!("{} application/vnd.example.sig", digest_of(&sig)),
            "{reg}"
        );
        let artifact: serde_json::Value = serde_json::from_str(&ggfs(&[
            "manifest",
            &format!("{reg}/r/img@{}", digest_of(&sbom)),
        ]))
        .unwrap();
        assert_eq!(
            artifact["subject"]["digest"],
            ggfs(&["digest", &image]).trim()
        );
    }
}

/// `mutate` edits the config and moves the tag; the old image stays
/// reachable by digest with its old config.
#[test]
fn mutate_changes_config_and_keeps_the_old_image() {
    let reg = Distribution::start();
    let work = common::tempdir();
    std::fs::write(work.path().join("f"), "x").unwrap();
    let image = reg.reference("m/img:v1");
    ggfs(&[
        "append",
        "-f",
        work.path().join("f").to_str().unwrap(),
        "-t",
        &image,
    ]);
    let old = ggfs(&["digest", &image]);
    ggfs(&[
        "mutate",
        &image,
        "-l",
        "org.example=yes",
        "-e",
        "GREETING=hi",
        "--entrypoint",
        "/bin/sh,-c",
    ]);
    let new = ggfs(&["digest", &image]);
    assert_ne!(old, new);
    let cfg: serde_json::Value = serde_json::from_str(&ggfs(&["config", &image])).unwrap();
    assert_eq!(cfg["config"]["Labels"]["org.example"], "yes");
    assert!(cfg["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "GREETING=hi"));
    assert_eq!(
        cfg["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"])
    );
    let old_ref = format!("{}/m/img@{}", reg.addr(), old.trim());
    let old_cfg: serde_json::Value = serde_json::from_str(&ggfs(&["config", &old_ref])).unwrap();
    assert!(old_cfg["config"]["Labels"].is_null());
    ggfs(&["validate", &image]);
    assert!(ggfs_fails(&["mutate", &image, "-l", "novalue"]).contains("KEY=VALUE"));
}

/// What a newcomer meets first: usage errors name what is missing, typos
/// get a suggestion, bare `ggfs` lists the commands, and `mount` speaks as
/// `ggfs mount`, not as the daemon binary behind it.
#[test]
fn usage_errors_name_what_is_wrong_and_where_help_is() {
    let e = ggfs_fails(&["copy"]);
    assert!(
        e.contains("<SRC> <DST>") && e.contains("ggfs copy --help"),
        "{e}"
    );
    let e = ggfs_fails(&["mout"]);
    assert!(e.contains("'mount'"), "{e}");
    let e = ggfs_fails(&["mount"]);
    assert!(
        e.contains("<REGISTRY> <MOUNTPOINT>") && e.contains("ggfs mount --help"),
        "{e}"
    );
    assert!(!e.contains("mountd"), "{e}");
    let e = ggfs_fails(&["ls", "127.0.0.1:5000"]);
    assert!(e.contains("ggfs catalog"), "{e}");
    // A refused connection is retried, and the error says so.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = ggfs_fails(&["manifest", &format!("127.0.0.1:{port}/x:y")]);
    assert!(e.contains("tried 5 times"), "{e}");
    let out = Command::new(common::ggfs_bin()).output().unwrap();
    let help = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for verb in ["copy", "mount", "commit", "flatten"] {
        assert!(
            help.contains(verb),
            "bare ggfs does not list {verb}: {help}"
        );
    }
    let help = ggfs(&["help", "mount"]);
    assert!(
        help.contains("--fetch-after") && help.contains("Usage: ggfs mount"),
        "{help}"
    );
}
