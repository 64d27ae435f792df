//! The registry side of the namespace: catalog, tags, tag → digest
//! resolution and artifacts, each memoized with single-flight. Answers that
//! can change (catalog, tags, tag resolution) live `tag_ttl`; failures live
//! `neg_ttl` so probing shells do not flood the registry; anything addressed
//! by digest lives as long as the process.

pub mod edit;
mod files;
pub mod fs;
pub mod inolog;
mod lookup;
pub mod prune;

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ggfs::image::manifest::{self, Platform};
use ggfs::image::{Artifact, Image, Layer, Source};
use ggfs::{Digest, Error, RawManifest};
use tokio::sync::OnceCell;

use crate::backend::Registry;
use crate::lower::cache::{self, Cache};
use crate::stats::{CountingSource, Stats};

/// A failure as the filesystem reports it: an errno and a message for the log.
#[derive(Clone, Debug)]
pub struct Fail {
    pub errno: i32,
    pub msg: Arc<str>,
}

pub type Res<T> = std::result::Result<T, Fail>;

impl Fail {
    pub fn new(errno: i32, msg: impl Into<Arc<str>>) -> Self {
        Fail {
            errno,
            msg: msg.into(),
        }
    }

    pub fn noent(what: impl std::fmt::Display) -> Self {
        Fail::new(libc::ENOENT, format!("{what} not found"))
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let errno = match &e {
            Error::NotFound(_) | Error::Reference { .. } => libc::ENOENT,
            Error::Auth { .. } => libc::EACCES,
            Error::Stalled { .. } => libc::ETIMEDOUT,
            Error::NoPlatform { .. } => libc::ENOENT,
            _ => libc::EIO,
        };
        Fail::new(errno, e.to_string())
    }
}

/// When a memo entry was made, and its (possibly pending) result.
type Slot<V> = (Instant, Arc<OnceCell<Res<V>>>);

/// Memoized async results with expiry and single-flight. Expired entries
/// are dropped whenever the map has doubled since the last sweep, so a
/// daemon asked for a million names that do not exist stays as small as
/// one asked for a few.
// Not a cache crate: each caller picks the lifetimes (tag_ttl, FOREVER, 30 s)
// and a failure lives another (neg_ttl); concurrent callers share one
// computation and its error; `peek` serves stale values on purpose.
// quick_cache has no expiry, mini-moka no single-flight or per-entry expiry,
// and moka's `Expiry` sees only key and value, so the lifetimes would have to
// ride in the value, and it hides the expired entries `peek` wants.
pub struct Memo<K, V> {
    map: Mutex<HashMap<K, Slot<V>>>,
    sweep_at: std::sync::atomic::AtomicUsize,
}

/// Fewest entries before a sweep.
const SWEEP_MIN: usize = 256;

impl<K: Hash + Eq + Clone, V: Clone> Default for Memo<K, V> {
    fn default() -> Self {
        Memo {
            map: Mutex::new(HashMap::new()),
            sweep_at: SWEEP_MIN.into(),
        }
    }
}

fn fresh<V>(slot: &Slot<V>, now: Instant, ok_ttl: Duration, err_ttl: Duration) -> bool {
    let (born, cell) = slot;
    match cell.get() {
        None => true,
        Some(Ok(_)) => now.duration_since(*born) < ok_ttl,
        Some(Err(_)) => now.duration_since(*born) < err_ttl,
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Memo<K, V> {
    pub async fn get<F, Fut>(&self, key: &K, ok_ttl: Duration, err_ttl: Duration, f: F) -> Res<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Res<V>>,
    {
        let cell = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if !map.get(key).is_some_and(|s| fresh(s, now, ok_ttl, err_ttl)) {
                map.insert(key.clone(), (now, Arc::new(OnceCell::new())));
                self.sweep(&mut map, now, ok_ttl, err_ttl);
            }
            map[key].1.clone()
        };
        cell.get_or_init(f).await.clone()
    }

    /// Drop the expired entries once the map has doubled since the last
    /// sweep (amortized O(1) per insert).
    fn sweep(&self, map: &mut HashMap<K, Slot<V>>, now: Instant, ok: Duration, err: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        if map.len() < self.sweep_at.load(Relaxed) {
            return;
        }
        map.retain(|_, s| fresh(s, now, ok, err));
        self.sweep_at.store((map.len() * 2).max(SWEEP_MIN), Relaxed);
    }

    /// How many entries are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Drop the entry for `key` if it holds a value, nobody is waiting on
    /// it, and `drop` (called with the map locked) agrees.
    pub fn forget_if(&self, key: &K, drop: impl FnOnce(&V) -> bool) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, cell)) = map.get(key) else {
            return false;
        };
        let go = Arc::strong_count(cell) == 1 && matches!(cell.get(), Some(Ok(v)) if drop(v));
        if go {
            map.remove(key);
        }
        go
    }

    /// Drop an entry: the next `get` computes it anew.
    pub fn forget(&self, key: &K) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(key);
    }

    /// The value if it is there and younger than `ttl`.
    pub fn fresh(&self, key: &K, ttl: Duration) -> Option<V> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (born, cell) = map.get(key)?;
        if born.elapsed() >= ttl {
            return None;
        }
        cell.get()?.as_ref().ok().cloned()
    }

    /// The value if it is already there (expired or not).
    pub fn peek(&self, key: &K) -> Option<V> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)?.1.get()?.as_ref().ok().cloned()
    }
}

/// An image's referrers: the index the registry answered, and its entries.
pub struct Referrers {
    pub json: Vec<u8>,
    pub digests: Vec<Digest>,
}

/// What a manifest is, as the namespace shows it.
pub enum Art {
    Image {
        image: Box<Image>,
        layers: Vec<Layer>,
    },
    Index {
        raw: RawManifest,
        /// Directory name (`linux-arm64-v8`) and child manifest digest.
        children: Vec<(String, Digest)>,
    },
}

impl Art {
    pub fn raw(&self) -> &RawManifest {
        match self {
            Art::Image { image, .. } => &image.raw,
            Art::Index { raw, .. } => raw,
        }
    }
}

const FOREVER: Duration = Duration::from_secs(u32::MAX as u64);

pub struct Namespace {
    reg: Arc<dyn Registry>,
    cache: Arc<Cache>,
    pub stats: Arc<Stats>,
    pub tag_ttl: Duration,
    pub neg_ttl: Duration,
    /// When set, indexes only show this platform's directories.
    pub platform: Option<Platform>,
    /// `rmdir REPO/TAG` deletes the tag (mount option --allow-delete).
    pub allow_delete: bool,
    /// When a lazily read layer is fetched whole in the background.
    pub fetch_rest: crate::lower::fetch::When,
    catalog: Memo<(), Option<Arc<Vec<String>>>>,
    tags: Memo<String, Arc<Vec<String>>>,
    resolved: Memo<(String, String), Digest>,
    referrers: Memo<(String, Digest), Arc<Referrers>>,
    arts: Memo<Digest, Arc<Art>>,
    seeds: Mutex<HashMap<Digest, RawManifest>>,
    sources: Mutex<HashMap<String, Arc<dyn Source>>>,
}

impl Namespace {
    pub fn new(
        reg: Arc<dyn Registry>,
        stats: Arc<Stats>,
        cache: Arc<Cache>,
        tag_ttl: Duration,
    ) -> Self {
        Namespace {
            reg,
            cache,
            stats,
            tag_ttl,
            neg_ttl: Duration::from_secs(5),
            platform: None,
            allow_delete: false,
            fetch_rest: crate::lower::fetch::When::After(crate::lower::fetch::DEFAULT_AFTER),
            catalog: Memo::default(),
            tags: Memo::default(),
            resolved: Memo::default(),
            referrers: Memo::default(),
            arts: Memo::default(),
            seeds: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
        }
    }

    pub fn source(&self, repo: &str) -> Arc<dyn Source> {
        let mut s = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        s.entry(repo.to_string())
            .or_insert_with(|| {
                let counted = CountingSource::wrap(self.reg.source(repo), self.stats.clone());
                CachingSource::wrap(counted, self.cache.clone())
            })
            .clone()
    }

    pub fn registry_name(&self) -> String {
        self.reg.name()
    }

    pub fn sink(&self, repo: &str) -> ggfs::Result<Arc<dyn ggfs::image::Sink>> {
        self.reg.sink(repo)
    }

    /// What `repo:tag` points at in the registry right now (no memo).
    pub async fn tag_digest(&self, repo: &str, tag: &str) -> ggfs::Result<Option<Digest>> {
        self.stats.request();
        self.reg.head(repo, tag).await
    }

    /// What refers to `subject` (re-read after `tag_ttl`).
    pub async fn referrers(&self, repo: &str, subject: &Digest) -> Res<Arc<Referrers>> {
        let key = (repo.to_string(), subject.clone());
        self.referrers
            .get(&key, self.tag_ttl, self.neg_ttl, || async {
                self.stats.request();
                let index = self.reg.referrers(repo, subject).await?;
                let json = serde_json::to_vec_pretty(&index)
                    .map_err(|e| Fail::new(libc::EIO, e.to_string()))?;
                let digests = index
                    .manifests()
                    .iter()
                    .filter_map(|d| manifest::digest_of(d).ok())
                    .collect();
                Ok(Arc::new(Referrers { json, digests }))
            })
            .await
    }

    /// Forget what was read of `subject`'s referrers (one was just added).
    pub fn forget_referrers(&self, repo: &str, subject: &Digest) {
        self.referrers.forget(&(repo.to_string(), subject.clone()));
    }

    /// Delete `repo:tag` from the registry: by tag where the registry can
    /// (OCI distribution 1.1), else its manifest by digest when no other tag
    /// shares it (the registry would take those along).
    pub async fn delete_tag(&self, repo: &str, tag: &str) -> Res<()> {
        let io = |e: Error| Fail::new(libc::EIO, format!("deleting {repo}:{tag}: {e}"));
        let d = self
            .tag_digest(repo, tag)
            .await
            .map_err(io)?
            .ok_or_else(|| Fail::noent(format!("{repo}:{tag}")))?;
        if self.reg.delete(repo, tag).await.is_err() {
            let mut shared = Vec::new();
            for t in self.reg.tags(repo).await.map_err(io)? {
                if t != tag && self.tag_digest(repo, &t).await.map_err(io)? == Some(d.clone()) {
                    shared.push(t);
                }
            }
            if !shared.is_empty() {
                return Err(Fail::new(
                    libc::EBUSY,
                    format!(
                        "deleting {repo}:{tag}: the registry deletes manifests, not tags, and {} also point at {d}",
                        shared.join(", ")
                    ),
                ));
            }
            self.reg.delete(repo, d.as_str()).await.map_err(io)?;
        }
        self.resolved.forget(&(repo.to_string(), tag.to_string()));
        self.tags.forget(&repo.to_string());
        Ok(())
    }

    /// Repositories this mount has read from.
    pub fn known_repos(&self) -> Vec<String> {
        let s = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        s.keys().cloned().collect()
    }

    pub async fn mount_blob(&self, repo: &str, d: &Digest, from: &str) -> ggfs::Result<bool> {
        self.stats.request();
        self.reg.mount(repo, d, from).await
    }

    /// Point `repo:tag` at `raw` (already pushed by digest, with its blobs).
    pub async fn put_tag(&self, repo: &str, tag: &str, raw: &RawManifest) -> ggfs::Result<()> {
        self.reg.sink(repo)?.put_manifest(raw, Some(tag)).await?;
        self.resolved.forget(&(repo.to_string(), tag.to_string()));
        self.tags.forget(&repo.to_string());
        Ok(())
    }

    pub async fn catalog(&self) -> Res<Option<Arc<Vec<String>>>> {
        self.catalog
            .get(&(), self.tag_ttl, self.neg_ttl, || async {
                self.stats.request();
                Ok(self.reg.catalog().await?.map(Arc::new))
            })
            .await
    }

    pub async fn tags(&self, repo: &str) -> Res<Arc<Vec<String>>> {
        self.tags
            .get(&repo.to_string(), self.tag_ttl, self.neg_ttl, || async {
                self.stats.request();
                Ok(Arc::new(self.reg.tags(repo).await?))
            })
            .await
    }

    /// Whether the repository's listing, fetched within `tag_ttl`, names
    /// `tag` (no request).
    pub fn lists_tag(&self, repo: &str, tag: &str) -> bool {
        let tags = self.tags.fresh(&repo.to_string(), self.tag_ttl);
        tags.is_some_and(|t| t.iter().any(|t| t == tag))
    }

    /// The digest a tag points at now (re-resolved after `tag_ttl`).
    pub async fn resolve(&self, repo: &str, tag: &str) -> Res<Digest> {
        let key = (repo.to_string(), tag.to_string());
        self.resolved
            .get(&key, self.tag_ttl, self.neg_ttl, || async {
                let raw = self.source(repo).manifest(tag).await?;
                let d = raw.digest.clone();
                let mut seeds = self.seeds.lock().unwrap_or_else(|p| p.into_inner());
                seeds.insert(d.clone(), raw);
                Ok(d)
            })
            .await
    }

    /// The layers of an image whose manifest a tag lookup already holds
    /// (not yet loaded): known before its config is, so they can be opened
    /// while it is fetched. Their diff IDs are not known yet.
    pub fn seeded_layers(&self, repo: &str, digest: &Digest) -> Vec<Layer> {
        let seeds = self.seeds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Ok(manifest::Parsed::Image(m))) = seeds.get(digest).map(|r| r.parse()) else {
            return Vec::new();
        };
        let source = self.source(repo);
        m.layers()
            .iter()
            .filter_map(|desc| {
                Some(Layer {
                    digest: manifest::digest_of(desc).ok()?,
                    descriptor: desc.clone(),
                    diff_id: None,
                    source: source.clone(),
                })
            })
            .collect()
    }

    /// The artifact with this manifest digest (fetched once, verified).
    pub async fn artifact(&self, repo: &str, digest: &Digest) -> Res<Arc<Art>> {
        self.arts
            .get(digest, FOREVER, self.neg_ttl, || self.load(repo, digest))
            .await
    }

    async fn load(&self, repo: &str, digest: &Digest) -> Res<Arc<Art>> {
        let seed = {
            let mut seeds = self.seeds.lock().unwrap_or_else(|p| p.into_inner());
            seeds.remove(digest)
        };
        let source = self.source(repo);
        let raw = match seed {
            Some(raw) => raw,
            None => source.manifest(digest.as_str()).await?,
        };
        if &raw.digest != digest {
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual: raw.digest,
            }
            .into());
        }
        let art = match Artifact::from_raw(source, raw).await? {
            Artifact::Image(image) => {
                let layers = image.layers()?;
                let cfg = image.manifest.config();
                if let Ok(d) = manifest::digest_of(cfg) {
                    self.stats.note_size(&d, cfg.size());
                    // Verified by Image::load: keep it for the next mount
                    // (its write and fsync not waited for).
                    let config = bytes::Bytes::copy_from_slice(&image.config);
                    crate::lower::layer::store_later(&self.cache, cache::Kind::Blob, &d, &config);
                }
                for l in &layers {
                    self.stats.note_size(&l.digest, l.size());
                }
                Art::Image {
                    image: Box::new(image),
                    layers,
                }
            }
            Artifact::Index(index) => Art::Index {
                children: platform_dirs(&index.parsed, self.platform.as_ref()),
                raw: index.raw,
            },
        };
        Ok(Arc::new(art))
    }
}

/// One directory per index entry, named after its platform
/// (`linux-arm64-v8`); entries without one are named by digest.
pub fn platform_dirs(
    index: &ggfs::image::manifest::ImageIndex,
    only: Option<&Platform>,
) -> Vec<(String, Digest)> {
    let mut out: Vec<(String, Digest)> = Vec::new();
    for desc in index.manifests() {
        if let Some(want) = only {
            if !desc.platform().as_ref().is_some_and(|p| want.matches(p)) {
                continue;
            }
        }
        let Ok(d) = manifest::digest_of(desc) else {
            continue;
        };
        let mut name = match desc.platform() {
            Some(p) => Platform::of(p).dir_name(),
            None => d.to_string(),
        };
        if out.iter().any(|(n, _)| *n == name) {
            name = format!("{name}-{}", &d.hex()[..12]);
        }
        out.push((name, d));
    }
    out
}

/// Is `name` a valid repository path component?
pub fn valid_component(name: &str) -> bool {
    ggfs::Repository::new("localhost", name).is_ok() && !name.contains('/')
}

/// Next path components below `prefix` ("" for the top) among `repos`.
pub fn children_of(repos: &[String], prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = repos
        .iter()
        .filter_map(|r| {
            let rest = if prefix.is_empty() {
                r.as_str()
            } else {
                r.strip_prefix(prefix)?.strip_prefix('/')?
            };
            rest.split('/').next().filter(|c| !c.is_empty())
        })
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A `Source` that answers from the cache's verified whole blobs when it
/// can (manifests by digest, configs, blobs read whole before), and keeps
/// every manifest it fetches under its digest.
pub struct CachingSource {
    inner: Arc<dyn Source>,
    cache: Arc<Cache>,
}

impl CachingSource {
    pub fn wrap(inner: Arc<dyn Source>, cache: Arc<Cache>) -> Arc<dyn Source> {
        Arc::new(CachingSource { inner, cache })
    }

    fn cached(&self, d: &Digest) -> Option<std::path::PathBuf> {
        self.cache.get(cache::Kind::Blob, d)
    }
}

#[async_trait::async_trait]
impl Source for CachingSource {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn manifest(&self, reference: &str) -> ggfs::Result<RawManifest> {
        if let Ok(d) = Digest::parse(reference) {
            if let Some(bytes) = self.cached(&d).and_then(|p| std::fs::read(p).ok()) {
                if let Ok(m) = RawManifest::verified(bytes.into(), None, &d) {
                    return Ok(m);
                }
            }
        }
        let m = self.inner.manifest(reference).await?;
        // The lookup that asked does not wait for its write and fsync.
        let bytes = bytes::Bytes::copy_from_slice(&m.bytes);
        crate::lower::layer::store_later(&self.cache, cache::Kind::Blob, &m.digest, &bytes);
        Ok(m)
    }

    async fn blob(&self, digest: &Digest) -> ggfs::Result<ggfs::image::ByteStream> {
        if let Some(p) = self.cached(digest) {
            if let Ok(f) = tokio::fs::File::open(&p).await {
                return Ok(Box::pin(tokio_util::io::ReaderStream::new(f)));
            }
        }
        self.inner.blob(digest).await
    }

    async fn blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> ggfs::Result<bytes::Bytes> {
        if let Some(p) = self.cached(digest) {
            let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(p)?;
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await;
            if let Ok(Ok(buf)) = read {
                return Ok(buf.into());
            }
        }
        self.inner.blob_range(digest, offset, len).await
    }

    async fn blob_size(&self, digest: &Digest) -> ggfs::Result<u64> {
        if let Some(md) = self.cached(digest).and_then(|p| std::fs::metadata(p).ok()) {
            return Ok(md.len());
        }
        self.inner.blob_size(digest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_children() {
        let repos: Vec<String> = ["a/b", "a/c/d", "ab", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(children_of(&repos, ""), ["a", "ab", "x"]);
        assert_eq!(children_of(&repos, "a"), ["b", "c"]);
        assert_eq!(children_of(&repos, "a/c"), ["d"]);
        assert!(children_of(&repos, "x").is_empty());
        assert!(valid_component("foo-bar"));
        assert!(!valid_component(".git"));
        assert!(!valid_component("Foo"));
    }

    #[tokio::test]
    async fn memo_expires_and_shares() {
        let m: Memo<u8, u32> = Memo::default();
        let calls = std::sync::atomic::AtomicU32::new(0);
        let f = || async { Ok(calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) };
        let long = Duration::from_secs(60);
        assert_eq!(m.get(&1, long, long, f).await.unwrap(), 0);
        assert_eq!(m.get(&1, long, long, f).await.unwrap(), 0);
        assert_eq!(m.get(&1, Duration::ZERO, long, f).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn memo_of_a_million_misses_stays_small() {
        let m: Memo<u32, u32> = Memo::default();
        let long = Duration::from_secs(60);
        for k in 0..1_000_000 {
            // Misses remembered for no time (a `neg_ttl` of 0): each is
            // expired once answered, and goes at the next sweep.
            let r = m.get(&k, long, Duration::ZERO, || async { Err(Fail::noent("x")) });
            assert!(r.await.is_err());
        }
        assert!(m.len() <= SWEEP_MIN, "{} entries kept", m.len());
        // What has not expired stays.
        for k in 0..1000 {
            assert_eq!(m.get(&k, long, long, || async { Ok(k) }).await.unwrap(), k);
        }
        assert!(m.len() >= 1000);
    }
}
