//! Commits: the changes made under a tag's `rootfs/` become ONE new layer on
//! the image the changes started from (its "base"), pushed blobs first,
//! then the manifest by digest, then the tag. Later commits rebuild that
//! one layer from the whole upper directory, so layers do not stack up.
//!
//! Journal: each changed image has a directory in the cache (`upper/<id>/`)
//! that eviction never touches: `state.json` (registry, repository, tag,
//! base, last pushed digest, status, last error) and a `dirty` marker that
//! exists from before the first change is acknowledged until a push has
//! carried every change. A crash, a registry that is down or one that
//! refuses the push leaves the marker, so the next try (backoff, `ggfs
//! commit`, or the next mount of the same cache) pushes it again.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ggfs::image::copy::CopyOptions;
use ggfs::image::mutate;
use ggfs::image::newlayer::{self, DirHooks, LayerFormat, LayerOptions, LocalLayer};
use ggfs::Digest;
use serde::{Deserialize, Serialize};

use crate::lower::layer::LayerData;
use crate::lower::tree::Meta;
use crate::namespace::fs::Inner;
use crate::upper::rootfs::{Data, RootFs};
use crate::upper::{self, Upper, OPAQUE, ORIGIN, PRIVATE, WHITEOUT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Changed, not pushed yet (or the last try failed and will be retried).
    Pending,
    /// Every change is in the registry.
    Pushed,
    /// Pushed by digest; the tag had moved, so it was left alone.
    Conflict,
    /// The last try failed in a way a retry will not fix by itself (auth).
    Failed,
}

/// `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Saved {
    pub registry: String,
    pub repo: String,
    pub tag: String,
    pub base: Digest,
    pub status: Status,
    pub pushed: Option<Digest>,
    pub error: Option<String>,
    /// For a platform of an index (`tag` is `TAG/PLATFORM`): the index the
    /// tag pointed at when the changes began, and the last one pushed.
    #[serde(default)]
    pub index: Option<Digest>,
    #[serde(default)]
    pub pushed_index: Option<Digest>,
}

struct St {
    saved: Saved,
    materialized: bool,
    dirty: bool,
    gen: u64,
    last_write: Instant,
    failures: u32,
    retry_at: Option<Instant>,
}

pub struct Journal {
    dir: PathBuf,
    st: Mutex<St>,
    /// One commit of an image at a time.
    pub committing: tokio::sync::Mutex<()>,
}

/// The journal directory of `registry/repo:tag` under the cache.
pub fn work_dir(cache: &Path, registry: &str, repo: &str, tag: &str) -> PathBuf {
    let id = Digest::of(format!("{registry}\0{repo}\0{tag}").as_bytes());
    cache.join("upper").join(&id.hex()[..32])
}

fn read_saved(dir: &Path) -> Option<Saved> {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()
}

/// Journals of `registry` left by earlier mounts: those with changes not
/// yet pushed; the others (everything pushed) are removed.
pub fn recover(cache: &Path, registry: &str) -> Vec<Saved> {
    let Ok(rd) = std::fs::read_dir(cache.join("upper")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let dir = e.path();
        let Some(saved) = read_saved(&dir) else {
            continue;
        };
        if saved.registry != registry {
            continue;
        }
        if dir.join("dirty").exists() {
            out.push(saved);
        } else if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("removing pushed changes {}: {e}", dir.display());
        }
    }
    out
}

impl Journal {
    /// The journal at `dir`, as a previous mount left it (if it did).
    pub fn open(
        dir: &Path,
        registry: &str,
        (repo, tag): (&str, &str),
        base: Digest,
        index: Option<Digest>,
    ) -> Self {
        let mut saved = Saved {
            registry: registry.to_string(),
            repo: repo.to_string(),
            tag: tag.to_string(),
            base: base.clone(),
            status: Status::Pending,
            pushed: None,
            error: None,
            index,
            pushed_index: None,
        };
        let mut materialized = false;
        if let Some(old) = read_saved(dir) {
            if old.base == base {
                saved = old;
                materialized = true;
            } else if dir.join("dirty").exists() {
                tracing::error!(
                    "{repo}:{tag}: changes pending on {} shadowed by {base}",
                    old.base
                );
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        if materialized {
            // What a crash left half prepared is no change anyone was told of.
            if let Err(e) = Upper::new(dir).clear_work() {
                tracing::warn!("{}: clearing work/: {e}", dir.display());
            }
        }
        Journal {
            dir: dir.to_path_buf(),
            st: Mutex::new(St {
                saved,
                materialized,
                dirty: materialized && dir.join("dirty").exists(),
                gen: 0,
                last_write: Instant::now(),
                failures: 0,
                retry_at: None,
            }),
            committing: tokio::sync::Mutex::new(()),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The index this journal's commits last pushed (platform commits).
    pub fn pushed_index(&self) -> Option<Digest> {
        self.st().saved.pushed_index.clone()
    }

    pub fn saved(&self) -> Saved {
        self.st().saved.clone()
    }

    pub fn materialized(&self) -> bool {
        self.st().materialized
    }

    pub fn dirty(&self) -> bool {
        self.st().dirty
    }

    /// Called before every change lands: the upper directory exists, the
    /// journal says which base it is on, and the dirty marker is on disk.
    pub fn touch(&self, upper: &Upper, root: &Meta) -> io::Result<()> {
        let mut st = self.st();
        if !st.materialized {
            std::fs::create_dir_all(&self.dir)?;
            upper.create(root)?;
            save(&self.dir, &st.saved)?;
            st.materialized = true;
        }
        if !st.dirty {
            std::fs::File::create(self.dir.join("dirty"))?.sync_all()?;
            upper::fsync_dir(&self.dir)?;
            st.dirty = true;
            st.saved.status = Status::Pending;
        }
        st.gen += 1;
        st.last_write = Instant::now();
        Ok(())
    }

    /// Due for an automatic commit: changed, quiet for `delay`, not waiting
    /// out a backoff, and not in a conflict only the user can settle.
    pub fn due(&self, delay: Duration) -> bool {
        let st = self.st();
        st.dirty
            && st.saved.status != Status::Conflict
            && st.last_write.elapsed() >= delay
            && st.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    fn record(&self, status: Status, pushed: Option<Digest>, error: Option<String>, gen: u64) {
        self.record_index(status, (pushed, None), error, gen)
    }

    /// [`Journal::record`], with the index pushed for a platform's commit.
    fn record_index(
        &self,
        status: Status,
        (pushed, index): (Option<Digest>, Option<Digest>),
        error: Option<String>,
        gen: u64,
    ) {
        let mut st = self.st();
        st.saved.status = status;
        if pushed.is_some() {
            st.saved.pushed = pushed;
        }
        if index.is_some() {
            st.saved.pushed_index = index;
        }
        st.saved.error = error;
        match status {
            Status::Pending | Status::Failed => {
                st.failures += 1;
                let wait =
                    Duration::from_secs(1 << st.failures.min(8)).min(Duration::from_secs(300));
                st.retry_at = Some(Instant::now() + wait);
            }
            _ => {
                st.failures = 0;
                st.retry_at = None;
            }
        }
        if let Err(e) = save(&self.dir, &st.saved) {
            tracing::error!("journal {}: {e}", self.dir.display());
        }
        // Every change up to the snapshot is in the registry: unless more
        // came since, nothing is left to push.
        if status == Status::Pushed && st.gen == gen {
            match std::fs::remove_file(self.dir.join("dirty")) {
                Ok(()) => st.dirty = false,
                Err(e) => tracing::error!("journal {}: {e}", self.dir.display()),
            }
        }
    }

    fn gen(&self) -> u64 {
        self.st().gen
    }

    /// One line of `ggfs status`.
    pub fn line(&self) -> String {
        let st = self.st();
        let s = &st.saved;
        let status = match (st.dirty, s.status) {
            (false, Status::Pending) => "clean",
            (_, Status::Pending) => "pending",
            (_, Status::Pushed) if st.dirty => "pending",
            (_, Status::Pushed) => "pushed",
            (_, Status::Conflict) => "conflict",
            (_, Status::Failed) => "failed",
        };
        let pushed = s.pushed.as_ref().map_or("-".to_string(), |d| d.to_string());
        let mut line = format!(
            "{status} {}:{} base={} pushed={pushed}",
            s.repo, s.tag, s.base
        );
        if let Some(e) = &s.error {
            line.push_str(&format!(" error: {e}"));
        }
        line
    }
}

fn save(dir: &Path, saved: &Saved) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(saved).map_err(io::Error::other)?;
    crate::lower::layer::write_atomic(&dir.join("state.json"), &bytes).map_err(io::Error::other)
}

/// What `ggfs commit` asks for.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Request {
    /// The image directory, relative to the mount: `repo/…/tag`.
    pub path: String,
    pub tag: Option<String>,
    #[serde(default)]
    pub layer_format: Option<String>,
    pub message: Option<String>,
    #[serde(default)]
    pub force: bool,
}

/// What `ggfs commit` is told.
#[derive(Clone, Debug, Serialize)]
pub struct Reply {
    /// `pushed`, `no changes`, `conflict`, `pending`, `failed`, `error`.
    pub status: String,
    /// `host/repo@sha256:…` of the new image, once pushed (by digest at least).
    pub reference: Option<String>,
    pub message: String,
}

impl Reply {
    pub fn error(msg: impl Into<String>) -> Self {
        Reply {
            status: "error".into(),
            reference: None,
            message: msg.into(),
        }
    }
}

pub fn compression(name: Option<&str>) -> Result<LayerFormat, String> {
    name.unwrap_or("gzip")
        .parse::<LayerFormat>()
        .map_err(|e| e.to_string())
}

/// Commit the changes of one writable rootfs.
pub async fn commit(inner: &Inner, r: &Arc<RootFs>, req: &Request) -> Reply {
    let Some(w) = &r.w else {
        return Reply::error("not a writable image");
    };
    let j = &w.journal;
    let format = match compression(req.layer_format.as_deref()) {
        Ok(c) => c,
        Err(e) => return Reply::error(e),
    };
    let _one = j.committing.lock().await;
    let (layer, gen) = {
        let _quiet = w.lock.write().await;
        if !j.dirty() {
            return Reply {
                status: "no changes".into(),
                reference: None,
                message: "no changes".into(),
            };
        }
        let gen = j.gen();
        let (rr, rt) = (r.clone(), tokio::runtime::Handle::current());
        match tokio::task::spawn_blocking(move || build_layer(&rr, format, rt)).await {
            Ok(Ok(l)) => (l, gen),
            Ok(Err(e)) => return fail(j, Status::Failed, format!("building the layer: {e}"), gen),
            Err(e) => return fail(j, Status::Failed, format!("building the layer: {e}"), gen),
        }
    };
    let s = j.saved();
    let registry = inner.ns.registry_name();
    let reference = |d: &Digest| format!("{registry}/{}@{d}", s.repo);
    let raw = match push_image(inner, &s, layer, req).await {
        Ok(raw) => raw,
        Err(e) => {
            let status = if matches!(e, ggfs::Error::Auth { .. }) {
                Status::Failed
            } else {
                Status::Pending
            };
            return fail(
                j,
                status,
                format!("push to {registry}/{}: {e}", s.repo),
                gen,
            );
        }
    };
    if let Some((tag, platform)) = s.tag.split_once('/') {
        return commit_platform(inner, j, &s, (tag, platform), &raw, req, gen).await;
    }
    let digest = raw.digest.clone();
    let tag = req.tag.clone().unwrap_or_else(|| s.tag.clone());
    if req.tag.is_none() && !req.force {
        let expected = s.pushed.clone().unwrap_or_else(|| s.base.clone());
        match inner.ns.tag_digest(&s.repo, &tag).await {
            Ok(now) if now.as_ref() == Some(&expected) || now.is_none() && s.pushed.is_none() => {}
            Ok(now) => {
                let now = now.map_or("nothing".to_string(), |d| d.to_string());
                let msg = format!(
                    "conflict: {}:{tag} moved to {now} since this image's base {expected} was read; \
                     pushed the new image by digest only as {} (ggfs commit --force moves the tag, --tag T pushes elsewhere)",
                    s.repo,
                    reference(&digest)
                );
                j.record(
                    Status::Conflict,
                    Some(digest.clone()),
                    Some(msg.clone()),
                    gen,
                );
                return Reply {
                    status: "conflict".into(),
                    reference: Some(reference(&digest)),
                    message: msg,
                };
            }
            Err(e) => return fail(j, Status::Pending, format!("reading tag {tag}: {e}"), gen),
        }
    }
    if let Err(e) = inner.ns.put_tag(&s.repo, &tag, &raw).await {
        return fail(j, Status::Pending, format!("moving tag {tag}: {e}"), gen);
    }
    j.record(Status::Pushed, Some(digest.clone()), None, gen);
    tracing::info!("committed {}:{tag} as {digest}", s.repo);
    Reply {
        status: "pushed".into(),
        reference: Some(reference(&digest)),
        message: format!("{}:{tag} is now {digest}", s.repo),
    }
}

/// The second half of a commit to a platform of an index: the index the
/// tag points at, with that platform's manifest replaced by `child` (already
/// pushed), pushed by digest, then tagged. The tag moved by someone else
/// (not to an index this mount pushed) is a conflict, as for an image.
async fn commit_platform(
    inner: &Inner,
    j: &Journal,
    s: &Saved,
    (tag, platform): (&str, &str),
    child: &ggfs::RawManifest,
    req: &Request,
    gen: u64,
) -> Reply {
    let registry = inner.ns.registry_name();
    let reference = |d: &Digest| format!("{registry}/{}@{d}", s.repo);
    let now = match inner.ns.tag_digest(&s.repo, tag).await {
        Ok(Some(d)) => d,
        Ok(None) => return fail(j, Status::Pending, format!("{}:{tag} is gone", s.repo), gen),
        Err(e) => return fail(j, Status::Pending, format!("reading tag {tag}: {e}"), gen),
    };
    let ours = inner.pushed_indexes(&s.repo, tag);
    let expected = s.index.iter().chain(ours.iter()).any(|d| *d == now);
    if !expected && !req.force && req.tag.is_none() {
        let msg = format!(
            "conflict: {}:{tag} moved to {now} since the changes to its {platform} began; \
             pushed the new {platform} image by digest only as {} (ggfs commit --force \
             replaces it in the index the tag points at now, --tag T pushes elsewhere)",
            s.repo,
            reference(&child.digest)
        );
        j.record(
            Status::Conflict,
            Some(child.digest.clone()),
            Some(msg.clone()),
            gen,
        );
        return Reply {
            status: "conflict".into(),
            reference: Some(reference(&child.digest)),
            message: msg,
        };
    }
    let index = match replace_child(inner, &s.repo, &now, platform, child).await {
        Ok(i) => i,
        Err(e) => return fail(j, Status::Pending, format!("new index for {tag}: {e}"), gen),
    };
    let target = req.tag.clone().unwrap_or_else(|| tag.to_string());
    let pushed = async {
        inner.ns.sink(&s.repo)?.put_manifest(&index, None).await?;
        inner.ns.put_tag(&s.repo, &target, &index).await
    };
    if let Err(e) = pushed.await {
        return fail(
            j,
            Status::Pending,
            format!("pushing the index of {target}: {e}"),
            gen,
        );
    }
    let pair = (Some(child.digest.clone()), Some(index.digest.clone()));
    j.record_index(Status::Pushed, pair, None, gen);
    tracing::info!(
        "committed {}:{target} ({platform}) as {}",
        s.repo,
        index.digest
    );
    Reply {
        status: "pushed".into(),
        reference: Some(reference(&index.digest)),
        message: format!(
            "{}:{target} is now {} ({platform}: {})",
            s.repo, index.digest, child.digest
        ),
    }
}

/// Index `index` of `repo` with its `platform` entry pointing at `child`.
async fn replace_child(
    inner: &Inner,
    repo: &str,
    index: &Digest,
    platform: &str,
    child: &ggfs::RawManifest,
) -> ggfs::Result<ggfs::RawManifest> {
    let raw = inner.ns.source(repo).manifest(index.as_str()).await?;
    let parsed = raw.index()?;
    let old = crate::namespace::platform_dirs(&parsed, None)
        .into_iter()
        .find(|(name, _)| name == platform)
        .map(|(_, d)| d)
        .ok_or_else(|| ggfs::Error::NotFound(format!("platform {platform} in index {index}")))?;
    let mut v: serde_json::Value = serde_json::from_slice(&raw.bytes)
        .map_err(|e| ggfs::Error::invalid(format!("index {index}"), e.to_string()))?;
    let entries = v["manifests"]
        .as_array_mut()
        .ok_or_else(|| ggfs::Error::invalid(format!("index {index}"), "no manifests"))?;
    for m in entries.iter_mut().filter(|m| m["digest"] == old.as_str()) {
        m["digest"] = child.digest.as_str().into();
        m["size"] = child.bytes.len().into();
        m["mediaType"] = child.media_type.as_str().into();
    }
    let bytes = serde_json::to_vec(&v).map_err(|e| ggfs::Error::invalid("index", e.to_string()))?;
    ggfs::RawManifest::new(bytes.into(), Some(&raw.media_type))
}

fn fail(j: &Journal, status: Status, msg: String, gen: u64) -> Reply {
    tracing::warn!("commit: {msg}");
    j.record(status, None, Some(msg.clone()), gen);
    Reply {
        status: if status == Status::Failed {
            "failed"
        } else {
            "pending"
        }
        .into(),
        reference: None,
        message: format!("{msg} (the changes stay pending in the cache)"),
    }
}

/// Base + the layer, pushed blobs first, then the manifest by digest.
async fn push_image(
    inner: &Inner,
    s: &Saved,
    layer: LocalLayer,
    req: &Request,
) -> ggfs::Result<ggfs::RawManifest> {
    let base = inner
        .image(&s.repo, &s.base)
        .await
        .map_err(|f| ggfs::Error::NotFound(format!("base image {}: {}", s.base, f.msg)))?;
    let image =
        mutate::append_with_history(&base, vec![layer], "ggfs commit", req.message.as_deref())?;
    let sink = inner.ns.sink(&s.repo)?;
    let d = image.digest().to_string();
    ggfs::image::copy::copy(
        image.source.clone(),
        &d,
        sink,
        None,
        &CopyOptions::default(),
    )
    .await?;
    Ok(image.raw.clone())
}

/// The layer of everything in the upper directory: whiteouts as they are,
/// metacopy files with their lower bytes, our own xattrs left out.
fn build_layer(
    r: &RootFs,
    format: LayerFormat,
    rt: tokio::runtime::Handle,
) -> ggfs::Result<LocalLayer> {
    let upper = &r.w.as_ref().expect("writable").upper;
    let hooks = Hooks { r, upper, rt };
    newlayer::layer_from_dir_as(upper.root(), &LayerOptions::new(format), &hooks)
}

struct Hooks<'a> {
    r: &'a RootFs,
    upper: &'a Upper,
    rt: tokio::runtime::Handle,
}

impl DirHooks for Hooks<'_> {
    /// A whiteout beside an entry of the same name is a crash's leftover:
    /// the entry wins.
    fn skip(&self, rel: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
        match name.strip_prefix(WHITEOUT) {
            Some(real) if name != OPAQUE => self
                .upper
                .root()
                .join(rel.with_file_name(std::ffi::OsStr::from_bytes(real)))
                .symlink_metadata()
                .is_ok(),
            _ => false,
        }
    }

    fn keep_xattr(&self, name: &str) -> bool {
        !name.starts_with(PRIVATE)
    }

    fn data(&self, full: &Path) -> io::Result<Option<Box<dyn Read + '_>>> {
        let Some(origin) = xattr::get(full, ORIGIN)? else {
            return Ok(None);
        };
        let Data::Lower(d, _) = self
            .r
            .origin_data(&origin)
            .map_err(|f| io::Error::other(f.msg.to_string()))?
        else {
            return Ok(None);
        };
        let reader = LowerReader {
            layer: self.r.layers[d.layer].clone(),
            entry: d.entry,
            off: 0,
            rt: self.rt.clone(),
        };
        Ok(Some(Box::new(io::BufReader::with_capacity(
            1 << 20,
            reader,
        ))))
    }
}

/// A lower file's bytes (verified by the layer reader) as a blocking reader.
struct LowerReader {
    layer: Arc<dyn LayerData>,
    entry: usize,
    off: u64,
    rt: tokio::runtime::Handle,
}

impl Read for LowerReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(1 << 20) as u32;
        let b = self
            .rt
            .block_on(self.layer.read(self.entry, self.off, n))
            .map_err(io::Error::other)?;
        buf[..b.len()].copy_from_slice(&b);
        self.off += b.len() as u64;
        Ok(b.len())
    }
}

/// Commit every image that is due, now and then; `None`: only `ggfs commit`.
pub async fn auto(inner: Arc<Inner>, delay: Duration) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        commit_due(&inner, delay).await;
    }
}

/// One pass: commit each changed image quiet for `delay`.
pub async fn commit_due(inner: &Inner, delay: Duration) {
    for r in inner.writables().await {
        let due = r.w.as_ref().is_some_and(|w| w.journal.due(delay));
        if due {
            let reply = commit(inner, &r, &Request::default()).await;
            tracing::info!("automatic commit: {}: {}", reply.status, reply.message);
        }
    }
}
