//! The registry client against a real CNCF distribution registry (and, for
//! bad input, tiny misbehaving servers that no real registry would be).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use ggfs::digest::Hasher;
use ggfs::error::Error;
use ggfs::image::manifest::{media, RawManifest};
use ggfs::image::{self, ByteStream, Sink, Source};
use ggfs::registry::auth::Keychain;
use ggfs::registry::{Client, ClientOptions, RegistryRepo, RetryPolicy};
use ggfs::Digest;

use common::client::{image_manifest, put, repo, stream_of, CONFIG};
use common::{CountingProxy, Distribution};

fn client() -> Client {
    Client::builder(ClientOptions::default())
        .keychain(Keychain::anonymous())
        .build()
        .unwrap()
}

/// Deterministic, incompressible-looking chunk `i` of a large blob.
fn chunk(i: u64, len: usize) -> Bytes {
    let seed = 0x9E37_79B9_7F4A_7C15u64 ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03);
    Bytes::from(common::pseudo_random(len, seed))
}

const MIB: usize = 1024 * 1024;
const BIG_CHUNKS: u64 = 50;

/// A 50 MiB blob produced lazily, one MiB at a time.
fn big_stream() -> ByteStream {
    Box::pin(futures::stream::iter(
        (0..BIG_CHUNKS).map(|i| Ok(chunk(i, MIB))),
    ))
}

fn big_digest() -> Digest {
    let mut h = Hasher::new();
    for i in 0..BIG_CHUNKS {
        h.update(&chunk(i, MIB));
    }
    h.finish()
}

#[tokio::test]
async fn push_pull_round_trip_small_and_50mb_streamed() {
    let reg = Distribution::start();
    let proxy = CountingProxy::start(reg.addr());
    let c = client();
    let r = repo(&c, proxy.addr(), "round/trip");

    let cfg = put(&r, CONFIG).await.unwrap();
    let big = big_digest();
    let big_len = BIG_CHUNKS * MIB as u64;
    proxy.reset();
    r.put_blob(&big, big_len, big_stream()).await.unwrap();
    // Streamed in 16 MiB PATCH chunks, then one closing PUT.
    let reqs = proxy.requests();
    let patches = reqs.iter().filter(|q| q.method == "PATCH").count();
    assert_eq!(patches, 4, "{reqs:?}");
    assert_eq!(reqs.iter().filter(|q| q.method == "PUT").count(), 1);

    let m = image_manifest(&cfg, CONFIG.len(), &[(big.clone(), big_len)]);
    r.put_manifest(&m, Some("v1")).await.unwrap();

    // By tag, by digest, HEAD.
    let got = r.manifest("v1").await.unwrap();
    assert_eq!(got.bytes, m.bytes);
    assert_eq!(got.media_type, media::OCI_MANIFEST);
    assert_eq!(
        r.manifest(m.digest.as_str()).await.unwrap().digest,
        m.digest
    );
    let head = r.head_manifest("v1").await.unwrap().unwrap();
    assert_eq!(
        head,
        (
            m.digest.clone(),
            media::OCI_MANIFEST.to_string(),
            m.bytes.len() as u64
        )
    );
    assert_eq!(r.head_manifest("nope").await.unwrap(), None);

    // Blob HEAD and whole-blob reads, verified.
    assert_eq!(r.blob_size(&big).await.unwrap(), big_len);
    assert!(r.has_blob(&cfg).await.unwrap());
    assert!(!r.has_blob(&Digest::of(b"absent")).await.unwrap());
    assert_eq!(image::read_blob(&r, &cfg, 1 << 20).await.unwrap(), CONFIG);
    let mut s = image::verify_stream(r.blob(&big).await.unwrap(), big.clone(), Some(big_len));
    let mut n = 0u64;
    while let Some(chunk) = s.next().await {
        n += chunk.unwrap().len() as u64;
    }
    assert_eq!(n, big_len);

    // Range reads: inside one MiB chunk, across a chunk boundary, at the end.
    let at = |off: u64, len: usize| {
        let mut out = Vec::new();
        let mut pos = off;
        while out.len() < len {
            let i = pos / MIB as u64;
            let c = chunk(i, MIB);
            let start = (pos % MIB as u64) as usize;
            let take = (MIB - start).min(len - out.len());
            out.extend_from_slice(&c[start..start + take]);
            pos += take as u64;
        }
        out
    };
    proxy.reset();
    assert_eq!(
        r.blob_range(&big, 12345, 1000).await.unwrap(),
        at(12345, 1000)
    );
    let edge = 3 * MIB as u64 - 10;
    assert_eq!(r.blob_range(&big, edge, 20).await.unwrap(), at(edge, 20));
    let tail = r.blob_range(&big, big_len - 5, 100).await.unwrap();
    assert_eq!(
        tail,
        at(big_len - 5, 5),
        "a range past the end is cut short"
    );
    assert_eq!(
        proxy.requests()[0].range.as_deref(),
        Some("bytes=12345-13344")
    );
    assert!(
        proxy.bytes_down() < 64 * 1024,
        "range reads fetched {} bytes",
        proxy.bytes_down()
    );

    // Missing things are NotFound naming them.
    let err = r.manifest("missing").await.unwrap_err();
    assert!(
        err.is_not_found() && err.to_string().contains("round/trip:missing"),
        "{err}"
    );
    let err = r.blob_size(&Digest::of(b"x")).await.unwrap_err();
    assert!(
        err.is_not_found() && err.to_string().contains("blob sha256:"),
        "{err}"
    );
}

#[tokio::test]
async fn blob_bytes_that_do_not_match_are_refused() {
    let reg = Distribution::start();
    let c = client();
    let r = repo(&c, reg.addr(), "mismatch");
    let claimed = Digest::of(b"good");
    let err = r
        .put_blob(&claimed, 4, stream_of(b"evil"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(!r.has_blob(&claimed).await.unwrap());
    let err = r
        .put_blob(&claimed, 4, stream_of(b"good!"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");

    // Bytes corrupted inside the registry fail verification on read.
    let d = put(&r, b"stored bytes").await.unwrap();
    std::fs::write(reg.blob_path(d.as_str()), b"stored bytez").unwrap();
    let err = image::read_blob(&r, &d, 1024).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn tags_and_catalog_paginate() {
    let reg = Distribution::start();
    let c = client();
    let cfg_repo = repo(&c, reg.addr(), "pages/a");
    let cfg = put(&cfg_repo, CONFIG).await.unwrap();
    let m = image_manifest(&cfg, CONFIG.len(), &[]);
    for t in ["t1", "t2", "t3", "t4", "t5"] {
        cfg_repo.put_manifest(&m, Some(t)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut last: Option<String> = None;
    let mut pages = 0;
    loop {
        let p = cfg_repo.tags_page(2, last.as_deref()).await.unwrap();
        assert!(p.items.len() <= 2, "{p:?}");
        seen.extend(p.items.clone());
        pages += 1;
        match p.next {
            Some(n) => last = Some(n),
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(seen, ["t1", "t2", "t3", "t4", "t5"]);
    assert_eq!(pages, 3);
    let mut all = cfg_repo.tags().await.unwrap();
    all.sort();
    assert_eq!(all, seen);

    for name in ["pages/b", "pages/c", "pages/d"] {
        let r = repo(&c, reg.addr(), name);
        put(&r, CONFIG).await.unwrap();
        r.put_manifest(&m, Some("x")).await.unwrap();
    }
    let p1 = c.catalog_page(reg.addr(), 2, None).await.unwrap();
    assert_eq!(p1.items, ["pages/a", "pages/b"]);
    assert_eq!(p1.next.as_deref(), Some("pages/b"));
    let p2 = c
        .catalog_page(reg.addr(), 2, p1.next.as_deref())
        .await
        .unwrap();
    assert_eq!(p2.items, ["pages/c", "pages/d"]);
    let all = c.catalog(reg.addr()).await.unwrap();
    assert_eq!(all, ["pages/a", "pages/b", "pages/c", "pages/d"]);
    let err = repo(&c, reg.addr(), "no/such").tags().await.unwrap_err();
    assert!(
        err.is_not_found() && err.to_string().contains("tags of"),
        "{err}"
    );
}

#[tokio::test]
async fn cross_repo_mount_moves_no_bytes() {
    let reg = Distribution::start();
    let proxy = CountingProxy::start(reg.addr());
    let c = client();
    let src = repo(&c, proxy.addr(), "mount/src");
    let dst = repo(&c, proxy.addr(), "mount/dst");
    let d = Digest::of(&chunk(7, 256 * 1024));
    src.put_blob(&d, 256 * 1024, image::bytes_stream(chunk(7, 256 * 1024)))
        .await
        .unwrap();
    assert!(!dst.has_blob(&d).await.unwrap());

    proxy.reset();
    assert!(
        dst.mount_blob(&d, &src).await.unwrap(),
        "registry did not answer 201"
    );
    let reqs = proxy.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].method, "POST");
    assert!(
        reqs[0].path.contains("mount=sha256") && reqs[0].path.contains("from=mount%2Fsrc"),
        "{reqs:?}"
    );
    assert!(
        proxy.bytes_up() < 4096,
        "mount sent {} bytes",
        proxy.bytes_up()
    );
    assert_eq!(dst.blob_size(&d).await.unwrap(), 256 * 1024);

    // A blob the source lacks: 202, not mounted.
    let absent = Digest::of(b"not there");
    assert!(!dst.mount_blob(&absent, &src).await.unwrap());
    // Another registry, or the same repository, is never asked.
    let other = repo(&c, reg.addr(), "mount/src");
    proxy.reset();
    assert!(!dst.mount_blob(&d, &other).await.unwrap());
    assert_eq!(proxy.request_count(), 0);
}

#[tokio::test]
async fn delete_manifests_and_blobs() {
    let reg = Distribution::start();
    let c = client();
    let r = repo(&c, reg.addr(), "del");
    let cfg = put(&r, CONFIG).await.unwrap();
    let m = image_manifest(&cfg, CONFIG.len(), &[]);
    r.put_manifest(&m, Some("gone")).await.unwrap();
    r.delete(m.digest.as_str()).await.unwrap();
    let err = r.manifest(m.digest.as_str()).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(r.head_manifest("gone").await.unwrap().is_none());
    r.delete_blob(&cfg).await.unwrap();
    assert!(!r.has_blob(&cfg).await.unwrap());
    let err = r.delete(m.digest.as_str()).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        r.delete("../../x").await.is_err(),
        "a bad reference reaches no URL"
    );
}

/// An image tagged `app` in `r` to refer to, and the `{}` blob artifacts use.
async fn subject_and_empty(r: &RegistryRepo) -> (RawManifest, Digest) {
    let cfg = put(r, CONFIG).await.unwrap();
    let subject = image_manifest(&cfg, CONFIG.len(), &[]);
    r.put_manifest(&subject, Some("app")).await.unwrap();
    (subject, put(r, b"{}").await.unwrap())
}

/// An artifact manifest of type `kind` (empty config and layer) about `subject`.
fn artifact(kind: &str, empty: &Digest, subject: &RawManifest) -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": kind,
        "config": {"mediaType": media::OCI_EMPTY, "digest": empty, "size": 2},
        "layers": [{"mediaType": media::OCI_EMPTY, "digest": empty, "size": 2}],
        "subject": subject.descriptor(),
    })
}

fn referrer_digests(index: &ggfs::image::manifest::ImageIndex) -> Vec<String> {
    index
        .manifests()
        .iter()
        .map(|d| d.digest().to_string())
        .collect()
}

#[tokio::test]
async fn referrers_fall_back_to_the_tag_schema() {
    let reg = Distribution::start();
    let c = client();
    let r = repo(&c, reg.addr(), "refs");
    let (subject, empty) = subject_and_empty(&r).await;
    assert!(r
        .referrers(&subject.digest, None)
        .await
        .unwrap()
        .manifests()
        .is_empty());

    let annotated = |kind: &str| {
        let mut v = artifact(kind, &empty, &subject);
        v["annotations"] = serde_json::json!({"org.example.kind": kind});
        RawManifest::from_json(&v).unwrap()
    };
    let sig = annotated("application/vnd.example.sig");
    let sbom = annotated("application/vnd.example.sbom");
    r.put_manifest(&sig, None).await.unwrap();
    r.put_manifest(&sbom, None).await.unwrap();
    r.put_manifest(&sig, None).await.unwrap(); // twice: listed once

    let all = r.referrers(&subject.digest, None).await.unwrap();
    assert_eq!(
        referrer_digests(&all),
        [sig.digest.to_string(), sbom.digest.to_string()]
    );
    assert_eq!(
        all.manifests()[0]
            .artifact_type()
            .as_ref()
            .map(|a| a.to_string())
            .as_deref(),
        Some("application/vnd.example.sig")
    );
    let only = r
        .referrers(&subject.digest, Some("application/vnd.example.sbom"))
        .await
        .unwrap();
    assert_eq!(only.manifests().len(), 1);
    assert_eq!(
        only.manifests()[0].digest().to_string(),
        sbom.digest.to_string()
    );
    // The fallback index lives at the sha256-<hex> tag.
    let tag = format!("sha256-{}", subject.digest.hex());
    assert!(r.tags().await.unwrap().contains(&tag));
}

/// A registry with the referrers API (the embedded one): the API answers,
/// and no fallback tag is written since the registry took the subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_api_when_the_registry_has_it() {
    let server = ggfs::server::Server::start(ggfs::server::Storage::Memory)
        .await
        .unwrap();
    let c = client();
    let r = repo(&c, &server.host(), "refs/api");
    let (subject, empty) = subject_and_empty(&r).await;
    let mut pushed = Vec::new();
    for kind in [
        "application/vnd.example.sig",
        "application/vnd.example.sbom",
    ] {
        let m = RawManifest::from_json(&artifact(kind, &empty, &subject)).unwrap();
        r.put_manifest(&m, None).await.unwrap();
        pushed.push(m.digest.to_string());
    }
    let mut got = referrer_digests(&r.referrers(&subject.digest, None).await.unwrap());
    got.sort();
    pushed.sort();
    assert_eq!(got, pushed);
    let sbom = r
        .referrers(&subject.digest, Some("application/vnd.example.sbom"))
        .await
        .unwrap();
    assert_eq!(sbom.manifests().len(), 1);
    assert_eq!(r.tags().await.unwrap(), ["app"], "no fallback tag");
}

// ---------------------------------------------------------------------------
// Misbehaving servers: a raw TcpListener answering what a test scripts.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Scripted {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// Serve each connection one response built by `answer`, then close.
fn scripted(answer: impl Fn(&Seen, usize) -> Vec<u8> + Send + Sync + 'static) -> Scripted {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let (log, answer) = (log.clone(), answer.clone());
            std::thread::spawn(move || {
                let Some(req) = read_request(&mut conn) else {
                    return;
                };
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(req.clone());
                    log.len()
                };
                let _ = conn.write_all(&answer(&req, n));
            });
        }
    });
    Scripted { addr, seen }
}

fn read_request(conn: &mut std::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let seen = Seen {
        method,
        path,
        headers,
    };
    let len: usize = seen
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some(seen)
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn fast_client() -> Client {
    let retry = RetryPolicy {
        attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_secs(2),
    };
    Client::builder(ClientOptions::default())
        .keychain(Keychain::anonymous())
        .retry(retry)
        .build()
        .unwrap()
}

#[tokio::test]
async fn oversized_manifests_are_refused_not_truncated() {
    let big = Arc::new(vec![b' '; 5 * MIB]);
    let b = big.clone();
    let with_length =
        scripted(move |_, _| response("200 OK", &[("Content-Type", media::OCI_MANIFEST)], &b));
    let c = fast_client();
    let err = repo(&c, &with_length.addr, "big")
        .manifest("latest")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { .. }) && err.to_string().contains("big:latest"),
        "{err}"
    );

    // No Content-Length: the body ends when the connection closes.
    let without_length = scripted(move |_, _| {
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: {}\r\n\r\n",
            media::OCI_MANIFEST
        )
        .into_bytes();
        out.extend_from_slice(&big);
        out
    });
    let err = repo(&c, &without_length.addr, "big")
        .manifest("latest")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn manifest_and_blob_digests_are_checked() {
    let body: &'static [u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;
    let other = Digest::of(b"other");
    let claim = other.to_string();
    let s = scripted(move |req, _| {
        if req.path.contains("/blobs/") {
            return response("200 OK", &[], b"evil");
        }
        response(
            "200 OK",
            &[
                ("Content-Type", media::OCI_MANIFEST),
                ("Docker-Content-Digest", &claim),
            ],
            body,
        )
    });
    let c = fast_client();
    let r = repo(&c, &s.addr, "lies");
    let err = r.manifest("latest").await.unwrap_err();
    assert!(
        matches!(&err, Error::DigestMismatch { expected, .. } if *expected == other),
        "{err}"
    );
    let err = r.manifest(other.as_str()).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let err = image::read_blob(&r, &Digest::of(b"good"), 1024)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn range_answered_with_the_whole_blob_is_sliced() {
    let blob = chunk(3, 64 * 1024);
    let b = blob.clone();
    let s = scripted(move |_, _| response("200 OK", &[], &b));
    let c = fast_client();
    let r = repo(&c, &s.addr, "norange");
    let d = Digest::of(&blob);
    assert_eq!(r.blob_range(&d, 1000, 100).await.unwrap(), blob[1000..1100]);
    assert_eq!(
        r.blob_range(&d, 64 * 1024 - 3, 10).await.unwrap(),
        blob[64 * 1024 - 3..]
    );
    assert_eq!(
        s.seen.lock().unwrap()[0].header("range"),
        Some("bytes=1000-1099")
    );
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let s = scripted(|_, _| {
        response(
            "500 Internal Server Error",
            &[("Content-Type", "application/json")],
            br#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#,
        )
    });
    let c = fast_client();
    let err = repo(&c, &s.addr, "fire").tags().await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Registry { .. }), "{msg}");
    assert!(
        msg.contains("UNKNOWN: disk on fire")
            && msg.contains("500")
            && msg.contains("tags of")
            && msg.contains("(tried 3 times)"),
        "{msg}"
    );
    assert_eq!(s.seen.lock().unwrap().len(), 3, "3 attempts");

    // 429 with Retry-After is waited out, then succeeds.
    let s = scripted(|_, n| match n {
        1 => response("429 Too Many Requests", &[("Retry-After", "1")], b""),
        _ => response("200 OK", &[], br#"{"name":"x","tags":["a"]}"#),
    });
    let start = Instant::now();
    assert_eq!(repo(&c, &s.addr, "x").tags().await.unwrap(), ["a"]);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn garbage_answers_are_clear_errors() {
    let s = scripted(|_, _| b"SSH-2.0-OpenSSH_9.0\r\n\r\n".to_vec());
    let c = fast_client();
    let err = repo(&c, &s.addr, "g").manifest("latest").await.unwrap_err();
    assert!(
        matches!(err, Error::Http { .. }) && err.to_string().contains("/v2/g/manifests/latest"),
        "{err}"
    );

    let s = scripted(|_, _| response("200 OK", &[], b"<html>not json</html>"));
    let err = repo(&c, &s.addr, "g").tags().await.unwrap_err();
    assert!(
        err.to_string().contains("tags of") && err.to_string().contains("not JSON"),
        "{err}"
    );
    let err = repo(&c, &s.addr, "g").manifest("latest").await.unwrap_err();
    assert!(err.to_string().contains("g:latest"), "{err}");

    // Nothing listening at all.
    let port = common::free_port();
    let err = repo(&c, &format!("127.0.0.1:{port}"), "g")
        .manifest("x")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Http { .. }), "{err}");
}

/// A client whose docker config holds a login (u/p) for `registry`.
fn client_with_login(registry: &str) -> (Client, tempfile::TempDir) {
    let dir = common::tempdir();
    let auths = serde_json::json!({"auths": {registry: {"username": "u", "password": "p"}}});
    std::fs::write(dir.path().join("config.json"), auths.to_string()).unwrap();
    let c = Client::builder(ClientOptions::default())
        .keychain(Keychain::docker_dir(dir.path()))
        .build()
        .unwrap();
    (c, dir)
}

fn assert_no_credentials(req: &Seen) {
    assert_eq!(
        req.header("authorization"),
        None,
        "credentials leaked to {req:?}"
    );
}

#[tokio::test]
async fn redirects_never_carry_credentials_off_host() {
    // Storage on another host: must not see the registry's Authorization.
    let blob = b"redirected blob".to_vec();
    let storage = scripted(move |_, _| response("200 OK", &[], &blob));
    let target = format!("http://{}/bucket/object?sig=abc", storage.addr);
    let registry = scripted(move |req, _| match req.header("authorization") {
        Some(a) if a.starts_with("Basic ") => {
            response("307 Temporary Redirect", &[("Location", &target)], b"")
        }
        _ => response(
            "401 Unauthorized",
            &[("WWW-Authenticate", r#"Basic realm="test""#)],
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        ),
    });
    let (c, _dir) = client_with_login(&registry.addr);
    let r = repo(&c, &registry.addr, "redir");
    let d = Digest::of(b"redirected blob");
    assert_eq!(
        image::read_blob(&r, &d, 1024).await.unwrap(),
        &b"redirected blob"[..]
    );
    let seen = storage.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/bucket/object?sig=abc")
    );
    assert_no_credentials(&seen[0]);
}

#[tokio::test]
async fn jobs_bound_concurrent_requests() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n2, m2) = (now.clone(), max.clone());
    let s = scripted(move |_, _| {
        let cur = n2.fetch_add(1, Ordering::SeqCst) + 1;
        m2.fetch_max(cur, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(150));
        n2.fetch_sub(1, Ordering::SeqCst);
        // A HEAD answer: the length of a body that is not sent.
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n".to_vec()
    });
    let opts = ClientOptions {
        jobs: 2,
        ..ClientOptions::default()
    };
    let c = Client::builder(opts)
        .keychain(Keychain::anonymous())
        .build()
        .unwrap();
    let r = repo(&c, &s.addr, "jobs");
    let digests: Vec<Digest> = (0..6u8).map(|i| Digest::of(&[i])).collect();
    let all = futures::future::join_all(digests.iter().map(|d| r.blob_size(d))).await;
    assert!(all.iter().all(|x| x.is_ok()), "{all:?}");
    assert_eq!(s.seen.lock().unwrap().len(), 6);
    assert_eq!(max.load(Ordering::SeqCst), 2, "jobs=2 not honoured");
}

#[tokio::test]
async fn uploads_follow_relative_locations() {
    let s = scripted(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v2/rel/blobs/uploads/") => response(
            "202 Accepted",
            &[("Location", "/elsewhere/session?_state=abc")],
            b"",
        ),
        ("PUT", p) if p.starts_with("/elsewhere/session?_state=abc&digest=sha256%3A") => {
            response("201 Created", &[], b"")
        }
        _ => response("400 Bad Request", &[], b""),
    });
    let c = fast_client();
    put(&repo(&c, &s.addr, "rel"), b"relative").await.unwrap();
    let seen = s.seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// A token the registry stops honouring (revoked, clock skew) is replaced:
/// the 401 drops the cached token and a new one is fetched once.
#[tokio::test]
async fn rejected_tokens_are_refreshed_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let issued = Arc::new(AtomicUsize::new(0));
    let i2 = issued.clone();
    let tokens = scripted(move |_, _| {
        let n = i2.fetch_add(1, Ordering::SeqCst) + 1;
        response(
            "200 OK",
            &[],
            format!(r#"{{"token":"tok{n}","expires_in":300}}"#).as_bytes(),
        )
    });
    let realm = format!("http://{}/token", tokens.addr);
    let registry = scripted(move |req, n| {
        // tok1 works for the first two requests, then only tok2 does.
        let ok = match req.header("authorization") {
            Some("Bearer tok1") => n <= 2,
            Some("Bearer tok2") => true,
            _ => false,
        };
        if ok {
            return response("200 OK", &[], br#"{"name":"r","tags":["a"]}"#);
        }
        let challenge =
            format!(r#"Bearer realm="{realm}",service="svc",scope="repository:r:pull""#);
        response("401 Unauthorized", &[("WWW-Authenticate", &challenge)], b"")
    });
    let c = fast_client();
    let r = repo(&c, &registry.addr, "r");
    r.tags().await.unwrap(); // 401, tok1, 200
    r.tags().await.unwrap(); // tok1 rejected, tok2, 200
    r.tags().await.unwrap(); // tok2 reused
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    let asked = tokens.seen.lock().unwrap().clone();
    assert!(
        asked[0]
            .path
            .starts_with("/token?service=svc&scope=repository%3Ar%3Apull"),
        "{asked:?}"
    );
    assert_eq!(registry.seen.lock().unwrap().len(), 5);
}

/// A chunk whose PATCH fails is resent only after the session confirms it
/// holds none of it; the upload then completes.
#[tokio::test]
async fn failed_chunks_are_resent_after_checking_the_session() {
    let held = Arc::new(Mutex::new((0u64, 0usize))); // (bytes held, PATCHes seen)
    let h = held.clone();
    let s = scripted(move |req, _| {
        let mut st = h.lock().unwrap();
        let loc = ("Location", "/v2/chunks/blobs/uploads/s1");
        match req.method.as_str() {
            "POST" => response("202 Accepted", &[loc], b""),
            "PATCH" => {
                st.1 += 1;
                if st.1 == 2 {
                    return response("503 Service Unavailable", &[], b"");
                }
                st.0 += req
                    .header("content-length")
                    .and_then(|l| l.parse::<u64>().ok())
                    .unwrap_or(0);
                let range = format!("0-{}", st.0 - 1);
                response("202 Accepted", &[loc, ("Range", &range)], b"")
            }
            "GET" => {
                let range = format!("0-{}", st.0.saturating_sub(1));
                response("204 No Content", &[loc, ("Range", &range)], b"")
            }
            "PUT" if st.0 == 10 => response("201 Created", &[], b""),
            _ => response("400 Bad Request", &[], b""),
        }
    });
    let c = Client::builder(ClientOptions::default())
        .keychain(Keychain::anonymous())
        .chunk_size(4)
        .build()
        .unwrap();
    let r = repo(&c, &s.addr, "chunks");
    put(&r, b"0123456789").await.unwrap();
    let methods: Vec<String> = s
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|q| q.method.clone())
        .collect();
    assert_eq!(
        methods,
        ["POST", "PATCH", "PATCH", "GET", "PATCH", "PATCH", "PUT"]
    );
}

#[tokio::test]
async fn token_endpoint_hiccups_are_retried() {
    let tokens = scripted(|_, n| match n {
        1 => response("503 Service Unavailable", &[], b"try later"),
        _ => response("200 OK", &[], br#"{"access_token":"good"}"#),
    });
    let realm = format!("http://{}/token", tokens.addr);
    let registry = scripted(move |req, _| match req.header("authorization") {
        Some("Bearer good") => response("200 OK", &[], br#"{"name":"r","tags":["a"]}"#),
        _ => response(
            "401 Unauthorized",
            &[("WWW-Authenticate", &format!(r#"Bearer realm="{realm}""#))],
            b"",
        ),
    });
    let c = fast_client();
    assert_eq!(repo(&c, &registry.addr, "r").tags().await.unwrap(), ["a"]);
    assert_eq!(tokens.seen.lock().unwrap().len(), 2);
}

/// A blob body that breaks off is resumed from where it stopped: with a
/// Range request answered 206, or (registry ignoring Range) a 200 whose
/// head is dropped. Either way the bytes verify.
#[tokio::test]
async fn broken_blob_downloads_resume() {
    let blob = chunk(9, 100_000);
    let d = Digest::of(&blob);
    for honour_range in [true, false] {
        let b = blob.clone();
        let s = scripted(move |req, n| {
            if n == 1 {
                // Promise the whole blob, send 40%, hang up.
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )
                .into_bytes();
                out.extend_from_slice(&b[..40_000]);
                return out;
            }
            match req.header("range").and_then(|r| r.strip_prefix("bytes=")) {
                Some(r) if honour_range => {
                    let start: usize = r.trim_end_matches('-').parse().unwrap();
                    let cr = format!("bytes {start}-{}/{}", b.len() - 1, b.len());
                    response(
                        "206 Partial Content",
                        &[("Content-Range", &cr)],
                        &b[start..],
                    )
                }
                _ => response("200 OK", &[], &b),
            }
        });
        let c = fast_client();
        let r = repo(&c, &s.addr, "resume");
        let got = image::read_blob(&r, &d, 1 << 20).await.unwrap();
        assert_eq!(got, blob, "honour_range={honour_range}");
        let seen = s.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert!(
            seen[1]
                .header("range")
                .is_some_and(|r| r.starts_with("bytes=") && r.ends_with('-')),
            "{seen:?}"
        );
    }
}

/// A streamed PUT that the registry answers 503 is sent again whole, from
/// the bytes kept: the source is read once, both PUTs carry every byte.
#[tokio::test]
async fn a_streamed_upload_answered_503_goes_again_from_the_bytes_kept() {
    let puts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = puts.clone();
    let s = scripted(move |req, _| match req.method.as_str() {
        "POST" => response(
            "202 Accepted",
            &[("Location", "/v2/x/blobs/uploads/u1")],
            b"",
        ),
        "PUT" if p.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 => {
            response("503 Service Unavailable", &[], b"")
        }
        "PUT" => response("201 Created", &[], b""),
        _ => response("404 Not Found", &[], b""),
    });
    let c = fast_client();
    let r = repo(&c, &s.addr, "x");
    let pieces: Vec<Bytes> = (0..4).map(|i| chunk(i, 1000)).collect();
    let digest = {
        let mut h = Hasher::new();
        pieces.iter().for_each(|b| h.update(b));
        h.finish()
    };
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = reads.clone();
    let data: ByteStream = Box::pin(futures::stream::iter(pieces).map(move |b| {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(b)
    }));
    r.put_blob(&digest, 4000, data).await.unwrap();
    assert_eq!(
        reads.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "source read once"
    );
    let seen = s.seen.lock().unwrap().clone();
    let puts: Vec<_> = seen.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 2, "{seen:?}");
    for p in puts {
        assert_eq!(p.header("content-length"), Some("4000"), "{p:?}");
        assert!(
            p.path.contains(&digest.as_str().replace(':', "%3A")),
            "{p:?}"
        );
    }
}

/// An upload session on another host (the registry's `Location` points at
/// its storage) gets the blob's streamed PUT without the registry's
/// credentials.
#[tokio::test]
async fn uploads_never_carry_credentials_off_host() {
    let storage = scripted(|_, _| response("201 Created", &[], b""));
    let target = format!("http://{}/upload/u1?sig=abc", storage.addr);
    let registry = scripted(move |req, _| match req.header("authorization") {
        Some(a) if a.starts_with("Basic ") => {
            response("202 Accepted", &[("Location", &target)], b"")
        }
        _ => response(
            "401 Unauthorized",
            &[("WWW-Authenticate", r#"Basic realm="test""#)],
            b"",
        ),
    });
    let (c, _dir) = client_with_login(&registry.addr);
    let r = repo(&c, &registry.addr, "up");
    put(&r, b"a blob stored elsewhere").await.unwrap();
    let seen = storage.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "PUT");
    assert!(
        seen[0].path.starts_with("/upload/u1?sig=abc&digest="),
        "{:?}",
        seen[0]
    );
    assert_no_credentials(&seen[0]);
}

/// Ranges of a blob the registry redirects to storage elsewhere (S3, a
/// CDN) go straight there once the redirect is known: one round trip a
/// range instead of two. A storage URL that stops working (a presigned URL
/// expired: 403) sends that read back through the registry, whose new
/// redirect is used from then on. The bytes are right throughout.
#[tokio::test]
async fn ranges_of_a_redirected_blob_go_straight_to_storage() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let blob = Arc::new(common::pseudo_random(100_000, 7));
    let digest = Digest::of(&blob);
    let expired = Arc::new(AtomicBool::new(false));
    let (b, ex) = (blob.clone(), expired.clone());
    let storage = scripted(move |req, _| {
        if req.path.contains("sig=1") && ex.load(SeqCst) {
            return response("403 Forbidden", &[], b"expired");
        }
        let range = req.header("range").unwrap_or("bytes=0-0");
        let (a, z) = range
            .trim_start_matches("bytes=")
            .split_once('-')
            .map(|(a, z)| (a.parse::<usize>().unwrap(), z.parse::<usize>().unwrap()))
            .unwrap();
        let cr = format!("bytes {a}-{z}/{}", b.len());
        response("206 Partial Content", &[("Content-Range", &cr)], &b[a..=z])
    });
    let (to, ex) = (storage.addr.clone(), expired.clone());
    let registry = scripted(move |_, _| {
        let sig = if ex.load(SeqCst) { 2 } else { 1 };
        let at = format!("http://{to}/object?sig={sig}");
        response("307 Temporary Redirect", &[("Location", &at)], b"")
    });
    let c = fast_client();
    let r = repo(&c, &registry.addr, "x");
    let read = |i: usize| {
        let (r, d, b) = (r.clone(), digest.clone(), blob.clone());
        async move {
            let got = r.get_blob_range(&d, i as u64 * 10_000, 1000).await.unwrap();
            assert_eq!(&got[..], &b[i * 10_000..i * 10_000 + 1000], "range {i}");
        }
    };
    let seen = |s: &Scripted| s.seen.lock().unwrap().len();
    for i in 0..5 {
        read(i).await;
    }
    assert_eq!((seen(&registry), seen(&storage)), (1, 5));
    expired.store(true, SeqCst);
    for i in 5..8 {
        read(i).await;
    }
    // The first read after: storage refused sig=1, the registry sent sig=2.
    assert_eq!((seen(&registry), seen(&storage)), (2, 9));
}
