//! crane and gcrane verbs against a real registry (CNCF distribution),
//! their results read back by skopeo and umoci (or, for tokens, used
//! against the registry with curl): `index list|filter|append`, `auth token`,
//! `mutate`'s layer, port, platform and output flags, `edit`, gcrane's
//! `ls -r [--json]`, `gc [-r]`.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;

use common::{ggfs, ggfs_fails, sha256_digest, skopeo_raw, umoci_unpack, Distribution};
use serde_json::Value;

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// The index or manifest at `image` as skopeo reads it: parsed, and the
/// digest of its bytes.
fn skopeo_manifest(image: &str) -> (Value, String) {
    let raw = skopeo_raw(&format!("docker://{image}"));
    (json(&raw), sha256_digest(raw.as_bytes()))
}

/// `docker://image` copied by skopeo into a fresh layout under `work` and
/// unpacked by umoci; returns the rootfs.
fn skopeo_unpack(image: &str, work: &Path, name: &str) -> PathBuf {
    let layout = work.join(format!("{name}-layout"));
    common::skopeo_copy(
        &format!("docker://{image}"),
        &format!("oci:{}:t", layout.display()),
    );
    umoci_unpack(&layout, "t", &work.join(format!("{name}-bundle")))
}

/// `repo@digest` printed by a verb: the digest, checked to be in `repo`.
fn printed_digest(out: &str, repo: &str) -> String {
    let line = out.trim();
    let digest = line
        .strip_prefix(&format!("{repo}@"))
        .unwrap_or_else(|| panic!("{line:?} is not {repo}@DIGEST"));
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{line}"
    );
    digest.to_string()
}

fn digests(index: &Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect()
}

/// An index of linux/amd64 and linux/arm64 pushed by skopeo to `repo:t`.
fn two_platform_index(reg: &Distribution, work: &Path, repo: &str) -> String {
    let layout = work.join(format!("{}-layout", repo.replace('/', "-")));
    common::index_two_platforms(&layout, "t");
    let at = reg.reference(&format!("{repo}:t"));
    common::push_oci_layout(&layout, "t", &at);
    at
}

/// Each child of `index` (pushed in `repo`) unpacks by umoci to a tree
/// whose `arch` file names its platform's architecture.
fn assert_children_unpack(reg: &Distribution, repo: &str, index: &Value, work: &Path) {
    for (i, d) in index["manifests"].as_array().unwrap().iter().enumerate() {
        let child = format!("{}@{}", reg.reference(repo), d["digest"].as_str().unwrap());
        let arch = d["platform"]["architecture"].as_str().unwrap();
        let port = reg.addr().rsplit(':').next().unwrap();
        let name = format!("{port}-{}-{i}", repo.replace('/', "-"));
        let rootfs = skopeo_unpack(&child, work, &name);
        assert_eq!(
            std::fs::read_to_string(rootfs.join("arch")).unwrap(),
            format!("{arch}\n")
        );
    }
}

/// crane index list: one `DIGEST PLATFORM` line per child, as skopeo sees
/// the index; an image is refused naming it.
#[test]
fn index_list_prints_each_child_and_its_platform() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let src = two_platform_index(&reg, work.path(), "idx/multi");
    let (index, _) = skopeo_manifest(&src);
    let want: Vec<String> = digests(&index)
        .into_iter()
        .zip(["linux/amd64", "linux/arm64"])
        .map(|(d, p)| format!("{d} {p}"))
        .collect();
    let out = ggfs(&["index", "list", &src]);
    assert_eq!(out.lines().collect::<Vec<_>>(), want);

    let child = format!("{}@{}", reg.reference("idx/multi"), digests(&index)[0]);
    let err = ggfs_fails(&["index", "list", &child]);
    assert!(
        err.contains(&child) && err.contains("not an index"),
        "{err}"
    );
}

/// crane index filter: keeps the children of the platforms given (os alone
/// keeps every arch), pushes elsewhere with -t or in place without; the
/// kept images are copied to a new repository whole.
#[test]
fn index_filter_keeps_the_platforms_given() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let src = two_platform_index(&reg, w, "idx/multi");
    let (index, _) = skopeo_manifest(&src);
    let arm_digest = digests(&index)[1].clone();

    let dst = reg.reference("filtered/multi:arm");
    let out = ggfs(&[
        "index",
        "filter",
        &src,
        "--platform",
        "linux/arm64",
        "-t",
        &dst,
    ]);
    let digest = printed_digest(&out, &reg.reference("filtered/multi"));
    let (filtered, skopeo_digest) = skopeo_manifest(&dst);
    assert_eq!(skopeo_digest, digest);
    assert_eq!(digests(&filtered), [arm_digest]);
    assert_eq!(filtered["manifests"][0], index["manifests"][1]);
    assert_eq!(filtered["mediaType"], index["mediaType"]);
    assert_children_unpack(&reg, "filtered/multi", &filtered, w);

    // Several platforms, comma-separated or repeated; `linux` keeps both.
    let both = reg.reference("filtered/multi:both");
    ggfs(&[
        "index",
        "filter",
        &src,
        "--platform",
        "linux/arm64,linux/amd64",
        "-t",
        &both,
    ]);
    assert_eq!(skopeo_manifest(&both).1, skopeo_manifest(&src).1);
    let os_only = reg.reference("filtered/multi:linux");
    ggfs(&[
        "index",
        "filter",
        &src,
        "--platform",
        "linux",
        "-t",
        &os_only,
    ]);
    assert_eq!(digests(&skopeo_manifest(&os_only).0).len(), 2);

    // In place: the tag moves to the filtered index.
    let out = ggfs(&["index", "filter", &src, "--platform", "linux/amd64"]);
    let digest = printed_digest(&out, &reg.reference("idx/multi"));
    let (now, d) = skopeo_manifest(&src);
    assert_eq!(d, digest);
    assert_eq!(digests(&now), [digests(&index)[0].clone()]);

    let err = ggfs_fails(&["index", "filter", &src]);
    assert!(err.contains("--platform"), "{err}");
    let err = ggfs_fails(&["index", "filter", &src, "--platform", "linux//x"]);
    assert!(err.contains("linux//x"), "{err}");
    let err = ggfs_fails(&[
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        "digest",
        &src,
    ]);
    assert!(err.contains("--platform given 2 times"), "{err}");
}

/// crane index append: an index from scratch out of images (platforms read
/// from their configs) pulled from other repositories; an index appended
/// is flattened into its children unless --flatten=false; a base index
/// keeps its children first; --docker-empty-base makes a manifest list.
#[test]
fn index_append_builds_indexes_from_images_and_indexes() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let src = two_platform_index(&reg, w, "idx/multi");
    let (index, _) = skopeo_manifest(&src);
    let (amd, arm) = (digests(&index)[0].clone(), digests(&index)[1].clone());
    let amd_ref = format!("{}@{amd}", reg.reference("idx/multi"));
    let arm_ref = format!("{}@{arm}", reg.reference("idx/multi"));

    // From scratch, images from another repository.
    let built = reg.reference("built/idx:t");
    let out = ggfs(&[
        "index", "append", "-m", &arm_ref, "-m", &amd_ref, "-t", &built,
    ]);
    let digest = printed_digest(&out, &reg.reference("built/idx"));
    let (new, d) = skopeo_manifest(&built);
    assert_eq!(d, digest);
    assert_eq!(new["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(digests(&new), [arm.clone(), amd.clone()]);
    for (desc, arch) in new["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["arm64", "amd64"])
    {
        assert_eq!(desc["platform"]["architecture"], arch);
        assert_eq!(desc["platform"]["os"], "linux");
        assert_eq!(
            desc["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
    assert_children_unpack(&reg, "built/idx", &new, w);
    let listed = ggfs(&["index", "list", &built]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [format!("{arm} linux/arm64"), format!("{amd} linux/amd64")]
    );

    // A base plus an index: flattened by default, itself with --flatten=false.
    let out = ggfs(&[
        "index",
        "append",
        &built,
        "-m",
        &src,
        "-t",
        &reg.reference("built/idx:flat"),
    ]);
    printed_digest(&out, &reg.reference("built/idx"));
    let (flat, _) = skopeo_manifest(&reg.reference("built/idx:flat"));
    assert_eq!(
        digests(&flat),
        [arm.clone(), amd.clone(), amd.clone(), arm.clone()]
    );
    let nested = reg.reference("built/idx:nested");
    ggfs(&[
        "index",
        "append",
        &built,
        "-m",
        &src,
        "--flatten=false",
        "-t",
        &nested,
    ]);
    let (n, _) = skopeo_manifest(&nested);
    assert_eq!(
        digests(&n),
        [arm.clone(), amd.clone(), skopeo_manifest(&src).1]
    );
    assert_eq!(n["manifests"][2]["mediaType"], index["mediaType"]);
    assert!(n["manifests"][2].get("platform").is_none());
    // In place on the base's tag.
    let out = ggfs(&["index", "append", &built, "-m", &amd_ref]);
    let digest = printed_digest(&out, &reg.reference("built/idx"));
    assert_eq!(skopeo_manifest(&built).1, digest);
    assert_eq!(digests(&skopeo_manifest(&built).0).len(), 3);

    // From another registry: the children and their blobs are copied over.
    let far = Distribution::start();
    let far_idx = far.reference("far/idx:t");
    ggfs(&["index", "append", "-m", &arm_ref, "-t", &far_idx]);
    let (far_index, _) = skopeo_manifest(&far_idx);
    assert_eq!(digests(&far_index), std::slice::from_ref(&arm));
    assert_children_unpack(&far, "far/idx", &far_index, w);

    let docker = reg.reference("built/docker:t");
    ggfs(&[
        "index",
        "append",
        "--docker-empty-base",
        "-m",
        &amd_ref,
        "-t",
        &docker,
    ]);
    let (list, _) = skopeo_manifest(&docker);
    assert_eq!(
        list["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(digests(&list), [amd]);

    let err = ggfs_fails(&["index", "append", "-m", &amd_ref]);
    assert!(err.contains("-t"), "{err}");
    let err = ggfs_fails(&["index", "append", &amd_ref, "-m", &arm_ref]);
    assert!(
        err.contains(&amd_ref) && err.contains("not an index"),
        "{err}"
    );
    let missing = reg.reference("nothing/here:t");
    let err = ggfs_fails(&["index", "append", "-m", &missing, "-t", &built]);
    assert!(err.contains("nothing/here"), "{err}");
}

/// `ggfs args…` with `DOCKER_CONFIG=docker`: stdout, or (failing) stderr.
fn ggfs_with_config(docker: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(common::ggfs_bin())
        .env("DOCKER_CONFIG", docker)
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match out.status.success() {
        true => Ok(text(&out.stdout)),
        false => Err(text(&out.stderr)),
    }
}

/// The `access` claim of a JWT, read without checking its signature (the
/// registry checks it when the token is used).
fn token_access(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    json(std::str::from_utf8(&bytes).unwrap())["access"].clone()
}

/// curl's HTTP status for `method url` with `header`.
fn curl_status(method: &str, url: &str, header: &str) -> String {
    common::run(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        method,
        "-H",
        header,
        url,
    ]))
}

/// crane auth token: the token server's token for the repository's pull
/// (or pull and push) scope, issued to the keychain's user, which the
/// registry accepts for exactly that; `-H` prints it as a header.
#[test]
fn auth_token_prints_a_token_the_registry_accepts() {
    let ts = common::TokenServer::start("alice", "secret");
    let reg = Distribution::start_token(&ts);
    let docker = common::tempdir();
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:secret");
    std::fs::write(
        docker.path().join("config.json"),
        serde_json::json!({ "auths": { reg.addr(): { "auth": auth } } }).to_string(),
    )
    .unwrap();
    let d = docker.path();
    let work = common::tempdir();
    std::fs::write(work.path().join("f"), "x\n").unwrap();
    let app = reg.reference("team/app");
    let dir = work.path().to_str().unwrap();
    ggfs_with_config(d, &["append", "-f", dir, "-t", &format!("{app}:v1")]).unwrap();

    ts.reset();
    let out = json(&ggfs_with_config(d, &["auth", "token", &app]).unwrap());
    assert_eq!(out["expires_in"], 300);
    assert_eq!(out["refresh_token"], "");
    let token = out["token"].as_str().unwrap();
    assert_eq!(
        token_access(token),
        serde_json::json!([{"type": "repository", "name": "team/app", "actions": ["pull"]}])
    );
    let reqs = ts.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].user.as_deref(), Some("alice"));
    let bearer = format!("Authorization: Bearer {token}");
    let tags = format!("{}/v2/team/app/tags/list", reg.url());
    assert_eq!(curl_status("GET", &tags, &bearer), "200");
    let uploads = format!("{}/v2/team/app/blobs/uploads/", reg.url());
    assert_eq!(curl_status("POST", &uploads, &bearer), "401");

    // --push and --mount; -H prints the header, no newline.
    let header = ggfs_with_config(
        d,
        &[
            "auth",
            "token",
            "-H",
            "--push",
            "-m",
            &reg.reference("team/base"),
            &app,
        ],
    )
    .unwrap();
    let token = header.strip_prefix("Authorization: Bearer ").unwrap();
    assert!(!token.contains(char::is_whitespace), "{header:?}");
    assert_eq!(
        token_access(token),
        serde_json::json!([
            {"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
            {"type": "repository", "name": "team/base", "actions": ["pull"]},
        ])
    );
    assert_eq!(curl_status("POST", &uploads, &header), "202");

    // No credentials: the token server's refusal; a registry without
    // token auth; a mount from another registry.
    let none = common::tempdir();
    let err = ggfs_with_config(none.path(), &["auth", "token", &app]).unwrap_err();
    assert!(err.contains("401") && err.contains("token"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let open = Distribution::start();
    let err = ggfs_fails(&["auth", "token", &open.reference("team/app")]);
    assert!(err.contains("issues no tokens"), "{err}");
    let err = ggfs_fails(&["auth", "token", "-m", "other.example/x", &app]);
    assert!(err.contains("other.example/x"), "{err}");
}

/// Write `files` (path → content) under a fresh directory `parent/name`.
fn tree(parent: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = parent.join(name);
    for (path, data) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
    root
}

/// The config of `image` (a skopeo transport reference) as skopeo reads it.
fn skopeo_config(image: &str) -> Value {
    json(&common::run(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        image,
    ])))
}

/// crane mutate's other flags: --append (a directory and a tar, as layers
/// umoci unpacks on top of the base), --exposed-ports, --set-platform;
/// -o writes a tarball skopeo reads or an OCI layout umoci unpacks instead
/// of pushing; --repo pushes by digest to another repository.
#[test]
fn mutate_appends_layers_sets_ports_and_platform_and_writes_elsewhere() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("base-layout");
    common::umoci_image(&layout, "t");
    let base = reg.reference("m/img:v1");
    common::push_oci_layout(&layout, "t", &base);
    let (base_manifest, base_digest) = skopeo_manifest(&base);

    let dir = tree(w, "dir", &[("added/from-dir", "dir\n")]);
    let tar_tree = tree(w, "tartree", &[("added/from-tar", "tar\n")]);
    let tar = w.join("layer.tar");
    common::run(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&tar_tree)
            .arg("added"),
    );
    let v2 = reg.reference("m/img:v2");
    let out = ggfs(&[
        "mutate",
        &base,
        "--append",
        dir.to_str().unwrap(),
        "--append",
        tar.to_str().unwrap(),
        "--exposed-ports",
        "8080,53/udp",
        "--set-platform",
        "linux/arm64/v8",
        "-l",
        "k=v",
        "-t",
        &v2,
    ]);
    let digest = printed_digest(&out, &reg.reference("m/img"));
    let (manifest, d) = skopeo_manifest(&v2);
    assert_eq!(d, digest);
    let layers = manifest["layers"].as_array().unwrap();
    let base_layers = base_manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), base_layers.len() + 2);
    assert_eq!(layers[..base_layers.len()], base_layers[..]);
    for l in &layers[base_layers.len()..] {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }
    let cfg = skopeo_config(&format!("docker://{v2}"));
    assert_eq!(
        cfg["config"]["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}, "53/udp": {}})
    );
    assert_eq!(
        (&cfg["os"], &cfg["architecture"], &cfg["variant"]),
        (
            &Value::from("linux"),
            &Value::from("arm64"),
            &Value::from("v8")
        )
    );
    assert_eq!(cfg["config"]["Labels"]["k"], "v");
    assert_eq!(
        cfg["rootfs"]["diff_ids"].as_array().unwrap().len(),
        layers.len()
    );
    let rootfs = skopeo_unpack(&v2, w, "v2");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("added/from-dir")).unwrap(),
        "dir\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("added/from-tar")).unwrap(),
        "tar\n"
    );
    let want = umoci_unpack(&layout, "t", &w.join("base-bundle"));
    assert_eq!(
        std::fs::read(rootfs.join("etc/os-release")).unwrap(),
        std::fs::read(want.join("etc/os-release")).unwrap()
    );
    ggfs(&["validate", &v2]);
    // The base is untouched.
    assert_eq!(skopeo_manifest(&base).1, base_digest);

    // -o: an OCI layout umoci unpacks, a tarball skopeo reads; nothing pushed.
    let tags_before = ggfs(&["ls", &reg.reference("m/img")]);
    let out_layout = w.join("out-layout");
    let out = ggfs(&[
        "mutate",
        &base,
        "--append",
        dir.to_str().unwrap(),
        "-o",
        &format!("oci:{}:mutated", out_layout.display()),
    ]);
    assert!(out.trim().starts_with("sha256:"), "{out}");
    let unpacked = umoci_unpack(&out_layout, "mutated", &w.join("out-bundle"));
    assert_eq!(
        std::fs::read_to_string(unpacked.join("added/from-dir")).unwrap(),
        "dir\n"
    );
    let tarball = w.join("out.tar");
    let out = ggfs(&[
        "mutate",
        &base,
        "-e",
        "A=1",
        "-t",
        &reg.reference("m/img:saved"),
        "-o",
        tarball.to_str().unwrap(),
    ]);
    assert!(out.trim().starts_with("sha256:"), "{out}");
    let archive = format!("docker-archive:{}", tarball.display());
    let saved = skopeo_config(&archive);
    assert!(saved["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "A=1"));
    assert_eq!(ggfs(&["ls", &reg.reference("m/img")]), tags_before);

    // --repo: by digest into another repository, no tag.
    let out = ggfs(&[
        "mutate",
        &base,
        "-l",
        "r=1",
        "--repo",
        &reg.reference("other/img"),
    ]);
    let digest = printed_digest(&out, &reg.reference("other/img"));
    let by_digest = format!("{}@{digest}", reg.reference("other/img"));
    assert_eq!(skopeo_manifest(&by_digest).1, digest);
    assert_eq!(
        skopeo_config(&format!("docker://{by_digest}"))["config"]["Labels"]["r"],
        "1"
    );

    let err = ggfs_fails(&["mutate", &base, "--repo", "x/y", "-t", &v2]);
    assert!(err.contains("--repo") && err.contains("--tag"), "{err}");
    let err = ggfs_fails(&["mutate", &base, "--exposed-ports", "http"]);
    assert!(err.contains("\"http\""), "{err}");
    let err = ggfs_fails(&["mutate", &base, "--set-platform", "linux"]);
    assert!(err.contains("linux"), "{err}");
    let missing = w.join("no-such-dir");
    let err = ggfs_fails(&["mutate", &base, "--append", missing.to_str().unwrap()]);
    assert!(err.contains("no-such-dir"), "{err}");
}

/// `ggfs args…` with `input` on stdin: stdout, or (failing) stderr.
fn ggfs_stdin(args: &[&str], input: &[u8]) -> Result<String, String> {
    let mut child = Command::new(common::ggfs_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match out.status.success() {
        true => Ok(text(&out.stdout)),
        false => Err(text(&out.stderr)),
    }
}

/// `ggfs args…` on a terminal (util-linux `script` gives it one), with
/// `EDITOR=editor`: the last word it wrote (stderr's progress comes first).
fn ggfs_on_a_terminal(args: &[&str], editor: &Path) -> String {
    let mut line = common::ggfs_bin().display().to_string();
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    let out = common::run(
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("EDITOR", editor)
            .env_remove("VISUAL")
            .stdin(Stdio::null()),
    );
    out.split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// `ggfs edit config|manifest`: the new document from stdin is pushed byte
/// for byte (skopeo reads back those bytes) once it checks out; on a
/// terminal $EDITOR edits it; what does not check out (not JSON, a changed
/// rootfs, a blob the repository lacks) is refused and nothing is pushed.
#[test]
fn edit_config_and_manifest_from_stdin_or_an_editor() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("layout");
    common::umoci_image(&layout, "t");
    let v1 = reg.reference("e/img:v1");
    common::push_oci_layout(&layout, "t", &v1);
    let repo = reg.reference("e/img");

    // Config from stdin, to another tag.
    let mut cfg = json(&ggfs(&["config", &v1]));
    cfg["config"]["Labels"] = serde_json::json!({"edited": "yes"});
    let new_cfg = serde_json::to_vec_pretty(&cfg).unwrap();
    let v2 = reg.reference("e/img:v2");
    let out = ggfs_stdin(&["edit", "config", &v1, "-t", &v2], &new_cfg).unwrap();
    let digest = printed_digest(&out, &repo);
    assert_eq!(skopeo_manifest(&v2).1, digest);
    let raw_cfg = common::run(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{v2}"),
    ]));
    assert_eq!(raw_cfg.as_bytes(), &new_cfg[..]);
    assert_eq!(
        skopeo_manifest(&v2).0["layers"],
        skopeo_manifest(&v1).0["layers"]
    );
    let rootfs = skopeo_unpack(&v2, w, "v2");
    let want = umoci_unpack(&layout, "t", &w.join("want"));
    assert_eq!(
        std::fs::read(rootfs.join("etc/os-release")).unwrap(),
        std::fs::read(want.join("etc/os-release")).unwrap()
    );

    // Config in $EDITOR on a terminal: edited in place, the tag moves.
    let editor = w.join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/\"edited\": \"yes\"/\"edited\": \"in-editor\"/' \"$1\"\n",
    )
    .unwrap();
    common::run(Command::new("chmod").arg("755").arg(&editor));
    let out = ggfs_on_a_terminal(&["edit", "config", &v2], &editor);
    let digest = printed_digest(&out, &repo);
    assert_eq!(skopeo_manifest(&v2).1, digest);
    assert_eq!(
        skopeo_config(&format!("docker://{v2}"))["config"]["Labels"]["edited"],
        "in-editor"
    );
    // An editor that changes nothing pushes the same image.
    let before = skopeo_manifest(&v2).1;
    let out = ggfs_on_a_terminal(&["edit", "config", &v2], Path::new("/bin/true"));
    assert_eq!(printed_digest(&out, &repo), before);

    // Manifest from stdin: pushed as sent.
    let mut m = skopeo_manifest(&v1).0;
    m["annotations"] = serde_json::json!({"org.example.edited": "1"});
    let new_manifest = serde_json::to_vec(&m).unwrap();
    let v3 = reg.reference("e/img:v3");
    let out = ggfs_stdin(&["edit", "manifest", &v1, "-t", &v3], &new_manifest).unwrap();
    let digest = printed_digest(&out, &repo);
    assert_eq!(digest, sha256_digest(&new_manifest));
    assert_eq!(
        skopeo_raw(&format!("docker://{v3}")).as_bytes(),
        &new_manifest[..]
    );

    // Refused, nothing pushed.
    let tags = ggfs(&["ls", &repo]);
    let one_line = |e: String| {
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        e
    };
    let mut missing = m.clone();
    let absent = sha256_digest(b"no such layer");
    missing["layers"][0]["digest"] = Value::from(absent.clone());
    let v4 = reg.reference("e/img:v4");
    let body = serde_json::to_vec(&missing).unwrap();
    let err = one_line(ggfs_stdin(&["edit", "manifest", &v1, "-t", &v4], &body).unwrap_err());
    assert!(err.contains(&absent) && err.contains("e/img"), "{err}");
    let elsewhere = reg.reference("empty/img:t");
    let err = one_line(
        ggfs_stdin(&["edit", "manifest", &v1, "-t", &elsewhere], &new_manifest).unwrap_err(),
    );
    assert!(err.contains("config") && err.contains("empty/img"), "{err}");
    let err = one_line(ggfs_stdin(&["edit", "manifest", &v1, "-t", &v4], b"{\"x\": ").unwrap_err());
    assert!(err.contains("not JSON"), "{err}");
    let err = one_line(ggfs_stdin(&["edit", "manifest", &v1, "-t", &v4], b"{}").unwrap_err());
    assert!(err.contains("new manifest"), "{err}");
    let mut bad_cfg = cfg.clone();
    bad_cfg["rootfs"]["diff_ids"] = serde_json::json!([]);
    let body = serde_json::to_vec(&bad_cfg).unwrap();
    let err = one_line(ggfs_stdin(&["edit", "config", &v1, "-t", &v4], &body).unwrap_err());
    assert!(err.contains("rootfs"), "{err}");
    assert_eq!(ggfs(&["ls", &repo]), tags);
}

/// gcrane ls -r: every repository at or below a prefix (from the catalog),
/// each manifest as repo@digest (the digest skopeo computes) followed by
/// its tags; --json gives one line per repository, with `child` under -r.
#[test]
fn ls_recursive_lists_repositories_below_a_prefix_with_digests() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("layout");
    common::umoci_image(&layout, "t");
    let a = reg.reference("ns/a");
    common::push_oci_layout(&layout, "t", &format!("{a}:v1"));
    ggfs(&["tag", &format!("{a}:v1"), "latest"]);
    let sub = reg.reference("ns/a/sub");
    two_platform_index(&reg, w, "ns/a/sub");
    common::push_oci_layout(&layout, "t", &reg.reference("other/x:t"));
    let d_a = skopeo_manifest(&format!("{a}:v1")).1;
    let d_sub = skopeo_manifest(&format!("{sub}:t")).1;

    let out = ggfs(&["ls", "-r", &reg.reference("ns")]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("{a}@{d_a}"),
            format!("{a}:latest"),
            format!("{a}:v1"),
            format!("{sub}@{d_sub}"),
            format!("{sub}:t"),
        ]
    );

    let lines: Vec<Value> = ggfs(&["ls", "-r", "--json", &reg.reference("ns")])
        .lines()
        .map(json)
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({
                "name": "ns/a",
                "tags": ["latest", "v1"],
                "manifest": { &d_a: {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "tag": ["latest", "v1"],
                }},
                "child": ["sub"],
            }),
            serde_json::json!({
                "name": "ns/a/sub",
                "tags": ["t"],
                "manifest": { &d_sub: {
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "tag": ["t"],
                }},
                "child": [],
            }),
        ]
    );
    // A registry alone: every repository; no -r: one repository, no child.
    let everything = ggfs(&["ls", "-r", reg.addr()]);
    assert!(
        everything.contains(&reg.reference("other/x:t")),
        "{everything}"
    );
    assert_eq!(everything.lines().filter(|l| l.contains('@')).count(), 3);
    let one = json(&ggfs(&["ls", "--json", &a]));
    assert_eq!(one["tags"], serde_json::json!(["latest", "v1"]));
    assert!(one.get("child").is_none(), "{one}");

    let err = ggfs_fails(&["ls", "-r", &reg.reference("nothing")]);
    assert!(err.contains("nothing"), "{err}");
}

/// gcrane gc: the manifests no tag reaches (a tag moved off one, an image
/// pushed by digest), not a tagged index's children; -r covers the
/// repositories below; what it prints skopeo finds, until it is deleted.
/// distribution, which lists only tags, is refused in one line.
#[test]
fn gc_lists_the_manifests_no_tag_reaches() {
    let srv = common::GgfsRegistry::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("layout");
    common::umoci_image(&layout, "t");
    let img = srv.reference("g/img");
    common::push_oci_layout(&layout, "t", &format!("{img}:v1"));
    let old = skopeo_manifest(&format!("{img}:v1")).1;
    // The tag moves: the old image is left untagged.
    ggfs(&["mutate", &format!("{img}:v1"), "-l", "new=1"]);
    assert_ne!(skopeo_manifest(&format!("{img}:v1")).1, old);
    // A tagged index: its children have no tag, but are reachable.
    let idx_layout = w.join("idx-layout");
    common::index_two_platforms(&idx_layout, "multi");
    common::push_oci_layout(&idx_layout, "multi", &format!("{img}:multi"));
    // An image pushed by digest into a repository below.
    let out = ggfs(&[
        "mutate",
        &format!("{img}:v1"),
        "-l",
        "sub=1",
        "--repo",
        &srv.reference("g/img/sub"),
    ]);
    let sub = printed_digest(&out, &srv.reference("g/img/sub"));
    ggfs(&[
        "tag",
        &format!("{}@{sub}", srv.reference("g/img/sub")),
        "other",
    ]);
    let untagged_sub = printed_digest(
        &ggfs(&[
            "mutate",
            &format!("{img}:v1"),
            "-l",
            "sub=2",
            "--repo",
            &srv.reference("g/img/sub"),
        ]),
        &srv.reference("g/img/sub"),
    );

    let out = ggfs(&["gc", &img]);
    assert_eq!(out.lines().collect::<Vec<_>>(), [format!("{img}@{old}")]);
    let out = ggfs(&["gc", "-r", &srv.reference("g")]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("{img}@{old}"),
            format!("{}@{untagged_sub}", srv.reference("g/img/sub"))
        ]
    );
    skopeo_manifest(&format!("{img}@{old}"));
    ggfs(&["delete", &format!("{img}@{old}")]);
    assert_eq!(ggfs(&["gc", &img]), "");
    let gone = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{img}@{old}"))
        .output()
        .unwrap();
    assert!(!gone.status.success(), "skopeo still finds {old}");

    let reg = Distribution::start();
    common::push_oci_layout(&layout, "t", &reg.reference("g/img:v1"));
    let err = ggfs_fails(&["gc", &reg.reference("g/img")]);
    assert!(err.contains("lists only the tags"), "{err}");
}
