//! Layers crafted to attack, pushed to the real distribution registry: the
//! mount and `ggfs export` never put anything outside the image, never
//! panic, and say what they dropped; a truncated layer is an EIO naming
//! it, not wrong bytes.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::mount::{within, Mount};
use common::{ggfs, ggfs_fails, run, Distribution};

/// A tar of hostile entries, written by Python's tarfile (which writes
/// whatever names it is given).
const CRAFT: &str = r#"
import io, sys, tarfile
t = tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT)
def add(name, data=b"", kind=tarfile.REGTYPE, link=""):
    i = tarfile.TarInfo(name)
    i.type, i.linkname, i.mode, i.mtime = kind, link, 0o644, 1700000000
    i.size = len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
add("etc", kind=tarfile.DIRTYPE)
add("etc/passwd", b"image passwd\n")
add("../escape", b"escaped\n")
add("a/../../escape2", b"escaped\n")
add("/abs/file", b"absolute\n")
add("link", kind=tarfile.SYMTYPE, link="/etc")
add("link/passwd", b"beneath the link\n")
add("hl", kind=tarfile.LNKTYPE, link="../../etc/shadow")
add("dup", b"first\n")
add("dup", b"second\n")
add("bad-\udcff-utf8", b"bytes\n")
add("/".join(["d" * 200] * 20) + "/deep", b"deep\n")
add("n" * 300, b"name too long for Linux\n")
t.close()
"#;

fn craft(path: &Path) {
    run(Command::new("python3").arg("-c").arg(CRAFT).arg(path));
}

fn read(p: &Path) -> std::io::Result<Vec<u8>> {
    let p = p.to_path_buf();
    within(60, "read", move || std::fs::read(&p))
}

#[test]
fn crafted_layer_stays_inside_the_image() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let tar = w.join("hostile.tar");
    craft(&tar);
    let image = reg.reference("hostile/img:t");
    ggfs(&["append", "-f", tar.to_str().unwrap(), "-t", &image]);

    let m = Mount::start(reg.addr(), &[]);
    let rootfs = m.path("hostile/img/t/rootfs");
    let names: Vec<Vec<u8>> = within(60, "readdir", {
        let r = rootfs.clone();
        move || {
            std::fs::read_dir(&r)
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect()
        }
    });
    let mut names = names;
    names.sort();
    let want: Vec<&[u8]> = vec![
        b"abs",
        b"bad-\xff-utf8",
        &[b'd'; 200],
        b"dup",
        b"etc",
        b"link",
    ];
    // The 300-byte name cannot be looked up on Linux; it may be listed or
    // dropped, but nothing else may appear.
    let listed: Vec<&[u8]> = names
        .iter()
        .map(Vec::as_slice)
        .filter(|n| *n != [b'n'; 300].as_slice())
        .collect();
    assert_eq!(
        listed,
        want,
        "{:?}",
        names
            .iter()
            .map(|n| String::from_utf8_lossy(n))
            .collect::<Vec<_>>()
    );
    assert_eq!(read(&rootfs.join("etc/passwd")).unwrap(), b"image passwd\n");
    assert_eq!(read(&rootfs.join("abs/file")).unwrap(), b"absolute\n");
    assert_eq!(read(&rootfs.join("dup")).unwrap(), b"second\n");
    let bad = rootfs.join(std::ffi::OsStr::from_bytes(b"bad-\xff-utf8"));
    assert_eq!(read(&bad).unwrap(), b"bytes\n");
    let deep = rootfs
        .join(vec!["d".repeat(200); 20].join("/"))
        .join("deep");
    assert_eq!(read(&deep).unwrap(), b"deep\n");
    // `link` is the image's symlink, nothing was put beneath it.
    let target = std::fs::read_link(rootfs.join("link")).unwrap();
    assert_eq!(target, Path::new("/etc"));
    assert!(!w.join("escape").exists() && !m.mp().join("escape").exists());
    let log = m.log();
    assert!(log.contains("link/passwd"), "the drop is not logged: {log}");
    drop(m);

    // export: the same tree; extracted by GNU tar inside a sandbox nothing
    // lands outside it.
    let out = w.join("export.tar");
    ggfs(&["export", &image, out.to_str().unwrap()]);
    let listing = run(Command::new("tar").arg("-tf").arg(&out));
    for name in listing.lines() {
        assert!(
            !name.starts_with('/') && !name.split('/').any(|c| c == ".."),
            "{name}"
        );
        assert!(
            !name.starts_with("link/"),
            "member beneath the symlink: {name}"
        );
        assert_ne!(name, "hl", "a hardlink out of the image was kept");
    }
    let sandbox = w.join("sandbox/root");
    std::fs::create_dir_all(&sandbox).unwrap();
    let _ = Command::new("tar")
        .arg("-xf")
        .arg(&out)
        .arg("-C")
        .arg(&sandbox)
        .status()
        .unwrap();
    let outside: Vec<_> = std::fs::read_dir(w.join("sandbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["root"]);
    assert_eq!(
        std::fs::read(sandbox.join("etc/passwd")).unwrap(),
        b"image passwd\n"
    );
}

/// A layer cut short (its blob's digest is of the cut bytes, so the
/// registry takes it): validate and export fail naming the layer, the
/// mount answers EIO for what is missing, serves what is there, and lives.
#[test]
fn truncated_layer_is_an_error_naming_it() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let tree = w.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("a-first"), b"whole\n").unwrap();
    std::fs::write(tree.join("z-last"), common::pseudo_random(4 << 20, 7)).unwrap();
    let layout = w.join("layout");
    let full = format!("oci:{}:t", layout.display());
    ggfs(&["append", "-f", tree.to_str().unwrap(), "-t", &full]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&mdigest)).unwrap()).unwrap();
    let ldigest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(blob(&ldigest)).unwrap();
    let cut = &bytes[..bytes.len() / 2];
    let cut_digest = common::sha256_digest(cut);
    std::fs::write(blob(&cut_digest), cut).unwrap();
    manifest["layers"][0]["digest"] = cut_digest.clone().into();
    manifest["layers"][0]["size"] = cut.len().into();
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let new_m = common::sha256_digest(&mbytes);
    std::fs::write(blob(&new_m), &mbytes).unwrap();
    let mut index = index;
    index["manifests"][0]["digest"] = new_m.into();
    index["manifests"][0]["size"] = mbytes.len().into();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let image = reg.reference("cut/img:t");
    ggfs(&["copy", &full, &image]);

    let short = &cut_digest["sha256:".len()..][..12];
    let err = ggfs_fails(&["validate", &image]);
    assert!(err.contains(short), "{err}");
    let err = ggfs_fails(&["export", &image, w.join("x.tar").to_str().unwrap()]);
    assert!(err.contains(short), "{err}");

    let m = Mount::start(reg.addr(), &[]);
    let rootfs = m.path("cut/img/t/rootfs");
    let last = read(&rootfs.join("z-last"));
    let e = last.expect_err("a truncated file was served");
    assert_eq!(e.raw_os_error(), Some(5), "{e}");
    assert!(m.pid_alive(), "the daemon died: {}", m.log());
    assert!(
        m.log().contains(short),
        "EIO not logged with the layer: {}",
        m.log()
    );
}
