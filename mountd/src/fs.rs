//! The FUSE side. fuser dispatches requests on one thread, so every request
//! is moved, with its `Reply*`, onto the tokio runtime and answered there:
//! a read waiting on the network never holds up another request.
//!
//! Inodes: namespace nodes (repositories, tags, manifests, ...) are keyed by
//! what they show, so one digest's content always has one inode; each merged
//! rootfs gets its own contiguous inode range above [`TREE_BASE`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuser::consts::{FOPEN_CACHE_DIR, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE};
use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
};
use ggfs::image::is_layer_media_type;
use ggfs::{Digest, Error};

use crate::cache::{self, Cache};
use crate::layer::{LayerData, Layers};
use crate::ns::{children_of, valid_component, Art, Fail, Memo, Namespace, Res};
use crate::tree::{self, NodeId, Tree};

/// Inodes at and above this belong to merged rootfs trees.
const TREE_BASE: u64 = 1 << 40;
/// How long the kernel may cache anything addressed by digest.
const LONG: Duration = Duration::from_secs(24 * 3600);
const FOREVER: Duration = Duration::from_secs(u32::MAX as u64);

/// A namespace node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Root,
    Meta,
    Stats,
    /// A repository path, or a prefix of some.
    Repo(String),
    Tag(String, String),
    /// A manifest addressed by digest: `sha256:<hex>` or platform directories.
    Art(String, Digest),
    Manifest(String, Digest),
    Config(String, Digest),
    DigestFile(String, Digest),
    Blobs(String, Digest),
    Blob(String, Digest, u64),
    Rootfs(String, Digest),
}

impl Key {
    fn is_dir(&self) -> bool {
        !matches!(
            self,
            Key::Stats | Key::Manifest(..) | Key::Config(..) | Key::DigestFile(..) | Key::Blob(..)
        )
    }

    /// Whether what this node shows can change (tags move, repos appear).
    fn mutable(&self) -> bool {
        matches!(self, Key::Root | Key::Repo(_) | Key::Tag(..) | Key::Stats)
    }
}

/// A merged root filesystem with its inode range.
pub struct RootFs {
    tree: Tree,
    layers: Vec<Arc<dyn LayerData>>,
    base: u64,
    root_ino: u64,
}

impl RootFs {
    fn ino(&self, id: NodeId) -> u64 {
        if id == tree::ROOT {
            self.root_ino
        } else {
            self.base + id as u64
        }
    }
}

#[derive(Clone)]
enum Node {
    Ns(Key),
    Tree(Arc<RootFs>, NodeId),
}

struct Inodes {
    keys: Vec<Key>,
    by_key: HashMap<Key, u64>,
    trees: BTreeMap<u64, Arc<RootFs>>,
    next_base: u64,
}

impl Inodes {
    fn ino(&mut self, key: Key) -> u64 {
        if let Some(&i) = self.by_key.get(&key) {
            return i;
        }
        self.keys.push(key.clone());
        let i = self.keys.len() as u64;
        self.by_key.insert(key, i);
        i
    }

    fn get(&self, ino: u64) -> Option<Node> {
        if ino < TREE_BASE {
            return self
                .keys
                .get((ino as usize).checked_sub(1)?)
                .cloned()
                .map(Node::Ns);
        }
        let (base, r) = self.trees.range(..=ino).next_back()?;
        let id = (ino - base) as usize;
        (id > 0 && id < r.tree.nodes.len()).then(|| Node::Tree(r.clone(), id as NodeId))
    }
}

pub struct Inner {
    pub ns: Namespace,
    cache: Arc<Cache>,
    layers: Layers,
    inodes: Mutex<Inodes>,
    rootfs: Memo<(String, Digest), Arc<RootFs>>,
    blobs: Memo<Digest, Arc<std::fs::File>>,
    uid: u32,
    gid: u32,
    start: SystemTime,
}

pub struct Fs {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
}

impl Fs {
    pub fn new(ns: Namespace, cache: Arc<Cache>, rt: tokio::runtime::Handle) -> Self {
        let inodes = Inodes {
            keys: vec![Key::Root],
            by_key: HashMap::from([(Key::Root, 1)]),
            trees: BTreeMap::new(),
            next_base: TREE_BASE,
        };
        let inner = Inner {
            ns,
            layers: Layers::new(cache.clone()),
            cache,
            inodes: Mutex::new(inodes),
            rootfs: Memo::default(),
            blobs: Memo::default(),
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            start: SystemTime::now(),
        };
        Fs {
            inner: Arc::new(inner),
            rt,
        }
    }
}

fn join(repo: &str, name: &str) -> String {
    if repo.is_empty() {
        name.to_string()
    } else {
        format!("{repo}/{name}")
    }
}

fn file_type(k: &tree::Kind) -> FileType {
    match k {
        tree::Kind::Dir => FileType::Directory,
        tree::Kind::File => FileType::RegularFile,
        tree::Kind::Symlink => FileType::Symlink,
        tree::Kind::Char => FileType::CharDevice,
        tree::Kind::Block => FileType::BlockDevice,
        tree::Kind::Fifo => FileType::NamedPipe,
    }
}

fn slice(b: &[u8], offset: u64, size: u32) -> Bytes {
    let start = (offset as usize).min(b.len());
    let end = start.saturating_add(size as usize).min(b.len());
    Bytes::copy_from_slice(&b[start..end])
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ino(&self, key: Key) -> u64 {
        self.lock().ino(key)
    }

    fn node(&self, ino: u64) -> Res<Node> {
        self.lock()
            .get(ino)
            .ok_or_else(|| Fail::new(libc::ESTALE, format!("unknown inode {ino}")))
    }

    fn ns_attr(&self, ino: u64, dir: bool, size: u64) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.start,
            mtime: self.start,
            ctime: self.start,
            crtime: self.start,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o555 } else { 0o444 },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn tree_attr(&self, r: &RootFs, id: NodeId) -> FileAttr {
        let n = r.tree.node(id);
        let m = &n.meta;
        let t = if m.mtime >= 0 {
            UNIX_EPOCH + Duration::new(m.mtime as u64, m.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(m.mtime.unsigned_abs())
                + Duration::from_nanos(m.mtime_nsec as u64)
        };
        FileAttr {
            ino: r.ino(id),
            size: m.size,
            blocks: m.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: file_type(&m.kind),
            perm: (m.mode & 0o7777) as u16,
            nlink: n.nlink.max(1),
            uid: m.uid,
            gid: m.gid,
            rdev: m.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    async fn attr(&self, ino: u64, node: &Node) -> Res<(Duration, FileAttr)> {
        let key = match node {
            Node::Tree(r, id) => return Ok((LONG, self.tree_attr(r, *id))),
            Node::Ns(k) => k,
        };
        let ttl = if key.mutable() { self.ns.tag_ttl } else { LONG };
        let size = match key {
            Key::Manifest(repo, d) => self.ns.artifact(repo, d).await?.raw().bytes.len() as u64,
            Key::Config(repo, d) => self.image(repo, d).await?.config.len() as u64,
            Key::DigestFile(_, d) => d.as_str().len() as u64 + 1,
            Key::Blob(_, _, size) => *size,
            Key::Stats => {
                return Ok((
                    Duration::ZERO,
                    self.ns_attr(ino, false, self.stats().len() as u64),
                ))
            }
            Key::Rootfs(repo, d) => {
                // Built trees answer for themselves; an unbuilt one is not
                // fetched just to be listed.
                return Ok(match self.rootfs.peek(&(repo.clone(), d.clone())) {
                    Some(r) => (LONG, self.tree_attr(&r, tree::ROOT)),
                    None => (Duration::from_secs(1), self.ns_attr(ino, true, 0)),
                });
            }
            _ => 0,
        };
        Ok((ttl, self.ns_attr(ino, key.is_dir(), size)))
    }

    fn stats(&self) -> String {
        self.ns.stats.render(&self.cache)
    }

    async fn image(&self, repo: &str, d: &Digest) -> Res<ggfs::image::Image> {
        match &*self.ns.artifact(repo, d).await? {
            Art::Image { image, .. } => Ok((**image).clone()),
            Art::Index { .. } => Err(Fail::new(libc::ENOENT, format!("{d} is an index"))),
        }
    }

    /// The digest a tag or digest directory shows.
    async fn art_digest(&self, key: &Key) -> Res<Option<(String, Digest)>> {
        Ok(match key {
            Key::Tag(repo, tag) => Some((repo.clone(), self.ns.resolve(repo, tag).await?)),
            Key::Art(repo, d) => Some((repo.clone(), d.clone())),
            _ => None,
        })
    }

    fn art_entries(repo: &str, art: &Art) -> Vec<(String, Key)> {
        let r = repo.to_string();
        let d = art.raw().digest.clone();
        let mut out = vec![
            ("manifest.json".into(), Key::Manifest(r.clone(), d.clone())),
            ("digest".into(), Key::DigestFile(r.clone(), d.clone())),
        ];
        match art {
            Art::Image { .. } => {
                out.push(("config.json".into(), Key::Config(r.clone(), d.clone())));
                out.push(("blobs".into(), Key::Blobs(r.clone(), d.clone())));
                out.push(("rootfs".into(), Key::Rootfs(r, d)));
            }
            Art::Index { children, .. } => {
                for (name, child) in children {
                    out.push((name.clone(), Key::Art(r.clone(), child.clone())));
                }
            }
        }
        out
    }

    /// The entries of a namespace directory.
    async fn list(&self, key: &Key) -> Res<Vec<(String, Key)>> {
        if let Some((repo, d)) = self.art_digest(key).await? {
            let art = self.ns.artifact(&repo, &d).await?;
            let mut out = Self::art_entries(&repo, &art);
            if let Key::Tag(repo, tag) = key {
                // A tag that is also a child repository's name: the image's
                // own entries win, the repository's children follow.
                let path = join(repo, tag);
                if valid_component(tag) && self.may_be_repo(&path).await {
                    for (n, k) in self.list_repo(&path).await {
                        if !out.iter().any(|(o, _)| *o == n) {
                            out.push((n, k));
                        }
                    }
                }
            }
            return Ok(out);
        }
        match key {
            Key::Root => {
                let mut out = vec![(".ggfs".to_string(), Key::Meta)];
                out.extend(self.list_repo("").await);
                Ok(out)
            }
            Key::Repo(path) => Ok(self.list_repo(path).await),
            Key::Meta => Ok(vec![("stats".into(), Key::Stats)]),
            Key::Blobs(repo, d) => {
                let image = self.image(repo, d).await?;
                let mut out = Vec::new();
                let cfg = image.manifest.config();
                let descs = std::iter::once(cfg).chain(image.manifest.layers().iter());
                for desc in descs {
                    if let Ok(bd) = ggfs::manifest::digest_of(desc) {
                        let name = bd.to_string();
                        if !out.iter().any(|(n, _)| *n == name) {
                            out.push((name, Key::Blob(repo.clone(), bd, desc.size())));
                        }
                    }
                }
                Ok(out)
            }
            _ => Err(Fail::new(libc::ENOTDIR, "not a directory")),
        }
    }

    /// Child repository names below `path` according to the catalog.
    async fn repo_children(&self, path: &str) -> Vec<String> {
        match self.ns.catalog().await {
            Ok(Some(cat)) => children_of(&cat, path),
            _ => Vec::new(),
        }
    }

    /// Whether `path` may be a repository or a prefix of one: per the
    /// catalog, or always when the registry does not list its catalog.
    async fn may_be_repo(&self, path: &str) -> bool {
        match self.ns.catalog().await {
            Ok(Some(cat)) => {
                let prefix = format!("{path}/");
                cat.iter().any(|r| r == path || r.starts_with(&prefix))
            }
            _ => true,
        }
    }

    /// Tags first; child repositories whose name is also a tag are shadowed.
    async fn list_repo(&self, path: &str) -> Vec<(String, Key)> {
        let mut out: Vec<(String, Key)> = Vec::new();
        if !path.is_empty() {
            if let Ok(tags) = self.ns.tags(path).await {
                for t in tags.iter() {
                    out.push((t.clone(), Key::Tag(path.to_string(), t.clone())));
                }
            }
        }
        for c in self.repo_children(path).await {
            if !out.iter().any(|(n, _)| *n == c) {
                out.push((c.clone(), Key::Repo(join(path, &c))));
            }
        }
        out
    }

    /// Look `name` up in a namespace directory.
    async fn lookup_ns(&self, key: &Key, name: &str) -> Res<Node> {
        if let Key::Rootfs(repo, d) = key {
            let r = self.build_rootfs(repo, d).await?;
            let id = r
                .tree
                .child(tree::ROOT, name.as_bytes())
                .ok_or_else(|| Fail::noent(name))?;
            return Ok(Node::Tree(r, id));
        }
        if let Some((repo, d)) = self.art_digest(key).await? {
            let art = self.ns.artifact(&repo, &d).await?;
            if let Some((_, k)) = Self::art_entries(&repo, &art)
                .into_iter()
                .find(|(n, _)| n == name)
            {
                return Ok(Node::Ns(k));
            }
            return match key {
                Key::Tag(repo, tag)
                    if valid_component(tag) && self.may_be_repo(&join(repo, tag)).await =>
                {
                    self.lookup_repo(&join(repo, tag), name).await
                }
                _ => Err(Fail::noent(name)),
            };
        }
        match key {
            Key::Root if name == ".ggfs" => Ok(Node::Ns(Key::Meta)),
            Key::Root => self.lookup_child_repo("", name).await,
            Key::Meta if name == "stats" => Ok(Node::Ns(Key::Stats)),
            Key::Repo(path) => self.lookup_repo(path, name).await,
            Key::Blobs(..) => self
                .list(key)
                .await?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, k)| Node::Ns(k))
                .ok_or_else(|| Fail::noent(name)),
            _ if key.is_dir() => Err(Fail::noent(name)),
            _ => Err(Fail::new(libc::ENOTDIR, "not a directory")),
        }
    }

    async fn lookup_repo(&self, path: &str, name: &str) -> Res<Node> {
        if name.starts_with("sha256:") {
            let d = Digest::parse(name).map_err(|_| Fail::noent(name))?;
            self.ns.artifact(path, &d).await?;
            return Ok(Node::Ns(Key::Art(path.to_string(), d)));
        }
        if let Ok(tags) = self.ns.tags(path).await {
            if tags.iter().any(|t| t == name) {
                return Ok(Node::Ns(Key::Tag(path.to_string(), name.to_string())));
            }
        }
        self.lookup_child_repo(path, name).await
    }

    /// A child repository (or repository prefix). Listed ones exist; an
    /// unlisted one exists when it has tags, or when the registry keeps its
    /// catalog to itself (a prefix cannot be told from nothing then).
    async fn lookup_child_repo(&self, path: &str, name: &str) -> Res<Node> {
        if !valid_component(name) {
            return Err(Fail::noent(name));
        }
        let child = join(path, name);
        let listed = match self.ns.catalog().await {
            Ok(Some(cat)) => Some(children_of(&cat, path).iter().any(|c| c == name)),
            _ => None,
        };
        if listed == Some(true) || self.ns.tags(&child).await.is_ok() || listed.is_none() {
            return Ok(Node::Ns(Key::Repo(child)));
        }
        Err(Fail::noent(name))
    }

    /// Fetch and merge an image's layers (once per image and process).
    async fn build_rootfs(&self, repo: &str, d: &Digest) -> Res<Arc<RootFs>> {
        let key = (repo.to_string(), d.clone());
        self.rootfs
            .get(&key, FOREVER, self.ns.neg_ttl, || async {
                let art = self.ns.artifact(repo, d).await?;
                let Art::Image { layers, .. } = &*art else {
                    return Err(Fail::new(libc::ENOENT, format!("{d} is an index")));
                };
                let wanted = layers.iter().filter(|l| {
                    let ok = is_layer_media_type(&l.media_type());
                    if !ok {
                        tracing::warn!(
                            "image {d}: skipping layer {} ({})",
                            l.digest,
                            l.media_type()
                        );
                    }
                    ok
                });
                let opened =
                    futures::future::try_join_all(wanted.map(|l| self.layers.open(l))).await?;
                let layers = opened.clone();
                let tree = tokio::task::spawn_blocking(move || {
                    Tree::build(layers.iter().map(|l| l.entries()))
                })
                .await
                .map_err(|e| Fail::new(libc::EIO, e.to_string()))?;
                let root_ino = self.ino(Key::Rootfs(repo.to_string(), d.clone()));
                let mut inodes = self.lock();
                let base = inodes.next_base;
                inodes.next_base += (tree.nodes.len() as u64 + 1).next_multiple_of(1024);
                let r = Arc::new(RootFs {
                    tree,
                    layers: opened,
                    base,
                    root_ino,
                });
                inodes.trees.insert(base, r.clone());
                Ok(r)
            })
            .await
    }

    /// The tree behind a node, if it is a rootfs directory or inside one.
    async fn tree_node(&self, node: &Node) -> Res<Option<(Arc<RootFs>, NodeId)>> {
        Ok(match node {
            Node::Tree(r, id) => Some((r.clone(), *id)),
            Node::Ns(Key::Rootfs(repo, d)) => Some((self.build_rootfs(repo, d).await?, tree::ROOT)),
            Node::Ns(_) => None,
        })
    }

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Res<(Duration, FileAttr)> {
        let pnode = self.node(parent)?;
        let child = match &pnode {
            Node::Tree(r, id) => {
                let c = r
                    .tree
                    .child(*id, name.as_bytes())
                    .ok_or_else(|| Fail::noent(name.to_string_lossy()))?;
                Node::Tree(r.clone(), c)
            }
            Node::Ns(k) => {
                let name = name
                    .to_str()
                    .ok_or_else(|| Fail::noent(name.to_string_lossy()))?;
                self.lookup_ns(k, name).await?
            }
        };
        let ino = match &child {
            Node::Tree(r, id) => r.ino(*id),
            Node::Ns(k) => self.ino(k.clone()),
        };
        let (ttl, attr) = self.attr(ino, &child).await?;
        // Children of a tag or repository can change when the tag moves.
        let entry_ttl = match &pnode {
            Node::Ns(k) if k.mutable() => ttl.min(self.ns.tag_ttl),
            _ => ttl,
        };
        Ok((entry_ttl, attr))
    }

    pub async fn getattr(&self, ino: u64) -> Res<(Duration, FileAttr)> {
        let node = self.node(ino)?;
        self.attr(ino, &node).await
    }

    pub async fn readdir(&self, ino: u64) -> Res<Vec<(u64, FileType, OsString)>> {
        let node = self.node(ino)?;
        let mut out = vec![(ino, FileType::Directory, OsString::from("."))];
        if let Some((r, id)) = self.tree_node(&node).await? {
            let n = r.tree.node(id);
            out.push((r.ino(n.parent), FileType::Directory, "..".into()));
            for (name, &c) in &n.children {
                let kind = file_type(&r.tree.node(c).meta.kind);
                out.push((r.ino(c), kind, OsString::from_vec(name.to_vec())));
            }
            return Ok(out);
        }
        let Node::Ns(key) = node else { unreachable!() };
        out.push((1, FileType::Directory, "..".into()));
        for (name, k) in self.list(&key).await? {
            let kind = if k.is_dir() {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            out.push((self.ino(k), kind, name.into()));
        }
        Ok(out)
    }

    /// Open flags for a readable node: digest-addressed content keeps the
    /// kernel's page cache across opens; stats are read fresh.
    pub async fn open(&self, ino: u64, flags: i32) -> Res<u32> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(Fail::new(libc::EROFS, "read-only filesystem"));
        }
        Ok(match self.node(ino)? {
            Node::Ns(Key::Stats) => FOPEN_DIRECT_IO,
            _ => FOPEN_KEEP_CACHE,
        })
    }

    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Res<Bytes> {
        match self.node(ino)? {
            Node::Tree(r, id) => {
                let n = r.tree.node(id);
                let Some(data) = n.data else {
                    return Err(Fail::new(libc::EISDIR, "not a regular file"));
                };
                let layer = &r.layers[data.layer];
                Ok(layer.read(data.entry, offset, size).await.map_err(|e| {
                    tracing::error!("read of layer {}: {e}", layer.digest());
                    Fail::from(e)
                })?)
            }
            Node::Ns(key) => self.read_ns(&key, offset, size).await,
        }
    }

    async fn read_ns(&self, key: &Key, offset: u64, size: u32) -> Res<Bytes> {
        match key {
            Key::Manifest(repo, d) => {
                let art = self.ns.artifact(repo, d).await?;
                Ok(slice(&art.raw().bytes, offset, size))
            }
            Key::Config(repo, d) => Ok(slice(&self.image(repo, d).await?.config, offset, size)),
            Key::DigestFile(_, d) => Ok(slice(format!("{d}\n").as_bytes(), offset, size)),
            Key::Stats => Ok(slice(self.stats().as_bytes(), offset, size)),
            Key::Blob(repo, d, len) => {
                if offset >= *len {
                    return Ok(Bytes::new());
                }
                let file = self.blob_file(repo, d, *len).await?;
                let n = (size as u64).min(len - offset) as usize;
                let d = d.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, offset)
                        .map_err(|e| Fail::new(libc::EIO, format!("cached blob {d}: {e}")))?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| Fail::new(libc::EIO, e.to_string()))?
            }
            _ => Err(Fail::new(libc::EISDIR, "is a directory")),
        }
    }

    /// A whole blob in the cache, downloaded and verified on first use.
    async fn blob_file(&self, repo: &str, d: &Digest, size: u64) -> Res<Arc<std::fs::File>> {
        // Held briefly: an evicted blob's space is freed once readers move on.
        self.blobs
            .get(d, Duration::from_secs(30), self.ns.neg_ttl, || async {
                let path = match self.cache.get(cache::Kind::Blob, d) {
                    Some(p) => p,
                    None => self.download(repo, d, size).await.inspect_err(|e| {
                        tracing::error!("blob {d}: {e}");
                    })?,
                };
                let f = std::fs::File::open(&path)
                    .map_err(|e| Error::io(path.display().to_string(), e))?;
                Ok(Arc::new(f))
            })
            .await
    }

    async fn download(
        &self,
        repo: &str,
        d: &Digest,
        size: u64,
    ) -> ggfs::Result<std::path::PathBuf> {
        use futures::StreamExt;
        use std::io::Write;
        let dest = self.cache.path(cache::Kind::Blob, d);
        let mut w = ggfs::digest::BlobWriter::create(&dest, d.clone(), Some(size))?;
        let mut stream = self.ns.source(repo).blob(d).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ggfs::error::from_io(format!("blob {d}"), e))?;
            w.write_all(&chunk)
                .map_err(|e| Error::io(dest.display().to_string(), e))?;
        }
        let path = tokio::task::spawn_blocking(move || w.commit())
            .await
            .map_err(|e| Error::io("commit task", std::io::Error::other(e)))??;
        self.cache.added(size);
        Ok(path)
    }

    pub async fn readlink(&self, ino: u64) -> Res<Bytes> {
        match self.node(ino)? {
            Node::Tree(r, id) if r.tree.node(id).meta.kind == tree::Kind::Symlink => {
                Ok(Bytes::copy_from_slice(&r.tree.node(id).meta.link))
            }
            _ => Err(Fail::new(libc::EINVAL, "not a symlink")),
        }
    }

    pub async fn xattrs(&self, ino: u64) -> Res<Vec<(Vec<u8>, Vec<u8>)>> {
        let node = self.node(ino)?;
        Ok(match self.tree_node(&node).await? {
            Some((r, id)) => r.tree.node(id).meta.xattrs.clone(),
            None => Vec::new(),
        })
    }

    fn fail(&self, what: &str, f: &Fail) {
        match f.errno {
            libc::ENOENT | libc::EROFS | libc::ENODATA | libc::ERANGE => {
                tracing::debug!("{what}: {}", f.msg)
            }
            _ => tracing::warn!("{what}: {}", f.msg),
        }
    }
}

impl Fs {
    fn spawn<F>(&self, f: impl FnOnce(Arc<Inner>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f(self.inner.clone()));
    }
}

fn xattr_reply(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(libc::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request<'_>, config: &mut fuser::KernelConfig) -> Result<(), i32> {
        // Bigger reads mean fewer chunk lookups and inflates per file.
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        // Reads are answered asynchronously: let the kernel keep more in flight.
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.spawn(|fs| async move {
            match fs.lookup(parent, &name).await {
                Ok((ttl, attr)) => reply.entry(&ttl, &attr, 0),
                Err(f) if f.errno == libc::ENOENT => {
                    // A negative entry: the kernel remembers the miss.
                    let mut attr = fs.ns_attr(0, false, 0);
                    attr.ino = 0;
                    reply.entry(&fs.ns.neg_ttl, &attr, 0)
                }
                Err(f) => {
                    fs.fail("lookup", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        self.spawn(|fs| async move {
            match fs.getattr(ino).await {
                Ok((ttl, attr)) => reply.attr(&ttl, &attr),
                Err(f) => {
                    fs.fail("getattr", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        self.spawn(|fs| async move {
            match fs.readlink(ino).await {
                Ok(b) => reply.data(&b),
                Err(f) => reply.error(f.errno),
            }
        });
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        self.spawn(|fs| async move {
            match fs.open(ino, flags).await {
                Ok(fl) => reply.opened(0, fl),
                Err(f) => reply.error(f.errno),
            }
        });
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        self.spawn(|fs| async move {
            match fs.read(ino, offset.max(0) as u64, size).await {
                Ok(b) => reply.data(&b),
                Err(f) => {
                    fs.fail("read", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        // A directory under a digest never changes: the kernel may keep its
        // listing, so a second `find` or `ls -R` costs no READDIR at all.
        let immutable = match self.inner.node(ino) {
            Ok(Node::Tree(..)) => true,
            Ok(Node::Ns(k)) => !k.mutable(),
            Err(_) => false,
        };
        let flags = if immutable {
            FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE
        } else {
            0
        };
        reply.opened(0, flags);
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(|fs| async move {
            match fs.readdir(ino).await {
                Ok(entries) => {
                    let skip = offset.max(0) as usize;
                    for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
                        if reply.add(ino, (i + 1) as i64, kind, &name) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(f) => {
                    fs.fail("readdir", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        // Sizes are the disk cache's: what `df` shows is how full it is.
        let files = self.inner.lock().keys.len() as u64;
        let (limit, used) = (self.inner.cache.limit(), self.inner.cache.used());
        let free = limit.saturating_sub(used) / 4096;
        reply.statfs(limit / 4096, free, free, files, 0, 4096, 255, 4096);
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let name = name.as_bytes().to_vec();
        self.spawn(|fs| async move {
            match fs.xattrs(ino).await {
                Ok(x) => match x.iter().find(|(n, _)| *n == name) {
                    Some((_, v)) => xattr_reply(reply, v, size),
                    None => reply.error(libc::ENODATA),
                },
                Err(f) => reply.error(f.errno),
            }
        });
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        self.spawn(|fs| async move {
            match fs.xattrs(ino).await {
                Ok(x) => {
                    let mut names = Vec::new();
                    for (n, _) in &x {
                        names.extend_from_slice(n);
                        names.push(0);
                    }
                    xattr_reply(reply, &names, size)
                }
                Err(f) => reply.error(f.errno),
            }
        });
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, mask: i32, reply: ReplyEmpty) {
        if mask & libc::W_OK != 0 {
            reply.error(libc::EROFS)
        } else {
            reply.ok()
        }
    }

    // Everything that would change the filesystem.

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        reply.error(libc::EROFS);
    }

    fn mknod(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(libc::EROFS);
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(libc::EROFS);
    }

    fn unlink(&mut self, _req: &Request<'_>, _parent: u64, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(libc::EROFS);
    }

    fn rmdir(&mut self, _req: &Request<'_>, _parent: u64, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(libc::EROFS);
    }

    fn symlink(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(libc::EROFS);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _newparent: u64,
        _newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(libc::EROFS);
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _newparent: u64,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(libc::EROFS);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _offset: i64,
        _data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        reply.error(libc::EROFS);
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(libc::EROFS);
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(libc::EROFS);
    }

    fn removexattr(&mut self, _req: &Request<'_>, _ino: u64, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(libc::EROFS);
    }
}
