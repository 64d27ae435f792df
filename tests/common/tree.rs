//! Compare two directory trees the way the tests mean "identical files":
//! paths, types, permission bits, owners, sizes, content digests, link
//! targets, device numbers, xattrs, hardlink groups, and optionally mtimes.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What is compared of one entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Set only when mtimes are compared.
    pub mtime: Option<(i64, i64)>,
    pub rdev: u64,
    pub link: Option<PathBuf>,
    pub content: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

pub struct Snapshot {
    pub nodes: BTreeMap<PathBuf, Node>,
    /// Names sharing an inode, each group sorted.
    pub hardlinks: Vec<Vec<PathBuf>>,
}

pub fn kind(ft: std::fs::FileType) -> &'static str {
    match () {
        _ if ft.is_dir() => "dir",
        _ if ft.is_file() => "file",
        _ if ft.is_symlink() => "symlink",
        _ if ft.is_char_device() => "char",
        _ if ft.is_block_device() => "block",
        _ if ft.is_fifo() => "fifo",
        _ => "other",
    }
}

/// Every entry below `root` (not `root` itself), by relative path.
/// Which mtimes a comparison looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mtimes {
    Ignore,
    /// All but directories': after whiteouts, extractors disagree on those.
    NonDirs,
    All,
}

pub fn snapshot(root: &Path, mtimes: Mtimes) -> Snapshot {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack: Vec<PathBuf> = children(root, Path::new(""));
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let k = kind(md.file_type());
        if k == "dir" {
            stack.extend(children(root, &rel));
        } else {
            inodes.entry(md.ino()).or_default().push(rel.clone());
        }
        let content = (k == "file").then(|| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            super::sha256_digest(&bytes)
        });
        let node = Node {
            kind: k,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: if k == "file" || k == "symlink" {
                md.size()
            } else {
                0
            },
            mtime: match (mtimes, k) {
                (Mtimes::All, _) => Some((md.mtime(), md.mtime_nsec())),
                (Mtimes::NonDirs, k) if k != "dir" => Some((md.mtime(), md.mtime_nsec())),
                _ => None,
            },
            rdev: md.rdev(),
            link: (k == "symlink").then(|| std::fs::read_link(&p).unwrap()),
            content,
            xattrs: xattrs(&p),
        };
        nodes.insert(rel, node);
    }
    let mut hardlinks: Vec<Vec<PathBuf>> = inodes.into_values().filter(|g| g.len() > 1).collect();
    hardlinks.iter_mut().for_each(|g| g.sort());
    hardlinks.sort();
    Snapshot { nodes, hardlinks }
}

fn children(root: &Path, rel: &Path) -> Vec<PathBuf> {
    let dir = root.join(rel);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| rel.join(e.unwrap().file_name()))
        .collect()
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(names) = xattr::list(p) else {
        return BTreeMap::new();
    };
    names
        .filter_map(|n| Some((n.to_str()?.to_string(), xattr::get(p, &n).ok()??)))
        .collect()
}

/// Panics with the first differences when `got` and `want` are not the same tree.
/// `with_mtime` compares the mtimes of everything but directories.
pub fn assert_same_tree(got: &Path, want: &Path, with_mtime: bool) {
    let mtimes = if with_mtime {
        Mtimes::NonDirs
    } else {
        Mtimes::Ignore
    };
    assert_same(got, want, mtimes);
}

pub fn assert_same(got: &Path, want: &Path, mtimes: Mtimes) {
    let (g, w) = (snapshot(got, mtimes), snapshot(want, mtimes));
    assert_same_snapshot(
        &g,
        &got.display().to_string(),
        &w,
        &want.display().to_string(),
    );
}

/// [`assert_same`] of two snapshots taken with the same [`Mtimes`], e.g. one
/// of a tree as it was before it changed; the names are for the messages.
pub fn assert_same_snapshot(g: &Snapshot, got: &str, w: &Snapshot, want: &str) {
    let only_in = |a: &Snapshot, b: &Snapshot| -> Vec<PathBuf> {
        let absent = |k: &&PathBuf| !b.nodes.contains_key(*k);
        a.nodes.keys().filter(absent).cloned().collect()
    };
    let (missing, extra) = (only_in(w, g), only_in(g, w));
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{got} vs {want}: missing {missing:?}, unexpected {extra:?}"
    );
    for (path, want_node) in &w.nodes {
        assert_eq!(&g.nodes[path], want_node, "{} differs", path.display());
    }
    assert_eq!(g.hardlinks, w.hardlinks, "hardlink groups differ");
    assert!(!w.nodes.is_empty(), "{want} is empty: nothing was compared");
}
