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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::consts::{FOPEN_CACHE_DIR, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE};
use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
};
use ggfs::image::is_layer_media_type;
use ggfs::{Digest, Error};

use crate::cache::{self, Cache};
use crate::commit::{self as journal, Journal};
use crate::layer::Layers;
use crate::ns::{children_of, valid_component, Art, Fail, Memo, Namespace, Res};
use crate::rootfs::{io_fail, Data, RootFs, SetAttr, Work, WRITABLE_RANGE};
use crate::tree::{self, DataRef, NodeId, Tree};
use crate::upper::Upper;

/// Inodes at and above this belong to merged rootfs trees.
const TREE_BASE: u64 = 1 << 40;
/// How long the kernel may cache anything addressed by digest.
const LONG: Duration = Duration::from_secs(24 * 3600);
const FOREVER: Duration = Duration::from_secs(u32::MAX as u64);
/// How long the kernel may cache what a writable tree says.
const SHORT: Duration = Duration::from_secs(1);

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
    /// The read-only rootfs of an image by digest.
    Rootfs(String, Digest),
    /// A tag's rootfs: writable, on the base image the changes started from.
    WRootfs(String, String, Digest),
    /// `.ggfs/status`: changed images and their commits.
    Status,
    /// `.ggfs/ctl`: `ggfs commit` writes a request, reads the reply.
    Ctl,
}

impl Key {
    fn is_dir(&self) -> bool {
        !matches!(
            self,
            Key::Stats
                | Key::Status
                | Key::Ctl
                | Key::Manifest(..)
                | Key::Config(..)
                | Key::DigestFile(..)
                | Key::Blob(..)
        )
    }

    /// Whether what this node shows can change (tags move, repos appear).
    fn mutable(&self) -> bool {
        matches!(
            self,
            Key::Root | Key::Repo(_) | Key::Tag(..) | Key::Stats | Key::Status | Key::Ctl
        )
    }
}

#[derive(Clone)]
enum Node {
    Ns(Key),
    /// A node of a read-only tree.
    Tree(Arc<RootFs>, NodeId),
    /// An inode of a writable tree.
    W(Arc<RootFs>, u64),
}

/// An open file.
enum Handle {
    /// Its upper copy.
    Upper(Arc<std::fs::File>, Arc<RootFs>),
    /// Its bytes in a lower layer.
    Lower(Arc<RootFs>, DataRef),
    /// `.ggfs/ctl`: the reply to the request written.
    Ctl(Arc<Mutex<Vec<u8>>>),
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
        if r.w.is_some() {
            return r.knows(ino).then(|| Node::W(r.clone(), ino));
        }
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
    wrootfs: Memo<(String, String, Digest), Arc<RootFs>>,
    /// Writable trees by (repository, tag).
    work: Mutex<HashMap<(String, String), Arc<RootFs>>>,
    /// Changed images an earlier mount left unpushed, until opened.
    recovered: Mutex<HashMap<(String, String), Digest>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
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
        let recovered = journal::recover(cache.root(), &ns.registry_name())
            .into_iter()
            .map(|s| ((s.repo, s.tag), s.base))
            .collect();
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
            wrootfs: Memo::default(),
            work: Mutex::new(HashMap::new()),
            recovered: Mutex::new(recovered),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
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

    pub fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

fn join(repo: &str, name: &str) -> String {
    if repo.is_empty() {
        name.to_string()
    } else {
        format!("{repo}/{name}")
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

    async fn attr(&self, ino: u64, node: &Node) -> Res<(Duration, FileAttr)> {
        let key = match node {
            Node::Tree(r, id) => return Ok((LONG, r.lower_attr(*id))),
            Node::W(r, ino) => return Ok((SHORT, r.getattr(*ino)?)),
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
                    Some(r) => (LONG, r.lower_attr(tree::ROOT)),
                    None => (Duration::from_secs(1), self.ns_attr(ino, true, 0)),
                });
            }
            Key::WRootfs(repo, tag, d) => {
                let key = (repo.clone(), tag.clone(), d.clone());
                return Ok(match self.wrootfs.peek(&key) {
                    Some(r) => (SHORT, r.getattr(r.root_ino)?),
                    None => (Duration::from_secs(1), self.ns_attr(ino, true, 0)),
                });
            }
            Key::Status => {
                let len = self.status().len() as u64;
                return Ok((Duration::ZERO, self.ns_attr(ino, false, len)));
            }
            Key::Ctl => {
                let mut a = self.ns_attr(ino, false, 0);
                a.perm = 0o600;
                return Ok((Duration::ZERO, a));
            }
            _ => 0,
        };
        Ok((ttl, self.ns_attr(ino, key.is_dir(), size)))
    }

    fn stats(&self) -> String {
        self.ns.stats.render(&self.cache)
    }

    pub async fn image(&self, repo: &str, d: &Digest) -> Res<ggfs::image::Image> {
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

    /// An image's or index's entries; a tag's `rootfs` is writable.
    fn entries(&self, key: &Key, repo: &str, art: &Art) -> Vec<(String, Key)> {
        let mut out = Self::art_entries(repo, art);
        if let Key::Tag(_, tag) = key {
            for (_, k) in out.iter_mut() {
                if let Key::Rootfs(r, d) = k {
                    let base = self.work_base(r, tag).unwrap_or_else(|| d.clone());
                    *k = Key::WRootfs(r.clone(), tag.clone(), base);
                }
            }
        }
        out
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
            let mut out = self.entries(key, &repo, &art);
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
            Key::Meta => Ok(vec![
                ("ctl".into(), Key::Ctl),
                ("stats".into(), Key::Stats),
                ("status".into(), Key::Status),
            ]),
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
        if let Key::WRootfs(repo, tag, d) = key {
            let r = self.wrootfs(repo, tag, d).await?;
            let attr = r.lookup(r.root_ino, name.as_bytes())?;
            return Ok(Node::W(r, attr.ino));
        }
        if let Some((repo, d)) = self.art_digest(key).await? {
            let art = self.ns.artifact(&repo, &d).await?;
            if let Some((_, k)) = self
                .entries(key, &repo, &art)
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
            Key::Meta if name == "status" => Ok(Node::Ns(Key::Status)),
            Key::Meta if name == "ctl" => Ok(Node::Ns(Key::Ctl)),
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
                    tree: Arc::new(tree),
                    layers: Arc::new(opened),
                    base,
                    root_ino,
                    w: None,
                });
                inodes.trees.insert(base, r.clone());
                Ok(r)
            })
            .await
    }

    /// The writable rootfs of `repo:tag` on `base`: the base's merged tree
    /// (shared with its read-only rootfs) and an upper directory, made on
    /// the first change, in the journal directory of that tag.
    pub async fn wrootfs(&self, repo: &str, tag: &str, base: &Digest) -> Res<Arc<RootFs>> {
        let key = (repo.to_string(), tag.to_string(), base.clone());
        self.wrootfs
            .get(&key, FOREVER, self.ns.neg_ttl, || async {
                let ro = self.build_rootfs(repo, base).await?;
                let registry = self.ns.registry_name();
                let dir = journal::work_dir(self.cache.root(), &registry, repo, tag);
                let j = Journal::open(&dir, &registry, repo, tag, base.clone());
                let root_ino = self.ino(Key::WRootfs(repo.into(), tag.into(), base.clone()));
                let mut inodes = self.lock();
                let b = inodes.next_base;
                inodes.next_base += WRITABLE_RANGE;
                let first_free = b + ro.tree.nodes.len() as u64;
                let r = Arc::new(RootFs {
                    tree: ro.tree.clone(),
                    layers: ro.layers.clone(),
                    base: b,
                    root_ino,
                    w: Some(Work::new(Upper::new(&dir), j, first_free)),
                });
                inodes.trees.insert(b, r.clone());
                drop(inodes);
                let k = (repo.to_string(), tag.to_string());
                let mut work = self.work.lock().unwrap_or_else(|p| p.into_inner());
                let keep = work
                    .get(&k)
                    .is_some_and(|old| old.w.as_ref().is_some_and(|w| w.journal.materialized()));
                if !keep {
                    work.insert(k.clone(), r.clone());
                    self.recovered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&k);
                }
                Ok(r)
            })
            .await
    }

    /// The base of the changes made to `repo:tag`, if there are any.
    fn work_base(&self, repo: &str, tag: &str) -> Option<Digest> {
        let k = (repo.to_string(), tag.to_string());
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = work.get(&k).and_then(|r| r.w.as_ref()) {
            if w.journal.materialized() {
                return Some(w.journal.saved().base);
            }
        }
        drop(work);
        let rec = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
        rec.get(&k).cloned()
    }

    /// Every writable tree with changes, opening those an earlier mount left.
    pub async fn writables(&self) -> Vec<Arc<RootFs>> {
        let left: Vec<((String, String), Digest)> = {
            let rec = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
            rec.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        for ((repo, tag), base) in left {
            if let Err(f) = self.wrootfs(&repo, &tag, &base).await {
                tracing::warn!(
                    "changes to {repo}:{tag} left by an earlier mount: {}",
                    f.msg
                );
            }
        }
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        work.values()
            .filter(|r| r.w.as_ref().is_some_and(|w| w.journal.materialized()))
            .cloned()
            .collect()
    }

    fn status(&self) -> String {
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines: Vec<String> = work
            .values()
            .filter_map(|r| r.w.as_ref())
            .filter(|w| w.journal.materialized())
            .map(|w| w.journal.line())
            .collect();
        drop(work);
        let rec = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
        for ((repo, tag), base) in rec.iter() {
            lines.push(format!(
                "pending {repo}:{tag} base={base} pushed=- (not opened yet)"
            ));
        }
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// The writable tree behind `ino`, if it is in one (or its root).
    async fn writable(&self, ino: u64) -> Res<Option<Arc<RootFs>>> {
        Ok(match self.node(ino)? {
            Node::W(r, _) => Some(r),
            Node::Ns(Key::WRootfs(repo, tag, base)) => {
                Some(self.wrootfs(&repo, &tag, &base).await?)
            }
            _ => None,
        })
    }

    /// The writable tree behind `ino`, or EROFS.
    async fn must_write(&self, ino: u64) -> Res<Arc<RootFs>> {
        self.writable(ino).await?.ok_or_else(|| {
            Fail::new(
                libc::EROFS,
                "read-only: only a tag's rootfs/ takes changes (images by digest and the namespace do not)",
            )
        })
    }

    /// Serve a `ggfs commit` request.
    async fn control(&self, request: &[u8]) -> journal::Reply {
        let req: journal::Request = match serde_json::from_slice(request) {
            Ok(r) => r,
            Err(e) => return journal::Reply::error(format!("bad request: {e}")),
        };
        let path = req.path.trim_matches('/');
        let path = path.strip_suffix("/rootfs").unwrap_or(path);
        let Some((repo, tag)) = path.rsplit_once('/') else {
            return journal::Reply::error(format!("{path:?} is not an image directory (REPO/TAG)"));
        };
        let base = match self.work_base(repo, tag) {
            Some(b) => b,
            None => match self.ns.resolve(repo, tag).await {
                Ok(d) => d,
                Err(f) => return journal::Reply::error(format!("{repo}:{tag}: {}", f.msg)),
            },
        };
        match self.wrootfs(repo, tag, &base).await {
            Ok(r) => journal::commit(self, &r, &req).await,
            Err(f) => journal::Reply::error(format!("{repo}:{tag}: {}", f.msg)),
        }
    }

    /// The tree behind a node, if it is a rootfs directory or inside one.
    async fn tree_node(&self, node: &Node) -> Res<Option<(Arc<RootFs>, NodeId)>> {
        Ok(match node {
            Node::Tree(r, id) => Some((r.clone(), *id)),
            Node::Ns(Key::Rootfs(repo, d)) => Some((self.build_rootfs(repo, d).await?, tree::ROOT)),
            Node::Ns(_) | Node::W(..) => None,
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
            Node::W(r, ino) => {
                let attr = r.lookup(*ino, name.as_bytes())?;
                Node::W(r.clone(), attr.ino)
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
            Node::W(_, ino) => *ino,
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

    pub async fn getattr(&self, ino: u64, fh: Option<u64>) -> Res<(Duration, FileAttr)> {
        let node = self.node(ino)?;
        // An open file keeps its attributes after its last name is gone.
        if let (Node::W(r, _), Some(Handle::Upper(f, _))) =
            (&node, fh.and_then(|fh| self.handle(fh)).as_deref())
        {
            if r.getattr(ino).is_err() {
                let md = f.metadata().map_err(|e| io_fail("fstat", e))?;
                return Ok((SHORT, crate::rootfs::attr_of(ino, &md)));
            }
        }
        self.attr(ino, &node).await
    }

    pub async fn readdir(&self, ino: u64) -> Res<Vec<(u64, FileType, OsString)>> {
        if let Some(r) = self.writable(ino).await? {
            return r.readdir(ino);
        }
        let node = self.node(ino)?;
        let mut out = vec![(ino, FileType::Directory, OsString::from("."))];
        if let Some((r, id)) = self.tree_node(&node).await? {
            let n = r.tree.node(id);
            out.push((r.ino(n.parent), FileType::Directory, "..".into()));
            for (name, &c) in &n.children {
                let kind = crate::rootfs::file_type(&r.tree.node(c).meta.kind);
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

    fn handle(&self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        h.get(&fh).cloned()
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut hs = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        hs.insert(fh, Arc::new(h));
        fh
    }

    pub fn release(&self, fh: u64) {
        let mut hs = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        hs.remove(&fh);
    }

    /// Open: (file handle, flags). Digest-addressed content keeps the
    /// kernel's page cache across opens; stats are read fresh; a writable
    /// tree's files get a handle on their upper copy or lower bytes.
    pub async fn open(&self, ino: u64, flags: i32) -> Res<(u64, u32)> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if let Some(r) = self.writable(ino).await? {
            if write {
                let _g = r.w.as_ref().expect("writable").lock.write().await;
                let f = r.open_write(ino, flags & libc::O_TRUNC != 0).await?;
                return Ok((self.add_handle(Handle::Upper(Arc::new(f), r.clone())), 0));
            }
            return Ok(match r.data_for_read(ino)? {
                Data::Upper(f) => (self.add_handle(Handle::Upper(Arc::new(f), r.clone())), 0),
                Data::Lower(d) => (
                    self.add_handle(Handle::Lower(r.clone(), d)),
                    FOPEN_KEEP_CACHE,
                ),
            });
        }
        let node = self.node(ino)?;
        if let Node::Ns(Key::Ctl) = node {
            let reply = Arc::new(Mutex::new(Vec::new()));
            return Ok((self.add_handle(Handle::Ctl(reply)), FOPEN_DIRECT_IO));
        }
        if write {
            return Err(Fail::new(
                libc::EROFS,
                "read-only: only a tag's rootfs/ takes changes",
            ));
        }
        Ok(match node {
            Node::Ns(Key::Stats | Key::Status) => (0, FOPEN_DIRECT_IO),
            _ => (0, FOPEN_KEEP_CACHE),
        })
    }

    pub async fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Res<Bytes> {
        if let Some(h) = self.handle(fh) {
            return match &*h {
                Handle::Upper(f, _) => {
                    let f = f.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; size as usize];
                        let mut n = 0;
                        while n < buf.len() {
                            match f.read_at(&mut buf[n..], offset + n as u64) {
                                Ok(0) => break,
                                Ok(k) => n += k,
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(e) => return Err(io_fail("read", e)),
                            }
                        }
                        buf.truncate(n);
                        Ok(Bytes::from(buf))
                    })
                    .await
                    .map_err(|e| Fail::new(libc::EIO, e.to_string()))?
                }
                Handle::Lower(r, d) => self.read_lower(r, *d, offset, size).await,
                Handle::Ctl(reply) => {
                    let reply = reply.lock().unwrap_or_else(|p| p.into_inner());
                    Ok(slice(&reply, offset, size))
                }
            };
        }
        match self.node(ino)? {
            Node::Tree(r, id) => {
                let n = r.tree.node(id);
                let Some(data) = n.data else {
                    return Err(Fail::new(libc::EISDIR, "not a regular file"));
                };
                self.read_lower(&r, data, offset, size).await
            }
            Node::W(..) => Err(Fail::new(libc::EBADF, "read without an open handle")),
            Node::Ns(key) => self.read_ns(&key, offset, size).await,
        }
    }

    async fn read_lower(&self, r: &RootFs, d: DataRef, offset: u64, size: u32) -> Res<Bytes> {
        let layer = &r.layers[d.layer];
        layer.read(d.entry, offset, size).await.map_err(|e| {
            tracing::error!("read of layer {}: {e}", layer.digest());
            Fail::from(e)
        })
    }

    pub async fn write(&self, fh: u64, offset: u64, data: Vec<u8>) -> Res<u32> {
        let h = self
            .handle(fh)
            .ok_or_else(|| Fail::new(libc::EBADF, "write to a file not open for writing"))?;
        match &*h {
            Handle::Upper(f, r) => {
                let w = r.w.as_ref().expect("writable");
                let _g = w.lock.read().await;
                w.journal
                    .touch(&w.upper, &r.tree.node(tree::ROOT).meta)
                    .map_err(|e| io_fail("journal", e))?;
                let f = f.clone();
                tokio::task::spawn_blocking(move || {
                    f.write_all_at(&data, offset)
                        .map(|_| data.len() as u32)
                        .map_err(|e| io_fail("write", e))
                })
                .await
                .map_err(|e| Fail::new(libc::EIO, e.to_string()))?
            }
            Handle::Ctl(reply) => {
                let len = data.len() as u32;
                let answer = self.control(&data).await;
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                *reply.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
                Ok(len)
            }
            Handle::Lower(..) => Err(Fail::new(libc::EBADF, "file not open for writing")),
        }
    }

    pub async fn fsync(&self, ino: u64, fh: u64) -> Res<()> {
        if let Some(h) = self.handle(fh) {
            if let Handle::Upper(f, r) = &*h {
                let (f, r) = (f.clone(), r.clone());
                return tokio::task::spawn_blocking(move || {
                    f.sync_all().map_err(|e| io_fail("fsync", e))?;
                    r.sync_names(ino)
                })
                .await
                .map_err(|e| Fail::new(libc::EIO, e.to_string()))?;
            }
        }
        Ok(())
    }

    pub async fn fallocate(&self, fh: u64, offset: i64, length: i64, mode: i32) -> Res<()> {
        let h = self
            .handle(fh)
            .ok_or_else(|| Fail::new(libc::EBADF, "fallocate on a file not open for writing"))?;
        let Handle::Upper(f, r) = &*h else {
            return Err(Fail::new(libc::EBADF, "file not open for writing"));
        };
        let w = r.w.as_ref().expect("writable");
        let _g = w.lock.read().await;
        w.journal
            .touch(&w.upper, &r.tree.node(tree::ROOT).meta)
            .map_err(|e| io_fail("journal", e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, length) };
        if rc != 0 {
            return Err(io_fail("fallocate", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Run a change on the writable tree behind `ino`, holding its lock.
    async fn change<T>(&self, ino: u64, f: impl FnOnce(&RootFs) -> Res<T>) -> Res<T> {
        let r = self.must_write(ino).await?;
        let _g = r.w.as_ref().expect("writable").lock.write().await;
        tokio::task::block_in_place(|| f(&r))
    }

    pub async fn setattr(&self, ino: u64, a: SetAttr) -> Res<FileAttr> {
        let r = self.must_write(ino).await?;
        let _g = r.w.as_ref().expect("writable").lock.write().await;
        r.setattr(ino, &a).await
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
            Key::Status => Ok(slice(self.status().as_bytes(), offset, size)),
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
        if let Some(r) = self.writable(ino).await? {
            return Ok(Bytes::from(r.readlink(ino)?));
        }
        match self.node(ino)? {
            Node::Tree(r, id) if r.tree.node(id).meta.kind == tree::Kind::Symlink => {
                Ok(Bytes::copy_from_slice(&r.tree.node(id).meta.link))
            }
            _ => Err(Fail::new(libc::EINVAL, "not a symlink")),
        }
    }

    pub async fn xattrs(&self, ino: u64) -> Res<Vec<(Vec<u8>, Vec<u8>)>> {
        if let Some(r) = self.writable(ino).await? {
            return r.xattrs(ino);
        }
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

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        self.spawn(|fs| async move {
            match fs.getattr(ino, fh).await {
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
                Ok((fh, fl)) => reply.opened(fh, fl),
                Err(f) => {
                    fs.fail("open", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        self.spawn(|fs| async move {
            match fs.read(ino, fh, offset.max(0) as u64, size).await {
                Ok(b) => reply.data(&b),
                Err(f) => {
                    fs.fail("read", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.release(fh);
        reply.ok();
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        // A directory under a digest never changes, and one of a writable
        // tree changes only through this mount (the kernel drops its cached
        // listing when it does): the kernel may keep listings, so a second
        // `find` or `ls -R` costs no READDIR at all.
        let immutable = match self.inner.node(ino) {
            Ok(Node::Tree(..) | Node::W(..)) => true,
            Ok(Node::Ns(k)) => !k.mutable(),
            _ => false,
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

    fn access(&mut self, _req: &Request<'_>, ino: u64, mask: i32, reply: ReplyEmpty) {
        let writable = matches!(
            self.inner.node(ino),
            Ok(Node::W(..) | Node::Ns(Key::WRootfs(..) | Key::Ctl))
        );
        if mask & libc::W_OK != 0 && !writable {
            reply.error(libc::EROFS)
        } else {
            reply.ok()
        }
    }

    // Changes: only a tag's rootfs/ takes them; everything else is EROFS.

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(timespec),
            mtime: mtime.map(timespec),
        };
        self.spawn(|fs| async move {
            match fs.setattr(ino, a).await {
                Ok(attr) => reply.attr(&SHORT, &attr),
                Err(f) => {
                    fs.fail("setattr", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (name.as_bytes().to_vec(), req.uid(), req.gid());
        self.spawn(|fs| async move {
            let r = fs
                .change(parent, |r| {
                    r.mknod(parent, &name, mode & !umask, rdev, uid, gid)
                })
                .await;
            entry_reply(&fs, "mknod", r, reply)
        });
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (name.as_bytes().to_vec(), req.uid(), req.gid());
        self.spawn(|fs| async move {
            let r = fs
                .change(parent, |r| r.mkdir(parent, &name, mode & !umask, uid, gid))
                .await;
            entry_reply(&fs, "mkdir", r, reply)
        });
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn(|fs| async move {
            let r = fs.change(parent, |r| r.unlink(parent, &name)).await;
            empty_reply(&fs, "unlink", r, reply)
        });
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn(|fs| async move {
            let r = fs.change(parent, |r| r.rmdir(parent, &name)).await;
            empty_reply(&fs, "rmdir", r, reply)
        });
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (link_name.as_bytes().to_vec(), req.uid(), req.gid());
        let target = target.to_path_buf();
        self.spawn(|fs| async move {
            let r = fs
                .change(parent, |r| r.symlink(parent, &name, &target, uid, gid))
                .await;
            entry_reply(&fs, "symlink", r, reply)
        });
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.spawn(|fs| async move {
            let r = match fs.must_write(newparent).await {
                Ok(to) => {
                    let same = fs
                        .must_write(parent)
                        .await
                        .is_ok_and(|from| Arc::ptr_eq(&from, &to));
                    if same {
                        fs.change(parent, |r| {
                            r.rename(parent, &name, newparent, &newname, flags)
                        })
                        .await
                    } else {
                        Err(Fail::new(libc::EXDEV, "rename across images"))
                    }
                }
                Err(f) => Err(f),
            };
            empty_reply(&fs, "rename", r, reply)
        });
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newname = newname.as_bytes().to_vec();
        self.spawn(|fs| async move {
            let r = fs.change(ino, |r| r.link(ino, newparent, &newname)).await;
            entry_reply(&fs, "link", r, reply)
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.spawn(|fs| async move {
            match fs.write(fh, offset.max(0) as u64, data).await {
                Ok(n) => reply.written(n),
                Err(f) => {
                    fs.fail("write", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        let (name, uid, gid) = (name.as_bytes().to_vec(), req.uid(), req.gid());
        self.spawn(|fs| async move {
            let made = fs
                .change(parent, |r| r.create(parent, &name, mode & !umask, uid, gid))
                .await;
            match made {
                Ok((attr, file)) => match fs.must_write(parent).await {
                    Ok(r) => {
                        let fh = fs.add_handle(Handle::Upper(Arc::new(file), r));
                        reply.created(&SHORT, &attr, 0, fh, 0)
                    }
                    Err(f) => reply.error(f.errno),
                },
                Err(f) => {
                    fs.fail("create", &f);
                    reply.error(f.errno)
                }
            }
        });
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, fh: u64, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(|fs| async move {
            let r = fs.fsync(ino, fh).await;
            empty_reply(&fs, "fsync", r, reply)
        });
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(|fs| async move {
            let r = match fs.writable(ino).await {
                Ok(Some(r)) => r.sync_names(ino),
                Ok(None) => Ok(()),
                Err(f) => Err(f),
            };
            empty_reply(&fs, "fsyncdir", r, reply)
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.spawn(|fs| async move {
            let r = fs.fallocate(fh, offset, length, mode).await;
            empty_reply(&fs, "fallocate", r, reply)
        });
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.spawn(|fs| async move {
            let r = fs
                .change(ino, |r| r.setxattr(ino, &name, &value, flags))
                .await;
            empty_reply(&fs, "setxattr", r, reply)
        });
    }

    fn removexattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn(|fs| async move {
            let r = fs.change(ino, |r| r.removexattr(ino, &name)).await;
            empty_reply(&fs, "removexattr", r, reply)
        });
    }
}

fn timespec(t: fuser::TimeOrNow) -> libc::timespec {
    match t {
        fuser::TimeOrNow::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        fuser::TimeOrNow::SpecificTime(t) => {
            let (sec, nsec) = match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                Err(e) => {
                    let d = e.duration();
                    let (s, n) = (d.as_secs() as i64, d.subsec_nanos() as i64);
                    if n == 0 {
                        (-s, 0)
                    } else {
                        (-s - 1, 1_000_000_000 - n)
                    }
                }
            };
            crate::upper::timespec(sec, nsec)
        }
    }
}

fn entry_reply(fs: &Inner, what: &str, r: Res<FileAttr>, reply: ReplyEntry) {
    match r {
        Ok(attr) => reply.entry(&SHORT, &attr, 0),
        Err(f) => {
            fs.fail(what, &f);
            reply.error(f.errno)
        }
    }
}

fn empty_reply(fs: &Inner, what: &str, r: Res<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(f) => {
            fs.fail(what, &f);
            reply.error(f.errno)
        }
    }
}
