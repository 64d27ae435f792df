//! What the mount shows, by inode: the namespace (repositories, tags,
//! manifests, ...) and the rootfs trees under it. What directories list and
//! names resolve to is `lookup`, the bytes of the namespace's files `files`.
//! The kernel-facing side is `fuse`; open files are `handles`; writable
//! trees are `upper::work`.
//!
//! Inodes: namespace nodes (repositories, tags, manifests, ...) are keyed by
//! what they show, so one digest's content always has one inode; each merged
//! rootfs gets its own contiguous inode range above [`TREE_BASE`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{FileAttr, FileType};
use ggfs::image::is_layer_media_type;
use ggfs::Digest;

use crate::commit as journal;
use crate::handles::Handle;
use crate::lower::cache::Cache;
use crate::lower::layer::Layers;
use crate::lower::tree::{self, NodeId, Tree};
use crate::namespace::inolog::{InoLog, Replayed};
use crate::namespace::{Art, Fail, Memo, Namespace, Res};
use crate::upper::rootfs::RootFs;

/// Inodes at and above this belong to merged rootfs trees.
const TREE_BASE: u64 = 1 << 40;
/// How long the kernel may cache anything addressed by digest.
pub(crate) const LONG: Duration = Duration::from_secs(24 * 3600);
pub(crate) const FOREVER: Duration = Duration::from_secs(u32::MAX as u64);
/// How long the kernel may cache what the namespace's writable files say.
pub(crate) const SHORT: Duration = Duration::from_secs(1);
/// How long the kernel may cache what a tag's writable rootfs says: it
/// changes only through this mount, and the kernel drops what it cached
/// of a name or inode when it changes it. (A tag moved in the registry
/// is a new rootfs, found when the tag's own short-lived entry expires.)
pub(crate) const WRITABLE_TTL: Duration = LONG;

/// A namespace node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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
    /// A platform directory of an index a tag points at: repository, tag,
    /// directory name, child manifest.
    TagChild(String, String, String, Digest),
    /// A tag's rootfs: writable, on the base image the changes started
    /// from. For a platform of an index the "tag" is `TAG/PLATFORM`.
    WRootfs(String, String, Digest),
    /// A tag's manifest.json and config.json: writing them retags or edits
    /// the config (`edit`). Repository, tag, the manifest shown.
    TagManifest(String, String, Digest),
    TagConfig(String, String, Digest),
    /// A tag made with mkdir, until a manifest is written into it.
    NewTag(String, String),
    NewManifest(String, String),
    /// `referrers/` of a manifest: what refers to it. Copying a file in
    /// attaches it.
    Referrers(String, Digest),
    /// `referrers/index.json`: the referrers index as the registry answered.
    ReferrersIndex(String, Digest),
    /// A file being copied into `referrers/` (repository, subject, name).
    Attaching(String, Digest, String),
    /// `.ggfs/status`: changed images and their commits.
    Status,
    /// `.ggfs/ctl`: `ggfs commit` writes a request, reads the reply.
    Ctl,
}

impl Key {
    /// The read-only node a tag's writable file shows.
    pub(crate) fn plain(&self) -> Option<Key> {
        match self {
            Key::TagManifest(r, _, d) => Some(Key::Manifest(r.clone(), d.clone())),
            Key::TagConfig(r, _, d) => Some(Key::Config(r.clone(), d.clone())),
            _ => None,
        }
    }

    pub(crate) fn is_dir(&self) -> bool {
        !matches!(
            self,
            Key::Stats
                | Key::Status
                | Key::Ctl
                | Key::TagManifest(..)
                | Key::TagConfig(..)
                | Key::NewManifest(..)
                | Key::ReferrersIndex(..)
                | Key::Attaching(..)
                | Key::Manifest(..)
                | Key::Config(..)
                | Key::DigestFile(..)
                | Key::Blob(..)
        )
    }

    /// Whether what this node shows can change (tags move, repos appear).
    pub(crate) fn mutable(&self) -> bool {
        matches!(
            self,
            Key::Root
                | Key::Repo(_)
                | Key::Tag(..)
                | Key::Stats
                | Key::Status
                | Key::Ctl
                | Key::NewTag(..)
                | Key::NewManifest(..)
                | Key::Referrers(..)
                | Key::ReferrersIndex(..)
                | Key::Attaching(..)
        )
    }
}

#[derive(Clone)]
pub(crate) enum Node {
    Ns(Key),
    /// A node of a read-only tree.
    Tree(Arc<RootFs>, NodeId),
    /// An inode of a writable tree.
    W(Arc<RootFs>, u64),
}

/// A namespace inode: its key, how many lookups of it the kernel holds
/// (decreased by FORGET), and when it was last handed out.
pub(crate) struct NsIno {
    key: Key,
    lookups: u64,
    used: u64,
}

impl NsIno {
    fn new(key: Key, lookups: u64) -> Self {
        let used = crate::upper::rootfs::now_secs();
        NsIno { key, lookups, used }
    }
}

/// `NsIno::lookups` of the root and of inodes an earlier daemon handed
/// out: unknown, so kept until the kernel forgets them.
const HELD: u64 = u64::MAX;

pub(crate) struct Inodes {
    /// Namespace inodes, numbered from 1 (the root) in the order given out;
    /// a number is never given out twice.
    pub(crate) keys: HashMap<u64, NsIno>,
    next_ns: u64,
    pub(crate) by_key: HashMap<Key, u64>,
    pub(crate) trees: BTreeMap<u64, Arc<RootFs>>,
    pub(crate) next_base: u64,
    /// Where the numbers given out are written, under a supervisor.
    pub(crate) log: Option<Arc<InoLog>>,
    /// Every tree given inodes, built or not (by an earlier daemon on this
    /// connection, or dropped by prune.rs): base → (end, key). A tree is
    /// rebuilt at the base it had, so the kernel's numbers keep meaning.
    pub(crate) placed: BTreeMap<u64, (u64, Key)>,
    pub(crate) base_of: HashMap<Key, u64>,
    /// Whether some placed tree is not built (so `Inner::stale` looks).
    pub(crate) unbuilt: bool,
    /// Their upper inodes: base → (st_ino → ino).
    pub(crate) uppers: HashMap<u64, HashMap<u64, u64>>,
}

impl Inodes {
    fn new(log: Option<(Arc<InoLog>, Replayed)>) -> Self {
        let mut i = Inodes {
            keys: HashMap::from([(1, NsIno::new(Key::Root, HELD))]),
            next_ns: 2,
            by_key: HashMap::from([(Key::Root, 1)]),
            trees: BTreeMap::new(),
            next_base: TREE_BASE,
            log: None,
            placed: BTreeMap::new(),
            base_of: HashMap::new(),
            unbuilt: false,
            uppers: HashMap::new(),
        };
        let Some((log, r)) = log else {
            return i;
        };
        // At the numbers they were given; forgotten ones stay unused.
        i.next_ns = r.next.max(2);
        for (ino, key) in r.keys {
            i.by_key.insert(key.clone(), ino);
            i.keys.insert(ino, NsIno::new(key, HELD));
        }
        i.next_base = r
            .trees
            .values()
            .map(|(end, _)| *end)
            .fold(TREE_BASE, u64::max);
        i.base_of = r.trees.iter().map(|(b, (_, k))| (k.clone(), *b)).collect();
        i.unbuilt = !r.trees.is_empty();
        i.placed = r.trees;
        i.uppers = r.uppers;
        i.log = Some(log);
        i
    }

    pub(crate) fn ino(&mut self, key: Key) -> u64 {
        if let Some(&i) = self.by_key.get(&key) {
            if let Some(n) = self.keys.get_mut(&i) {
                n.used = crate::upper::rootfs::now_secs();
            }
            return i;
        }
        if let Some(log) = &self.log {
            log.key(&key);
        }
        let i = self.next_ns;
        self.next_ns += 1;
        self.by_key.insert(key.clone(), i);
        self.keys.insert(i, NsIno::new(key, 0));
        i
    }

    /// The kernel was handed namespace inode `ino` in an entry (a LOOKUP,
    /// MKDIR or CREATE reply): one more lookup it holds.
    pub(crate) fn looked_up(&mut self, ino: u64) {
        if let Some(n) = self.keys.get_mut(&ino) {
            n.lookups = n.lookups.saturating_add(1);
            n.used = crate::upper::rootfs::now_secs();
        }
    }

    /// The kernel dropped `nlookup` lookups of `ino` (FORGET). The number
    /// goes only in [`Inodes::sweep`], once unused for a while: a LOOKUP
    /// answered with it may still be on its way to the kernel.
    pub(crate) fn forget(&mut self, ino: u64, nlookup: u64) {
        if ino == 1 {
            return;
        }
        if let Some(n) = self.keys.get_mut(&ino) {
            // An earlier daemon's count is unknown: a FORGET drops it all.
            n.lookups = match n.lookups {
                HELD => 0,
                l => l.saturating_sub(nlookup),
            };
            n.used = crate::upper::rootfs::now_secs();
        }
    }

    /// Drop the namespace inodes the kernel holds no lookup of and that
    /// were not handed out for `idle` seconds: how many went. A name
    /// looked up again later gets a new number.
    pub(crate) fn sweep(&mut self, idle: u64) -> usize {
        let now = crate::upper::rootfs::now_secs();
        let gone: Vec<u64> = self
            .keys
            .iter()
            .filter(|(_, n)| n.lookups == 0 && now.saturating_sub(n.used) >= idle)
            .map(|(&i, _)| i)
            .collect();
        for i in &gone {
            let Some(n) = self.keys.remove(i) else {
                continue;
            };
            if self.by_key.get(&n.key) == Some(i) {
                self.by_key.remove(&n.key);
            }
            if let Some(log) = &self.log {
                log.forgot(*i);
            }
        }
        self.compact_log();
        gone.len()
    }

    /// Compact the inode log once names forgotten and looked up again
    /// have made it much bigger than what holds now.
    fn compact_log(&self) {
        let Some(log) = self
            .log
            .as_ref()
            .filter(|l| l.wants_compacting(self.keys.len()))
        else {
            return;
        };
        let keys = self.keys.iter().filter(|(&i, _)| i != 1);
        if let Err(e) = log.compact(keys.map(|(&i, n)| (i, &n.key)), self.next_ns) {
            tracing::warn!("inode log: compacting: {e}");
        }
    }

    /// The base of the tree for `key` with `span` inodes: the one it was
    /// given before, or the next free.
    pub(crate) fn place(&mut self, key: &Key, span: u64) -> u64 {
        if let Some(&base) = self.base_of.get(key) {
            return base;
        }
        let base = self.next_base;
        self.next_base += span;
        if let Some(log) = &self.log {
            log.tree(base, self.next_base, key);
        }
        self.placed.insert(base, (self.next_base, key.clone()));
        self.base_of.insert(key.clone(), base);
        base
    }

    /// The key of the unbuilt tree `ino` is in.
    pub(crate) fn pending_tree(&self, ino: u64) -> Option<Key> {
        let (base, (end, key)) = self.placed.range(..=ino).next_back()?;
        (ino < *end && !self.trees.contains_key(base)).then(|| key.clone())
    }

    /// The key of the tree at `base`.
    pub(crate) fn tree_key(&self, base: u64) -> Option<Key> {
        Some(self.placed.get(&base)?.1.clone())
    }

    /// Take the tree at `base` out (prune.rs); its numbers stay its own.
    pub(crate) fn unlist(&mut self, base: u64) {
        self.trees.remove(&base);
        self.unbuilt = true;
    }

    pub(crate) fn get(&self, ino: u64) -> Option<Node> {
        if ino < TREE_BASE {
            return self.keys.get(&ino).map(|n| Node::Ns(n.key.clone()));
        }
        let (base, r) = self.trees.range(..=ino).next_back()?;
        r.used.store(
            crate::upper::rootfs::now_secs(),
            std::sync::atomic::Ordering::Relaxed,
        );
        if r.w.is_some() {
            return r.knows(ino).then(|| Node::W(r.clone(), ino));
        }
        let id = (ino - base) as usize;
        (id > 0 && id < r.tree.nodes.len()).then(|| Node::Tree(r.clone(), id as NodeId))
    }
}

/// What a daemon takes over from earlier ones on the same connection.
#[derive(Default)]
pub struct Takeover {
    pub log: Option<(Arc<InoLog>, Replayed)>,
    /// How many daemons served the connection before this one.
    pub generation: u64,
}

pub struct Inner {
    pub ns: Namespace,
    pub(crate) cache: Arc<Cache>,
    pub(crate) layers: Layers,
    pub(crate) inodes: Mutex<Inodes>,
    pub(crate) rootfs: Memo<(String, Digest), Arc<RootFs>>,
    pub(crate) wrootfs: Memo<(String, String, Digest), Arc<RootFs>>,
    /// Writable trees by (repository, tag).
    pub(crate) work: Mutex<HashMap<(String, String), Arc<RootFs>>>,
    /// Changed images an earlier mount left unpushed, until opened.
    pub(crate) recovered: Mutex<HashMap<(String, String), Digest>>,
    pub(crate) handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// Directories' listings, paged from the one a READDIR at offset 0
    /// took: a listing is built once per reading, not per page.
    pub(crate) listings: Mutex<super::lookup::Listings>,
    /// Tags made with mkdir, waiting for their manifest: (repository, tag).
    pub(crate) new_tags: Mutex<std::collections::BTreeSet<(String, String)>>,
    pub(crate) next_fh: AtomicU64,
    /// Below this (and not 0): a handle an earlier daemon opened.
    pub(crate) fh_base: u64,
    pub(crate) blobs: Memo<Digest, Arc<std::fs::File>>,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) start: SystemTime,
    /// Set once the kernel agreed to FUSE passthrough (fuse.rs `init`).
    pub(crate) passthrough: std::sync::OnceLock<crate::lower::passthrough::Passthrough>,
    /// Passthrough's copies, made when the mount is quiet.
    pub(crate) copies: Arc<crate::lower::backing::Copies>,
    /// The /dev/fuse connection, for passthrough's backing files.
    pub(crate) dev: std::sync::OnceLock<std::os::fd::OwnedFd>,
}

impl Inner {
    pub fn new(ns: Namespace, cache: Arc<Cache>, takeover: Takeover) -> Self {
        let layers = Layers::new(cache.clone(), ns.fetch_rest);
        let recovered = journal::recover(cache.root(), &ns.registry_name())
            .into_iter()
            .map(|s| ((s.repo, s.tag), s.base))
            .collect();
        let inodes = Inodes::new(takeover.log);
        // Handles of an earlier daemon stay in the kernel's open files:
        // ours are numbered apart from theirs.
        let fh_base = takeover.generation << 40;
        Inner {
            ns,
            layers,
            cache,
            inodes: Mutex::new(inodes),
            rootfs: Memo::default(),
            wrootfs: Memo::default(),
            work: Mutex::new(HashMap::new()),
            recovered: Mutex::new(recovered),
            handles: Mutex::new(HashMap::new()),
            listings: Mutex::default(),
            new_tags: Mutex::new(std::collections::BTreeSet::new()),
            next_fh: AtomicU64::new(fh_base + 1),
            fh_base,
            blobs: Memo::default(),
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            start: SystemTime::now(),
            passthrough: std::sync::OnceLock::new(),
            copies: Arc::default(),
            dev: std::sync::OnceLock::new(),
        }
    }
}

pub(crate) fn join(repo: &str, name: &str) -> String {
    if repo.is_empty() {
        name.to_string()
    } else {
        format!("{repo}/{name}")
    }
}

pub(crate) fn slice(b: &[u8], offset: u64, size: u32) -> Bytes {
    let start = (offset as usize).min(b.len());
    let end = start.saturating_add(size as usize).min(b.len());
    Bytes::copy_from_slice(&b[start..end])
}

impl Inner {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn ino(&self, key: Key) -> u64 {
        self.lock().ino(key)
    }

    /// See [`Inodes::looked_up`]; inodes of trees are not counted.
    pub(crate) fn looked_up(&self, ino: u64) {
        if ino != 0 && ino < TREE_BASE {
            self.lock().looked_up(ino);
        }
    }

    /// See [`Inodes::forget`]; trees go by prune.rs instead.
    pub(crate) fn forget(&self, ino: u64, nlookup: u64) {
        if ino < TREE_BASE {
            self.lock().forget(ino, nlookup);
        }
    }

    /// Whether `ino` is one an earlier daemon on this connection gave
    /// out that this one has not taken up yet.
    pub(crate) fn stale(&self, ino: u64) -> bool {
        if ino < TREE_BASE {
            return false;
        }
        let inodes = self.lock();
        inodes.unbuilt && inodes.get(ino).is_none()
    }

    /// Take up `ino`: build the tree an earlier daemon put it in, and
    /// learn its name again in a writable tree.
    pub(crate) async fn revive(&self, ino: u64) -> Res<()> {
        let pending = self.lock().pending_tree(ino);
        match pending {
            Some(Key::Rootfs(repo, d)) => drop(self.build_rootfs(&repo, &d).await?),
            Some(Key::WRootfs(repo, tag, base)) => drop(self.wrootfs(&repo, &tag, &base).await?),
            _ => {}
        }
        let tree = self
            .lock()
            .trees
            .range(..=ino)
            .next_back()
            .map(|(_, r)| r.clone());
        if let Some(r) = tree.filter(|r| r.w.is_some() && !r.knows(ino)) {
            r.relearn(ino);
        }
        Ok(())
    }

    pub(crate) fn node(&self, ino: u64) -> Res<Node> {
        self.lock()
            .get(ino)
            .ok_or_else(|| Fail::new(libc::ESTALE, format!("unknown inode {ino}")))
    }

    pub(crate) fn ns_attr(&self, ino: u64, dir: bool, size: u64) -> FileAttr {
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

    pub(crate) async fn attr(&self, ino: u64, node: &Node) -> Res<(Duration, FileAttr)> {
        let key = match node {
            Node::Tree(r, id) => return Ok((LONG, r.lower_attr(*id))),
            Node::W(r, ino) => return Ok((WRITABLE_TTL, r.getattr(*ino)?)),
            Node::Ns(k) => k,
        };
        // A tag's own files take writes: shown as writable, never cached long.
        if let Some(plain) = key.plain() {
            let (_, mut a) = Box::pin(self.attr(ino, &Node::Ns(plain))).await?;
            a.perm = 0o644;
            return Ok((SHORT, a));
        }
        match key {
            Key::NewTag(..) => {
                let mut a = self.ns_attr(ino, true, 0);
                a.mtime = self.listing_epoch();
                return Ok((SHORT, a));
            }
            Key::Referrers(..) => {
                let mut a = self.ns_attr(ino, true, 0);
                a.perm = 0o755;
                a.mtime = self.listing_epoch();
                return Ok((SHORT, a));
            }
            Key::ReferrersIndex(repo, d) => {
                let len = self.ns.referrers(repo, d).await?.json.len() as u64;
                return Ok((SHORT, self.ns_attr(ino, false, len)));
            }
            Key::NewManifest(..) | Key::Attaching(..) => {
                let mut a = self.ns_attr(ino, false, 0);
                a.perm = 0o644;
                return Ok((SHORT, a));
            }
            _ => {}
        }
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
                    None => (LONG, crate::upper::rootfs::root_attr(ino)),
                });
            }
            Key::WRootfs(repo, tag, d) => {
                let key = (repo.clone(), tag.clone(), d.clone());
                return Ok(match self.wrootfs.peek(&key) {
                    Some(r) => (WRITABLE_TTL, r.getattr(r.root_ino)?),
                    None => (WRITABLE_TTL, crate::upper::rootfs::root_attr(ino)),
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
        let mut a = self.ns_attr(ino, key.is_dir(), size);
        if key.mutable() && key.is_dir() {
            a.mtime = self.listing_epoch();
        }
        Ok((ttl, a))
    }

    /// The mtime of a directory whose registry side can change (the
    /// catalog, a repository's tags, what a tag names): it moves once per
    /// `--tag-ttl`, so the kernel, which keeps every listing (fuse.rs
    /// `opendir`), asks for it again at most that much later.
    fn listing_epoch(&self) -> SystemTime {
        let ttl = self.ns.tag_ttl.as_nanos().max(1);
        let age = self.start.elapsed().unwrap_or_default().as_nanos();
        let n = (age / ttl) as u32;
        self.start + self.ns.tag_ttl * n
    }

    pub(crate) fn stats(&self) -> String {
        self.ns.stats.render(&self.cache)
    }

    pub async fn image(&self, repo: &str, d: &Digest) -> Res<ggfs::image::Image> {
        match &*self.ns.artifact(repo, d).await? {
            Art::Image { image, .. } => Ok((**image).clone()),
            Art::Index { .. } => Err(Fail::new(libc::ENOENT, format!("{d} is an index"))),
        }
    }

    /// The digest a tag or digest directory shows.
    pub(crate) async fn art_digest(&self, key: &Key) -> Res<Option<(String, Digest)>> {
        Ok(match key {
            Key::Tag(repo, tag) => Some((repo.clone(), self.ns.resolve(repo, tag).await?)),
            Key::Art(repo, d) | Key::TagChild(repo, _, _, d) => Some((repo.clone(), d.clone())),
            _ => None,
        })
    }

    /// Fetch and merge an image's layers (once per image and process).
    pub(crate) async fn build_rootfs(&self, repo: &str, d: &Digest) -> Res<Arc<RootFs>> {
        let key = (repo.to_string(), d.clone());
        self.rootfs
            .get(&key, FOREVER, self.ns.neg_ttl, || async {
                let art = self.ns.artifact(repo, d).await?;
                let Art::Image { image, layers } = &*art else {
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
                let origin = crate::lower::layer::Origin {
                    ns: &self.ns,
                    repo,
                    image: &image.raw,
                };
                let opened = futures::future::try_join_all(
                    wanted.map(|l| self.layers.open(l, Some(&origin))),
                )
                .await?;
                let layers = opened.clone();
                let tree = tokio::task::spawn_blocking(move || {
                    Tree::build_with(layers.iter().map(|l| || l.entries()))
                })
                .await
                .map_err(|e| Fail::new(libc::EIO, e.to_string()))?;
                let key = Key::Rootfs(repo.to_string(), d.clone());
                let root_ino = self.ino(key.clone());
                let mut inodes = self.lock();
                let span = (tree.nodes.len() as u64 + 1).next_multiple_of(1024);
                let base = inodes.place(&key, span);
                self.ns.stats.tree_built();
                let r = Arc::new(RootFs {
                    tree: Arc::new(tree),
                    layers: Arc::new(opened),
                    base,
                    root_ino,
                    w: None,
                    used: crate::upper::rootfs::now_secs().into(),
                });
                inodes.trees.insert(base, r.clone());
                Ok(r)
            })
            .await
    }

    /// Open the lazily read ones of `layers`; plain layers wait for a read.
    pub(crate) async fn warm(&self, layers: Vec<ggfs::image::Layer>) {
        let opening = layers
            .iter()
            .filter(|l| crate::lower::lazy::is_lazy(l))
            .map(|l| self.layers.open(l, None));
        futures::future::join_all(opening).await;
    }

    /// The tree behind a node, if it is a rootfs directory or inside one.
    pub(crate) async fn tree_node(&self, node: &Node) -> Res<Option<(Arc<RootFs>, NodeId)>> {
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
        if let Some(r) = self.writable(ino).await? {
            return Ok((WRITABLE_TTL, self.getattr_w(&r, ino, fh)?));
        }
        let node = self.node(ino)?;
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
                let kind = crate::upper::rootfs::file_type(&r.tree.node(c).meta.kind);
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

    /// Log a failure; its errno, for the reply.
    pub(crate) fn failed(&self, what: &str, f: Fail) -> i32 {
        self.fail(what, &f);
        f.errno
    }

    pub(crate) fn fail(&self, what: &str, f: &Fail) {
        match f.errno {
            libc::ENOENT | libc::ENODATA | libc::ERANGE => tracing::debug!("{what}: {}", f.msg),
            // A refused write says why, once per request.
            libc::EROFS | libc::EPERM => tracing::info!("{what} refused: {}", f.msg),
            _ => tracing::warn!("{what}: {}", f.msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_forgot_go_and_come_back_with_new_numbers() {
        let mut i = Inodes::new(None);
        let repo = || Key::Repo("a".into());
        let a = i.ino(repo());
        i.looked_up(a);
        i.looked_up(a);
        i.forget(a, 1);
        assert_eq!(i.sweep(0), 0, "one lookup still held");
        i.forget(a, 1);
        // Forgotten, but kept while it may still be on its way in a reply.
        assert_eq!(i.sweep(600), 0);
        assert_eq!(i.sweep(0), 1);
        assert!(i.get(a).is_none());
        let again = i.ino(repo());
        assert!(again > a, "a number is never given out twice");
        // Listed only (never in an entry): goes once idle too.
        let listed = i.ino(Key::Tag("a".into(), "t".into()));
        assert_eq!(i.sweep(0), 2, "{again} and {listed}");
        i.forget(1, 5);
        assert_eq!(i.sweep(0), 0);
        assert!(matches!(i.get(1), Some(Node::Ns(Key::Root))));
    }

    #[test]
    fn a_sweep_compacts_a_log_grown_by_forgotten_names() {
        use std::os::fd::FromRawFd;
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        let open = |f: &std::fs::File| {
            let (log, r) = InoLog::open(f.try_clone().unwrap()).unwrap();
            (Arc::new(log), r)
        };
        let mut i = Inodes::new(Some(open(&f)));
        let name = |n: u64| Key::Repo(format!("a/repository/with/a/longer/name/{n:08}"));
        // Each name listed once, never looked up: ~60 bytes of log each.
        for n in 0..80_000 {
            i.ino(name(n));
        }
        let kept = i.ino(Key::Stats);
        i.looked_up(kept);
        assert_eq!(i.sweep(0), 80_000);
        let (_, r) = open(&f);
        assert_eq!(r.keys, BTreeMap::from([(kept, Key::Stats)]));
        assert_eq!(r.next, kept + 1);
        use std::os::fd::AsRawFd;
        let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert!(data > 4 << 20, "the log's first 4 MiB were freed: {data}");
    }
}
