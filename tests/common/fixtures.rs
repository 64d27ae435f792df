//! Generated image fixtures: a root filesystem with every file type, OCI
//! layouts built from it with umoci, a multi-layer image with whiteouts and
//! a two-platform index. Expensive trees are cached under target/fixtures
//! (shared by all test processes: built in a private dir, then renamed into
//! place, so concurrent builders never see a half-made tree).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::{run, sha256_digest, skopeo_copy_with, tempdir};

/// Bump when the generated trees change, so stale caches are not reused.
const VERSION: u32 = 2;

/// Tag of the image in [`multilayer_image`]'s layout.
pub const MULTILAYER_TAG: &str = "latest";

/// Fixed mtime of every fixture entry (2023-11-14T22:13:20Z).
pub const FIXTURE_MTIME: i64 = 1_700_000_000;

/// `target/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("fixtures");
    fs::create_dir_all(&dir).expect("create target/fixtures");
    dir
}

/// Builds `name` under target/fixtures once: `build` fills a private
/// directory which is then renamed into place (losing a race is harmless).
fn cached(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let dest = fixtures_dir().join(format!("{name}-v{VERSION}"));
    if dest.exists() {
        return dest;
    }
    let tmp = fixtures_dir().join(format!(".{name}-{}-{}", std::process::id(), nanos()));
    fs::create_dir_all(&tmp).expect("create fixture build dir");
    build(&tmp);
    if fs::rename(&tmp, &dest).is_err() {
        assert!(dest.exists(), "cannot move fixture into {}", dest.display());
        let _ = fs::remove_dir_all(&tmp);
    }
    dest
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// A root filesystem with every file type (see `build_rootfs`). Read-only
/// for tests: copy it before changing anything.
pub fn fixture_rootfs() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| cached("rootfs", |d| build_rootfs(&d.join("rootfs"))).join("rootfs"))
}

/// Deterministic pseudo-random bytes (xorshift64), so every builder of the
/// cache produces the same tree.
pub fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write(root: &Path, rel: &str, data: &[u8], mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir -p");
    fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mkdir(root: &Path, rel: &str, mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(&p).expect("mkdir");
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod dir");
}

/// The tree:
/// - `etc/os-release`, `etc/hostname`, `empty` (0 bytes), `small.txt`
/// - `data/random-1m` (1 MiB), `data/big-5m` (5 MiB), pseudo-random
/// - `tmp/` 1777, `private/` 0700 with `private/secret` 0600
/// - `usr/bin/suid` 04755, `usr/bin/sgid` 02755, `usr/bin/cap` with
///   security.capability = cap_net_bind_service+ep
/// - `links/abs` -> /etc/os-release, `links/rel` -> ../etc/os-release,
///   `links/dangling` -> /nonexistent/target, `links/dir` -> ../data
/// - `hard/a`, `hard/b`, `hard/c`: one inode, nlink 3
/// - `dev/char` (c 1 3), `dev/block` (b 7 0), `dev/fifo`
/// - `xattr/file` with user.ggfs=hello and user.bin=0x00ff
/// - `unicode/héllo wörld ☃.txt`, `unicode/日本語/ファイル`,
///   `long/<255-byte name>`, `deep/d1/.../d12/file` (path > 100 bytes)
/// - `owned/u1000` 1000:1000, `owned/nobody` 65534:65534, `owned/dir/` 1234:5678
/// - `mtime/old`: mtime 1_000_000_000; everything else FIXTURE_MTIME
fn build_rootfs(root: &Path) {
    mkdir(root, "", 0o755);
    write(
        root,
        "etc/os-release",
        b"ID=ggfs-fixture\nVERSION_ID=1\n",
        0o644,
    );
    write(root, "etc/hostname", b"fixture\n", 0o644);
    write(root, "empty", b"", 0o644);
    write(root, "small.txt", b"hello ggfs\n", 0o644);
    write(root, "data/random-1m", &pseudo_random(1 << 20, 1), 0o644);
    write(root, "data/big-5m", &pseudo_random(5 << 20, 2), 0o640);
    mkdir(root, "tmp", 0o1777);
    mkdir(root, "private", 0o700);
    write(root, "private/secret", b"s3cret\n", 0o600);
    write(root, "usr/bin/suid", b"#!/bin/sh\necho suid\n", 0o4755);
    write(root, "usr/bin/sgid", b"#!/bin/sh\necho sgid\n", 0o2755);
    write(root, "usr/bin/cap", b"#!/bin/sh\necho cap\n", 0o755);
    build_links(root);
    build_special(root);
    build_names(root);
    build_owners(root);
    set_xattrs(root);
    run(Command::new("find")
        .arg(root)
        .args(["-exec", "touch", "-h", "-d"])
        .arg(format!("@{FIXTURE_MTIME}"))
        .args(["{}", "+"]));
    run(Command::new("touch")
        .args(["-h", "-d", "@1000000000"])
        .arg(root.join("mtime/old")));
}

fn build_links(root: &Path) {
    mkdir(root, "links", 0o755);
    let l = root.join("links");
    symlink("/etc/os-release", l.join("abs")).expect("symlink abs");
    symlink("../etc/os-release", l.join("rel")).expect("symlink rel");
    symlink("/nonexistent/target", l.join("dangling")).expect("symlink dangling");
    symlink("../data", l.join("dir")).expect("symlink dir");
    write(root, "hard/a", b"three names, one inode\n", 0o644);
    fs::hard_link(root.join("hard/a"), root.join("hard/b")).expect("hardlink b");
    fs::hard_link(root.join("hard/a"), root.join("hard/c")).expect("hardlink c");
}

fn build_special(root: &Path) {
    mkdir(root, "dev", 0o755);
    let dev = root.join("dev");
    run(Command::new("mknod")
        .args(["-m", "0666"])
        .arg(dev.join("char"))
        .args(["c", "1", "3"]));
    run(Command::new("mknod")
        .args(["-m", "0660"])
        .arg(dev.join("block"))
        .args(["b", "7", "0"]));
    run(Command::new("mkfifo")
        .args(["-m", "0644"])
        .arg(dev.join("fifo")));
}

fn build_names(root: &Path) {
    write(root, "unicode/héllo wörld ☃.txt", b"unicode\n", 0o644);
    write(root, "unicode/日本語/ファイル", b"nihongo\n", 0o644);
    let long = format!("{}.txt", "l".repeat(251));
    write(root, &format!("long/{long}"), b"long name\n", 0o644);
    let deep: Vec<String> = (1..=12).map(|i| format!("directory{i:02}")).collect();
    write(
        root,
        &format!("deep/{}/file", deep.join("/")),
        b"deep\n",
        0o644,
    );
    write(root, "mtime/old", b"old\n", 0o644);
}

fn build_owners(root: &Path) {
    use std::os::unix::fs::{chown, lchown};
    write(root, "owned/u1000", b"uid 1000\n", 0o644);
    chown(root.join("owned/u1000"), Some(1000), Some(1000)).expect("chown");
    write(root, "owned/nobody", b"uid 65534\n", 0o644);
    chown(root.join("owned/nobody"), Some(65534), Some(65534)).expect("chown");
    mkdir(root, "owned/dir", 0o750);
    chown(root.join("owned/dir"), Some(1234), Some(5678)).expect("chown dir");
    symlink("u1000", root.join("owned/link")).expect("symlink");
    lchown(root.join("owned/link"), Some(1000), Some(1000)).expect("lchown");
}

/// Sets xattrs with setfattr; silently skipped where the tool or the
/// filesystem does not support them (tests check `xattrs_supported()`).
fn set_xattrs(root: &Path) {
    write(root, "xattr/file", b"has xattrs\n", 0o644);
    let set = |name: &str, value: &str, rel: &str| {
        Command::new("setfattr")
            .args(["-n", name, "-v", value])
            .arg(root.join(rel))
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    set("user.ggfs", "hello", "xattr/file");
    set("user.bin", "0x00ff", "xattr/file");
    // vfs_cap_data v2: magic|effective, permitted = 1<<10 (NET_BIND_SERVICE).
    set(
        "security.capability",
        "0x0100000200040000000000000000000000000000",
        "usr/bin/cap",
    );
}

/// Builds (or extends) the OCI layout `layout` with `tag` = one layer made
/// from [`fixture_rootfs`].
pub fn umoci_image(layout: &Path, tag: &str) {
    umoci_image_from(layout, tag, fixture_rootfs());
}

/// Builds (or extends) the OCI layout `layout` with `tag` = one layer made
/// from the tree `tree` (umoci init/new/unpack, copy, repack).
pub fn umoci_image_from(layout: &Path, tag: &str, tree: &Path) {
    if !layout.join("index.json").exists() {
        run(Command::new("umoci").args(["init", "--layout"]).arg(layout));
    }
    let image = format!("{}:{tag}", layout.display());
    run(Command::new("umoci").args(["new", "--image", &image]));
    let work = tempdir();
    let bundle = work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", tree.display()))
        .arg(bundle.join("rootfs")));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
}

/// Pushes `layout:tag` to `dst` (`127.0.0.1:PORT/repo:tag`) with skopeo,
/// keeping OCI media types; indexes are pushed whole (`--all`).
pub fn push_oci_layout(layout: &Path, tag: &str, dst: &str) {
    let src = format!("oci:{}:{tag}", layout.display());
    skopeo_copy_with(&["--all"], &src, &format!("docker://{dst}"));
}

/// Like [`push_oci_layout`] but converted to Docker schema 2 media types.
pub fn push_oci_layout_v2s2(layout: &Path, tag: &str, dst: &str) {
    let src = format!("oci:{}:{tag}", layout.display());
    skopeo_copy_with(&["--format", "v2s2"], &src, &format!("docker://{dst}"));
}

/// An OCI layout (cached) whose image `MULTILAYER_TAG` has three layers:
///
/// 1. (umoci) `base/keep.txt`="v1", `base/to_delete.txt`, `opq/old1`,
///    `opq/sub/old2`, `replaced` (a file), `dir_to_file/inner`, `gone_dir/x`
/// 2. (hand-made tar) `base/.wh.to_delete.txt`, `opq/.wh..wh..opq` +
///    `opq/new.txt`, `replaced/` now a dir with `replaced/inside.txt`,
///    `.wh.gone_dir`
/// 3. (hand-made tar) `dir_to_file` now a file, `base/keep.txt`="v3",
///    `base/added.txt`
///
/// Merged result: `base/{keep.txt=v3,added.txt}`, `opq/new.txt` only,
/// `replaced/inside.txt`, `dir_to_file` a file "now a file\n", no `gone_dir`.
pub fn multilayer_image() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        cached("multilayer", |d| build_multilayer(&d.join("layout"))).join("layout")
    })
}

fn build_multilayer(layout: &Path) {
    let tree = tempdir();
    let t = tree.path();
    write(t, "base/keep.txt", b"v1\n", 0o644);
    write(t, "base/to_delete.txt", b"doomed\n", 0o644);
    write(t, "opq/old1", b"old1\n", 0o644);
    write(t, "opq/sub/old2", b"old2\n", 0o644);
    write(t, "replaced", b"i was a file\n", 0o644);
    write(t, "dir_to_file/inner", b"inner\n", 0o644);
    write(t, "gone_dir/x", b"x\n", 0o644);
    umoci_image_from(layout, MULTILAYER_TAG, t);
    let layer2 = [
        Entry::file("base/.wh.to_delete.txt", b""),
        Entry::dir("opq"),
        Entry::file("opq/.wh..wh..opq", b""),
        Entry::file("opq/new.txt", b"new\n"),
        Entry::dir("replaced"),
        Entry::file("replaced/inside.txt", b"inside\n"),
        Entry::file(".wh.gone_dir", b""),
    ];
    add_raw_layer(layout, MULTILAYER_TAG, &layer2);
    let layer3 = [
        Entry::file("dir_to_file", b"now a file\n"),
        Entry::file("base/keep.txt", b"v3\n"),
        Entry::file("base/added.txt", b"added\n"),
    ];
    add_raw_layer(layout, MULTILAYER_TAG, &layer3);
}

/// A tar entry for hand-made layers.
struct Entry {
    path: &'static str,
    data: Option<&'static [u8]>,
}

impl Entry {
    fn file(path: &'static str, data: &'static [u8]) -> Entry {
        Entry {
            path,
            data: Some(data),
        }
    }

    fn dir(path: &'static str) -> Entry {
        Entry { path, data: None }
    }
}

/// Appends an uncompressed tar of `entries` as a new layer (umoci gzips it
/// and updates the config's diff_ids).
fn add_raw_layer(layout: &Path, tag: &str, entries: &[Entry]) {
    let dir = tempdir();
    let tar_path = dir.path().join("layer.tar");
    let mut b = tar::Builder::new(fs::File::create(&tar_path).expect("create layer tar"));
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(FIXTURE_MTIME as u64);
        h.set_uid(0);
        h.set_gid(0);
        // tar-rs leaves these NUL-filled; write "0" like GNU tar and Go do.
        h.set_device_major(0).expect("ustar has device fields");
        h.set_device_minor(0).expect("ustar has device fields");
        match e.data {
            Some(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, e.path, data).expect("tar file");
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, e.path, std::io::empty())
                    .expect("tar dir");
            }
        }
    }
    b.finish().expect("finish tar");
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&tar_path));
}

/// Adds to the OCI layout `layout` (created if needed) an image index
/// tagged `tag` with two images, linux/amd64 and linux/arm64. Each has one
/// layer holding `arch` (its architecture name + newline) and
/// `etc/os-release`. The per-platform images are also tagged
/// `<tag>-amd64` / `<tag>-arm64`. Push with [`push_oci_layout`].
pub fn index_two_platforms(layout: &Path, tag: &str) {
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let tree = tempdir();
        write(tree.path(), "arch", format!("{arch}\n").as_bytes(), 0o644);
        write(tree.path(), "etc/os-release", b"ID=ggfs-fixture\n", 0o644);
        let arch_tag = format!("{tag}-{arch}");
        umoci_image_from(layout, &arch_tag, tree.path());
        run(Command::new("umoci")
            .args(["config", "--image"])
            .arg(format!("{}:{arch_tag}", layout.display()))
            .args(["--os", "linux", "--architecture", arch]));
        let mut desc = tagged_descriptor(layout, &arch_tag);
        desc["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        if let Some(obj) = desc.as_object_mut() {
            obj.remove("annotations");
        }
        manifests.push(desc);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec(&index).expect("serialize index");
    let digest = sha256_digest(&bytes);
    let blob = layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    fs::write(&blob, &bytes).expect("write index blob");
    set_tag(
        layout,
        tag,
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": bytes.len(),
        }),
    );
}

fn read_index(layout: &Path) -> serde_json::Value {
    let text = fs::read_to_string(layout.join("index.json")).expect("read index.json");
    serde_json::from_str(&text).expect("parse index.json")
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The descriptor `index.json` holds for `tag`.
fn tagged_descriptor(layout: &Path, tag: &str) -> serde_json::Value {
    let index = read_index(layout);
    index["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|d| d["annotations"][REF_NAME] == tag))
        .cloned()
        .unwrap_or_else(|| panic!("tag {tag} not in {}", layout.display()))
}

/// Points `tag` in `index.json` at `desc`, replacing any previous entry.
fn set_tag(layout: &Path, tag: &str, mut desc: serde_json::Value) {
    let mut index = read_index(layout);
    let manifests = index["manifests"].as_array_mut().expect("manifests array");
    manifests.retain(|d| d["annotations"][REF_NAME] != tag);
    desc["annotations"] = serde_json::json!({ REF_NAME: tag });
    manifests.push(desc);
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("serialize index.json"),
    )
    .expect("write index.json");
}
