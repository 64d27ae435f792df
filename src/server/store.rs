//! The registry's storage: content-addressed blobs shared by all repositories,
//! and per-repository links (blobs, manifests, tags) that decide what each
//! repository can see. Metadata lives in memory behind one lock; in disk mode
//! every change is also written through as small files, and blob bytes live
//! only on disk, written to an upload file and renamed into place once verified.
//! Content is removed when a delete leaves no repository linking it.
//!
//! Disk layout under the root:
//! `blobs/sha256/<hex>` content; `uploads/<id>` sessions in progress;
//! `repositories/<name>/_layers/sha256/<hex>` (empty), `_manifests/sha256/<hex>`
//! (holds the media type), `_tags/<tag>` (holds the digest).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::error::{ApiError, ApiResult};
use crate::digest::{BlobWriter, Digest, Hasher};
use crate::error::{Error, Result};

/// What one repository can see.
#[derive(Default)]
pub struct Repo {
    pub blobs: HashSet<Digest>,
    /// Manifest digest to the media type it was pushed with.
    pub manifests: HashMap<Digest, String>,
    pub tags: BTreeMap<String, Digest>,
    /// Subject digest to (referrer manifest digest to its descriptor).
    pub referrers: HashMap<Digest, BTreeMap<Digest, Value>>,
}

impl Repo {
    fn is_empty(&self) -> bool {
        self.blobs.is_empty() && self.manifests.is_empty() && self.tags.is_empty()
    }

    /// Forget a manifest, the tags naming it and its referrer entry.
    fn drop_manifest(&mut self, digest: &Digest) -> Vec<String> {
        self.manifests.remove(digest);
        let tags: Vec<String> = self
            .tags
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(t, _)| t.clone())
            .collect();
        for t in &tags {
            self.tags.remove(t);
        }
        self.referrers.retain(|_, refs| {
            refs.remove(digest);
            !refs.is_empty()
        });
        tags
    }
}

/// A manifest about to be recorded in a repository.
#[derive(Debug)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    /// Blobs (config, layers) that must already be in the repository.
    pub blobs: Vec<Digest>,
    /// Manifests (index children) that must already be in the repository.
    pub children: Vec<Digest>,
    /// The `subject` digest and this manifest's descriptor for the referrers API.
    pub subject: Option<(Digest, Value)>,
}

/// Where an upload's bytes accumulate until they are verified.
enum Sink {
    Memory(BytesMut),
    Disk {
        path: PathBuf,
        file: tokio::fs::File,
    },
}

/// One blob upload session.
pub struct Upload {
    pub repo: String,
    hasher: Hasher,
    sink: Sink,
    touched: Instant,
}

/// Sessions idle this long are dropped (with their bytes) when the next
/// upload starts.
const UPLOAD_TTL: Duration = Duration::from_secs(3600);

/// Where an upload stood before a chunk, to undo a chunk that failed midway.
pub struct Mark {
    hasher: Hasher,
}

impl Upload {
    /// Bytes received so far.
    pub fn offset(&self) -> u64 {
        self.hasher.len()
    }

    pub fn mark(&self) -> Mark {
        Mark {
            hasher: self.hasher.clone(),
        }
    }

    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        match &mut self.sink {
            Sink::Memory(buf) => buf.extend_from_slice(chunk),
            Sink::Disk { path, file } => file
                .write_all(chunk)
                .await
                .map_err(|e| Error::io(path.display().to_string(), e))?,
        }
        self.hasher.update(chunk);
        self.touched = Instant::now();
        Ok(())
    }

    /// Cut the upload back to where `mark` was taken.
    pub async fn rollback(&mut self, mark: Mark) -> Result<()> {
        let len = mark.hasher.len();
        match &mut self.sink {
            Sink::Memory(buf) => buf.truncate(len as usize),
            Sink::Disk { path, file } => {
                let ctx = |e| Error::io(path.display().to_string(), e);
                file.flush().await.map_err(ctx)?;
                file.set_len(len).await.map_err(ctx)?;
                file.seek(SeekFrom::Start(len)).await.map_err(ctx)?;
            }
        }
        self.hasher = mark.hasher;
        Ok(())
    }

    /// The digest of everything received.
    pub fn digest(&self) -> Digest {
        self.hasher.clone().finish()
    }

    /// The digest of everything received in `expected`'s algorithm: the
    /// running sha256, or the bytes hashed again for sha512.
    async fn digest_like(&mut self, expected: &Digest) -> Result<Digest> {
        if expected.algorithm() == "sha256" {
            return Ok(self.digest());
        }
        match &mut self.sink {
            Sink::Memory(buf) => Ok(expected.of_like(buf)),
            Sink::Disk { path, file } => {
                file.flush().await.map_err(io_err(path))?;
                let (path, expected) = (path.clone(), expected.clone());
                tokio::task::spawn_blocking(move || {
                    let f = std::fs::File::open(&path).map_err(io_err(&path))?;
                    let mut h = Hasher::like(&expected);
                    let mut r = std::io::BufReader::with_capacity(256 * 1024, f);
                    std::io::copy(&mut r, &mut h).map_err(io_err(&path))?;
                    Ok(h.finish())
                })
                .await
                .map_err(|e| Error::invalid("rehashing an upload", e.to_string()))?
            }
        }
    }
}

/// An upload session; `None` once it has been committed or cancelled, for
/// requests that were waiting on its lock meanwhile.
pub type Session = Arc<tokio::sync::Mutex<Option<Upload>>>;

pub struct Store {
    root: Option<PathBuf>,
    /// Held shared while content is written and linked, exclusively while
    /// unreferenced content is removed, so removal never races a new link.
    gate: tokio::sync::RwLock<()>,
    blobs: RwLock<HashMap<Digest, Bytes>>,
    meta: Mutex<BTreeMap<String, Repo>>,
    uploads: Mutex<HashMap<String, Session>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path.display().to_string(), e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-updated in a
    // way that matters more than refusing all further requests would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    pub fn memory() -> Self {
        Store {
            root: None,
            gate: tokio::sync::RwLock::new(()),
            blobs: RwLock::default(),
            meta: Mutex::default(),
            uploads: Mutex::default(),
        }
    }

    /// Open (or create) a disk store and load its repositories.
    pub fn disk(root: &Path) -> Result<Self> {
        for sub in ["blobs", "repositories"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        // Upload sessions do not survive a restart.
        let uploads = root.join("uploads");
        if uploads.exists() {
            std::fs::remove_dir_all(&uploads).map_err(io_err(&uploads))?;
        }
        std::fs::create_dir_all(&uploads).map_err(io_err(&uploads))?;
        let store = Store {
            root: Some(root.to_path_buf()),
            ..Store::memory()
        };
        let mut repos = BTreeMap::new();
        load_repos(&root.join("repositories"), "", &mut repos)?;
        store.index_referrers(&mut repos)?;
        *lock(&store.meta) = repos;
        Ok(store)
    }

    /// Rebuild each repository's referrers from its manifests' `subject`.
    fn index_referrers(&self, repos: &mut BTreeMap<String, Repo>) -> Result<()> {
        for repo in repos.values_mut() {
            for (digest, mt) in &repo.manifests {
                let bytes = self.read_small_sync(digest)?;
                if let Some((subject, desc)) = super::manifests::referrer_of(&bytes, mt, digest) {
                    repo.referrers
                        .entry(subject)
                        .or_default()
                        .insert(digest.clone(), desc);
                }
            }
        }
        Ok(())
    }

    fn blob_path(root: &Path, d: &Digest) -> PathBuf {
        root.join("blobs").join(d.algorithm()).join(d.hex())
    }

    fn repo_dir(root: &Path, name: &str) -> PathBuf {
        root.join("repositories").join(name)
    }

    fn link_path(root: &Path, name: &str, kind: &str, d: &Digest) -> PathBuf {
        Self::repo_dir(root, name)
            .join(kind)
            .join(d.algorithm())
            .join(d.hex())
    }

    fn tag_path(root: &Path, name: &str, tag: &str) -> PathBuf {
        Self::repo_dir(root, name).join("_tags").join(tag)
    }

    /// Memory mode's content; see [`lock`] on poisoning.
    fn memory_blobs(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Digest, Bytes>> {
        self.blobs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn memory_blobs_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Digest, Bytes>> {
        self.blobs.write().unwrap_or_else(|p| p.into_inner())
    }

    // ---- metadata ----

    pub fn has_blob(&self, repo: &str, d: &Digest) -> bool {
        lock(&self.meta)
            .get(repo)
            .is_some_and(|r| r.blobs.contains(d))
    }

    pub fn repo_exists(&self, repo: &str) -> bool {
        lock(&self.meta).contains_key(repo)
    }

    pub fn link_blob(&self, repo: &str, d: &Digest) -> Result<()> {
        let mut meta = lock(&self.meta);
        if let Some(root) = &self.root {
            write_small(&Self::link_path(root, repo, "_layers", d), b"")?;
        }
        meta.entry(repo.to_string())
            .or_default()
            .blobs
            .insert(d.clone());
        Ok(())
    }

    /// Link a blob that `from` has into `to` (cross-repository mount).
    /// False when `from` does not have it.
    pub async fn mount(&self, from: &str, to: &str, d: &Digest) -> Result<bool> {
        let _gate = self.gate.read().await;
        if !self.has_blob(from, d) {
            return Ok(false);
        }
        self.link_blob(to, d)?;
        Ok(true)
    }

    /// Remove a blob from a repository's view, and its bytes once no
    /// repository references them. False if it was not there.
    pub async fn delete_blob(&self, repo: &str, d: &Digest) -> Result<bool> {
        if !self.unlink_blob(repo, d)? {
            return Ok(false);
        }
        self.forget_if_orphan(d).await?;
        Ok(true)
    }

    fn unlink_blob(&self, repo: &str, d: &Digest) -> Result<bool> {
        let mut meta = lock(&self.meta);
        let Some(r) = meta.get_mut(repo) else {
            return Ok(false);
        };
        if !r.blobs.remove(d) {
            return Ok(false);
        }
        if let Some(root) = &self.root {
            remove_file(&Self::link_path(root, repo, "_layers", d))?;
        }
        if r.is_empty() {
            meta.remove(repo);
        }
        Ok(true)
    }

    /// A tag or digest to the manifest's digest and media type.
    pub fn resolve(&self, repo: &str, reference: &str) -> Option<(Digest, String)> {
        let meta = lock(&self.meta);
        let r = meta.get(repo)?;
        let digest = match Digest::parse(reference) {
            Ok(d) => d,
            Err(_) => r.tags.get(reference)?.clone(),
        };
        let mt = r.manifests.get(&digest)?.clone();
        Some((digest, mt))
    }

    /// Store a manifest's bytes and record it (tagged if asked), after
    /// checking that everything it references is in the repository.
    pub async fn add_manifest(
        &self,
        repo: &str,
        bytes: &Bytes,
        m: ManifestRecord,
        tag: Option<&str>,
    ) -> ApiResult<()> {
        let digest = m.digest.clone();
        let result = {
            let _gate = self.gate.read().await;
            self.put_small(bytes, &digest)
                .map_err(ApiError::from)
                .and_then(|_| self.put_manifest(repo, m, tag))
        };
        if result.is_err() {
            self.forget_if_orphan(&digest).await?;
        }
        result
    }

    fn put_manifest(&self, repo: &str, m: ManifestRecord, tag: Option<&str>) -> ApiResult<()> {
        let mut meta = lock(&self.meta);
        let existing = meta.get(repo);
        let has_blob = |d: &Digest| existing.is_some_and(|r| r.blobs.contains(d));
        let has_manifest = |d: &Digest| existing.is_some_and(|r| r.manifests.contains_key(d));
        if let Some(d) = m.blobs.iter().find(|d| !has_blob(d)) {
            return Err(ApiError::manifest_blob_unknown(d, "blob"));
        }
        if let Some(d) = m.children.iter().find(|d| !has_manifest(d)) {
            return Err(ApiError::manifest_blob_unknown(d, "manifest"));
        }
        if let Some(root) = &self.root {
            let link = Self::link_path(root, repo, "_manifests", &m.digest);
            write_small(&link, m.media_type.as_bytes())?;
            if let Some(tag) = tag {
                let path = Self::tag_path(root, repo, tag);
                write_small(&path, m.digest.as_str().as_bytes())?;
            }
        }
        let r = meta.entry(repo.to_string()).or_default();
        if let Some((subject, desc)) = m.subject {
            r.referrers
                .entry(subject)
                .or_default()
                .insert(m.digest.clone(), desc);
        }
        if let Some(tag) = tag {
            r.tags.insert(tag.to_string(), m.digest.clone());
        }
        r.manifests.insert(m.digest, m.media_type);
        Ok(())
    }

    /// Delete a manifest by digest (with its tags and, once unreferenced,
    /// its bytes), or just a tag. False if the reference was unknown.
    pub async fn delete_manifest(&self, repo: &str, reference: &str) -> Result<bool> {
        if !self.unlink_manifest(repo, reference)? {
            return Ok(false);
        }
        if let Ok(d) = Digest::parse(reference) {
            self.forget_if_orphan(&d).await?;
        }
        Ok(true)
    }

    fn unlink_manifest(&self, repo: &str, reference: &str) -> Result<bool> {
        let mut meta = lock(&self.meta);
        let Some(r) = meta.get_mut(repo) else {
            return Ok(false);
        };
        let tags = match Digest::parse(reference) {
            Ok(d) if r.manifests.contains_key(&d) => {
                if let Some(root) = &self.root {
                    remove_file(&Self::link_path(root, repo, "_manifests", &d))?;
                }
                r.drop_manifest(&d)
            }
            Ok(_) => return Ok(false),
            Err(_) if r.tags.remove(reference).is_some() => vec![reference.to_string()],
            Err(_) => return Ok(false),
        };
        if let Some(root) = &self.root {
            for t in tags {
                remove_file(&Self::tag_path(root, repo, &t))?;
            }
        }
        if r.is_empty() {
            meta.remove(repo);
        }
        Ok(true)
    }

    /// Sorted tags, or None when the repository is unknown.
    pub fn tags(&self, repo: &str) -> Option<Vec<String>> {
        lock(&self.meta)
            .get(repo)
            .map(|r| r.tags.keys().cloned().collect())
    }

    /// Every manifest of a repository, by digest: its media type and the
    /// tags naming it (what GCR's tags/list adds as `manifest`); None when
    /// the repository is unknown.
    pub fn manifest_tags(&self, repo: &str) -> Option<BTreeMap<Digest, (String, Vec<String>)>> {
        let meta = lock(&self.meta);
        let r = meta.get(repo)?;
        let mut out: BTreeMap<Digest, (String, Vec<String>)> = r
            .manifests
            .iter()
            .map(|(d, mt)| (d.clone(), (mt.clone(), Vec::new())))
            .collect();
        for (tag, d) in &r.tags {
            if let Some(entry) = out.get_mut(d) {
                entry.1.push(tag.clone());
            }
        }
        Some(out)
    }

    pub fn repositories(&self) -> Vec<String> {
        lock(&self.meta).keys().cloned().collect()
    }

    /// Descriptors of the manifests whose subject is `subject`, by digest.
    pub fn referrers(&self, repo: &str, subject: &Digest) -> Vec<Value> {
        lock(&self.meta)
            .get(repo)
            .and_then(|r| r.referrers.get(subject))
            .map(|refs| refs.values().cloned().collect())
            .unwrap_or_default()
    }

    // ---- content ----

    /// The size of stored content, if present (in any repository).
    pub async fn content_size(&self, d: &Digest) -> Result<Option<u64>> {
        let Some(root) = &self.root else {
            let blobs = self.memory_blobs();
            return Ok(blobs.get(d).map(|b| b.len() as u64));
        };
        let path = Self::blob_path(root, d);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path.display().to_string(), e)),
        }
    }

    /// `len` bytes of stored content from `start`, streamed.
    pub async fn read_content(&self, d: &Digest, start: u64, len: u64) -> Result<Body> {
        let Some(root) = &self.root else {
            let blobs = self.memory_blobs();
            let b = blobs
                .get(d)
                .ok_or_else(|| Error::NotFound(format!("blob {d}")))?;
            let end = start.saturating_add(len).min(b.len() as u64) as usize;
            return Ok(Body::from(b.slice((start as usize).min(end)..end)));
        };
        let path = Self::blob_path(root, d);
        let mut file = tokio::fs::File::open(&path).await.map_err(io_err(&path))?;
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(io_err(&path))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 64 * 1024);
        Ok(Body::from_stream(stream))
    }

    /// Whole stored content known to be small (manifests).
    pub async fn read_small(&self, d: &Digest) -> Result<Bytes> {
        match &self.root {
            None => self.read_small_sync(d),
            Some(root) => {
                let path = Self::blob_path(root, d);
                tokio::fs::read(&path)
                    .await
                    .map(Bytes::from)
                    .map_err(io_err(&path))
            }
        }
    }

    fn read_small_sync(&self, d: &Digest) -> Result<Bytes> {
        match &self.root {
            None => self
                .memory_blobs()
                .get(d)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("blob {d}"))),
            Some(root) => {
                let path = Self::blob_path(root, d);
                std::fs::read(&path).map(Bytes::from).map_err(io_err(&path))
            }
        }
    }

    /// Remove content that no repository links (as blob or manifest).
    async fn forget_if_orphan(&self, d: &Digest) -> Result<()> {
        let _gate = self.gate.write().await;
        let referenced = lock(&self.meta)
            .values()
            .any(|r| r.blobs.contains(d) || r.manifests.contains_key(d));
        if referenced {
            return Ok(());
        }
        match &self.root {
            None => {
                self.memory_blobs_mut().remove(d);
                Ok(())
            }
            Some(root) => remove_file(&Self::blob_path(root, d)),
        }
    }

    /// Store small content (a manifest): `bytes` (already checked to hash to `d`) as content.
    fn put_small(&self, bytes: &Bytes, d: &Digest) -> Result<()> {
        let d = d.clone();
        match &self.root {
            None => {
                self.memory_blobs_mut()
                    .entry(d.clone())
                    .or_insert_with(|| bytes.clone());
            }
            Some(root) => {
                let path = Self::blob_path(root, &d);
                if !path.exists() {
                    let mut w = BlobWriter::create(&path, d.clone(), Some(bytes.len() as u64))?;
                    std::io::Write::write_all(&mut w, bytes).map_err(io_err(&path))?;
                    w.commit()?;
                }
            }
        }
        Ok(())
    }

    // ---- uploads ----

    pub async fn start_upload(&self, repo: &str) -> Result<String> {
        self.expire_uploads(UPLOAD_TTL).await;
        let id = format!("{:032x}", rand::random::<u128>());
        let sink = match &self.root {
            None => Sink::Memory(BytesMut::new()),
            Some(root) => {
                let path = root.join("uploads").join(&id);
                let file = tokio::fs::File::create(&path)
                    .await
                    .map_err(io_err(&path))?;
                Sink::Disk { path, file }
            }
        };
        let upload = Upload {
            repo: repo.to_string(),
            hasher: Hasher::new(),
            sink,
            touched: Instant::now(),
        };
        lock(&self.uploads).insert(id.clone(), Arc::new(tokio::sync::Mutex::new(Some(upload))));
        Ok(id)
    }

    /// Cancel sessions idle for longer than `ttl` (skipping busy ones).
    async fn expire_uploads(&self, ttl: Duration) {
        let sessions: Vec<(String, Session)> = lock(&self.uploads)
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        for (id, session) in sessions {
            let Ok(mut guard) = session.try_lock() else {
                continue;
            };
            if guard.as_ref().is_some_and(|u| u.touched.elapsed() >= ttl) {
                if let Some(upload) = guard.take() {
                    self.cancel_upload(&id, upload).await;
                }
            }
        }
    }

    pub fn upload(&self, id: &str) -> Option<Session> {
        lock(&self.uploads).get(id).cloned()
    }

    /// End a session without keeping anything.
    pub async fn cancel_upload(&self, id: &str, upload: Upload) {
        lock(&self.uploads).remove(id);
        if let Sink::Disk { path, file } = upload.sink {
            drop(file);
            let _ = tokio::fs::remove_file(&path).await;
        }
    }

    /// Verify an upload against `expected` and, only if it matches, make it
    /// content and link it into the upload's repository. The session ends
    /// either way.
    pub async fn commit_upload(
        &self,
        id: &str,
        mut upload: Upload,
        expected: &Digest,
    ) -> ApiResult<()> {
        let actual = upload.digest_like(expected).await?;
        if &actual != expected {
            self.cancel_upload(id, upload).await;
            return Err(ApiError::digest_invalid(format!(
                "upload hashes to {actual}, not the {expected} given"
            ))
            .with_detail(serde_json::json!({ "expected": expected, "actual": actual })));
        }
        lock(&self.uploads).remove(id);
        let _gate = self.gate.read().await;
        let repo = upload.repo.clone();
        match (upload.sink, &self.root) {
            (Sink::Memory(buf), _) => {
                self.memory_blobs_mut()
                    .entry(actual.clone())
                    .or_insert_with(|| buf.freeze());
            }
            (Sink::Disk { path, mut file }, Some(root)) => {
                persist_upload(&path, &mut file, &Self::blob_path(root, &actual)).await?;
            }
            (Sink::Disk { path, .. }, None) => {
                return Err(ApiError::internal(Error::invalid(
                    path.display().to_string(),
                    "disk upload in a memory store",
                )))
            }
        }
        self.link_blob(&repo, &actual)?;
        Ok(())
    }
}

/// Flush an upload file and rename it to its content path (or drop it when
/// that content is already there: same digest, same bytes).
async fn persist_upload(path: &Path, file: &mut tokio::fs::File, dest: &Path) -> Result<()> {
    file.flush().await.map_err(io_err(path))?;
    file.sync_data().await.map_err(io_err(path))?;
    if tokio::fs::try_exists(dest).await.unwrap_or(false) {
        return tokio::fs::remove_file(path).await.map_err(io_err(path));
    }
    if let Some(dir) = dest.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io_err(dir))?;
    }
    tokio::fs::rename(path, dest).await.map_err(io_err(dest))
}

/// Write a small metadata file atomically (tmp + rename).
fn write_small(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    std::fs::write(tmp.path(), bytes).map_err(io_err(tmp.path()))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path.display().to_string(), e.error))?;
    Ok(())
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(path.display().to_string(), e))
        }
        _ => Ok(()),
    }
}

/// Files in `dir` named by digest (`<dir>/sha256/<hex>`), with their contents.
fn read_links(dir: &Path, with_content: bool) -> Result<Vec<(Digest, String)>> {
    let mut out = Vec::new();
    for (algo, algo_path) in list_dir(dir)? {
        for (hex, path) in list_dir(&algo_path)? {
            let Ok(d) = Digest::parse(&format!("{algo}:{hex}")) else {
                continue; // a leftover .tmp- file
            };
            let content = if with_content {
                std::fs::read_to_string(&path).map_err(io_err(&path))?
            } else {
                String::new()
            };
            out.push((d, content.trim().to_string()));
        }
    }
    Ok(out)
}

fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir.display().to_string(), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        out.push((name, entry.path()));
    }
    Ok(out)
}

/// Walk `repositories/`: a directory holding `_layers`, `_manifests` or
/// `_tags` is a repository; other children are deeper name components.
fn load_repos(dir: &Path, name: &str, repos: &mut BTreeMap<String, Repo>) -> Result<()> {
    let mut repo = Repo::default();
    for (d, _) in read_links(&dir.join("_layers"), false)? {
        repo.blobs.insert(d);
    }
    for (d, mt) in read_links(&dir.join("_manifests"), true)? {
        repo.manifests.insert(d, mt);
    }
    for (tag, path) in list_dir(&dir.join("_tags"))? {
        if tag.starts_with(".tmp-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let d = Digest::parse(text.trim())?;
        repo.tags.insert(tag, d);
    }
    if !repo.is_empty() {
        repos.insert(name.to_string(), repo);
    }
    for (child, path) in list_dir(dir)? {
        if !child.starts_with('_') && path.is_dir() {
            let sub = if name.is_empty() {
                child
            } else {
                format!("{name}/{child}")
            };
            load_repos(&path, &sub, repos)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_uploads_expire() {
        let dir = tempfile::tempdir().unwrap();
        for store in [Store::memory(), Store::disk(dir.path()).unwrap()] {
            let id = store.start_upload("r").await.unwrap();
            store.expire_uploads(UPLOAD_TTL).await;
            assert!(store.upload(&id).is_some(), "fresh session kept");
            store.expire_uploads(Duration::ZERO).await;
            assert!(store.upload(&id).is_none(), "idle session dropped");
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("uploads"))
                .unwrap()
                .count(),
            0
        );
    }
}
