//! The merged root filesystem of an image: layers applied in order as the OCI
//! image spec describes (`.wh.<name>` deletes a lower entry, `.wh..wh..opq`
//! hides a directory's lower contents), hardlinks sharing one node.

use std::collections::BTreeMap;

/// What a layer says about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
}

/// Metadata of a file as recorded in its layer.
#[derive(Clone, Debug)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    /// Symlink target.
    pub link: Vec<u8>,
    pub rdev: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    pub fn implicit_dir() -> Self {
        Meta {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            link: Vec::new(),
            rdev: 0,
            xattrs: Vec::new(),
        }
    }
}

/// One entry of a layer, in the layer's order.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Relative path without leading `./` or `/`, no trailing `/`; empty for the root.
    pub path: Vec<u8>,
    /// For a hardlink: the path (same form) of the file it links to.
    pub hardlink: Option<Vec<u8>>,
    pub meta: Meta,
}

/// Where a regular file's bytes live: entry `entry` of layer `layer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    pub layer: usize,
    pub entry: usize,
}

pub type NodeId = u32;
pub const ROOT: NodeId = 0;

#[derive(Debug)]
pub struct Node {
    pub meta: Meta,
    pub data: Option<DataRef>,
    pub children: BTreeMap<Box<[u8]>, NodeId>,
    pub parent: NodeId,
    pub nlink: u32,
}

#[derive(Debug)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT: &[u8] = b".wh.";

/// Clean a tar path into the tree's form; `None` for paths that escape the root.
pub fn normalize(path: &[u8]) -> Option<Vec<u8>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join(&b'/'))
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        Tree {
            nodes: vec![Node {
                meta: Meta::implicit_dir(),
                data: None,
                children: BTreeMap::new(),
                parent: ROOT,
                nlink: 2,
            }],
        }
    }

    /// Build the merged tree from layers, bottom first.
    #[cfg(test)]
    pub fn build<'a>(layers: impl IntoIterator<Item = &'a [Entry]>) -> Tree {
        let mut t = Tree::new();
        for (i, entries) in layers.into_iter().enumerate() {
            t.apply(i, entries);
        }
        t.finish();
        t
    }

    /// [`Tree::build`] from layers whose entries are made on demand: each
    /// of `layers` gives an iterator over its entries, asked for twice
    /// (whiteouts first, then the rest), so no layer's entries need to be
    /// held as a whole while the tree is built.
    pub fn build_with<I, E>(layers: impl IntoIterator<Item = impl Fn() -> I>) -> Tree
    where
        I: Iterator<Item = E>,
        E: std::borrow::Borrow<Entry>,
    {
        let mut t = Tree::new();
        for (i, entries) in layers.into_iter().enumerate() {
            t.apply_with(i, entries);
        }
        t.finish();
        t
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.nodes.get(dir as usize)?.children.get(name).copied()
    }

    /// Follow a path from the root (no symlinks).
    pub fn resolve(&self, path: &[u8]) -> Option<NodeId> {
        let mut id = ROOT;
        for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            id = self.child(id, c)?;
        }
        Some(id)
    }

    /// Every path at which node `id` is linked (a hardlinked file has several).
    pub fn paths_of(&self, id: NodeId) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut stack: Vec<(NodeId, Vec<u8>)> = vec![(ROOT, Vec::new())];
        while let Some((dir, path)) = stack.pop() {
            for (name, &c) in &self.nodes[dir as usize].children {
                let p = if path.is_empty() {
                    name.to_vec()
                } else {
                    [&path[..], b"/", name].concat()
                };
                if c == id {
                    out.push(p.clone());
                }
                if self.nodes[c as usize].meta.kind == Kind::Dir && c != dir {
                    stack.push((c, p));
                }
            }
        }
        out
    }

    /// Apply one layer: its whiteouts act on the layers below it only, so
    /// they go first, then its entries in order.
    #[cfg(test)]
    pub fn apply(&mut self, layer: usize, entries: &[Entry]) {
        self.apply_with(layer, || entries.iter());
    }

    /// [`Tree::apply`] over `entries()`, called twice.
    fn apply_with<I, E>(&mut self, layer: usize, entries: impl Fn() -> I)
    where
        I: Iterator<Item = E>,
        E: std::borrow::Borrow<Entry>,
    {
        for e in entries() {
            let e = e.borrow();
            let (parent, base) = split(&e.path);
            let Some(dir) = self.resolve(parent) else {
                continue;
            };
            if base == OPAQUE {
                let gone = std::mem::take(&mut self.nodes[dir as usize].children);
                gone.into_values().for_each(|id| self.unlinked(id));
            } else if let Some(name) = base.strip_prefix(WHITEOUT) {
                if let Some(id) = self.nodes[dir as usize].children.remove(name) {
                    self.unlinked(id);
                }
            }
        }
        let first_new = self.nodes.len() as NodeId;
        for (i, e) in entries().enumerate() {
            let e = e.borrow();
            let (_, base) = split(&e.path);
            if base.starts_with(WHITEOUT) {
                continue;
            }
            let data = DataRef { layer, entry: i };
            self.insert(e, data, first_new);
        }
    }

    /// Add one entry; nodes from `first_new` on were made by this layer.
    fn insert(&mut self, e: &Entry, data: DataRef, first_new: NodeId) {
        // The root keeps its implicit metadata: rootfs/ is answered before
        // any layer is read, and must not change once one is.
        if e.path.is_empty() {
            return;
        }
        let (parent, base) = split(&e.path);
        let Some(dir) = self.make_dirs(parent, first_new) else {
            tracing::warn!(
                "layer entry {} lies beneath a non-directory of the same layer (a symlink?): dropped",
                String::from_utf8_lossy(&e.path)
            );
            return;
        };
        if let Some(target) = &e.hardlink {
            match self.resolve(target) {
                Some(t) if self.nodes[t as usize].meta.kind != Kind::Dir => {
                    self.replace(dir, base, None);
                    self.nodes[t as usize].nlink += 1;
                    self.nodes[dir as usize].children.insert(base.into(), t);
                }
                _ => tracing::warn!(
                    "hardlink {} -> {}: target missing, skipped",
                    String::from_utf8_lossy(&e.path),
                    String::from_utf8_lossy(target)
                ),
            }
            return;
        }
        if e.meta.kind == Kind::Dir {
            if let Some(old) = self.child(dir, base) {
                if self.nodes[old as usize].meta.kind == Kind::Dir {
                    self.nodes[old as usize].meta = e.meta.clone();
                    return;
                }
            }
        }
        let data = (e.meta.kind == Kind::File).then_some(data);
        let id = self.add_node(dir, e.meta.clone(), data);
        self.replace(dir, base, Some(id));
    }

    /// Point `dir/name` at `new` (or remove it), unlinking what was there.
    fn replace(&mut self, dir: NodeId, name: &[u8], new: Option<NodeId>) {
        let children = &mut self.nodes[dir as usize].children;
        let old = match new {
            Some(id) => children.insert(name.into(), id),
            None => children.remove(name),
        };
        if let Some(old) = old {
            self.unlinked(old);
        }
    }

    fn unlinked(&mut self, id: NodeId) {
        let n = &mut self.nodes[id as usize];
        n.nlink = n.nlink.saturating_sub(1);
    }

    fn add_node(&mut self, parent: NodeId, meta: Meta, data: Option<DataRef>) -> NodeId {
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node {
            meta,
            data,
            children: BTreeMap::new(),
            parent,
            nlink: 1,
        });
        id
    }

    /// The directory at `path`, creating missing components and replacing
    /// lower layers' non-directories; `None` when a component is a
    /// non-directory of this layer (nodes from `first_new` on): an entry
    /// beneath a symlink the same layer made is never followed or merged.
    fn make_dirs(&mut self, path: &[u8], first_new: NodeId) -> Option<NodeId> {
        let mut id = ROOT;
        for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            id = match self.child(id, c) {
                Some(n) if self.nodes[n as usize].meta.kind == Kind::Dir => n,
                Some(n) if n >= first_new => return None,
                _ => {
                    let n = self.add_node(id, Meta::implicit_dir(), None);
                    self.replace(id, c, Some(n));
                    n
                }
            };
        }
        Some(id)
    }

    /// Directory link counts: 2 plus one per subdirectory.
    fn finish(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].meta.kind != Kind::Dir {
                continue;
            }
            let subdirs = self.nodes[i]
                .children
                .values()
                .filter(|&&c| self.nodes[c as usize].meta.kind == Kind::Dir)
                .count() as u32;
            self.nodes[i].nlink = 2 + subdirs;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind) -> Entry {
        Entry {
            path: normalize(path.as_bytes()).unwrap(),
            hardlink: None,
            meta: Meta {
                kind,
                ..Meta::implicit_dir()
            },
        }
    }

    fn names(t: &Tree, path: &str) -> Vec<String> {
        let id = t.resolve(path.as_bytes()).unwrap();
        t.node(id)
            .children
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn entries_beneath_a_symlink_of_their_own_layer_are_dropped() {
        let l0 = [e("link", Kind::Symlink), e("link/passwd", Kind::File)];
        let t = Tree::build([&l0[..]]);
        assert_eq!(names(&t, ""), ["link"]);
        assert_eq!(t.node(t.resolve(b"link").unwrap()).meta.kind, Kind::Symlink);
        // A later layer's entry beneath it makes it a directory, as a later
        // layer replaces any lower file.
        let l1 = [e("link/passwd", Kind::File)];
        let t = Tree::build([&l0[..], &l1[..]]);
        assert_eq!(t.node(t.resolve(b"link").unwrap()).meta.kind, Kind::Dir);
        assert_eq!(names(&t, "link"), ["passwd"]);
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let l0 = [
            e("./", Kind::Dir),
            e("./a/", Kind::Dir),
            e("./a/x", Kind::File),
            e("./a/y", Kind::File),
            e("./b/", Kind::Dir),
            e("./b/old", Kind::File),
            e("./c", Kind::File),
        ];
        let l1 = [
            e("a/.wh.x", Kind::File),
            e("b/new", Kind::File),
            e("b/.wh..wh..opq", Kind::File),
            e(".wh.c", Kind::File),
            e("c/", Kind::Dir),
            e("d/e/f", Kind::File),
        ];
        let t = Tree::build([&l0[..], &l1[..]]);
        assert_eq!(names(&t, ""), ["a", "b", "c", "d"]);
        assert_eq!(names(&t, "a"), ["y"]);
        assert_eq!(names(&t, "b"), ["new"]);
        assert_eq!(t.node(t.resolve(b"c").unwrap()).meta.kind, Kind::Dir);
        assert_eq!(names(&t, "d/e"), ["f"]);
        assert_eq!(t.node(ROOT).nlink, 2 + 4);
        let f = t.node(t.resolve(b"b/new").unwrap());
        assert_eq!(f.data, Some(DataRef { layer: 1, entry: 1 }));
    }

    #[test]
    fn hardlinks_share_a_node() {
        let mut link = e("bin/sh", Kind::File);
        link.hardlink = Some(b"bin/busybox".to_vec());
        let l0 = [e("bin/busybox", Kind::File), link];
        let t = Tree::build([&l0[..]]);
        let a = t.resolve(b"bin/busybox").unwrap();
        assert_eq!(t.resolve(b"bin/sh"), Some(a));
        assert_eq!(t.node(a).nlink, 2);
        // Deleting one name in a later layer drops the count.
        let l1 = [e("bin/.wh.sh", Kind::File)];
        let t = Tree::build([&l0[..], &l1[..]]);
        assert_eq!(t.node(t.resolve(b"bin/busybox").unwrap()).nlink, 1);
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize(b"./a//b/").unwrap(), b"a/b");
        assert_eq!(normalize(b"/").unwrap(), b"");
        assert_eq!(normalize(b"a/../b").unwrap(), b"b");
        assert!(normalize(b"../x").is_none());
    }
}
