//! Image verbs against a real registry (CNCF distribution) and real readers
//! (skopeo, umoci): `push` of a docker-save tarball, `pull --format tarball`
//! of several images, `flatten`, `rebase` and `optimize`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::tree::assert_same_tree;
use common::{ggfs, ggfs_fails, run, umoci_unpack, Distribution};
use serde_json::Value;

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
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

fn layer_media_types(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap().to_string())
        .collect()
}

/// A docker-save tarball written by skopeo holds uncompressed layers; ggfs
/// push gzips them as crane does: gzip media types, compressed digests in
/// the manifest, the config's DiffIDs unchanged, and readers get the tree.
#[test]
fn push_of_docker_archive_gzips_its_layers() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("layout");
    common::umoci_image(&layout, "t");
    let archive = w.join("saved.tar");
    common::skopeo_copy(
        &format!("oci:{}:t", layout.display()),
        &format!("docker-archive:{}:saved/img:t", archive.display()),
    );
    let dst = reg.reference("pushed/img:t");
    let out = ggfs(&["push", archive.to_str().unwrap(), &dst]);
    assert!(
        out.trim().starts_with(&reg.reference("pushed/img@sha256:")),
        "{out}"
    );

    let manifest = json(&ggfs(&["manifest", &dst]));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        layer_media_types(&manifest),
        ["application/vnd.docker.image.rootfs.diff.tar.gzip"]
    );
    let config_text = ggfs(&["config", &dst]);
    let saved_config = ggfs(&["config", &format!("docker-archive:{}", archive.display())]);
    assert_eq!(config_text, saved_config, "the config changed");
    let config = json(&config_text);
    let layer = &manifest["layers"][0];
    let diff_id = config["rootfs"]["diff_ids"][0].as_str().unwrap();
    assert_ne!(
        layer["digest"], diff_id,
        "the layer was pushed uncompressed"
    );
    let blob = run(Command::new("sh").arg("-c").arg(format!(
        "{} blob {}@{} | gzip -dc | sha256sum",
        common::ggfs_bin().display(),
        reg.reference("pushed/img"),
        layer["digest"].as_str().unwrap()
    )));
    assert_eq!(format!("sha256:{}", &blob[..64]), diff_id);
    ggfs(&["validate", &dst]);
    common::skopeo_inspect_raw(&format!("docker://{dst}"));

    let unpacked = skopeo_unpack(&dst, w, "pushed");
    let want = umoci_unpack(&layout, "t", &w.join("want-bundle"));
    assert_same_tree(&unpacked, &want, true);
    let by_podman = common::podman_rootfs(&dst, &w.join("podman"));
    assert_same_tree(&by_podman, &want, true);

    // A tarball of compressed layers (as ggfs and crane pull) is pushed as
    // it is: the same layers and config come back.
    let pulled = w.join("pulled.tar");
    ggfs(&["pull", &dst, pulled.to_str().unwrap()]);
    let again = reg.reference("again/img:t");
    ggfs(&["push", pulled.to_str().unwrap(), &again]);
    assert_eq!(json(&ggfs(&["manifest", &again])), manifest);
}

/// manifest.json of a docker-save tarball.
fn save_listing(tar: &Path) -> Value {
    let mut archive = tar::Archive::new(std::fs::File::open(tar).unwrap());
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("manifest.json") {
            return serde_json::from_reader(&mut e).unwrap();
        }
    }
    panic!("no manifest.json in {}", tar.display())
}

/// `pull --format tarball` of several images writes one docker-save
/// tarball: one manifest.json entry per image with every tag it was pulled
/// by; skopeo reads each image back out of it by tag.
#[test]
fn pull_of_several_images_into_one_tarball() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("layout");
    common::umoci_image(&layout, "t");
    let (a, a2) = (reg.reference("a/img:t"), reg.reference("a/img:again"));
    let b = reg.reference("b/multi:t");
    common::push_oci_layout(&layout, "t", &a);
    common::push_oci_layout(&layout, "t", &a2);
    let multi = common::multilayer_image();
    common::push_oci_layout(multi, common::MULTILAYER_TAG, &b);

    let out = w.join("all.tar");
    ggfs(&["pull", &a, &b, &a2, out.to_str().unwrap()]);
    let listing = save_listing(&out);
    let entries = listing.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{listing}");
    assert_eq!(entries[0]["RepoTags"], serde_json::json!([a, a2]));
    assert_eq!(entries[1]["RepoTags"], serde_json::json!([b]));
    assert_eq!(entries[1]["Layers"].as_array().unwrap().len(), 3);

    let want_a = umoci_unpack(&layout, "t", &w.join("want-a"));
    let want_b = umoci_unpack(multi, common::MULTILAYER_TAG, &w.join("want-b"));
    for (i, (tag, want)) in [(&a, &want_a), (&a2, &want_a), (&b, &want_b)]
        .into_iter()
        .enumerate()
    {
        let back = w.join(format!("back{i}"));
        common::skopeo_copy(
            &format!("docker-archive:{}:{tag}", out.display()),
            &format!("oci:{}:t", back.display()),
        );
        let got = umoci_unpack(&back, "t", &w.join(format!("back{i}-bundle")));
        assert_same_tree(&got, want, true);
    }
    // A tarball pushed back selects its image by tag.
    let err = ggfs_fails(&["push", out.to_str().unwrap(), &reg.reference("c/img:t")]);
    assert!(err.contains("holds 2 images"), "{err}");
}

/// The multi-layer whiteout fixture pushed as `multi/img:t`: its reference,
/// umoci's unpack of it (under `w`) and its config.
fn push_multilayer(reg: &Distribution, w: &Path) -> (String, PathBuf, Value) {
    let multi = common::multilayer_image();
    let src = reg.reference("multi/img:t");
    common::push_oci_layout(multi, common::MULTILAYER_TAG, &src);
    let want = umoci_unpack(multi, common::MULTILAYER_TAG, &w.join("want"));
    let before = json(&ggfs(&["config", &src]));
    (src, want, before)
}

/// crane flatten of the multi-layer whiteout fixture: one layer whose
/// unpacked tree is the unpacked input's, history kept as empty-layer
/// entries plus one for the new layer; without -t it replaces the tag.
#[test]
fn flatten_squashes_the_whiteout_fixture_into_one_layer() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let (src, want, before) = push_multilayer(&reg, w);

    let flat = reg.reference("multi/img:flat");
    let out = ggfs(&["flatten", &src, "-t", &flat]);
    let digest = ggfs(&["digest", &flat]);
    assert_eq!(
        out.trim(),
        format!("{}@{}", reg.reference("multi/img"), digest.trim())
    );
    let manifest = json(&ggfs(&["manifest", &flat]));
    assert_eq!(
        layer_media_types(&manifest),
        ["application/vnd.oci.image.layer.v1.tar+gzip"]
    );
    let config = json(&ggfs(&["config", &flat]));
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    let old_history = before["history"].as_array().unwrap();
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), old_history.len() + 1);
    for (new, old) in history.iter().zip(old_history) {
        assert_eq!(new["empty_layer"], true);
        assert_eq!(new["created_by"], old["created_by"]);
    }
    assert_eq!(history.last().unwrap()["created_by"], "ggfs flatten");
    assert_eq!(config["config"], before["config"]);
    ggfs(&["validate", &flat]);
    let got = skopeo_unpack(&flat, w, "flat");
    assert_same_tree(&got, &want, true);

    // No -t: back to the same tag.
    let old = ggfs(&["digest", &src]);
    ggfs(&["flatten", &src]);
    let new = ggfs(&["digest", &src]);
    assert_ne!(old, new);
    let again = json(&ggfs(&["manifest", &src]));
    assert_eq!(
        again["layers"], manifest["layers"],
        "the flattened layer is reproducible"
    );
    let err = ggfs_fails(&["flatten", &reg.reference("multi/none:t")]);
    assert!(err.contains("multi/none"), "{err}");
}

/// An index is flattened platform by platform.
#[test]
fn flatten_of_an_index_flattens_each_platform() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("layout");
    common::index_two_platforms(&layout, "t");
    let src = reg.reference("idx/img:t");
    common::push_oci_layout(&layout, "t", &src);
    let flat = reg.reference("idx/img:flat");
    ggfs(&["flatten", &src, "-t", &flat]);
    let index = json(&ggfs(&["manifest", &flat]));
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    let old = json(&ggfs(&["manifest", &src]));
    for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        assert_eq!(manifests[i]["platform"]["architecture"], arch);
        assert_ne!(manifests[i]["digest"], old["manifests"][i]["digest"]);
        let child = format!(
            "{}@{}",
            reg.reference("idx/img"),
            manifests[i]["digest"].as_str().unwrap()
        );
        ggfs(&["validate", &child]);
        let cfg = json(&ggfs(&["config", &child]));
        assert_eq!(cfg["architecture"], arch);
        let got = skopeo_unpack(&child, w, arch);
        assert_eq!(
            std::fs::read(got.join("arch")).unwrap(),
            format!("{arch}\n").as_bytes()
        );
    }
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

fn diff_ids(image: &str) -> Vec<Value> {
    json(&ggfs(&["config", image]))["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .clone()
}

/// crane rebase: app built on base:1 moved onto base:2 unpacks as app's
/// layer applied on base:2; base:2's layers are mounted, not uploaded; the
/// new base is recorded, so a later rebase needs no flags; a wrong old base
/// is refused naming the first mismatch.
#[test]
fn rebase_moves_an_image_onto_a_new_base() {
    let reg = Distribution::start();
    let proxy = common::CountingProxy::start(reg.addr());
    let at = |s: &str| format!("{}/{s}", proxy.addr());
    let work = common::tempdir();
    let w = work.path();
    let base1 = tree(
        w,
        "base1",
        &[
            ("etc/base", "1\n"),
            ("shared/a", "a\n"),
            ("shared/k", "k\n"),
        ],
    );
    let base2a = tree(w, "base2a", &[("etc/base", "2\n"), ("shared/a", "a2\n")]);
    let base2b = tree(w, "base2b", &[("extra", "e\n")]);
    let app = tree(w, "app", &[("app/bin", "x\n"), ("shared/.wh.a", "")]);
    let p = |d: &PathBuf| d.to_str().unwrap().to_string();
    ggfs(&["append", "-f", &p(&base1), "-t", &at("base:1")]);
    ggfs(&[
        "append",
        "-f",
        &p(&base2a),
        "-f",
        &p(&base2b),
        "-t",
        &at("base:2"),
    ]);
    ggfs(&[
        "append",
        "-b",
        &at("base:1"),
        "-f",
        &p(&app),
        "-t",
        &at("app:v1"),
    ]);
    ggfs(&[
        "append",
        "-b",
        &at("base:2"),
        "-f",
        &p(&app),
        "-t",
        &at("want:v1"),
    ]);

    let requests_before = proxy.requests().len();
    let up_before = proxy.bytes_up();
    let out = ggfs(&[
        "rebase",
        &at("app:v1"),
        "--old-base",
        &at("base:1"),
        "--new-base",
        &at("base:2"),
        "-t",
        &at("app:rebased"),
    ]);
    let rebased = at("app:rebased");
    assert_eq!(
        out.trim(),
        format!("{}@{}", at("app"), ggfs(&["digest", &rebased]).trim())
    );
    let reqs = proxy.requests()[requests_before..].to_vec();
    let mounts = reqs
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("mount=") && r.path.contains("from=base"))
        .count();
    assert_eq!(mounts, 2, "base:2's layers mounted: {reqs:?}");
    assert!(
        proxy.bytes_up() - up_before < 64 * 1024,
        "blob bytes uploaded"
    );

    let app_ids = diff_ids(&at("app:v1"));
    let mut want_ids = diff_ids(&at("base:2"));
    want_ids.push(app_ids[1].clone());
    assert_eq!(diff_ids(&rebased), want_ids);
    assert_eq!(diff_ids(&at("want:v1")), want_ids);
    let cfg = json(&ggfs(&["config", &rebased]));
    assert_eq!(cfg["history"].as_array().unwrap().len(), 3);
    let manifest = json(&ggfs(&["manifest", &rebased]));
    let a = &manifest["annotations"];
    assert_eq!(a["org.opencontainers.image.base.name"], at("base:2"));
    assert_eq!(
        a["org.opencontainers.image.base.digest"],
        ggfs(&["digest", &at("base:2")]).trim()
    );
    ggfs(&["validate", &rebased]);
    let got = skopeo_unpack(&reg.reference("app:rebased"), w, "rebased");
    let want = skopeo_unpack(&reg.reference("want:v1"), w, "want");
    assert_same_tree(&got, &want, true);
    assert_eq!(std::fs::read(got.join("etc/base")).unwrap(), b"2\n");
    assert!(!got.join("shared/a").exists());

    // base:2 moves on; the recorded base is enough to follow it.
    let base2c = tree(w, "base2c", &[("later", "l\n")]);
    ggfs(&[
        "append",
        "-b",
        &at("base:2"),
        "-f",
        &p(&base2c),
        "-t",
        &at("base:2"),
    ]);
    ggfs(&["rebase", &rebased]);
    let mut want_ids = diff_ids(&at("base:2"));
    want_ids.push(app_ids[1].clone());
    assert_eq!(diff_ids(&rebased), want_ids);

    ggfs(&["append", "-f", &p(&base2b), "-t", &at("other:1")]);
    let err = ggfs_fails(&[
        "rebase",
        &at("app:v1"),
        "--old-base",
        &at("other:1"),
        "--new-base",
        &at("base:1"),
    ]);
    assert!(err.contains("other:1") && err.contains("layer 0"), "{err}");
    let err = ggfs_fails(&["rebase", &at("app:v1")]);
    assert!(err.contains("--old-base"), "{err}");
    let layout = w.join("index");
    common::index_two_platforms(&layout, "t");
    common::push_oci_layout(&layout, "t", &reg.reference("idx:t"));
    let err = ggfs_fails(&["rebase", &at("idx:t"), "--old-base", &at("base:1")]);
    assert!(err.contains("idx:t is an index"), "{err}");
}

/// The files eStargz and zstd:chunked add to a layer's tar (the TOC, the
/// landmarks): in an unpacked tree, not part of the image's.
fn without_format_files(rootfs: PathBuf) -> PathBuf {
    for f in [
        "stargz.index.json",
        ".prefetch.landmark",
        ".no.prefetch.landmark",
    ] {
        let _ = std::fs::remove_file(rootfs.join(f));
    }
    rootfs
}

/// The names in a layer blob's tar, in order.
fn layer_names(image: &str, digest: &str) -> Vec<String> {
    let repo = image.rsplit_once(':').unwrap().0;
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "{} blob {repo}@{digest} | zcat | tar -t",
        common::ggfs_bin().display()
    )));
    out.lines().map(String::from).collect()
}

/// optimize converts every layer of the whiteout fixture (three gzip
/// layers) to eStargz, then zstd:chunked: an OCI manifest whose layers
/// carry their TOC annotations, new DiffIDs and the same history, and
/// umoci, podman and a ggfs mount all see the input's merged tree. A
/// prefetch file goes first in the layer that holds it; an image already in
/// the format comes back unchanged.
#[test]
fn optimize_converts_every_layer() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let (src, want, before) = push_multilayer(&reg, w);

    let esgz = reg.reference("multi/img:esgz");
    ggfs(&[
        "optimize",
        &src,
        "-t",
        &esgz,
        "--prefetch",
        "/base/added.txt",
    ]);
    let manifest = json(&ggfs(&["manifest", &esgz]));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{manifest:#}");
    for l in layers {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let ann = &l["annotations"];
        assert!(
            ann["containerd.io/snapshot/stargz/toc.digest"].is_string(),
            "{manifest:#}"
        );
    }
    let config = json(&ggfs(&["config", &esgz]));
    assert_eq!(config["history"], before["history"]);
    assert_eq!(config["config"], before["config"]);
    let (old_ids, new_ids) = (&before["rootfs"]["diff_ids"], &config["rootfs"]["diff_ids"]);
    assert_eq!(new_ids.as_array().unwrap().len(), 3);
    for i in 0..3 {
        assert_ne!(old_ids[i], new_ids[i], "layer {i} kept its tar");
    }
    ggfs(&["validate", &esgz]);
    // The prefetch file leads the top layer (the one holding it), before
    // its landmark; the others say there is nothing to prefetch.
    let top = layer_names(&esgz, layers[2]["digest"].as_str().unwrap());
    let file = top
        .iter()
        .position(|n| n.trim_start_matches("./") == "base/added.txt");
    let mark = top
        .iter()
        .position(|n| n.trim_start_matches("./") == ".prefetch.landmark");
    assert!(file.unwrap() < mark.unwrap(), "{top:?}");
    let bottom = layer_names(&esgz, layers[0]["digest"].as_str().unwrap());
    assert_eq!(
        bottom[0].trim_start_matches("./"),
        ".no.prefetch.landmark",
        "{bottom:?}"
    );

    let got = without_format_files(skopeo_unpack(&esgz, w, "esgz"));
    assert_same_tree(&got, &want, true);
    {
        let m = common::mount::Mount::start(reg.addr(), &[]);
        // The mount hides the format's files itself.
        common::mount::assert_same_tree(&m.path("multi/img/esgz/rootfs"), &want);
    }

    // Already eStargz, nothing to prefetch: the same image comes back.
    let again = reg.reference("multi/img:esgz2");
    ggfs(&["optimize", &esgz, "-t", &again]);
    assert_eq!(ggfs(&["digest", &again]), ggfs(&["digest", &esgz]));

    let zc = reg.reference("multi/img:zc");
    ggfs(&["optimize", &src, "-t", &zc, "--format", "zstd:chunked"]);
    let manifest = json(&ggfs(&["manifest", &zc]));
    for l in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let ann = &l["annotations"];
        assert!(
            ann["io.containers.zstd-chunked.manifest-checksum"].is_string(),
            "{manifest:#}"
        );
    }
    ggfs(&["validate", &zc]);
    let by_podman = without_format_files(common::podman_rootfs(&zc, &w.join("podman")));
    assert_same_tree(&by_podman, &want, true);

    let err = ggfs_fails(&["optimize", &src, "-t", &zc, "--prefetch", "/no/such"]);
    assert!(err.contains("\"/no/such\""), "{err}");
}
