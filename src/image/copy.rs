//! Copy an image or a whole index from any source to any sink, blobs first,
//! manifests last, so a tag never points at a manifest whose blobs are missing.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::image::manifest::{self, Parsed, Platform, RawManifest};
use crate::image::{self, ByteStream, Sink, Source};

/// What happened to one blob, for progress reporting and for tests that
/// check a copy within one registry moved no bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobOutcome {
    /// The sink already had it.
    Present,
    /// Made present without moving bytes (cross-repository mount).
    Mounted,
    /// Bytes were streamed from source to sink.
    Uploaded,
}

/// Called as bytes of a blob flow, and when a blob is done.
pub trait Progress: Send + Sync {
    /// A blob of `_size` bytes starts moving.
    fn start(&self, _digest: &Digest, _size: u64) {}
    /// `_bytes` more of the blob moved.
    fn advance(&self, _digest: &Digest, _bytes: u64) {}
    /// The blob is done, and how it got there.
    fn finish(&self, _digest: &Digest, _outcome: BlobOutcome) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// What [`copy`] copies and how.
pub struct CopyOptions {
    /// Copy only this platform's image out of an index.
    pub platform: Option<Platform>,
    /// Blobs transferred at once.
    pub jobs: usize,
    /// Told about every blob as it moves.
    pub progress: Arc<dyn Progress>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            platform: None,
            jobs: 4,
            progress: Arc::new(Quiet),
        }
    }
}

/// Summary of a copy.
#[derive(Debug, Default, Clone)]
pub struct CopyReport {
    /// Digest of the top manifest written to the sink.
    pub digest: Option<Digest>,
    /// Blobs the sink already had.
    pub blobs_present: usize,
    /// Blobs mounted from another repository of the same registry.
    pub blobs_mounted: usize,
    /// Blobs whose bytes were sent.
    pub blobs_uploaded: usize,
    /// Bytes sent for those blobs.
    pub bytes_uploaded: u64,
}

impl CopyReport {
    /// Count one blob's outcome.
    pub fn count(&mut self, outcome: BlobOutcome, size: u64) {
        match outcome {
            BlobOutcome::Present => self.blobs_present += 1,
            BlobOutcome::Mounted => self.blobs_mounted += 1,
            BlobOutcome::Uploaded => {
                self.blobs_uploaded += 1;
                self.bytes_uploaded += size;
            }
        }
    }
}

/// Copy `reference` (tag or digest) from `src` to `dst`, tagging it `tag`
/// there (or storing it by digest only when `tag` is `None`).
pub async fn copy(
    src: Arc<dyn Source>,
    reference: &str,
    dst: Arc<dyn Sink>,
    tag: Option<&str>,
    opts: &CopyOptions,
) -> Result<CopyReport> {
    let mut report = CopyReport::default();
    let top = manifest_for(src.as_ref(), reference, opts.platform.as_ref()).await?;
    let mut walk = Walk {
        seen: HashSet::from([top.digest.clone()]),
        depth: 0,
    };
    copy_manifest(&src, &top, &dst, opts, &mut report, &mut walk).await?;
    dst.put_manifest(&top, tag).await?;
    dst.finish().await?;
    report.digest = Some(top.digest.clone());
    Ok(report)
}

/// The manifest `reference` names; when it is an index and `platform` is
/// given, that platform's child instead.
pub async fn manifest_for(
    src: &dyn Source,
    reference: &str,
    platform: Option<&Platform>,
) -> Result<RawManifest> {
    let raw = src.manifest(reference).await?;
    match platform {
        Some(p) if raw.is_index() => pick_platform(src, &raw, p).await,
        _ => Ok(raw),
    }
}

/// The child manifest of an index for one platform, verified.
pub async fn pick_platform(
    src: &dyn Source,
    index: &RawManifest,
    platform: &Platform,
) -> Result<RawManifest> {
    let idx = index.index()?;
    let desc = image::child_for_platform(&idx, &index.digest, platform)?;
    image::fetch_child(src, desc).await
}

/// How deep indexes may nest, the top one counting as 1: an index of
/// indexes is the most real images use; deeper is refused rather than
/// walked (a chain of indexes costs a request per level).
pub const MAX_INDEX_DEPTH: usize = 16;

/// Where a copy is in the graph of an index: the manifests already copied
/// (an index may list one child many times, and the children of children:
/// 2^depth paths through depth manifests), and the nesting depth.
struct Walk {
    seen: HashSet<Digest>,
    depth: usize,
}

/// Copy everything `raw` references (blobs, child manifests), not `raw`
/// itself. Every blob of every platform goes in one wave (one round of
/// existence checks, transfers biggest first across all of them), then
/// the child manifests, each after all blobs are in and before its parent.
async fn copy_manifest(
    src: &Arc<dyn Source>,
    raw: &RawManifest,
    dst: &Arc<dyn Sink>,
    opts: &CopyOptions,
    report: &mut CopyReport,
    walk: &mut Walk,
) -> Result<()> {
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    collect(src, raw, &mut blobs, &mut children, walk).await?;
    copy_blobs(src, dst, blobs, opts, report).await?;
    // Images at once; then indexes, each after its children.
    let (indexes, images): (Vec<_>, Vec<_>) = children.into_iter().partition(|c| c.is_index());
    futures::stream::iter(images)
        .map(|child| {
            let dst = dst.clone();
            async move { dst.put_manifest(&child, None).await }
        })
        .buffer_unordered(CHECKS)
        .try_collect::<Vec<()>>()
        .await?;
    for child in &indexes {
        dst.put_manifest(child, None).await?;
    }
    Ok(())
}

/// The blobs `raw` references, and its child manifests (fetched, each
/// index's children at once) in the order they may be stored: children
/// before the index that lists them.
async fn collect(
    src: &Arc<dyn Source>,
    raw: &RawManifest,
    blobs: &mut Vec<(Digest, u64)>,
    children: &mut Vec<RawManifest>,
    walk: &mut Walk,
) -> Result<()> {
    match raw.parse()? {
        Parsed::Image(m) => {
            for d in std::iter::once(m.config()).chain(m.layers().iter()) {
                blobs.push((manifest::digest_of(d)?, d.size()));
            }
            Ok(())
        }
        Parsed::Index(idx) => {
            if walk.depth >= MAX_INDEX_DEPTH {
                return Err(Error::invalid(
                    format!("index {}", raw.digest),
                    format!("indexes nest deeper than {MAX_INDEX_DEPTH} levels"),
                ));
            }
            walk.depth += 1;
            let mut new = Vec::new();
            for desc in idx.manifests() {
                // Copied already (through another path): the same bytes.
                if walk.seen.insert(manifest::digest_of(desc)?) {
                    new.push(desc.clone());
                }
            }
            let fetched: Vec<RawManifest> = futures::stream::iter(new)
                .map(|desc| {
                    let src = src.clone();
                    async move { image::fetch_child(src.as_ref(), &desc).await }
                })
                .buffered(CHECKS)
                .try_collect()
                .await?;
            for child in fetched {
                Box::pin(collect(src, &child, blobs, children, walk)).await?;
                children.push(child);
            }
            walk.depth -= 1;
            Ok(())
        }
    }
}

async fn copy_blobs(
    src: &Arc<dyn Source>,
    dst: &Arc<dyn Sink>,
    mut blobs: Vec<(Digest, u64)>,
    opts: &CopyOptions,
    report: &mut CopyReport,
) -> Result<()> {
    blobs.sort();
    blobs.dedup();
    // Which blobs the sink has, asked all at once (a HEAD each, as many in
    // flight as the client allows): only the others wait for a transfer
    // slot. One after another in `jobs` slots, a commit onto a 20-layer
    // image spent 6 round trips on them.
    let present: Vec<(Digest, u64, bool)> = futures::stream::iter(blobs)
        .map(|(digest, size)| async move {
            let has = dst.has_blob(&digest).await?;
            Ok::<_, Error>((digest, size, has))
        })
        .buffer_unordered(CHECKS)
        .try_collect()
        .await?;
    let mut missing = Vec::new();
    for (digest, size, has) in present {
        match has {
            true => {
                opts.progress.finish(&digest, BlobOutcome::Present);
                report.count(BlobOutcome::Present, size);
            }
            false => missing.push((digest, size)),
        }
    }
    // The biggest first: over a slow link the longest transfer sets the
    // end, so it should not wait for a slot behind small ones.
    missing.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let outcomes: Vec<(BlobOutcome, u64)> = futures::stream::iter(missing)
        .map(|(digest, size)| async move {
            let outcome = transfer_blob(src, dst, &digest, size, opts).await?;
            opts.progress.finish(&digest, outcome);
            Ok::<_, Error>((outcome, size))
        })
        .buffer_unordered(opts.jobs.max(1))
        .try_collect()
        .await?;
    for (outcome, size) in outcomes {
        report.count(outcome, size);
    }
    Ok(())
}

/// Existence checks in flight at once (the client's `jobs` bounds them too).
const CHECKS: usize = 16;

/// Copy one blob: skip when present, mount when the sink can, else stream.
pub async fn copy_blob(
    src: &Arc<dyn Source>,
    dst: &Arc<dyn Sink>,
    digest: &Digest,
    size: u64,
    opts: &CopyOptions,
) -> Result<BlobOutcome> {
    if dst.has_blob(digest).await? {
        return Ok(BlobOutcome::Present);
    }
    transfer_blob(src, dst, digest, size, opts).await
}

/// A blob the sink lacks: mounted when the sink can, else streamed.
async fn transfer_blob(
    src: &Arc<dyn Source>,
    dst: &Arc<dyn Sink>,
    digest: &Digest,
    size: u64,
    opts: &CopyOptions,
) -> Result<BlobOutcome> {
    if dst.mount_blob(digest, src.as_ref()).await? {
        return Ok(BlobOutcome::Mounted);
    }
    opts.progress.start(digest, size);
    // The source is asked while the sink opens its upload (a registry's
    // POST): the two round trips overlap.
    let opening = {
        let (src, digest) = (src.clone(), digest.clone());
        tokio::spawn(async move { src.blob(&digest).await })
    };
    // A source that failed to open is the error to report, in its kind
    // (not found, auth), not the upload's failure it caused.
    let failed = Arc::new(std::sync::Mutex::new(None));
    let (slot, what) = (failed.clone(), format!("opening blob {digest}"));
    let stream: ByteStream = Box::pin(
        futures::stream::once(async move {
            let opened = opening
                .await
                .map_err(|e| Error::invalid(what, e.to_string()));
            opened.and_then(|r| r).map_err(|e| {
                let msg = e.to_string();
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                std::io::Error::other(msg)
            })
        })
        .try_flatten(),
    );
    let stream = counted(stream, digest.clone(), opts.progress.clone());
    match dst.put_blob(digest, size, stream).await {
        Ok(()) => Ok(BlobOutcome::Uploaded),
        Err(e) => Err(failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(e)),
    }
}

fn counted(stream: ByteStream, digest: Digest, progress: Arc<dyn Progress>) -> ByteStream {
    Box::pin(stream.inspect_ok(move |chunk| progress.advance(&digest, chunk.len() as u64)))
}
