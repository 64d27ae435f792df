//! The writable mount and `ggfs commit` / `ggfs status`, end to end: a real
//! registry (CNCF distribution), real FUSE mounts by `ggfs-mountd`, changes
//! made with the shell tools a user would use, and the result checked by
//! third-party tools (skopeo pulls it, umoci unpacks it) and by fresh mounts.
//!
//! The interface under test:
//! - `ggfs-mountd mount ... --commit-delay SECS|manual` (default 10): with
//!   `manual` nothing is committed automatically, not even at unmount; with
//!   SECS an image is committed after SECS seconds without writes, and at
//!   unmount.
//! - `MNT/<repo>/<tag>/rootfs/` is writable; `MNT/<repo>/sha256:<hex>/` and
//!   the namespace files (manifest.json, digest, ...) are read-only (EROFS).
//! - `ggfs commit IMAGE_DIR [--tag T] [--layer-format gzip|zstd|estargz|zstd:chunked] [-m MSG]
//!   [--force]`: one new layer on the base, pushed by digest, then the tag
//!   moved; stdout's last line `<registry>/<repo>@sha256:<hex>`. No changes:
//!   exit 0, `no changes` on stderr. Tag moved meanwhile: exit 1, `conflict`
//!   and the pushed digest on stderr. Registry down: exit 1, `pending`, and
//!   the commit is pushed later (`ggfs commit` again, or the next mount of
//!   the same cache dir).
//! - `ggfs status MNT` (and `MNT/.ggfs/status`): one line per image with
//!   changes, `<state> <repo>:<tag> ...`, state one of pending, pushed,
//!   conflict, failed.
//! - Changes live in the daemon's `--cache-dir` and survive `kill -9`.
//!
//! Every wait is bounded (`within`, or a poll with a deadline); no test
//! asserts on wall time. Small helpers are at the bottom.

mod common;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mount::{within, Mount};
use common::tree::{self, Mtimes, Snapshot};
use common::Distribution;

/// Daemon options: no automatic commits.
const MANUAL: &[&str] = &["--commit-delay", "manual"];
/// The fixture's repository, its tag, and the image directory in a mount.
const REPO: &str = "fixture/all";
const TAG: &str = "fixture/all:latest";
const IMAGE: &str = "fixture/all/latest";
const ROOTFS: &str = "fixture/all/latest/rootfs";

/// A user edits the mounted image with the usual tools; the committed image,
/// pulled by skopeo and unpacked by umoci, is exactly the tree the mount
/// showed before the commit, and so is a fresh mount of the registry.
#[test]
fn posix_tools_then_commit_match_umoci_unpack() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let base_manifest = manifest(&reg, REPO, &base);
    let base_config = config(&reg, REPO, &base);
    let work = common::tempdir();
    let src = local_tree(work.path());
    let patch = common::pseudo_random(1000, 99);
    let patch_file = work.path().join("patch");
    fs::write(&patch_file, &patch).unwrap();

    let m = Mount::start(reg.addr(), MANUAL);
    let root = m.path(ROOTFS);
    let r = |argv: &[&str]| tool(&root, argv);
    r(&["cp", "-a", src.to_str().unwrap(), "copied"]);
    r(&["rm", "etc/hostname"]);
    r(&["rm", "-r", "unicode"]);
    r(&["rmdir", "tmp"]);
    r(&["mkdir", "newdir"]);
    r(&["mv", "deep", "deeper"]);
    r(&["chmod", "0600", "small.txt"]);
    r(&["chown", "1000:1000", "etc/os-release"]);
    r(&["ln", "private/secret", "secret-hl"]);
    r(&["ln", "-s", "../small.txt", "newdir/sym"]);
    r(&["mkfifo", "newdir/fifo"]);
    r(&["mknod", "newdir/null", "c", "1", "3"]);
    r(&[
        "dd",
        &format!("if={}", patch_file.display()),
        "of=data/random-1m",
        "bs=1000",
        "seek=777777",
        "oflag=seek_bytes",
        "conv=notrunc",
        "status=none",
    ]);
    r(&["sh", "-c", "printf appended >> mtime/old"]);
    r(&["truncate", "-s", "3", "owned/nobody"]);
    r(&["setfattr", "-n", "user.x", "-v", "y", "empty"]);
    r(&["touch", "-h", "-d", "@1600000000", "links/rel"]);
    // Everything the mount stamped with the current time (changed files,
    // directories whose entries changed) gets a whole-second mtime, so the
    // strictest comparison (Mtimes::All, nanoseconds included) can pass for
    // a correct implementation: tar headers carry whole seconds unless a
    // PAX mtime is written, and layers commonly truncate (docker does). The
    // mtimes still have to make it into the layer, directories' included.
    // Untouched entries are older: the fixture's are 2023-11-14 or 2001,
    // the copied tree's 2022.
    let find = "find . -mindepth 1 -newermt @1700000001 -exec touch -h -d @1700000100 {} +";
    r(&find.split(' ').collect::<Vec<_>>());

    // The mount shows the changes.
    let (rt, fx) = (root.clone(), common::fixture_rootfs().to_path_buf());
    within(120, "checking the changed mount", move || {
        for gone in ["etc/hostname", "unicode", "tmp", "deep"] {
            assert!(!rt.join(gone).exists(), "{gone} still there");
        }
        let deep: Vec<String> = (1..=12).map(|i| format!("directory{i:02}")).collect();
        assert_eq!(
            fs::read(rt.join("deeper").join(deep.join("/")).join("file")).unwrap(),
            b"deep\n"
        );
        assert_eq!(fs::read(rt.join("copied/f1.txt")).unwrap(), b"first\n");
        let mut want = fs::read(fx.join("data/random-1m")).unwrap();
        want[777_777..777_777 + patch.len()].copy_from_slice(&patch);
        assert_eq!(
            common::sha256_digest(&fs::read(rt.join("data/random-1m")).unwrap()),
            common::sha256_digest(&want),
            "data/random-1m after dd"
        );
        assert_eq!(fs::read(rt.join("mtime/old")).unwrap(), b"old\nappended");
        assert_eq!(fs::read(rt.join("owned/nobody")).unwrap(), b"uid");
        let small = fs::metadata(rt.join("small.txt")).unwrap();
        assert_eq!(small.mode() & 0o7777, 0o600);
        assert_eq!(fs::read(rt.join("small.txt")).unwrap(), b"hello ggfs\n");
        let os = fs::metadata(rt.join("etc/os-release")).unwrap();
        assert_eq!((os.uid(), os.gid()), (1000, 1000));
        assert_eq!(
            xattr::get(rt.join("empty"), "user.x").unwrap(),
            Some(b"y".to_vec())
        );
        let null = fs::symlink_metadata(rt.join("newdir/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(
            null.rdev(),
            fs::symlink_metadata(fx.join("dev/char")).unwrap().rdev()
        );
        assert!(fs::symlink_metadata(rt.join("newdir/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(
            fs::read_link(rt.join("newdir/sym")).unwrap(),
            Path::new("../small.txt")
        );
    });
    let hardlinks = [
        (&["private/secret", "secret-hl"][..], 2),
        (&["copied/hl1", "copied/hl2"][..], 2),
        (&["hard/a", "hard/b", "hard/c"][..], 3),
    ];
    for (names, nlink) in hardlinks {
        assert_hardlinked(&root, names, nlink);
    }
    let before = snap(&root);

    let out = commit(&m, IMAGE, &["-m", "posix tools"]);
    let new = committed(&out, &reg, REPO);
    assert_ne!(new, base);
    assert_eq!(tag_digest(&reg, TAG), new, "the tag did not move");
    let raw = common::skopeo_raw(&format!("docker://{}@{new}", reg.reference(REPO)));
    assert_eq!(common::sha256_digest(raw.as_bytes()), new);

    // One layer more, on top of the base's; one diff_id and one history entry more.
    let man = manifest(&reg, REPO, &new);
    let (old_layers, layers) = (
        json_array(&base_manifest["layers"]),
        json_array(&man["layers"]),
    );
    assert_eq!(layers.len(), old_layers.len() + 1, "{man:#}");
    assert_eq!(
        &layers[..old_layers.len()],
        old_layers,
        "base layers changed"
    );
    let cfg = config(&reg, REPO, &new);
    let (old_ids, ids) = (
        json_array(&base_config["rootfs"]["diff_ids"]),
        json_array(&cfg["rootfs"]["diff_ids"]),
    );
    assert_eq!(ids.len(), old_ids.len() + 1, "{cfg:#}");
    assert_eq!(&ids[..old_ids.len()], old_ids);
    let (old_hist, hist) = (
        json_array(&base_config["history"]),
        json_array(&cfg["history"]),
    );
    assert_eq!(hist.len(), old_hist.len() + 1, "{cfg:#}");
    assert_eq!(&hist[..old_hist.len()], old_hist);
    let last = hist.last().unwrap();
    assert_ne!(last["empty_layer"], true, "{last}");
    // -m: where the message goes is not pinned down; comment or created_by.
    assert!(
        [&last["comment"], &last["created_by"]]
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.contains("posix tools"))),
        "message not in the history entry: {last}"
    );

    // skopeo pulls it, the new layer's DiffID checks out, umoci unpacks it
    // to exactly the tree the mount showed.
    let (layout, unpacked) = pull_and_unpack(&reg, REPO, &new, work.path());
    assert_eq!(
        layer_diff_id(&layout, layers.last().unwrap()),
        ids.last().unwrap().as_str().unwrap()
    );
    tree::assert_same_snapshot(
        &snap(&unpacked),
        "umoci unpack",
        &before,
        "mount before commit",
    );
    // Committing changed nothing in the mount.
    tree::assert_same_snapshot(
        &snap(&root),
        "mount after commit",
        &before,
        "mount before commit",
    );
    for (names, nlink) in hardlinks {
        assert_hardlinked(&root, names, nlink);
    }
    // The base stays pullable by digest.
    common::skopeo_raw(&format!("docker://{}@{base}", reg.reference(REPO)));

    // A fresh mount (new cache) of the registry shows the same tree.
    let fresh = Mount::start(reg.addr(), MANUAL);
    let froot = fresh.path(ROOTFS);
    tree::assert_same_snapshot(&snap(&froot), "fresh mount", &before, "mount before commit");
    for (names, nlink) in hardlinks {
        assert_hardlinked(&froot, names, nlink);
    }
}

/// Renames over existing targets (a file over a lower file, a directory
/// over an empty lower one, one refused over a non-empty one), `sed -i`,
/// `tar -x` and a git repository made and cloned inside the mount: the
/// committed image, unpacked by umoci, is the tree the mount showed.
#[test]
fn renames_sed_tar_and_git_then_commit_match_umoci_unpack() {
    let reg = Distribution::start();
    push_fixture(&reg);
    let work = common::tempdir();
    let archive = work.path().join("in.tar");
    let src = local_tree(work.path());
    common::run(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&src)
            .arg("."),
    );
    let m = Mount::start(reg.addr(), MANUAL);
    let root = m.path(ROOTFS);
    let r = |argv: &[&str]| tool(&root, argv);
    r(&["mv", "-f", "small.txt", "empty"]);
    r(&["mkdir", "newer"]);
    r(&["mv", "-T", "links", "owned/dir"]);
    r(&[
        "sed",
        "-i",
        "s/VERSION_ID=1/VERSION_ID=2/",
        "etc/os-release",
    ]);
    r(&["mkdir", "untarred"]);
    r(&["tar", "-xpf", archive.to_str().unwrap(), "-C", "untarred"]);
    let git = |dir: &str, args: &[&str]| {
        let mut argv = vec![
            "git",
            "-C",
            dir,
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@e",
        ];
        argv.extend_from_slice(args);
        r(&argv);
    };
    r(&["git", "init", "-q", "repo"]);
    fs::write(root.join("repo/README"), b"inside the mount\n").unwrap();
    git("repo", &["add", "README"]);
    git("repo", &["commit", "-q", "-m", "first"]);
    r(&["git", "clone", "-q", "repo", "clone"]);
    // A directory over a non-empty one is refused, and changes nothing.
    let err = fs::rename(root.join("data"), root.join("hard")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(39), "ENOTEMPTY: {err}");

    assert_eq!(read_string(&root.join("empty")), "hello ggfs\n");
    assert!(!exists(&root.join("small.txt")));
    assert!(exists(&root.join("owned/dir/abs")) && !exists(&root.join("links")));
    assert_eq!(
        read_string(&root.join("etc/os-release")),
        "ID=ggfs-fixture\nVERSION_ID=2\n"
    );
    assert_eq!(read_string(&root.join("untarred/f1.txt")), "first\n");
    assert_eq!(
        read_string(&root.join("clone/README")),
        "inside the mount\n"
    );
    let find = "find . -mindepth 1 -newermt @1700000001 -exec touch -h -d @1700000100 {} +";
    r(&find.split(' ').collect::<Vec<_>>());
    let before = snap(&root);

    let new = committed(&commit(&m, IMAGE, &[]), &reg, REPO);
    let (_, unpacked) = pull_and_unpack(&reg, REPO, &new, work.path());
    tree::assert_same_snapshot(
        &snap(&unpacked),
        "umoci unpack",
        &before,
        "mount before commit",
    );
    // git itself reads the committed repository back.
    let out = common::output(
        Command::new("git")
            .args(["-C"])
            .arg(unpacked.join("clone"))
            .args(["log", "--format=%s"]),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "first");
}

/// A container runs on the writable rootfs: runc (what podman and
/// containerd run) makes its mount points in it, the container's shell
/// writes, and the commit carries what it wrote.
#[test]
fn runc_runs_on_the_writable_rootfs() {
    let reg = Distribution::start();
    let work = common::tempdir();
    // The smallest image with a shell: dash and the libraries it needs.
    let img = work.path().join("img");
    for (from, to) in [
        ("/bin/dash", "bin/sh"),
        (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "lib/x86_64-linux-gnu/libc.so.6",
        ),
        ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
    ] {
        fs::create_dir_all(img.join(to).parent().unwrap()).unwrap();
        fs::copy(from, img.join(to)).unwrap();
    }
    let out = ggfs(&[
        OsStr::new("append"),
        OsStr::new("-f"),
        img.as_os_str(),
        OsStr::new("-t"),
        OsStr::new(&reg.reference("shell:v1")),
    ]);
    assert!(out.status.success(), "ggfs append: {}", describe(&out));
    let m = Mount::start(reg.addr(), MANUAL);
    let root = m.path("shell/v1/rootfs");
    let bundle = work.path().join("bundle");
    fs::create_dir(&bundle).unwrap();
    common::run(Command::new("runc").arg("spec").current_dir(&bundle));
    let spec_path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&fs::read(&spec_path).unwrap()).unwrap();
    spec["root"] = serde_json::json!({ "path": root, "readonly": false });
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!([
        "/bin/sh",
        "-c",
        // dash's builtins only: the image has nothing else.
        "echo from-the-container > /written && read l < /written && echo $l"
    ]);
    fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let id = format!("ggfs-test-{}", std::process::id());
    let b = bundle.clone();
    let out = within(120, "runc run", move || {
        Command::new("runc")
            .args(["run", &id])
            .current_dir(&b)
            .stdin(Stdio::null())
            .output()
            .expect("spawn runc")
    });
    assert!(out.status.success(), "runc run: {}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "from-the-container"
    );
    assert_eq!(read_string(&root.join("written")), "from-the-container\n");

    let new = committed(&commit(&m, "shell/v1", &[]), &reg, "shell");
    let (_, unpacked) = pull_and_unpack(&reg, "shell", &new, work.path());
    assert_eq!(
        read_string(&unpacked.join("written")),
        "from-the-container\n"
    );
    assert!(unpacked.join("bin/sh").is_file());
}

/// A write drops a file's capabilities and chown does too, as on any Linux
/// file system (the mount does it: it tells the kernel it will); a write
/// by root keeps setuid.
#[test]
fn writes_drop_file_capabilities_and_root_keeps_setuid() {
    let reg = Distribution::start();
    push_fixture(&reg);
    let m = Mount::start(reg.addr(), MANUAL);
    let root = m.path(ROOTFS);
    let cap = |p: &str| xattr::get(root.join(p), "security.capability").unwrap();
    assert!(
        cap("usr/bin/cap").is_some(),
        "the fixture's file has a capability"
    );
    tool(&root, &["sh", "-c", "printf '#' >> usr/bin/cap"]);
    assert_eq!(cap("usr/bin/cap"), None, "a write keeps the capability");
    tool(
        &root,
        &[
            "setfattr",
            "-n",
            "security.capability",
            "-v",
            "0x0100000200040000000000000000000000000000",
            "usr/bin/cap",
        ],
    );
    assert!(cap("usr/bin/cap").is_some());
    tool(&root, &["chown", "1000", "usr/bin/cap"]);
    assert_eq!(cap("usr/bin/cap"), None, "chown keeps the capability");
    tool(&root, &["sh", "-c", "printf '#' >> usr/bin/suid"]);
    let mode = fs::metadata(root.join("usr/bin/suid")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o4755, "root's write dropped setuid");
    assert_eq!(
        read_string(&root.join("usr/bin/suid")),
        "#!/bin/sh\necho suid\n#"
    );
}

/// Each platform of an index a tag points at is writable: a commit pushes
/// that platform's new image, then an index with it replaced (the other
/// platform untouched, byte for byte), and moves the tag; a second
/// platform's commit builds on the index the first pushed.
#[test]
fn platforms_of_an_index_commit_a_new_index() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let layout = work.path().join("layout");
    common::index_two_platforms(&layout, "multi");
    common::push_oci_layout(&layout, "multi", &reg.reference("plat:multi"));
    let old_index = manifest(&reg, "plat", &tag_digest(&reg, "plat:multi"));
    let m = Mount::start(reg.addr(), MANUAL);
    write_file(
        &m.path("plat/multi/linux-amd64/rootfs/added"),
        b"amd64 only\n",
    );
    assert!(!exists(&m.path("plat/multi/linux-arm64/rootfs/added")));

    let first = committed(&commit(&m, "plat/multi/linux-amd64", &[]), &reg, "plat");
    assert_eq!(
        tag_digest(&reg, "plat:multi"),
        first,
        "the tag is on the new index"
    );
    let index = manifest(&reg, "plat", &first);
    let (old, new) = (
        json_array(&old_index["manifests"]),
        json_array(&index["manifests"]),
    );
    assert_eq!(old.len(), new.len());
    assert_eq!(old[1], new[1], "linux-arm64 changed");
    assert_ne!(old[0]["digest"], new[0]["digest"]);
    assert_eq!(old[0]["platform"], new[0]["platform"]);
    let amd = new[0]["digest"].as_str().unwrap();
    let amd_manifest = manifest(&reg, "plat", amd);
    assert_eq!(
        json_array(&amd_manifest["layers"]).len(),
        json_array(&manifest(&reg, "plat", old[0]["digest"].as_str().unwrap())["layers"]).len() + 1
    );

    write_file(
        &m.path("plat/multi/linux-arm64/rootfs/added"),
        b"arm64 too\n",
    );
    let second = committed(&commit(&m, "plat/multi/linux-arm64", &[]), &reg, "plat");
    let index = manifest(&reg, "plat", &second);
    let both = json_array(&index["manifests"]);
    assert_eq!(both[0]["digest"], amd, "the second commit undid the first");
    assert_ne!(both[1]["digest"], old[1]["digest"]);

    // skopeo reads each platform; a fresh mount shows both changes.
    for (arch, want) in [("amd64", "amd64 only\n"), ("arm64", "arm64 too\n")] {
        let dest = work.path().join(format!("pulled-{arch}"));
        common::skopeo_copy_with(
            &["--override-arch", arch],
            &format!("docker://{}", reg.reference("plat:multi")),
            &format!("oci:{}:x", dest.display()),
        );
        let un = common::umoci_unpack(&dest, "x", &work.path().join(format!("b-{arch}")));
        assert_eq!(read_string(&un.join("added")), want);
        assert_eq!(read_string(&un.join("arch")), format!("{arch}\n"));
    }
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(
        read_string(&fresh.path("plat/multi/linux-arm64/rootfs/added")),
        "arm64 too\n"
    );
}

/// Against a registry with bearer tokens: a mount without credentials reads
/// (anonymous pull) but its commit is refused: a clear error, `failed` in
/// the status, the changes kept. The next mount of the same cache, with
/// credentials, pushes them, asking for a push scope.
#[test]
fn token_registry_refuses_then_takes_a_commit() {
    use common::{TokenOptions, TokenServer};
    let ts = TokenServer::start_with(TokenOptions {
        anonymous_pull: true,
        ..TokenOptions::default()
    });
    let reg = Distribution::start_token(&ts);
    let work = common::tempdir();
    let docker = |name: &str, auths: serde_json::Value| {
        let dir = work.path().join(name);
        fs::create_dir(&dir).unwrap();
        let config = serde_json::json!({ "auths": auths });
        fs::write(dir.join("config.json"), config.to_string()).unwrap();
        dir
    };
    let creds = docker(
        "creds",
        serde_json::json!({ reg.addr(): {"username": "alice", "password": "secret"} }),
    );
    let anon = docker("anon", serde_json::json!({}));
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("base.txt"), b"base\n").unwrap();
    // This test's process alone reads the variable (nextest: a process per test).
    std::env::set_var("DOCKER_CONFIG", &creds);
    let out = ggfs(&[
        OsStr::new("append"),
        OsStr::new("-f"),
        src.as_os_str(),
        OsStr::new("-t"),
        OsStr::new(&reg.reference("tok/app:v1")),
    ]);
    assert!(out.status.success(), "ggfs append: {}", describe(&out));

    let cache = work.path().join("cache");
    std::env::set_var("DOCKER_CONFIG", &anon);
    let m = Mount::start_with_cache(reg.addr(), MANUAL, Some(&cache));
    assert_eq!(read_string(&m.path("tok/app/v1/rootfs/base.txt")), "base\n");
    write_file(&m.path("tok/app/v1/rootfs/new.txt"), b"new\n");
    let out = commit(&m, "tok/app/v1", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains(reg.addr()),
        "the error names the registry: {err}"
    );
    assert!(err.contains("pending"), "{err}");
    assert_eq!(state(&status(&m), "tok/app:v1"), Some("failed".into()));
    m.unmount().unwrap();

    std::env::set_var("DOCKER_CONFIG", &creds);
    ts.reset();
    let m = Mount::start_with_cache(reg.addr(), MANUAL, Some(&cache));
    assert_eq!(read_string(&m.path("tok/app/v1/rootfs/new.txt")), "new\n");
    let new = committed(&commit(&m, "tok/app/v1", &[]), &reg, "tok/app");
    assert!(
        ts.scopes()
            .iter()
            .any(|s| s == "repository:tok/app:pull,push"),
        "{:?}",
        ts.scopes()
    );
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(
        read_string(&fresh.path("tok/app/v1/rootfs/new.txt")),
        "new\n"
    );
    assert_eq!(
        read_string(&fresh.path(&format!("tok/app/{new}/rootfs/base.txt"))),
        "base\n"
    );
}

/// A tag's own files are registry operations: a manifest written into a
/// new tag directory (mkdir) tags it, its blobs mounted from the repository
/// they were read from; writing config.json pushes the image with that
/// config; bad input fails at close and changes nothing.
#[test]
fn manifest_and_config_writes_tag_and_edit() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let other_layout = common::multilayer_image();
    common::push_oci_layout(
        other_layout,
        common::MULTILAYER_TAG,
        &reg.reference("other/repo:v1"),
    );
    let m = Mount::start(reg.addr(), MANUAL);
    let manifest_bytes = read(&m.path(&format!("{IMAGE}/manifest.json")));

    // Same repository: a new tag for the same manifest.
    fs::create_dir(m.path("fixture/all/copy")).unwrap();
    assert!(is_dir(&m.path("fixture/all/copy")));
    write_closed(m.path("fixture/all/copy/manifest.json"), &manifest_bytes).unwrap();
    assert_eq!(tag_digest(&reg, "fixture/all:copy"), base);
    // Another repository: the blobs come along by cross-repository mount.
    fs::create_dir(m.path("other/repo/fx")).unwrap();
    write_closed(m.path("other/repo/fx/manifest.json"), &manifest_bytes).unwrap();
    assert_eq!(tag_digest(&reg, "other/repo:fx"), base);
    let dest = common::tempdir();
    common::skopeo_copy(
        &format!("docker://{}", reg.reference("other/repo:fx")),
        &format!("oci:{}:x", dest.path().join("l").display()),
    );
    // Retag an existing tag by writing its manifest.json.
    let v1 = read(&m.path("other/repo/v1/manifest.json"));
    write_closed(m.path(&format!("{IMAGE}/manifest.json")), b"{ not json").unwrap_err();
    assert_eq!(tag_digest(&reg, TAG), base, "a bad manifest moved the tag");
    write_closed(m.path("fixture/all/copy/manifest.json"), &v1).unwrap();
    let v1_digest = common::sha256_digest(&v1);
    assert_eq!(tag_digest(&reg, "fixture/all:copy"), v1_digest);

    // config.json: an edited config, the same layers.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&read(&m.path(&format!("{IMAGE}/config.json")))).unwrap();
    cfg["config"]["Env"] = serde_json::json!(["EDITED=1"]);
    let edited = serde_json::to_vec(&cfg).unwrap();
    write_closed(m.path(&format!("{IMAGE}/config.json")), &edited).unwrap();
    let new = tag_digest(&reg, TAG);
    assert_ne!(new, base);
    let man = manifest(&reg, REPO, &new);
    assert_eq!(man["layers"], manifest(&reg, REPO, &base)["layers"]);
    assert_eq!(man["config"]["digest"], common::sha256_digest(&edited));
    assert_eq!(
        config(&reg, REPO, &new)["config"]["Env"],
        serde_json::json!(["EDITED=1"])
    );
    // The layers are what they are: a config that says otherwise is refused.
    cfg["rootfs"]["diff_ids"] = serde_json::json!([]);
    let err = write_closed(
        m.path(&format!("{IMAGE}/config.json")),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(22), "EINVAL: {err}");
    assert_eq!(tag_digest(&reg, TAG), new);
}

/// `referrers/` lists what refers to an image (`ggfs attach` made one
/// here); a file copied into it is attached as an artifact whose subject is
/// the image, which `ggfs refs` and the listing then show.
#[test]
fn referrers_list_and_attach() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let work = common::tempdir();
    let sig = work.path().join("sig.txt");
    fs::write(&sig, b"signed\n").unwrap();
    let out = ggfs(&[
        OsStr::new("attach"),
        OsStr::new(&reg.reference(TAG)),
        OsStr::new("--artifact-type"),
        OsStr::new("application/vnd.example.sig"),
        OsStr::new("-f"),
        sig.as_os_str(),
    ]);
    assert!(out.status.success(), "ggfs attach: {}", describe(&out));
    let by_attach = String::from_utf8_lossy(&out.stdout)
        .trim()
        .rsplit('@')
        .next()
        .unwrap()
        .to_string();
    let m = Mount::start(reg.addr(), MANUAL);
    let refs = m.path(&format!("{IMAGE}/referrers"));
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&refs), ["index.json".to_string(), by_attach.clone()]);
    let index: serde_json::Value = serde_json::from_slice(&read(&refs.join("index.json"))).unwrap();
    assert_eq!(
        index["manifests"][0]["artifactType"],
        "application/vnd.example.sig"
    );
    // The artifact reads like any manifest; its file is a blob.
    let art: serde_json::Value =
        serde_json::from_slice(&read(&refs.join(&by_attach).join("manifest.json"))).unwrap();
    assert_eq!(art["subject"]["digest"], base.as_str());
    let blob = art["layers"][0]["digest"].as_str().unwrap().to_string();
    assert_eq!(
        read(&refs.join(&by_attach).join("blobs").join(&blob)),
        b"signed\n"
    );

    // cp attaches.
    let sbom = work.path().join("sbom.json");
    fs::write(&sbom, b"{\"sbom\": true}\n").unwrap();
    tool(
        work.path(),
        &["cp", sbom.to_str().unwrap(), refs.to_str().unwrap()],
    );
    let out = ggfs(&[OsStr::new("refs"), OsStr::new(&reg.reference(TAG))]);
    assert!(out.status.success(), "ggfs refs: {}", describe(&out));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let added: Vec<String> = digests_in(&listed)
        .into_iter()
        .filter(|d| *d != by_attach)
        .collect();
    assert_eq!(added.len(), 1, "{listed}");
    let art = manifest(&reg, REPO, &added[0]);
    assert_eq!(art["subject"]["digest"], base.as_str());
    assert_eq!(
        art["layers"][0]["annotations"]["org.opencontainers.image.title"],
        "sbom.json"
    );
    let blob = art["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(blob, common::sha256_digest(b"{\"sbom\": true}\n"));
    // The listing shows it.
    assert!(names(&refs).contains(&added[0]), "{:?}", names(&refs));
    // Nothing else in the namespace takes a file.
    assert_erofs("create beside referrers/", {
        let f = m.path(&format!("{IMAGE}/x"));
        move || fs::write(f, b"x")
    });
}

/// `rmdir MOUNT/REPO/TAG` deletes the tag, only with --allow-delete, and
/// not when another tag shares its manifest (distribution deletes
/// manifests, not tags: it would go too).
#[test]
fn rmdir_deletes_a_tag_only_with_allow_delete() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let out = ggfs(&[
        OsStr::new("tag"),
        OsStr::new(&reg.reference(TAG)),
        OsStr::new("twin"),
    ]);
    assert!(out.status.success(), "ggfs tag: {}", describe(&out));
    common::push_oci_layout(
        common::multilayer_image(),
        common::MULTILAYER_TAG,
        &reg.reference("fixture/all:solo"),
    );
    let m = Mount::start(reg.addr(), MANUAL);
    let err = fs::remove_dir(m.path("fixture/all/solo")).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(30),
        "EROFS without --allow-delete: {err}"
    );
    drop(m);

    let m = Mount::start(reg.addr(), &["--commit-delay", "manual", "--allow-delete"]);
    fs::remove_dir(m.path("fixture/all/solo")).unwrap();
    let (code, _) = common::http_get(reg.addr(), "/v2/fixture/all/manifests/solo").unwrap();
    assert_eq!(code, 404, "solo still there");
    let err = fs::remove_dir(m.path("fixture/all/latest")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(16), "EBUSY: twin shares it: {err}");
    assert_eq!(tag_digest(&reg, TAG), base);
    assert_eq!(tag_digest(&reg, "fixture/all:twin"), base);
    // A tag made with mkdir and never written just goes.
    fs::create_dir(m.path("fixture/all/scratch")).unwrap();
    fs::remove_dir(m.path("fixture/all/scratch")).unwrap();
    assert!(!exists(&m.path("fixture/all/scratch")));
}

/// By-digest images and the namespace files refuse writes with EROFS, and
/// writes through the tag do not show through the digest.
#[test]
fn digest_dirs_and_namespace_stay_read_only() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let m = Mount::start(reg.addr(), MANUAL);
    let by_digest = m.path(&format!("{REPO}/{base}/rootfs"));
    assert_eq!(read(&by_digest.join("small.txt")), b"hello ggfs\n");
    let p = |rel: &str| by_digest.join(rel);
    assert_erofs("create in sha256:…/rootfs", {
        let f = p("x");
        move || fs::write(f, b"x")
    });
    assert_erofs("mkdir in sha256:…/rootfs", {
        let f = p("newdir");
        move || fs::create_dir(f)
    });
    assert_erofs("unlink in sha256:…/rootfs", {
        let f = p("small.txt");
        move || fs::remove_file(f)
    });
    assert_erofs("chmod in sha256:…/rootfs", {
        let f = p("small.txt");
        move || fs::set_permissions(f, fs::Permissions::from_mode(0o600))
    });
    assert_erofs("open for writing in sha256:…/rootfs", {
        let f = p("small.txt");
        move || fs::OpenOptions::new().write(true).open(f)
    });
    assert_erofs("rename in sha256:…/rootfs", {
        let (a, b) = (p("small.txt"), p("renamed"));
        move || fs::rename(a, b)
    });
    // The digest's own files never change; a tag's digest file neither
    // (its manifest.json and config.json take writes: see
    // manifest_and_config_writes_tag_and_edit), and none is deleted.
    for dir in [format!("{REPO}/{base}"), IMAGE.to_string()] {
        for rel in ["manifest.json", "digest", "config.json"] {
            let f = m.path(&format!("{dir}/{rel}"));
            if dir != IMAGE || rel == "digest" {
                assert_erofs(&format!("write {dir}/{rel}"), {
                    let f = f.clone();
                    move || fs::write(f, b"{}")
                });
            }
            assert_erofs(&format!("unlink {dir}/{rel}"), move || fs::remove_file(f));
        }
    }
    assert_erofs("create beside rootfs", {
        let f = m.path(&format!("{IMAGE}/new"));
        move || fs::write(f, b"x")
    });

    // The tag's rootfs is writable; the digest's view does not change.
    write_file(&m.path(&format!("{ROOTFS}/x")), b"through the tag\n");
    write_file(&m.path(&format!("{ROOTFS}/small.txt")), b"changed\n");
    assert_eq!(read(&m.path(&format!("{ROOTFS}/x"))), b"through the tag\n");
    assert_eq!(read(&m.path(&format!("{ROOTFS}/small.txt"))), b"changed\n");
    assert!(!exists(&by_digest.join("x")));
    assert_eq!(read(&by_digest.join("small.txt")), b"hello ggfs\n");
    // Manual: nothing is committed, not even at unmount.
    m.unmount_within(60).unwrap();
    assert_eq!(tag_digest(&reg, TAG), base);
}

/// Committing an untouched (only read) image pushes nothing at all.
#[test]
fn commit_with_no_changes_pushes_nothing() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let m = Mount::start(reg.addr(), MANUAL);
    assert_eq!(
        read(&m.path(&format!("{ROOTFS}/small.txt"))),
        b"hello ggfs\n"
    );
    let rt = m.path(ROOTFS);
    within(300, "reading the mount", move || {
        tree::snapshot(&rt, Mtimes::All)
    });
    let stored = storage_files(&reg);

    let out = commit(&m, IMAGE, &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no changes"),
        "{}",
        describe(&out)
    );
    assert_eq!(tag_digest(&reg, TAG), base);
    assert_eq!(
        storage_files(&reg),
        stored,
        "the registry's storage changed"
    );
    // "One line per image with changes": none of the states of a changed
    // image (a line with some other word, say for a clean image, is allowed).
    let st = status(&m);
    let s = state(&st, TAG);
    assert!(
        !matches!(
            s.as_deref(),
            Some("pending" | "pushed" | "conflict" | "failed")
        ),
        "ggfs status:\n{st}"
    );
}

/// kill -9 of the daemon loses nothing that was acknowledged: the next mount
/// of the same cache dir (same mount point) shows the changes and commits them.
#[test]
fn killed_daemon_keeps_acknowledged_writes() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let work = common::tempdir();
    let cache = work.path().join("cache");
    let data = common::pseudo_random(300_000, 4);
    let local = work.path().join("new.bin");
    fs::write(&local, &data).unwrap();

    let m = Mount::start_with_cache(reg.addr(), MANUAL, Some(&cache));
    let root = m.path(ROOTFS);
    tool(
        &root,
        &[
            "dd",
            &format!("if={}", local.display()),
            "of=synced.bin",
            "bs=64k",
            "conv=fsync",
            "status=none",
        ],
    );
    // Written and closed, never fsynced.
    tool(
        &root,
        &["sh", "-c", "printf 'not synced\\n' > unsynced.txt"],
    );
    tool(&root, &["mkdir", "newdir"]);
    tool(&root, &["rm", "small.txt"]);
    m.kill9();

    let m2 = Mount::start_at(reg.addr(), MANUAL, m.mp(), Some(&cache));
    let check = |root: &Path| {
        assert_eq!(
            common::sha256_digest(&read(&root.join("synced.bin"))),
            common::sha256_digest(&data)
        );
        assert_eq!(read(&root.join("unsynced.txt")), b"not synced\n");
        assert!(is_dir(&root.join("newdir")));
        assert!(!exists(&root.join("small.txt")));
        assert_eq!(read(&root.join("etc/hostname")), b"fixture\n");
    };
    check(&m2.path(ROOTFS));
    let new = committed(&commit(&m2, IMAGE, &[]), &reg, REPO);
    assert_ne!(new, base);
    assert_eq!(tag_digest(&reg, TAG), new);
    let fresh = Mount::start(reg.addr(), MANUAL);
    check(&fresh.path(ROOTFS));
}

/// A commit while the registry is down stays pending and is pushed, whole,
/// by the next `ggfs commit` once it is back.
#[test]
fn registry_down_leaves_commit_pending() {
    let mut reg = Distribution::start();
    let base = push_fixture(&reg);
    let data = common::pseudo_random(200_000, 5);
    let m = Mount::start(reg.addr(), MANUAL);
    write_file(&m.path(&format!("{ROOTFS}/new.bin")), &data);

    reg.kill();
    let out = commit(&m, IMAGE, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("pending"), "{}", describe(&out));
    let st = status(&m);
    assert_eq!(
        state(&st, TAG),
        Some("pending".into()),
        "ggfs status:\n{st}"
    );
    let file = read_string(&m.path(".ggfs/status"));
    assert_eq!(
        state(&file, TAG),
        Some("pending".into()),
        ".ggfs/status:\n{file}"
    );

    reg.restart();
    assert_eq!(tag_digest(&reg, TAG), base);
    let new = committed(&commit(&m, IMAGE, &[]), &reg, REPO);
    assert_ne!(new, base);
    assert_eq!(tag_digest(&reg, TAG), new);
    let st = status(&m);
    let line = status_line(&st, TAG).unwrap_or_else(|| panic!("ggfs status:\n{st}"));
    assert!(line.starts_with("pushed ") && line.contains(&new), "{line}");
    // The new layer's blob is in the registry, intact.
    let man = manifest(&reg, REPO, &new);
    let layer = json_array(&man["layers"]).last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, blob) = common::http_get(reg.addr(), &format!("/v2/{REPO}/blobs/{layer}")).unwrap();
    assert_eq!(code, 200, "GET blob {layer}");
    assert_eq!(common::sha256_digest(&blob), layer);
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(
        common::sha256_digest(&read(&fresh.path(&format!("{ROOTFS}/new.bin")))),
        common::sha256_digest(&data)
    );
}

/// Automatic commits retry: with the registry down the commit stays
/// pending (the status says why), and once it is back the same mount pushes
/// it by itself, backing off in between.
#[test]
fn automatic_commit_retries_until_the_registry_is_back() {
    let mut reg = Distribution::start();
    let base = push_fixture(&reg);
    let m = Mount::start(reg.addr(), &["--commit-delay", "0.5"]);
    assert_eq!(
        read(&m.path(&format!("{ROOTFS}/small.txt"))),
        b"hello ggfs\n"
    );
    reg.kill();
    write_file(&m.path(&format!("{ROOTFS}/later.txt")), b"later\n");
    let line = poll(60, "a failed automatic commit", || {
        let st = status(&m);
        status_line(&st, TAG)
            .filter(|l| l.starts_with("pending ") && l.contains("error"))
            .map(str::to_string)
    });
    assert!(
        line.contains(reg.addr()),
        "the error names the registry: {line}"
    );
    reg.restart();
    let new = poll(120, "the retried commit", || {
        Some(tag_digest(&reg, TAG)).filter(|d| *d != base)
    });
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(
        read(&fresh.path(&format!("{ROOTFS}/later.txt"))),
        b"later\n"
    );
    assert!(
        status_line(&status(&m), TAG).is_some_and(|l| l.starts_with("pushed ") && l.contains(&new))
    );
}

/// A commit that failed with the registry down is pushed by the next mount
/// of the same cache dir, without another `ggfs commit`.
#[test]
fn pending_commit_is_pushed_by_the_next_mount() {
    let mut reg = Distribution::start();
    let base = push_fixture(&reg);
    let cache = common::tempdir();
    {
        let m = Mount::start_with_cache(reg.addr(), MANUAL, Some(cache.path()));
        write_file(&m.path(&format!("{ROOTFS}/later.txt")), b"pushed later\n");
        reg.kill();
        let out = commit(&m, IMAGE, &[]);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(stderr(&out).contains("pending"), "{}", describe(&out));
        m.unmount_within(120).unwrap();
    }
    reg.restart();
    assert_eq!(tag_digest(&reg, TAG), base);
    // Default options: the pending commit goes out without being asked for.
    let m = Mount::start_with_cache(reg.addr(), &[], Some(cache.path()));
    let new = poll(60, "the pending commit to be pushed", || {
        let d = tag_digest(&reg, TAG);
        (d != base).then_some(d)
    });
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(
        read(&fresh.path(&format!("{ROOTFS}/later.txt"))),
        b"pushed later\n"
    );
    assert_eq!(
        read_string(&fresh.path(&format!("{IMAGE}/digest"))).trim(),
        new
    );
    drop(m);
}

/// With `manual`, a clean unmount keeps the changes pending in the cache dir:
/// the next mount of it shows them, and `ggfs commit` there pushes them.
#[test]
fn manual_changes_stay_pending_across_unmount() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let cache = common::tempdir();
    {
        let m = Mount::start_with_cache(reg.addr(), MANUAL, Some(cache.path()));
        write_file(&m.path(&format!("{ROOTFS}/kept.txt")), b"kept\n");
        tool(&m.path(ROOTFS), &["rm", "-r", "deep"]);
        m.unmount_within(60).unwrap();
    }
    assert_eq!(tag_digest(&reg, TAG), base);
    let m = Mount::start_with_cache(reg.addr(), MANUAL, Some(cache.path()));
    assert_eq!(read(&m.path(&format!("{ROOTFS}/kept.txt"))), b"kept\n");
    assert!(!exists(&m.path(&format!("{ROOTFS}/deep"))));
    // Changes not yet committed: `pending` is the one state that fits.
    let st = status(&m);
    assert_eq!(
        state(&st, TAG),
        Some("pending".into()),
        "ggfs status:\n{st}"
    );
    let new = committed(&commit(&m, IMAGE, &[]), &reg, REPO);
    assert_eq!(tag_digest(&reg, TAG), new);
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(read(&fresh.path(&format!("{ROOTFS}/kept.txt"))), b"kept\n");
    assert!(!exists(&fresh.path(&format!("{ROOTFS}/deep"))));
}

/// Someone else pushed to the tag since the mount read it: the commit is
/// pushed by digest only and the tag is left alone; `--tag` pushes it to
/// another tag.
#[test]
fn tag_moved_underneath_is_a_conflict() {
    let reg = Distribution::start();
    let (base, base_layers, m, outsider) = moved_underneath(&reg);

    let out = commit(&m, IMAGE, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("conflict"), "{}", describe(&out));
    assert_eq!(tag_digest(&reg, TAG), outsider, "the tag was moved");
    // The pushed digest is on stderr (besides maybe the base's and the
    // outsider's), pullable, and is the base plus one layer.
    let pushed: Vec<String> = digests_in(&err)
        .into_iter()
        .filter(|d| *d != base && *d != outsider)
        .collect();
    assert!(!pushed.is_empty(), "no pushed digest: {}", describe(&out));
    assert!(
        pushed
            .iter()
            .any(|d| is_base_plus_one(&manifest(&reg, REPO, d), &base_layers)),
        "none of {pushed:?} is the base plus one layer"
    );
    let st = status(&m);
    assert_eq!(
        state(&st, TAG),
        Some("conflict".into()),
        "ggfs status:\n{st}"
    );

    let out = commit(&m, IMAGE, &["--tag", "other"]);
    let other = committed(&out, &reg, REPO);
    assert_eq!(tag_digest(&reg, "fixture/all:other"), other);
    assert!(is_base_plus_one(
        &manifest(&reg, REPO, &other),
        &base_layers
    ));
    assert_eq!(tag_digest(&reg, TAG), outsider);
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(
        read(&fresh.path("fixture/all/other/rootfs/mine.txt")),
        b"mine\n"
    );
    assert_eq!(
        read(&fresh.path(&format!("{ROOTFS}/base/keep.txt"))),
        b"v3\n"
    );
    assert!(!exists(&fresh.path(&format!("{ROOTFS}/mine.txt"))));
}

/// `--force` moves a tag that moved underneath, to the base plus our layer.
#[test]
fn force_moves_a_tag_that_moved_underneath() {
    let reg = Distribution::start();
    let (_, base_layers, m, outsider) = moved_underneath(&reg);

    let new = committed(&commit(&m, IMAGE, &["--force"]), &reg, REPO);
    assert_ne!(new, outsider);
    assert_eq!(tag_digest(&reg, TAG), new);
    assert!(is_base_plus_one(&manifest(&reg, REPO, &new), &base_layers));
    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(read(&fresh.path(&format!("{ROOTFS}/mine.txt"))), b"mine\n");
    assert_eq!(
        read(&fresh.path(&format!("{ROOTFS}/small.txt"))),
        b"hello ggfs\n"
    );
}

/// `--commit-delay 1`: an idle image is committed on its own, and what is
/// written just before the unmount is committed by the unmount.
#[test]
fn auto_commit_after_delay_and_at_unmount() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let m = Mount::start(reg.addr(), &["--commit-delay", "1"]);
    write_file(&m.path(&format!("{ROOTFS}/a.txt")), b"first\n");
    let first = poll(60, "the automatic commit", || {
        let d = tag_digest(&reg, TAG);
        (d != base).then_some(d)
    });
    write_file(&m.path(&format!("{ROOTFS}/b.txt")), b"second\n");
    m.unmount_within(120)
        .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", m.log()));
    let second = tag_digest(&reg, TAG);
    assert_ne!(second, first, "the unmount did not commit b.txt");
    assert_ne!(second, base);

    let fresh = Mount::start(reg.addr(), MANUAL);
    assert_eq!(read(&fresh.path(&format!("{ROOTFS}/a.txt"))), b"first\n");
    assert_eq!(read(&fresh.path(&format!("{ROOTFS}/b.txt"))), b"second\n");
    let first_root = fresh.path(&format!("{REPO}/{first}/rootfs"));
    assert_eq!(read(&first_root.join("a.txt")), b"first\n");
    assert!(!exists(&first_root.join("b.txt")));
}

/// One byte overwritten in the middle of a 5 MiB lower file that was never
/// read: the committed (zstd) layer holds the whole file with that byte
/// changed, metadata kept.
#[test]
fn large_lower_file_overwrite() {
    let reg = Distribution::start();
    let base = push_fixture(&reg);
    let fixture = common::fixture_rootfs().join("data/big-5m");
    let orig_md = fs::metadata(&fixture).unwrap();
    let mut want = fs::read(&fixture).unwrap();
    assert!(want.len() >= 4 << 20);
    let at = want.len() / 2 + 1;
    want[at] ^= 0xff;
    let work = common::tempdir();
    let byte = work.path().join("byte");
    fs::write(&byte, [want[at]]).unwrap();

    let m = Mount::start(reg.addr(), MANUAL);
    tool(
        &m.path(ROOTFS),
        &[
            "dd",
            &format!("if={}", byte.display()),
            "of=data/big-5m",
            "bs=1",
            &format!("seek={at}"),
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
    );
    let want_digest = common::sha256_digest(&want);
    let big = format!("{ROOTFS}/data/big-5m");
    assert_eq!(common::sha256_digest(&read(&m.path(&big))), want_digest);

    let new = committed(&commit(&m, IMAGE, &["--layer-format", "zstd"]), &reg, REPO);
    assert_ne!(new, base);
    let man = manifest(&reg, REPO, &new);
    let top = json_array(&man["layers"]).last().unwrap()["mediaType"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(top.contains("zstd"), "--layer-format zstd gave {top}");

    let fresh = Mount::start(reg.addr(), MANUAL);
    let got = fresh.path(&big);
    assert_eq!(common::sha256_digest(&read(&got)), want_digest);
    let md = fs::metadata(&got).unwrap();
    assert_eq!(md.len(), orig_md.len());
    assert_eq!(
        (md.mode(), md.uid(), md.gid()),
        (orig_md.mode(), orig_md.uid(), orig_md.gid())
    );
    assert_eq!(
        common::sha256_digest(&read(&fresh.path(&format!("{ROOTFS}/data/random-1m")))),
        common::sha256_digest(&fs::read(common::fixture_rootfs().join("data/random-1m")).unwrap())
    );
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Pushes the every-file-type fixture as `fixture/all:latest`; its digest.
fn push_fixture(reg: &Distribution) -> String {
    let dir = common::tempdir();
    let layout = dir.path().join("layout");
    common::umoci_image(&layout, "latest");
    common::push_oci_layout(&layout, "latest", &reg.reference(TAG));
    tag_digest(reg, TAG)
}

/// The fixture pushed, a change made through a mount, then another image
/// pushed to the tag from outside: (base, base layers, mount, outsider).
fn moved_underneath(reg: &Distribution) -> (String, Vec<serde_json::Value>, Mount, String) {
    let base = push_fixture(reg);
    let base_layers = json_array(&manifest(reg, REPO, &base)["layers"]).clone();
    let m = Mount::start(reg.addr(), MANUAL);
    write_file(&m.path(&format!("{ROOTFS}/mine.txt")), b"mine\n");
    let outsider = push_outsider(reg);
    (base, base_layers, m, outsider)
}

/// Pushes a different image (the multi-layer one) to `fixture/all:latest`
/// from outside the mount; its digest.
fn push_outsider(reg: &Distribution) -> String {
    let layout = common::multilayer_image();
    common::push_oci_layout(layout, common::MULTILAYER_TAG, &reg.reference(TAG));
    tag_digest(reg, TAG)
}

/// A local tree for `cp -a`: files, a subdir with an empty dir, a symlink,
/// a hardlink pair, another owner and modes, all with mtime 2022-04-15.
fn local_tree(dir: &Path) -> PathBuf {
    use std::os::unix::fs::{chown, lchown, symlink};
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub/empty-dir")).unwrap();
    fs::write(src.join("f1.txt"), b"first\n").unwrap();
    fs::write(
        src.join("sub/f2.bin"),
        common::pseudo_random(65_536 + 123, 7),
    )
    .unwrap();
    fs::set_permissions(src.join("sub/f2.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
    chown(src.join("sub/f2.bin"), Some(1000), Some(1000)).unwrap();
    symlink("../f1.txt", src.join("sub/link")).unwrap();
    lchown(src.join("sub/link"), Some(1000), Some(1000)).unwrap();
    fs::write(src.join("hl1"), b"two names, one inode\n").unwrap();
    fs::hard_link(src.join("hl1"), src.join("hl2")).unwrap();
    common::run(Command::new("find").arg(&src).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        "@1650000000",
        "{}",
        "+",
    ]));
    src
}

/// `skopeo copy` of `repo@digest` into an OCI layout under `dir`, then
/// `umoci unpack` of it: (layout, rootfs).
fn pull_and_unpack(reg: &Distribution, repo: &str, digest: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let layout = dir.join("pulled");
    common::skopeo_copy(
        &format!("docker://{}@{digest}", reg.reference(repo)),
        &format!("oci:{}:new", layout.display()),
    );
    let rootfs = common::umoci_unpack(&layout, "new", &dir.join("unpacked"));
    (layout, rootfs)
}

/// `ggfs commit <m>/<image> EXTRA...`.
fn commit(m: &Mount, image: &str, extra: &[&str]) -> Output {
    let mut args: Vec<OsString> = vec!["commit".into(), m.path(image).into()];
    args.extend(extra.iter().map(OsString::from));
    ggfs(&args)
}

/// Asserts `ggfs commit` succeeded and printed `<registry>/<repo>@<digest>`
/// as its last line; the digest.
fn committed(out: &Output, reg: &Distribution, repo: &str) -> String {
    assert!(
        out.status.success(),
        "ggfs commit failed: {}",
        describe(out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("").trim();
    let (name, digest) = last
        .rsplit_once('@')
        .unwrap_or_else(|| panic!("last line is not a reference: {}", describe(out)));
    assert_eq!(name, reg.reference(repo), "{}", describe(out));
    assert!(
        digest.len() == 71 && digests_in(digest) == [digest],
        "not a digest: {}",
        describe(out)
    );
    digest.to_string()
}

/// `ggfs status MNT`'s stdout (it must succeed).
fn status(m: &Mount) -> String {
    let out = ggfs(&[OsStr::new("status"), m.mp().as_os_str()]);
    assert!(out.status.success(), "ggfs status: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The line of a status text about `image` (`repo:tag`).
fn status_line<'a>(text: &'a str, image: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(image))
}

/// The state a status text gives `image`, if it lists it.
fn state(text: &str, image: &str) -> Option<String> {
    status_line(text, image).and_then(|l| l.split_whitespace().next().map(str::to_string))
}

/// Runs `ggfs ARGS` (limit 5 min).
fn ggfs<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let what = format!("ggfs {args:?}");
    within(300, &what, move || {
        Command::new(common::ggfs_bin())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn ggfs")
    })
}

/// Runs `argv` in `dir` (a shell tool in the mount), which must succeed
/// within 2 min.
fn tool(dir: &Path, argv: &[&str]) {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).current_dir(dir).stdin(Stdio::null());
    within(120, &argv.join(" "), move || {
        common::output(&mut cmd);
    });
}

/// The sha256 of `repo:tag`'s manifest as the registry serves it.
fn tag_digest(reg: &Distribution, repo_tag: &str) -> String {
    let image = format!("docker://{}", reg.reference(repo_tag));
    within(120, "skopeo inspect", move || {
        common::sha256_digest(common::skopeo_raw(&image).as_bytes())
    })
}

/// The manifest `repo@digest`, parsed.
fn manifest(reg: &Distribution, repo: &str, digest: &str) -> serde_json::Value {
    common::skopeo_inspect_raw(&format!("docker://{}@{digest}", reg.reference(repo)))
}

/// The config blob of `repo@digest`, parsed.
fn config(reg: &Distribution, repo: &str, digest: &str) -> serde_json::Value {
    let raw = common::run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--config",
        "--tls-verify=false",
        &format!("docker://{}@{digest}", reg.reference(repo)),
    ]));
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("config of {digest}: {e}: {raw}"))
}

/// Whether `manifest`'s layers are `base` plus exactly one.
fn is_base_plus_one(manifest: &serde_json::Value, base: &[serde_json::Value]) -> bool {
    let layers = json_array(&manifest["layers"]);
    layers.len() == base.len() + 1 && layers[..base.len()] == *base
}

fn json_array(v: &serde_json::Value) -> &Vec<serde_json::Value> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}"))
}

/// The DiffID (sha256 of the uncompressed tar) of the layer `desc` of the
/// OCI layout `layout`, checking the blob's digest on the way.
fn layer_diff_id(layout: &Path, desc: &serde_json::Value) -> String {
    let digest = desc["digest"].as_str().unwrap();
    let blob = fs::read(layout.join("blobs/sha256").join(&digest["sha256:".len()..])).unwrap();
    assert_eq!(common::sha256_digest(&blob), digest);
    let media_type = desc["mediaType"].as_str().unwrap_or_default();
    let tar = if media_type.ends_with("gzip") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else if media_type.ends_with("zstd") {
        zstd::stream::decode_all(&blob[..]).unwrap()
    } else {
        blob
    };
    common::sha256_digest(&tar)
}

/// Every `sha256:<64 hex>` in `text`, in order.
fn digests_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("sha256:") {
        let hex: String = rest[i + 7..].chars().take(64).collect();
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            out.push(format!("sha256:{hex}"));
        }
        rest = &rest[i + 7..];
    }
    out
}

/// Every file below the registry's storage (to see that nothing was pushed).
fn storage_files(reg: &Distribution) -> Vec<PathBuf> {
    let out = common::run(Command::new("find").arg(reg.storage()).args(["-type", "f"]));
    let mut v: Vec<PathBuf> = out.lines().map(PathBuf::from).collect();
    v.sort();
    v
}

/// Asserts the `names` below `root` are one inode with `nlink` links.
fn assert_hardlinked(root: &Path, names: &[&str], nlink: u64) {
    let paths: Vec<PathBuf> = names.iter().map(|n| root.join(n)).collect();
    let mds = within(60, "stat", move || {
        paths
            .iter()
            .map(|p| fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .collect::<Vec<_>>()
    });
    for (name, md) in names.iter().zip(&mds) {
        assert_eq!(
            md.ino(),
            mds[0].ino(),
            "{name} and {} differ in inode",
            names[0]
        );
        assert_eq!(md.nlink(), nlink, "{name}: link count");
    }
}

/// A snapshot of the tree below `root`, every mtime included (5 min limit).
fn snap(root: &Path) -> Snapshot {
    let root = root.to_path_buf();
    within(300, "snapshot", move || tree::snapshot(&root, Mtimes::All))
}

/// Asserts `f` fails with EROFS.
fn assert_erofs<T: std::fmt::Debug + Send + 'static>(
    what: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) {
    match within(60, what, f) {
        Ok(v) => panic!("{what}: succeeded ({v:?}), want EROFS"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(30), "{what}: want EROFS, got {e}"),
    }
}

/// Polls `f` every 250 ms until it gives a value, failing after `secs`.
fn poll<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "no {what} within {secs}s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn write_file(p: &Path, data: &[u8]) {
    let (p, data) = (p.to_path_buf(), data.to_vec());
    within(60, "write", move || {
        fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()))
    })
}

fn read(p: &Path) -> Vec<u8> {
    let p = p.to_path_buf();
    within(60, "read", move || {
        fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    })
}

fn read_string(p: &Path) -> String {
    String::from_utf8(read(p)).unwrap()
}

fn exists(p: &Path) -> bool {
    let p = p.to_path_buf();
    within(60, "stat", move || fs::symlink_metadata(p).is_ok())
}

fn is_dir(p: &Path) -> bool {
    let p = p.to_path_buf();
    within(60, "stat", move || {
        fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit status, stdout and stderr, for failure messages.
fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Write `data` to `p` and close it, with close's own error: a tag's
/// manifest.json and config.json are pushed, or refused, at close
/// (`fs::write` drops the file, which ignores that).
fn write_closed(p: impl AsRef<Path>, data: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::fd::IntoRawFd;
    let (p, data) = (p.as_ref().to_path_buf(), data.as_ref().to_vec());
    within(120, "write and close", move || {
        let mut f = fs::File::create(&p)?;
        f.write_all(&data)?;
        // SAFETY: we own the descriptor and close it once.
        if unsafe { libc::close(f.into_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
}
