//! Blobs: streamed GET, Range GET, HEAD, uploads (monolithic or chunked,
//! with cross-repository mount) and DELETE.

use std::io;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, StatusCode};
use url::Url;

use super::resume::Key;
use super::transport::Resp;
use super::RegistryRepo;
use crate::digest::Digest;
use crate::error::{from_io, Error, Result};
use crate::image::{verify_stream, ByteStream};

const OCTET_STREAM: &str = "application/octet-stream";
/// Resends of one chunk after its session confirmed it was not taken.
const PATCH_RETRIES: u32 = 3;

/// Times a broken blob body is resumed before the error is passed on.
const RESUMES: u32 = 3;

/// A blob download that survives broken connections.
struct Resume {
    repo: RegistryRepo,
    digest: Digest,
    /// The response being read (its `jobs` slot given back).
    body: Resp,
    /// Bytes handed out so far.
    offset: u64,
    /// Bytes still to drop from the current body before handing any out.
    skip: u64,
    resumes: u32,
}

impl Resume {
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let (repo, digest, offset) = (&self.repo, &self.digest, self.offset);
            let what = || format!("{} at byte {offset}", repo.blob_what(digest));
            match self.body.chunk(what).await {
                Ok(Some(mut chunk)) => {
                    let drop = self.skip.min(chunk.len() as u64);
                    self.skip -= drop;
                    let _ = chunk.split_to(drop as usize);
                    if chunk.is_empty() {
                        continue;
                    }
                    self.offset += chunk.len() as u64;
                    return Ok(Some(chunk));
                }
                Ok(None) => return Ok(None),
                // A stall already waited a whole stall period: no resume
                // (each would wait as long again); say so now.
                Err(e) if self.resumes < RESUMES && !matches!(e, Error::Stalled { .. }) => {
                    self.resumes += 1;
                    tracing::debug!(digest = %self.digest, offset = self.offset, error = %e, "blob body broke off; resuming");
                    tokio::time::sleep(std::time::Duration::from_millis(100 << self.resumes)).await;
                    let (body, skip) = self.repo.open_blob(&self.digest, self.offset).await?;
                    (self.body, self.skip) = (body, skip);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// An upload session in progress.
struct Session {
    /// Where the next request goes (each answer names the next URL).
    loc: Url,
    /// Bytes the registry confirmed it holds.
    held: u64,
    /// The last request found the registry away (no answer, or 5xx): the
    /// session may well live on, so it is kept for a rerun.
    broken_off: bool,
    /// This process holds the blob's upload lock: it records the session.
    recorded: bool,
}

impl Session {
    fn new(loc: Url) -> Session {
        Session {
            loc,
            held: 0,
            broken_off: false,
            recorded: false,
        }
    }
}

/// Failures that say nothing against the session: the registry or the
/// source went away (connection, stall, I/O), not a refusal or bad bytes.
fn resumable(e: &Error) -> bool {
    matches!(
        e,
        Error::Http { .. } | Error::Stalled { .. } | Error::Io { .. }
    )
}

/// `chunk` without its first `*skip` bytes (fewer if shorter), counting
/// them off `skip`.
fn drop_front(mut chunk: Bytes, skip: &mut u64) -> Bytes {
    let n = (*skip).min(chunk.len() as u64);
    *skip -= n;
    chunk.split_off(n as usize)
}

/// An upload's source, handed out in pieces of at most the size asked for:
/// the part of a piece past one PATCH's end goes into the next.
struct Feed {
    data: ByteStream,
    /// Bytes the session already holds, still to read and drop.
    skip: u64,
    rest: Bytes,
}

impl Feed {
    /// `data`, of which the session already holds the first `skip` bytes.
    fn new(data: ByteStream, skip: u64) -> Feed {
        Feed {
            data,
            skip,
            rest: Bytes::new(),
        }
    }

    /// Read to the source's end, where its digest and size are checked.
    async fn finish(&mut self, size: u64, what: &str) -> Result<()> {
        match self.take(1, what).await? {
            Some(_) => Err(Error::invalid(
                what,
                format!("source has more than {size} bytes"),
            )),
            None => Ok(()),
        }
    }

    async fn take(&mut self, max: usize, what: &str) -> Result<Option<Bytes>> {
        while self.rest.is_empty() {
            match self.data.next().await {
                Some(chunk) => {
                    self.rest = drop_front(chunk.map_err(|e| from_io(what, e))?, &mut self.skip)
                }
                None => return Ok(None),
            }
        }
        let n = max.min(self.rest.len());
        Ok(Some(self.rest.split_to(n)))
    }

    /// Pass the next `len` bytes to `tx` (a request body) as they come,
    /// and return them all. A request that went away is no reason to stop
    /// reading: the bytes are wanted for the resend. A failing source ends
    /// the body with an error, so the registry never takes a short chunk.
    async fn send(
        &mut self,
        len: u64,
        tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
        what: &str,
    ) -> Result<Bytes> {
        let mut kept = BytesMut::with_capacity(len as usize);
        let mut tx = Some(tx);
        while (kept.len() as u64) < len {
            let want = (len - kept.len() as u64) as usize;
            let short =
                || Error::invalid(what, format!("source ended before byte {len} of a chunk"));
            let piece = match self
                .take(want, what)
                .await
                .and_then(|p| p.ok_or_else(short))
            {
                Ok(p) => p,
                Err(e) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Err(io::Error::other("the source failed"))).await;
                    }
                    return Err(e);
                }
            };
            kept.extend_from_slice(&piece);
            if let Some(t) = &tx {
                if t.send(Ok(piece)).await.is_err() {
                    tx = None;
                }
            }
        }
        Ok(kept.freeze())
    }
}

/// A channel's receiving end as a request body.
struct Channel(tokio::sync::mpsc::Receiver<io::Result<Bytes>>);

impl futures::Stream for Channel {
    type Item = io::Result<Bytes>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// An upload session's URL with `?digest=`, which closes it.
fn with_digest(mut loc: Url, digest: &Digest) -> Url {
    loc.query_pairs_mut().append_pair("digest", digest.as_str());
    loc
}

/// What POST /blobs/uploads/ gave us.
enum Started {
    /// 201: the blob was mounted from another repository.
    Mounted,
    /// 202: an upload session at this URL.
    Session(Url),
}

impl RegistryRepo {
    fn blob_what(&self, digest: &Digest) -> String {
        format!("blob {digest} in {}", self.repository())
    }

    fn blob_url(&self, digest: &Digest) -> Result<Url> {
        self.url(&format!("blobs/{digest}"))
    }

    /// The whole blob as a stream, unverified (see [`crate::image::Source::blob`]).
    /// A body that breaks off mid-blob is resumed with a Range request from
    /// where it stopped. The `jobs` slot is released once headers arrive, so
    /// a caller copying between two repositories of one client cannot
    /// deadlock on it.
    pub async fn get_blob(&self, digest: &Digest) -> Result<ByteStream> {
        let (body, skip) = self.open_blob(digest, 0).await?;
        let state = Resume {
            repo: self.clone(),
            digest: digest.clone(),
            body,
            offset: 0,
            skip,
            resumes: 0,
        };
        Ok(Box::pin(futures::stream::unfold(
            Some(state),
            |st| async move {
                let mut st = st?;
                match st.next().await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(st))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            },
        )))
    }

    /// GET a blob from `offset`: the body, and how many leading bytes of it
    /// to drop (a registry ignoring Range answers 200 from the start).
    async fn open_blob(&self, digest: &Digest, offset: u64) -> Result<(Resp, u64)> {
        let mut req = self.pull(Method::GET, self.blob_url(digest)?).redirects();
        if offset > 0 {
            req = req.header(RANGE, &format!("bytes={offset}-"));
        }
        let mut resp = self.t().send(&req).await?;
        if resp.status().is_success() {
            // Its ranges, read next, go there directly (get_blob_range).
            self.t().remember_redirect(&req.url, resp.url());
        }
        let what = self.blob_what(digest);
        let skip = match resp.status() {
            StatusCode::OK => offset,
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                self.check_range_start(&resp, offset, &what)?;
                0
            }
            _ => return Err(self.status_error(&what, resp).await),
        };
        drop(resp.permit.take());
        Ok((resp, skip))
    }

    /// `len` bytes at `offset`. Accepts 206, or a 200 with the whole blob
    /// from which the range is cut without buffering more than `len` bytes.
    /// Shorter than `len` only when the blob ends first.
    pub async fn get_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let what = self.blob_what(digest);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.checked_add(len - 1).ok_or_else(|| {
            Error::invalid(format!("range of {what}"), "offset + length overflows")
        })?;
        let range = format!("bytes={offset}-{end}");
        let url = self.blob_url(digest)?;
        // A blob the registry sent elsewhere (object storage, a CDN) is
        // asked there directly: one round trip a range instead of two.
        // The bytes are checked by the caller wherever they come from; no
        // credential goes off the registry's host.
        if let Some(at) = self.t().redirected(&url) {
            let req = self.pull(Method::GET, at).header(RANGE, &range);
            match self.range_answer(req, &what, offset, end, len).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    tracing::debug!(%what, error = %e, "redirect target failed; asking the registry");
                    self.t().forget_redirect(&url);
                }
            }
        }
        let req = self
            .pull(Method::GET, url)
            .redirects()
            .header(RANGE, &range);
        self.range_answer(req, &what, offset, end, len).await
    }

    /// Send a Range GET for bytes `offset..=end` and read its answer,
    /// remembering where a redirect took it.
    async fn range_answer(
        &self,
        req: super::transport::Req,
        what: &str,
        offset: u64,
        end: u64,
        len: u64,
    ) -> Result<Bytes> {
        let resp = self.t().send(&req).await?;
        if resp.status().is_success() {
            self.t().remember_redirect(&req.url, resp.url());
        }
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                self.check_range_start(&resp, offset, what)?;
                read_window(resp, what, 0, len).await
            }
            StatusCode::OK => read_window(resp, what, offset, len).await,
            StatusCode::RANGE_NOT_SATISFIABLE => Err(Error::invalid(
                format!("range {offset}-{end} of {what}"),
                "past the end of the blob",
            )),
            _ => Err(self.status_error(what, resp).await),
        }
    }

    /// The blob's size, or `None` when the repository does not have it.
    pub async fn head_blob(&self, digest: &Digest) -> Result<Option<u64>> {
        let what = self.blob_what(digest);
        let req = self.pull(Method::HEAD, self.blob_url(digest)?).redirects();
        let resp = self.t().send(&req).await?;
        match resp.status() {
            StatusCode::OK => {
                let len = resp
                    .header(CONTENT_LENGTH.as_str())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        self.registry_error(format!("HEAD of {what} gave no Content-Length"))
                    })?;
                Ok(Some(len))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_error(&what, resp).await),
        }
    }

    /// Upload a blob, verifying `data` against `digest` and `size` on the
    /// way (the registry checks the digest too before the blob appears).
    /// Blobs up to the chunk size go in one PUT; larger ones are streamed
    /// in PATCH chunks, holding one chunk in memory at a time.
    pub async fn upload_blob(&self, digest: &Digest, size: u64, data: ByteStream) -> Result<()> {
        let what = self.blob_what(digest);
        let data = verify_stream(data, digest.clone(), Some(size));
        if size > self.client().chunk_size as u64 {
            return self.upload_resumable(digest, size, data, &what).await;
        }
        let Started::Session(loc) = self.start_upload(None).await? else {
            return Ok(());
        };
        let result = self
            .upload_monolithic(loc.clone(), digest, size, data, &what)
            .await;
        if result.is_err() {
            self.cancel_upload(loc).await;
        }
        result
    }

    /// A chunked upload, going on from the session an earlier run left
    /// when the registry still holds it. A session broken off by the
    /// registry (or the source) going away is kept, and recorded, for a
    /// rerun; one the registry refused, or whose bytes failed
    /// verification, is cancelled.
    async fn upload_resumable(
        &self,
        digest: &Digest,
        size: u64,
        data: ByteStream,
        what: &str,
    ) -> Result<()> {
        let key = Key {
            registry: self.registry(),
            repository: self.name(),
            digest,
            size,
        };
        let claim = self.client().uploads.as_deref().and_then(|r| r.claim(&key));
        let resumed = match claim {
            Some(_) => self.resumed(&key, what).await,
            None => None,
        };
        let mut s = match resumed {
            Some(s) => s,
            None => match self.start_upload(None).await? {
                Started::Session(loc) => Session::new(loc),
                Started::Mounted => return Ok(()),
            },
        };
        s.recorded = claim.is_some();
        // Recorded before the first chunk too: a session kept after a
        // failure is worth a record even if it holds nothing yet.
        self.remember(&key, &s);
        let result = self.upload_chunked(&mut s, &key, data, what).await;
        let records = self.client().uploads.as_deref().filter(|_| s.recorded);
        match &result {
            Ok(()) => records.into_iter().for_each(|r| r.remove(&key)),
            Err(e) if s.recorded && (s.broken_off || resumable(e)) => {
                tracing::info!(%what, held = s.held, error = %e, "upload broken off; kept for a rerun");
            }
            Err(_) => {
                self.cancel_upload(s.loc.clone()).await;
                records.into_iter().for_each(|r| r.remove(&key));
            }
        }
        result
    }

    /// The session recorded for `key`, if the registry still has it: how
    /// much it holds is asked, not taken from the record. Unknown (404) or
    /// anything odd: `None`, start afresh.
    async fn resumed(&self, key: &Key<'_>, what: &str) -> Option<Session> {
        let records = self.client().uploads.as_deref()?;
        let (loc, recorded) = records.load(key)?;
        let progress = match self.same_origin(&loc) {
            true => self.upload_progress(&loc, what).await,
            false => Err(self.registry_error(format!("{what}: recorded upload at {loc}"))),
        };
        match progress {
            Ok((held, next)) if held <= key.size && self.same_origin(&next) => {
                tracing::info!(%what, held, recorded, "resuming the upload an earlier run left");
                Some(Session {
                    held,
                    ..Session::new(next)
                })
            }
            Ok((held, _)) => {
                tracing::debug!(%what, held, "recorded upload session is odd; starting afresh");
                records.forget(key);
                None
            }
            Err(e) => {
                tracing::debug!(%what, error = %e, "recorded upload session not resumed");
                // Still there when the registry is only away for now.
                if !resumable(&e) {
                    records.forget(key);
                }
                None
            }
        }
    }

    /// Only a session on the registry's own host is recorded or resumed: a
    /// record naming another would send our credentials there.
    fn same_origin(&self, loc: &Url) -> bool {
        self.url("blobs/uploads/")
            .is_ok_and(|base| base.origin() == loc.origin())
    }

    /// Record where `s` stands, for a later process (best effort).
    fn remember(&self, key: &Key<'_>, s: &Session) {
        if let Some(records) = self.client().uploads.as_deref() {
            if s.recorded && self.same_origin(&s.loc) {
                records.save(key, &s.loc, s.held);
            }
        }
    }

    /// One PUT, its body streamed as the bytes come in (the download and
    /// the upload overlap); resent from the bytes kept if it failed.
    async fn upload_monolithic(
        &self,
        loc: Url,
        digest: &Digest,
        size: u64,
        data: ByteStream,
        what: &str,
    ) -> Result<()> {
        let mut feed = Feed::new(data, 0);
        let req = self
            .push(Method::PUT, with_digest(loc.clone(), digest))
            .header(CONTENT_TYPE, OCTET_STREAM)
            .header(CONTENT_LENGTH, &size.to_string());
        let (sent, kept) = self.stream_body(&req, &mut feed, size, what).await;
        let kept = kept?;
        feed.finish(size, what).await?;
        match sent {
            Ok(resp) if resp.status() == StatusCode::CREATED => self.stored_as(&resp, digest),
            Ok(resp)
                if resp.status().is_client_error() && resp.status() != StatusCode::UNAUTHORIZED =>
            {
                Err(self.status_error(what, resp).await)
            }
            // Away, or a token run out: once more, with retries and auth.
            _ => self.finish_upload(loc, digest, kept).await,
        }
    }

    /// Send `req` with the next `len` bytes of `feed` streamed as its body,
    /// while keeping them for a resend.
    async fn stream_body(
        &self,
        req: &super::transport::Req,
        feed: &mut Feed,
        len: u64,
        what: &str,
    ) -> (Result<Resp>, Result<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body = reqwest::Body::wrap_stream(Channel(rx));
        tokio::join!(self.t().send_streamed(req, body), feed.send(len, tx, what))
    }

    /// PATCH `data` from `s.held` on, a chunk per request, each streamed
    /// as its bytes come in. The bytes the session already holds are read
    /// and dropped: `data` is digest-verified as a whole, so they are still
    /// hashed.
    async fn upload_chunked(
        &self,
        s: &mut Session,
        key: &Key<'_>,
        data: ByteStream,
        what: &str,
    ) -> Result<()> {
        let chunk_size = self.client().chunk_size.max(1) as u64;
        let mut feed = Feed::new(data, s.held);
        while s.held < key.size {
            let len = (key.size - s.held).min(chunk_size);
            self.patch_streamed(s, &mut feed, len, what).await?;
            self.remember(key, s);
        }
        feed.finish(key.size, what).await?;
        self.finish_upload(s.loc.clone(), key.digest, Bytes::new())
            .await
    }

    /// PATCH the next `len` bytes of `feed` at `s.held`, sending them as
    /// they come in: the download and the upload overlap instead of taking
    /// turns (over a WAN a chunk buffered first costs its whole transfer
    /// again). The bytes are kept until the registry confirms them, and
    /// resent through [`RegistryRepo::patch`] when it did not.
    async fn patch_streamed(
        &self,
        s: &mut Session,
        feed: &mut Feed,
        len: u64,
        what: &str,
    ) -> Result<()> {
        let (offset, end) = (s.held, s.held + len - 1);
        let req = self
            .push(Method::PATCH, s.loc.clone())
            .header(CONTENT_TYPE, OCTET_STREAM)
            .header(CONTENT_RANGE, &format!("{offset}-{end}"))
            .header(CONTENT_LENGTH, &len.to_string());
        let (sent, kept) = self.stream_body(&req, feed, len, what).await;
        let kept = kept?;
        let failure = match sent {
            Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                self.check_range_end(&resp, end, what)?;
                (s.loc, s.held) = (self.location(&resp, what)?, end + 1);
                return Ok(());
            }
            // A token that ran out during a long upload: `patch` renews it.
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                return self.patch(s, kept, what).await
            }
            Ok(resp) if resp.status().is_server_error() => {
                s.broken_off = true;
                self.status_error(what, resp).await
            }
            Ok(resp) => {
                s.broken_off = false;
                return Err(self.status_error(what, resp).await);
            }
            Err(e) if resumable(&e) => {
                s.broken_off = true;
                e
            }
            Err(e) => return Err(e),
        };
        match self.after_failed_patch(s, end, failure, what).await? {
            true => Ok(()),
            false => self.patch(s, kept, what).await,
        }
    }

    /// A PATCH of bytes `s.held..=end` failed with `failure` (PATCH is not
    /// blindly resent: it appends): ask the session how much it holds.
    /// All of the chunk: `true`, go on; none: `false`, send it again;
    /// anything else: give up.
    async fn after_failed_patch(
        &self,
        s: &mut Session,
        end: u64,
        failure: Error,
        what: &str,
    ) -> Result<bool> {
        let offset = s.held;
        tracing::debug!(error = %failure, offset, "chunk upload failed; checking the session");
        let (held, next) = self.upload_progress(&s.loc, what).await?;
        s.loc = next;
        if held == end + 1 {
            s.held = held;
            return Ok(true);
        }
        if held != offset {
            s.broken_off = false;
            return Err(self.registry_error(format!("{what}: after a failed chunk at {offset} the session holds {held} bytes ({failure})")));
        }
        Ok(false)
    }

    /// POST to open an upload session, or (with `mount`) to mount a blob
    /// from another repository of this registry.
    async fn start_upload(&self, mount: Option<(&Digest, &str)>) -> Result<Started> {
        let mut url = self.url("blobs/uploads/")?;
        let mut req = self.push(Method::POST, url.clone());
        if let Some((digest, from)) = mount {
            url.query_pairs_mut()
                .append_pair("mount", digest.as_str())
                .append_pair("from", from);
            req.url = url;
            req.scopes.push(format!("repository:{from}:pull"));
        }
        let req = req.header(CONTENT_LENGTH, "0").body(Bytes::new());
        let resp = self.t().send(&req).await?;
        let what = format!("blob upload to {}", self.repository());
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(Started::Mounted),
            StatusCode::ACCEPTED => Ok(Started::Session(self.location(&resp, &what)?)),
            _ => Err(self.status_error(&what, resp).await),
        }
    }

    /// A 206 must start where we asked, or the bytes are not the ones wanted.
    fn check_range_start(&self, resp: &Resp, offset: u64, what: &str) -> Result<()> {
        match resp
            .header(CONTENT_RANGE.as_str())
            .and_then(content_range_start)
        {
            Some(start) if start != offset => Err(self.registry_error(format!(
                "{what}: asked for bytes from {offset}, got bytes from {start}"
            ))),
            _ => Ok(()),
        }
    }

    /// A 202 to PATCH says `Range: 0-<last byte held>`: it must be our end.
    fn check_range_end(&self, resp: &Resp, end: u64, what: &str) -> Result<()> {
        match resp.header(RANGE.as_str()) {
            Some(range) if range_end(range) != Some(end) => Err(self.registry_error(format!(
                "{what}: sent bytes up to {end}, registry holds Range {range:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// The upload URL the registry named (relative or absolute).
    fn location(&self, resp: &Resp, what: &str) -> Result<Url> {
        let loc = resp.header(LOCATION.as_str()).ok_or_else(|| {
            self.registry_error(format!("{what}: {} gave no Location", resp.status()))
        })?;
        resp.url()
            .join(loc)
            .map_err(|e| Error::invalid(format!("{what}: Location {loc:?}"), e.to_string()))
    }

    /// Send one chunk at `s.held`. PATCH is not blindly resent (it
    /// appends), so after a 5xx or a broken connection the session is
    /// asked how much it holds: nothing of this chunk → resend; all of it →
    /// go on; else give up. `s.broken_off` says whether the registry was
    /// away (no answer, 5xx) when it gave up.
    async fn patch(&self, s: &mut Session, part: Bytes, what: &str) -> Result<()> {
        let (offset, end) = (s.held, s.held + part.len() as u64 - 1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let req = self
                .push(Method::PATCH, s.loc.clone())
                .header(CONTENT_TYPE, OCTET_STREAM)
                .header(CONTENT_RANGE, &format!("{offset}-{end}"))
                .body(part.clone());
            let sent = self.t().send(&req).await;
            s.broken_off = match &sent {
                Ok(resp) => resp.status().is_server_error(),
                Err(e) => resumable(e),
            };
            let failure = match sent {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    self.check_range_end(&resp, end, what)?;
                    (s.loc, s.held) = (self.location(&resp, what)?, end + 1);
                    return Ok(());
                }
                Ok(resp) if s.broken_off && attempt <= PATCH_RETRIES => {
                    self.status_error(what, resp).await
                }
                Ok(resp) => return Err(self.status_error(what, resp).await),
                Err(e @ Error::Http { .. }) if attempt <= PATCH_RETRIES => e,
                Err(e) => return Err(e),
            };
            if self.after_failed_patch(s, end, failure, what).await? {
                return Ok(());
            }
        }
    }

    /// GET on an upload session: bytes held so far, and where to go on.
    async fn upload_progress(&self, loc: &Url, what: &str) -> Result<(u64, Url)> {
        let resp = self.t().send(&self.push(Method::GET, loc.clone())).await?;
        if !matches!(resp.status(), StatusCode::NO_CONTENT | StatusCode::OK) {
            return Err(self.status_error(what, resp).await);
        }
        // `0-<last>`; distribution writes `0-0` for an empty session too.
        let held = match resp.header(RANGE.as_str()).and_then(range_end) {
            Some(0) | None => 0,
            Some(last) => last + 1,
        };
        let next = match resp.header(LOCATION.as_str()) {
            Some(_) => self.location(&resp, what)?,
            None => loc.clone(),
        };
        Ok((held, next))
    }

    /// PUT `?digest=` closes the session; the registry verifies the digest.
    async fn finish_upload(&self, loc: Url, digest: &Digest, body: Bytes) -> Result<()> {
        let what = self.blob_what(digest);
        let req = self
            .push(Method::PUT, with_digest(loc, digest))
            .header(CONTENT_TYPE, OCTET_STREAM)
            .header(CONTENT_LENGTH, &body.len().to_string())
            .body(body);
        let resp = self.t().send(&req).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.status_error(&what, resp).await);
        }
        self.stored_as(&resp, digest)
    }

    /// A 201 for `digest` must not name another digest of our algorithm.
    fn stored_as(&self, resp: &Resp, digest: &Digest) -> Result<()> {
        // A registry may name a sha512 blob by its own canonical sha256
        // (distribution does): only a digest in our algorithm compares.
        let same_algorithm =
            |d: &str| d.split_once(':').map(|(a, _)| a) == Some(digest.algorithm());
        match resp.header("docker-content-digest") {
            Some(d) if same_algorithm(d) && d != digest.as_str() => Err(self.registry_error(
                format!("{}: registry stored it as {d}", self.blob_what(digest)),
            )),
            _ => Ok(()),
        }
    }

    /// Best effort: abandon an upload session.
    async fn cancel_upload(&self, loc: Url) {
        let req = self.push(Method::DELETE, loc);
        if let Err(e) = self.t().send(&req).await {
            tracing::debug!(error = %e, "cancelling upload session");
        }
    }

    /// Mount `digest` from repository `from` (same registry). `Ok(true)`
    /// when the registry answered 201; `Ok(false)` when it opened an upload
    /// session instead (abandoned here; upload the blob).
    pub async fn mount(&self, digest: &Digest, from: &str) -> Result<bool> {
        match self.start_upload(Some((digest, from))).await? {
            Started::Mounted => Ok(true),
            Started::Session(loc) => {
                self.cancel_upload(loc).await;
                Ok(false)
            }
        }
    }

    /// Delete a blob (registries may refuse: 405 UNSUPPORTED).
    pub async fn delete_blob(&self, digest: &Digest) -> Result<()> {
        let url = self.blob_url(digest)?;
        self.delete_at(url, &self.blob_what(digest)).await
    }

    /// DELETE `url` (a manifest or blob), naming it `what` on failure.
    pub(super) async fn delete_at(&self, url: Url, what: &str) -> Result<()> {
        let resp = self
            .t()
            .send(&self.req(Method::DELETE, url, "delete"))
            .await?;
        match resp.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
            _ => Err(self.status_error(what, resp).await),
        }
    }
}

/// `0-41` (a Range response header) → 41.
fn range_end(v: &str) -> Option<u64> {
    v.rsplit('-').next()?.trim().parse().ok()
}

/// `bytes 10-19/100` → 10.
fn content_range_start(v: &str) -> Option<u64> {
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    v.split('-').next()?.trim().parse().ok()
}

/// Skip `skip` bytes of the body, then keep at most `len`; stop reading
/// (dropping the connection) once we have them.
async fn read_window(mut resp: Resp, what: &str, mut skip: u64, len: u64) -> Result<Bytes> {
    let mut out = BytesMut::with_capacity(len.min(64 << 20) as usize);
    while (out.len() as u64) < len {
        let Some(mut chunk) = resp.chunk(|| what.to_string()).await? else {
            break;
        };
        if skip >= chunk.len() as u64 {
            skip -= chunk.len() as u64;
            continue;
        }
        let _ = chunk.split_to(skip as usize);
        skip = 0;
        let want = (len - out.len() as u64).min(chunk.len() as u64) as usize;
        out.extend_from_slice(&chunk[..want]);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_range() {
        assert_eq!(super::content_range_start("bytes 10-19/100"), Some(10));
        assert_eq!(super::content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(super::content_range_start("items 1-2"), None);
    }
}
