//! Local sources, sinks and transformations against the real tools: OCI
//! layouts read and written by umoci and skopeo, docker-save tarballs read and
//! written by skopeo, flatten compared with `umoci unpack`, and mutations.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::tree::assert_same_tree;
use common::{
    fixture_rootfs, multilayer_image, run, tempdir, umoci_image, umoci_unpack, untar,
    MULTILAYER_TAG,
};
use ggfs::image::copy::{copy, CopyOptions};
use ggfs::image::layout::Layout;
use ggfs::image::manifest::Compression;
use ggfs::image::{export, mutate, newlayer, tarball};
use ggfs::image::{fetch_image, read_blob, Image, Sink, Source};
use ggfs::Digest;

/// Trees are compared with mtimes: every tool here keeps them.
const WITH_MTIME: bool = true;

/// An image of one gzip layer made from `dir`.
fn image_of_dir(dir: &Path) -> Image {
    let layer = newlayer::layer_from_dir(dir, Compression::Gzip).unwrap();
    let base = mutate::empty(&"linux/amd64".parse().unwrap()).unwrap();
    mutate::append(&base, vec![layer]).unwrap()
}

async fn save_to_layout(image: &Image, layout: &Path, tag: &str) -> Arc<Layout> {
    let sink = Arc::new(Layout::create(layout).unwrap());
    let opts = CopyOptions::default();
    copy(
        image.source.clone(),
        image.digest().as_str(),
        sink.clone(),
        Some(tag),
        &opts,
    )
    .await
    .unwrap();
    sink
}

async fn open_layout_image(layout: &Path, tag: &str) -> Image {
    let src: Arc<dyn Source> = Arc::new(Layout::open(layout).unwrap());
    fetch_image(src, tag, None).await.unwrap()
}

async fn flatten_to_dir(image: &Image, dest: &Path) {
    let tar_path = dest.with_extension("tar");
    let file = fs::File::create(&tar_path).unwrap();
    export::flatten(image, file).await.unwrap();
    untar(&tar_path, dest);
}

/// Each layer's compressed bytes hash to its digest and its tar to the DiffID.
async fn verify_layers(image: &Image) {
    let layers = image.layers().unwrap();
    let diff_ids = image.config_file().unwrap().rootfs().diff_ids().clone();
    assert_eq!(layers.len(), diff_ids.len());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let layer2 = layer.clone();
        let digest = tokio::task::spawn_blocking(move || {
            let r = export::layer_reader(&layer2).unwrap();
            ggfs::digest::Hasher::read_all(r).unwrap().finish()
        })
        .await
        .unwrap();
        assert_eq!(digest.to_string(), diff_id, "layer {}", layer.digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn layout_we_write_unpacks_with_umoci() {
    let t = tempdir();
    let image = image_of_dir(fixture_rootfs());
    save_to_layout(&image, &t.path().join("oci"), "v1").await;
    let rootfs = umoci_unpack(&t.path().join("oci"), "v1", &t.path().join("bundle"));
    assert_same_tree(&rootfs, fixture_rootfs(), WITH_MTIME);
}

#[tokio::test(flavor = "multi_thread")]
async fn layout_source_reads_umoci_image() {
    let t = tempdir();
    let layout = t.path().join("oci");
    umoci_image(&layout, "latest");
    let image = open_layout_image(&layout, "latest").await;
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], image.digest().as_str());
    assert_eq!(image.config_digest().unwrap(), Digest::of(&image.config));
    verify_layers(&image).await;

    let l = &image.layers().unwrap()[0];
    let whole = read_blob(image.source.as_ref(), &l.digest, 1 << 30)
        .await
        .unwrap();
    let range = image.source.blob_range(&l.digest, 10, 100).await.unwrap();
    assert_eq!(&range[..], &whole[10..110]);
    assert_eq!(image.source.blob_size(&l.digest).await.unwrap(), l.size());
    let err = image.source.manifest("nope").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_reads_our_tarball_and_layout() {
    let t = tempdir();
    let image = image_of_dir(fixture_rootfs());
    let tar = t.path().join("img.tar");
    let tags = ["ggfs.test/fixture:v1".to_string()];
    tarball::write_to(&image, tarball::Dest::Path(tar.clone()), &tags)
        .await
        .unwrap();

    let from_tar = t.path().join("from-tar");
    common::skopeo_copy(
        &format!("docker-archive:{}", tar.display()),
        &format!("oci:{}:t", from_tar.display()),
    );
    let rootfs = umoci_unpack(&from_tar, "t", &t.path().join("b1"));
    assert_same_tree(&rootfs, fixture_rootfs(), WITH_MTIME);

    save_to_layout(&image, &t.path().join("ours"), "v1").await;
    let copied = t.path().join("copied");
    common::skopeo_copy(
        &format!("oci:{}:v1", t.path().join("ours").display()),
        &format!("oci:{}:t", copied.display()),
    );
    let back = open_layout_image(&copied, "t").await;
    assert_eq!(back.config, image.config);
    assert_eq!(
        back.digest(),
        image.digest(),
        "skopeo kept the manifest as is"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tarball_source_reads_skopeo_docker_archive() {
    let t = tempdir();
    let layout = t.path().join("oci");
    umoci_image(&layout, "latest");
    let tar = t.path().join("img.tar");
    common::skopeo_copy(
        &format!("oci:{}:latest", layout.display()),
        &format!("docker-archive:{}:ggfs.test/img:v1", tar.display()),
    );
    let original = open_layout_image(&layout, "latest").await;

    let src: Arc<dyn Source> = Arc::new(tarball::Tarball::open(&tar).unwrap());
    let image = fetch_image(src.clone(), "ggfs.test/img:v1", None)
        .await
        .unwrap();
    let same = fetch_image(src, "", None).await.unwrap();
    assert_eq!(image.digest(), same.digest());
    let diff_ids = |i: &Image| i.config_file().unwrap().rootfs().diff_ids().clone();
    assert_eq!(diff_ids(&image), diff_ids(&original));
    verify_layers(&image).await;

    let out = t.path().join("flat");
    flatten_to_dir(&image, &out).await;
    assert_same_tree(&out, fixture_rootfs(), WITH_MTIME);
}

#[tokio::test(flavor = "multi_thread")]
async fn flatten_matches_umoci_unpack_of_multilayer_fixture() {
    let t = tempdir();
    let layout = multilayer_image();
    let image = open_layout_image(layout, MULTILAYER_TAG).await;
    assert_eq!(image.layers().unwrap().len(), 3);
    let ours = t.path().join("ours");
    flatten_to_dir(&image, &ours).await;
    let theirs = umoci_unpack(layout, MULTILAYER_TAG, &t.path().join("bundle"));
    assert_same_tree(&ours, &theirs, WITH_MTIME);
    assert_eq!(fs::read(ours.join("base/keep.txt")).unwrap(), b"v3\n");
    assert!(!ours.join("opq/old1").exists() && !ours.join("gone_dir").exists());
}

/// Rewrite a file's last byte: corrupts a stored blob in place.
fn edit_last_byte(path: &Path, edit: impl FnOnce(&mut u8)) {
    let mut bytes = fs::read(path).unwrap();
    edit(bytes.last_mut().expect("a non-empty blob"));
    fs::write(path, &bytes).unwrap();
}

/// Write `files` (path → content; a trailing `/` makes a directory) under a
/// fresh directory inside `parent`.
fn tree(parent: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = parent.join(name);
    fs::create_dir_all(&root).unwrap();
    for (path, data) in files {
        let p = root.join(path);
        if path.ends_with('/') {
            fs::create_dir_all(&p).unwrap();
        } else {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, data).unwrap();
        }
    }
    root
}

#[tokio::test(flavor = "multi_thread")]
async fn flatten_with_hardlinks_and_whiteouts_matches_umoci() {
    let t = tempdir();
    // Layer 2 deletes the target of the hardlink group hard/{a,b,c}, makes
    // data/ opaque, deletes a symlink and a whole directory, and turns a
    // directory (links/) into a file. Layer 3 re-creates hard/a and a
    // deleted directory.
    let l2 = tree(
        t.path(),
        "l2",
        &[
            ("hard/.wh.a", ""),
            ("data/.wh..wh..opq", ""),
            ("data/new", "fresh\n"),
            ("owned/.wh.link", ""),
            (".wh.unicode", ""),
            (".wh.links", ""),
            ("links", "now a file\n"),
            (".wh.deep", ""),
        ],
    );
    let l3 = tree(
        t.path(),
        "l3",
        &[("hard/a", "new a\n"), ("deep/again", "x\n"), ("tmp/", "")],
    );
    let mut image = image_of_dir(fixture_rootfs());
    // umoci 0.4 reads no zstd: gzip and plain tar here.
    for (dir, c) in [(&l2, Compression::Gzip), (&l3, Compression::None)] {
        let layer = newlayer::layer_from_dir(dir, c).unwrap();
        image = mutate::append(&image, vec![layer]).unwrap();
    }
    let layout = t.path().join("oci");
    save_to_layout(&image, &layout, "v1").await;
    let theirs = umoci_unpack(&layout, "v1", &t.path().join("bundle"));
    let ours = t.path().join("ours");
    flatten_to_dir(&open_layout_image(&layout, "v1").await, &ours).await;
    assert_same_tree(&ours, &theirs, WITH_MTIME);
    // Spot checks that the comparison covered the interesting cases.
    assert_eq!(
        fs::read(ours.join("hard/b")).unwrap(),
        b"three names, one inode\n"
    );
    assert_eq!(fs::read(ours.join("hard/a")).unwrap(), b"new a\n");
    assert!(!ours.join("data/random-1m").exists());
    assert!(!ours.join("unicode").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn appended_layer_shows_in_umoci_unpack() {
    let t = tempdir();
    let layout = t.path().join("oci");
    umoci_image(&layout, "latest");
    let base = open_layout_image(&layout, "latest").await;
    let extra = tree(
        t.path(),
        "extra",
        &[("added/file", "appended\n"), ("etc/hostname", "changed\n")],
    );
    let layer = newlayer::layer_from_dir(&extra, Compression::Gzip).unwrap();
    let edits = mutate::ConfigEdits {
        env: vec![("GGFS".into(), "1".into())],
        ..Default::default()
    };
    let image = mutate::config(&mutate::append(&base, vec![layer]).unwrap(), &edits).unwrap();
    save_to_layout(&image, &layout, "appended").await;

    let rootfs = umoci_unpack(&layout, "appended", &t.path().join("bundle"));
    assert_eq!(fs::read(rootfs.join("added/file")).unwrap(), b"appended\n");
    assert_eq!(fs::read(rootfs.join("etc/hostname")).unwrap(), b"changed\n");
    assert_eq!(
        fs::read(rootfs.join("etc/os-release")).unwrap(),
        fs::read(fixture_rootfs().join("etc/os-release")).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(t.path().join("bundle/config.json")).unwrap()).unwrap();
    let env = config["process"]["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e == "GGFS=1"), "{env:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_layout_blob_is_a_digest_error_and_writes_nothing() {
    let t = tempdir();
    let image = image_of_dir(&tree(t.path(), "src", &[("f", "some content\n")]));
    let layout = t.path().join("oci");
    let store = save_to_layout(&image, &layout, "v1").await;
    let digest = image.layers().unwrap()[0].digest.clone();
    edit_last_byte(&store.blob_path(&digest), |b| *b ^= 0xff);

    let image = open_layout_image(&layout, "v1").await;
    let out = t.path().join("out.tar");
    let err = tarball::write_to(&image, tarball::Dest::Path(out.clone()), &[])
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(digest.as_str()) && msg.contains("failed verification"),
        "{msg}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Copying into another layout: the bad blob never lands there either.
    let dst = Arc::new(Layout::create(t.path().join("dst")).unwrap());
    let err = copy(
        image.source.clone(),
        "v1",
        dst.clone(),
        Some("v1"),
        &CopyOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("failed verification"), "{err}");
    assert!(!dst.has_blob(&digest).await.unwrap());
    assert!(dst.tags().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn index_in_layout_round_trips_through_skopeo() {
    let t = tempdir();
    let layout = t.path().join("oci");
    common::index_two_platforms(&layout, "multi");
    let src: Arc<dyn Source> = Arc::new(Layout::open(&layout).unwrap());
    let arm = "linux/arm64".parse().unwrap();
    let image = fetch_image(src.clone(), "multi", Some(&arm)).await.unwrap();
    let flat = t.path().join("flat");
    flatten_to_dir(&image, &flat).await;
    assert_eq!(fs::read(flat.join("arch")).unwrap(), b"arm64\n");

    // The whole index copied into a layout of ours, then read by skopeo.
    let ours = t.path().join("ours");
    let sink = Arc::new(Layout::create(&ours).unwrap());
    copy(src, "multi", sink, Some("m"), &CopyOptions::default())
        .await
        .unwrap();
    let raw = common::skopeo_inspect_raw(&format!("oci:{}:m", ours.display()));
    assert_eq!(raw["manifests"].as_array().map(Vec::len), Some(2));
    common::skopeo_copy_with(
        &["--all"],
        &format!("oci:{}:m", ours.display()),
        &format!("oci:{}:m", t.path().join("again").display()),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn overlayfs_style_deletions_become_whiteouts() {
    let t = tempdir();
    let base = tree(
        t.path(),
        "base",
        &[
            ("keep", "k\n"),
            ("gone", "g\n"),
            ("opq/old", "o\n"),
            ("d/x", "x\n"),
        ],
    );
    // An overlayfs upper dir: a 0/0 char device marks a deletion, the
    // trusted.overlay.opaque xattr an opaque directory.
    let upper = tree(t.path(), "upper", &[("opq/new", "n\n"), ("d/y", "y\n")]);
    run(Command::new("mknod")
        .arg(upper.join("gone"))
        .args(["c", "0", "0"]));
    run(Command::new("setfattr")
        .args(["-n", "trusted.overlay.opaque", "-v", "y"])
        .arg(upper.join("opq")));
    let mut image = image_of_dir(&base);
    let layer = newlayer::layer_from_dir(&upper, Compression::Gzip).unwrap();
    image = mutate::append(&image, vec![layer]).unwrap();

    let ours = t.path().join("ours");
    flatten_to_dir(&image, &ours).await;
    let layout = t.path().join("oci");
    save_to_layout(&image, &layout, "v1").await;
    let theirs = umoci_unpack(&layout, "v1", &t.path().join("bundle"));
    assert_same_tree(&ours, &theirs, WITH_MTIME);
    let mut names: Vec<String> = walkdir(&ours);
    names.sort();
    assert_eq!(names, ["d", "d/x", "d/y", "keep", "opq", "opq/new"]);
}

fn walkdir(root: &Path) -> Vec<String> {
    common::tree::snapshot(root, common::tree::Mtimes::Ignore)
        .nodes
        .keys()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn untagged_copy_is_listed_for_skopeo() {
    let t = tempdir();
    let image = image_of_dir(&tree(t.path(), "src", &[("f", "untagged\n")]));
    let dir = t.path().join("oci");
    let sink = Arc::new(Layout::create(&dir).unwrap());
    copy(
        image.source.clone(),
        image.digest().as_str(),
        sink,
        None,
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    let raw = common::skopeo_inspect_raw(&format!("oci:{}", dir.display()));
    assert_eq!(
        raw["config"]["digest"],
        image.config_digest().unwrap().as_str()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn export_notices_corruption_after_the_end_of_archive() {
    let t = tempdir();
    let layer = newlayer::layer_from_dir(tree(t.path(), "src", &[("f", "x\n")]), Compression::None)
        .unwrap();
    let base = mutate::empty(&"linux/amd64".parse().unwrap()).unwrap();
    let image = mutate::append(&base, vec![layer.clone()]).unwrap();
    let layout = t.path().join("oci");
    let store = save_to_layout(&image, &layout, "v1").await;
    // Flip a byte in the tar's trailing zero blocks: the entries still
    // parse, only the digest can tell.
    edit_last_byte(&store.blob_path(&layer.digest), |b| *b = 1);

    let image = open_layout_image(&layout, "v1").await;
    let err = export::flatten(&image, Vec::new()).await.unwrap_err();
    assert!(err.to_string().contains("failed verification"), "{err}");
}
