//! The embedded registry, started in-process on 127.0.0.1:0 and driven by a
//! real client (skopeo) and by plain HTTP for the API's corners.

mod common;

use std::path::{Path, PathBuf};

use ggfs::server::{Server, Storage};
use ggfs::Digest;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

struct Reg {
    server: Server,
    http: reqwest::Client,
}

impl Reg {
    async fn start(storage: Storage) -> Reg {
        let server = Server::start(storage).await.expect("start registry");
        Reg {
            server,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// A bodiless request with no extra headers.
    async fn send(&self, method: Method, path: &str) -> Response {
        self.req(method, path).send().await.unwrap()
    }

    /// Monolithic upload; returns the digest.
    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        let r = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            )
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "push blob to {repo}");
        d
    }

    async fn put_manifest(&self, repo: &str, reference: &str, mt: &str, body: &[u8]) -> Response {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("Content-Type", mt)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Push a config and a layer, then an image manifest (by tag if given).
    async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        seed: &str,
        extra: Value,
    ) -> (Digest, Vec<u8>) {
        let cfg = self
            .push_blob(repo, format!("{{\"seed\":\"{seed}\"}}").as_bytes())
            .await;
        let layer = self
            .push_blob(repo, format!("layer {seed}").as_bytes())
            .await;
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": 11 + seed.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 6 + seed.len()}],
        });
        if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
            m.extend(extra.clone());
        }
        let bytes = serde_json::to_vec(&m).unwrap();
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, &bytes).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        (Digest::of(&bytes), bytes)
    }
}

fn header<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

async fn body(r: Response) -> Value {
    let bytes = r.bytes().await.expect("response body");
    serde_json::from_slice(&bytes).expect("JSON body")
}

/// The first error code of a spec error body.
async fn error_code(r: Response) -> String {
    let v: Value = body(r).await;
    v["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_string()
}

// ---------- skopeo ----------

async fn run(cmd: &str, args: &[&str]) {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI layout with one image `:t` holding one file layer, made by umoci.
async fn make_layout(dir: &Path) -> PathBuf {
    make_layout_with(dir, b"hello from ggfs\n").await
}

async fn make_layout_with(dir: &Path, content: &[u8]) -> PathBuf {
    let layout = dir.join("src");
    let file = dir.join("hello.txt");
    std::fs::write(&file, content).unwrap();
    let l = layout.to_str().unwrap();
    let img = format!("{l}:t");
    run("umoci", &["init", "--layout", l]).await;
    run("umoci", &["new", "--image", &img]).await;
    run(
        "umoci",
        &[
            "insert",
            "--image",
            &img,
            file.to_str().unwrap(),
            "/hello.txt",
        ],
    )
    .await;
    layout
}

/// The manifest digest an OCI layout's index.json gives for its only image.
fn layout_manifest(layout: &Path) -> String {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The digests (hex) of the image's manifest, config and layers.
fn reachable(layout: &Path) -> Vec<String> {
    let hex = |d: &Value| {
        d.as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string()
    };
    let manifest = hex(&Value::String(layout_manifest(layout)));
    let path = layout.join("blobs/sha256").join(&manifest);
    let m: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut names = vec![manifest, hex(&m["config"]["digest"])];
    names.extend(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| hex(&l["digest"])),
    );
    names.sort();
    names
}

async fn skopeo_copy(src: &str, dst: &str) {
    run(
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            src,
            dst,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_push_and_pull_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = make_layout(tmp.path()).await;
    let reg = Reg::start(Storage::Memory).await;
    let host = reg.server.host();
    let remote = format!("docker://{host}/team/apps/hello:t");
    skopeo_copy(&format!("oci:{}:t", layout.display()), &remote).await;

    // Registry-to-registry copy (cross-repository mount path), then pull back.
    let other = format!("docker://{host}/mirror:v1");
    skopeo_copy(&remote, &other).await;
    let back = tmp.path().join("back");
    skopeo_copy(&other, &format!("oci:{}:t", back.display())).await;

    assert_eq!(layout_manifest(&layout), layout_manifest(&back));
    assert_eq!(reachable(&layout), reachable(&back));
    assert_eq!(reachable(&layout).len(), 3, "manifest, config, one layer");
    for name in reachable(&back) {
        let bytes = std::fs::read(back.join("blobs/sha256").join(&name)).unwrap();
        assert_eq!(Digest::of(&bytes).hex(), name, "pulled blob corrupt");
    }
    let tags: Value = body(reg.send(Method::GET, "/v2/team/apps/hello/tags/list").await).await;
    assert_eq!(
        (&tags["name"], &tags["tags"]),
        (&json!("team/apps/hello"), &json!(["t"]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_storage_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // Incompressible, so the layer is big enough to arrive in many pieces.
    let mut noise = vec![0u8; 12 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
    let layout = make_layout_with(tmp.path(), &noise).await;
    let root = tmp.path().join("registry");
    let reg = Reg::start(Storage::Disk(root.clone())).await;
    let remote = format!("docker://{}/a/b:t", reg.server.host());
    skopeo_copy(&format!("oci:{}:t", layout.display()), &remote).await;
    let stored = std::fs::read_dir(root.join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(stored, reachable(&layout).len());
    drop(reg);

    let reg = Reg::start(Storage::Disk(root.clone())).await;
    let back = tmp.path().join("back");
    let remote = format!("docker://{}/a/b:t", reg.server.host());
    skopeo_copy(&remote, &format!("oci:{}:t", back.display())).await;
    assert_eq!(layout_manifest(&layout), layout_manifest(&back));
    let cat: Value = body(reg.send(Method::GET, "/v2/_catalog").await).await;
    assert_eq!(cat, json!({"repositories": ["a/b"]}));
    assert_eq!(std::fs::read_dir(root.join("uploads")).unwrap().count(), 0);
}

// ---------- API corners ----------

#[tokio::test]
async fn base_endpoint_and_errors() {
    let reg = Reg::start(Storage::Memory).await;
    let r = reg.send(Method::GET, "/v2/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "Docker-Distribution-API-Version"),
        "registry/2.0"
    );
    let r = reg.send(Method::HEAD, "/v2/").await;
    assert_eq!(r.status(), StatusCode::OK);

    let r = reg.send(Method::GET, "/v2/Bad_Name/tags/list").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "NAME_INVALID");
    let r = reg.send(Method::GET, "/v2/nope/tags/list").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    let r = reg.send(Method::GET, "/v2/x/blobs/sha256:zz").await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    // A nonexistent manifest whose reference is malformed is unknown, not
    // invalid (distribution-spec conformance), by GET and by HEAD.
    reg.push_blob("x", b"a blob").await;
    for method in [Method::GET, Method::HEAD] {
        let r = reg
            .send(method.clone(), "/v2/x/manifests/.INVALID_MANIFEST_NAME")
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method}");
    }
    let r = reg
        .send(Method::GET, "/v2/x/manifests/.INVALID_MANIFEST_NAME")
        .await;
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn blob_range_requests() {
    let reg = Reg::start(Storage::Memory).await;
    let data: Vec<u8> = (0..100u8).collect();
    let d = reg.push_blob("r/a/n/g/e", &data).await;
    let path = format!("/v2/r/a/n/g/e/blobs/{d}");

    let r = reg.send(Method::HEAD, &path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "Content-Length"), "100");
    assert_eq!(header(&r, "Docker-Content-Digest"), d.as_str());

    let r = reg
        .req(Method::GET, &path)
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "Content-Range"), "bytes 10-19/100");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);

    let r = reg
        .req(Method::GET, &path)
        .header("Range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[95..]);

    let r = reg
        .req(Method::GET, &path)
        .header("Range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "Content-Range"), "bytes */100");

    let r = reg.send(Method::GET, &path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
}

/// Chunked uploads, in memory and on disk: order is enforced, a wrong final
/// digest leaves nothing behind, a right one makes the blob visible.
#[tokio::test]
async fn chunked_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    for storage in [Storage::Memory, Storage::Disk(tmp.path().to_path_buf())] {
        let reg = Reg::start(storage.clone()).await;
        chunked_upload_checks(&reg).await;
        if let Storage::Disk(root) = storage {
            assert_eq!(std::fs::read_dir(root.join("uploads")).unwrap().count(), 0);
            let blobs = std::fs::read_dir(root.join("blobs/sha256"))
                .unwrap()
                .count();
            assert_eq!(blobs, 1, "only the verified blob is stored");
        }
    }
}

async fn start_session(reg: &Reg, repo: &str) -> String {
    let r = reg
        .send(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().contains_key("Docker-Upload-UUID"));
    header(&r, "Location").to_string()
}

async fn patch(reg: &Reg, loc: &str, range: &str, body: &[u8]) -> Response {
    reg.req(Method::PATCH, loc)
        .header("Content-Range", range)
        .header("Content-Type", "application/octet-stream")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

async fn chunked_upload_checks(reg: &Reg) {
    let repo = "up/load";
    let part1 = vec![1u8; 300_000];
    let part2 = vec![2u8; 200_000];
    let whole = [part1.clone(), part2.clone()].concat();
    let good = Digest::of(&whole);
    let wrong = Digest::of(b"something else");

    // Wrong digest at close: refused, session gone, nothing visible.
    let loc = start_session(reg, repo).await;
    let r = patch(reg, &loc, "0-299999", &part1).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "Range"), "0-299999");
    let r = patch(reg, &loc, "400000-599999", &part2).await;
    assert_eq!(
        r.status(),
        StatusCode::RANGE_NOT_SATISFIABLE,
        "out-of-order chunk"
    );
    assert_eq!(header(&r, "Range"), "0-299999");
    let r = reg.send(Method::GET, &loc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "Range"), "0-299999");
    let r = reg
        .req(Method::PUT, &format!("{loc}?digest={wrong}"))
        .header("Content-Range", "300000-499999")
        .body(part2.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    for d in [&good, &wrong] {
        let r = reg
            .send(Method::HEAD, &format!("/v2/{repo}/blobs/{d}"))
            .await;
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "{d} visible after a failed upload"
        );
    }
    let r = reg.send(Method::GET, &loc).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");

    // A chunk whose body is shorter than its Content-Range is undone.
    let loc = start_session(reg, repo).await;
    let r = patch(reg, &loc, "0-299999", &part1[..1000]).await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let r = reg.send(Method::GET, &loc).await;
    assert_eq!(header(&r, "Range"), "0-0");

    // The right way: two chunks, close with the digest (and an empty body).
    let r = patch(reg, &loc, "0-299999", &part1).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = patch(reg, &loc, "300000-499999", &part2).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = reg.send(Method::PUT, &format!("{loc}?digest={good}")).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "Docker-Content-Digest"), good.as_str());
    let r = reg
        .send(Method::GET, &format!("/v2/{repo}/blobs/{good}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &whole[..]);

    // Monolithic with a wrong digest: refused, nothing kept.
    let r = reg
        .req(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={wrong}"),
        )
        .body(b"not it".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
}

#[tokio::test]
async fn cross_repository_mount_and_visibility() {
    let reg = Reg::start(Storage::Memory).await;
    let d = reg.push_blob("src/repo", b"shared layer").await;

    // Not in "dst" until mounted, even though the registry has the bytes.
    let r = reg.send(Method::HEAD, &format!("/v2/dst/blobs/{d}")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let r = reg
        .send(
            Method::POST,
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=src/repo"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "Location"), format!("/v2/dst/blobs/{d}"));
    let r = reg.send(Method::GET, &format!("/v2/dst/blobs/{d}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"shared layer");

    // The source repository lacks it: an ordinary upload session instead.
    let r = reg
        .send(
            Method::POST,
            &format!("/v2/third/blobs/uploads/?mount={d}&from=elsewhere"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(header(&r, "Location").starts_with("/v2/third/blobs/uploads/"));
    let r = reg
        .send(Method::HEAD, &format!("/v2/third/blobs/{d}"))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Deleting from one repository leaves the other's view alone.
    let r = reg
        .send(Method::DELETE, &format!("/v2/src/repo/blobs/{d}"))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = reg
        .send(Method::HEAD, &format!("/v2/src/repo/blobs/{d}"))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = reg.send(Method::HEAD, &format!("/v2/dst/blobs/{d}")).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn manifests_push_get_delete() {
    let reg = Reg::start(Storage::Memory).await;
    let repo = "m/a/n/i";
    let missing = Digest::of(b"never pushed");
    let orphan = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": missing, "size": 12},
        "layers": []
    });
    let r = reg
        .put_manifest(
            repo,
            "x",
            OCI_MANIFEST,
            &serde_json::to_vec(&orphan).unwrap(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");

    let (d, bytes) = reg.push_image(repo, "v1", "one", json!({})).await;
    for reference in ["v1", d.as_str()] {
        let r = reg
            .send(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "Content-Type"), OCI_MANIFEST);
        assert_eq!(header(&r, "Docker-Content-Digest"), d.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[..]);
    }
    let r = reg
        .send(Method::HEAD, &format!("/v2/{repo}/manifests/v1"))
        .await;
    assert_eq!(header(&r, "Content-Length"), bytes.len().to_string());

    // By digest: the bytes must hash to it.
    let other = Digest::of(b"x");
    let r = reg
        .put_manifest(repo, other.as_str(), OCI_MANIFEST, &bytes)
        .await;
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = reg
        .put_manifest(repo, d.as_str(), OCI_MANIFEST, &bytes)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // An index's children must be manifests in the repository.
    let index = |child: &Digest| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": 1}]
        }))
        .unwrap()
    };
    let config_digest = Digest::of(br#"{"seed":"one"}"#);
    let r = reg
        .put_manifest(repo, "idx", OCI_INDEX, &index(&config_digest))
        .await;
    assert_eq!(
        error_code(r).await,
        "MANIFEST_BLOB_UNKNOWN",
        "a blob is not a manifest"
    );
    let r = reg.put_manifest(repo, "idx", OCI_INDEX, &index(&d)).await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // Content-Type must agree with mediaType; over 4 MiB is refused.
    let r = reg.put_manifest(repo, "bad", OCI_INDEX, &bytes).await;
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let mut big = serde_json::to_vec(&orphan).unwrap();
    big.pop();
    big.extend(format!(",\"annotations\":{{\"pad\":\"{}\"}}}}", "x".repeat(4 << 20)).bytes());
    let r = reg.put_manifest(repo, "big", OCI_MANIFEST, &big).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Delete by tag removes the tag; by digest removes manifest and tags.
    let r = reg
        .send(Method::DELETE, &format!("/v2/{repo}/manifests/idx"))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = reg
        .send(Method::DELETE, &format!("/v2/{repo}/manifests/{d}"))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    for reference in ["v1", d.as_str(), "idx"] {
        let r = reg
            .send(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{reference}");
        assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    }
}

/// Follow `Link: <...>; rel="next"` headers to the end, collecting `key`.
async fn all_pages(reg: &Reg, first: &str, key: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let (mut pages, mut links) = (Vec::new(), Vec::new());
    let mut next = Some(first.to_string());
    while let Some(path) = next.take() {
        let r = reg.send(Method::GET, &path).await;
        assert_eq!(r.status(), StatusCode::OK);
        if let Some(link) = r.headers().get("Link") {
            let link = link.to_str().unwrap().to_string();
            let target = link.trim_start_matches('<').split('>').next().unwrap();
            assert!(link.ends_with("rel=\"next\""), "{link}");
            next = Some(target.to_string());
            links.push(link);
        }
        let v: Value = body(r).await;
        let page = v[key].as_array().unwrap().iter();
        pages.push(page.map(|t| t.as_str().unwrap().to_string()).collect());
    }
    (pages, links)
}

#[tokio::test]
async fn tags_and_catalog_pagination() {
    let reg = Reg::start(Storage::Memory).await;
    for tag in ["t0", "t1", "t2", "t3", "t4"] {
        reg.push_image("pag/ed", tag, "same", json!({})).await;
    }
    reg.push_blob("zz/last", b"x").await;
    reg.push_blob("aa/first", b"x").await;

    let (pages, links) = all_pages(&reg, "/v2/pag/ed/tags/list?n=2", "tags").await;
    assert_eq!(pages, [vec!["t0", "t1"], vec!["t2", "t3"], vec!["t4"]]);
    assert_eq!(links[0], "</v2/pag/ed/tags/list?n=2&last=t1>; rel=\"next\"");

    let (pages, _) = all_pages(&reg, "/v2/_catalog?n=1", "repositories").await;
    assert_eq!(pages, [vec!["aa/first"], vec!["pag/ed"], vec!["zz/last"]]);
    let (pages, links) = all_pages(&reg, "/v2/_catalog", "repositories").await;
    assert_eq!(pages.len(), 1);
    assert!(links.is_empty());

    let r = reg.send(Method::GET, "/v2/pag/ed/tags/list?n=x").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn referrers_api() {
    let reg = Reg::start(Storage::Memory).await;
    let repo = "ref/errs";
    let (subject, subject_bytes) = reg.push_image(repo, "v1", "base", json!({})).await;
    let subject_desc =
        json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_bytes.len()});

    let sig_extra = json!({"artifactType": "application/vnd.example.sig", "subject": subject_desc,
                           "annotations": {"who": "me"}});
    let sbom_extra =
        json!({"artifactType": "application/vnd.example.sbom", "subject": subject_desc});
    let (sig, _) = reg.push_image(repo, "sig", "sig", sig_extra).await;
    let sbom_bytes = {
        let (d, b) = reg.push_image(repo, "sbom", "sbom", sbom_extra).await;
        (d, b)
    };
    // OCI-Subject answers a push that has a subject.
    let r = reg
        .put_manifest(repo, "sbom", OCI_MANIFEST, &sbom_bytes.1)
        .await;
    assert_eq!(header(&r, "OCI-Subject"), subject.as_str());

    let path = format!("/v2/{repo}/referrers/{subject}");
    let r = reg.send(Method::GET, &path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "Content-Type"), OCI_INDEX);
    assert!(r.headers().get("OCI-Filters-Applied").is_none());
    let index: Value = body(r).await;
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);

    let r = reg
        .send(
            Method::GET,
            &format!("{path}?artifactType=application/vnd.example.sig"),
        )
        .await;
    assert_eq!(header(&r, "OCI-Filters-Applied"), "artifactType");
    let index: Value = body(r).await;
    let m = &index["manifests"];
    assert_eq!(m.as_array().unwrap().len(), 1);
    assert_eq!(m[0]["digest"], sig.as_str());
    assert_eq!(m[0]["artifactType"], "application/vnd.example.sig");
    assert_eq!(m[0]["annotations"]["who"], "me");

    // Deleting a referrer drops it; an unknown subject gives an empty index.
    let r = reg
        .send(Method::DELETE, &format!("/v2/{repo}/manifests/{sig}"))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let index: Value = body(reg.send(Method::GET, &path).await).await;
    assert_eq!(index["manifests"][0]["digest"], sbom_bytes.0.as_str());
    let nobody = Digest::of(b"nobody");
    let r = reg
        .send(Method::GET, &format!("/v2/{repo}/referrers/{nobody}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let index: Value = body(r).await;
    assert_eq!(index["manifests"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = std::sync::Arc::new(Reg::start(Storage::Disk(tmp.path().to_path_buf())).await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let repo = format!("c/r{}", i % 4);
            // Half push the same bytes, half their own.
            let shared = reg.push_blob(&repo, b"same bytes everywhere").await;
            let own = reg.push_blob(&repo, format!("own {i}").as_bytes()).await;
            (repo, shared, own)
        }));
    }
    for t in tasks {
        let (repo, shared, own) = t.await.unwrap();
        for d in [shared, own] {
            let r = reg
                .send(Method::HEAD, &format!("/v2/{repo}/blobs/{d}"))
                .await;
            assert_eq!(r.status(), StatusCode::OK);
        }
    }
    assert_eq!(
        std::fs::read_dir(tmp.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        17
    );
}

/// Tags, deletions, per-repository links and referrers come back after a
/// restart of a disk registry.
#[tokio::test]
async fn disk_restores_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = Storage::Disk(tmp.path().to_path_buf());
    let reg = Reg::start(storage.clone()).await;
    let (subject, bytes) = reg.push_image("d/one", "keep", "s", json!({})).await;
    let desc = json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": bytes.len()});
    let extra = json!({"artifactType": "application/x-note", "subject": desc});
    let (note, _) = reg.push_image("d/one", "note", "n", extra).await;
    reg.push_image("d/one", "gone", "g", json!({})).await;
    let dropped = reg.push_blob("d/two", b"dropped").await;
    let kept = reg.push_blob("d/two", b"kept").await;
    for path in [
        "/v2/d/one/manifests/gone".to_string(),
        format!("/v2/d/two/blobs/{dropped}"),
    ] {
        let r = reg.send(Method::DELETE, &path).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{path}");
    }
    drop(reg);

    let reg = Reg::start(storage).await;
    let tags = body(reg.send(Method::GET, "/v2/d/one/tags/list").await).await;
    assert_eq!(tags["tags"], json!(["keep", "note"]));
    let r = reg
        .send(Method::GET, &format!("/v2/d/one/referrers/{subject}"))
        .await;
    let index = body(r).await;
    assert_eq!(index["manifests"][0]["digest"], note.as_str());
    assert_eq!(index["manifests"][0]["artifactType"], "application/x-note");
    let r = reg.send(Method::GET, "/v2/d/one/manifests/keep").await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[..]);
    for (d, want) in [(&dropped, StatusCode::NOT_FOUND), (&kept, StatusCode::OK)] {
        let r = reg
            .send(Method::HEAD, &format!("/v2/d/two/blobs/{d}"))
            .await;
        assert_eq!(r.status(), want, "{d}");
    }
}

/// Bytes go once no repository links them, and not before.
#[tokio::test]
async fn deleted_content_is_removed_once_unreferenced() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Reg::start(Storage::Disk(tmp.path().to_path_buf())).await;
    let file = |d: &Digest| tmp.path().join("blobs/sha256").join(d.hex());
    let d = reg.push_blob("gc/a", b"shared").await;
    let r = reg
        .send(
            Method::POST,
            &format!("/v2/gc/b/blobs/uploads/?mount={d}&from=gc/a"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    reg.send(Method::DELETE, &format!("/v2/gc/a/blobs/{d}"))
        .await;
    assert!(file(&d).exists(), "still linked from gc/b");
    let r = reg.send(Method::GET, &format!("/v2/gc/b/blobs/{d}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"shared");
    reg.send(Method::DELETE, &format!("/v2/gc/b/blobs/{d}"))
        .await;
    assert!(!file(&d).exists(), "unreferenced bytes removed");

    let (m, bytes) = reg.push_image("gc/c", "v1", "gc", json!({})).await;
    assert!(file(&m).exists());
    let r = reg
        .send(Method::DELETE, &format!("/v2/gc/c/manifests/{m}"))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(!file(&m).exists(), "deleted manifest's bytes removed");
    let config = Digest::of(br#"{"seed":"gc"}"#);
    assert!(
        file(&config).exists(),
        "blobs stay linked in their repository"
    );

    // A manifest refused for a missing blob leaves no bytes behind.
    let r = reg
        .put_manifest("gc/empty", "x", OCI_MANIFEST, &bytes)
        .await;
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    assert!(!file(&m).exists());
}

/// Wrap a layout's image in an OCI index (tag `multi`) and return its digest.
fn add_index(layout: &Path) -> Digest {
    let path = layout.join("index.json");
    let mut top: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut child = top["manifests"][0].clone();
    child.as_object_mut().unwrap().remove("annotations");
    child["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]});
    let bytes = serde_json::to_vec(&index).unwrap();
    let d = Digest::of(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(d.hex()), &bytes).unwrap();
    top["manifests"] = json!([{
        "mediaType": OCI_INDEX, "digest": d, "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}
    }]);
    std::fs::write(&path, serde_json::to_vec(&top).unwrap()).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = make_layout(tmp.path()).await;
    let index = add_index(&layout);
    let reg = Reg::start(Storage::Memory).await;
    let remote = format!("docker://{}/multi/arch:latest", reg.server.host());
    let all = |src: String, dst: String| async move {
        let args = ["--insecure-policy", "copy", "--all", "--preserve-digests"];
        let tls = ["--src-tls-verify=false", "--dest-tls-verify=false"];
        let args: Vec<&str> = args
            .iter()
            .chain(&tls)
            .copied()
            .chain([&*src, &*dst])
            .collect();
        run("skopeo", &args).await;
    };
    all(format!("oci:{}:multi", layout.display()), remote.clone()).await;
    let r = reg
        .send(Method::HEAD, "/v2/multi/arch/manifests/latest")
        .await;
    assert_eq!(header(&r, "Docker-Content-Digest"), index.as_str());
    assert_eq!(header(&r, "Content-Type"), OCI_INDEX);

    let back = tmp.path().join("back");
    all(remote, format!("oci:{}:multi", back.display())).await;
    assert_eq!(layout_manifest(&back), index.as_str());
}

fn sha512_of(bytes: &[u8]) -> Digest {
    Digest::parse(&format!("sha512:{}", "0".repeat(128)))
        .unwrap()
        .of_like(bytes)
}

/// ggfs's CLI on a blocking thread (these tests run on the runtime).
async fn ggfs_cli(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::ggfs(&args)
    })
    .await
    .unwrap()
}

/// sha512 digests (the image spec allows them) end to end: the embedded
/// registry takes blobs by sha512 (monolithic and chunked) and a manifest
/// PUT by its sha512, refuses a wrong one, serves them back by it; the ggfs
/// client reads, validates and copies such an image to the CNCF
/// distribution registry, which serves it by the same digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha512_digests_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    for storage in [Storage::Memory, Storage::Disk(dir.path().to_path_buf())] {
        let reg = Reg::start(storage).await;
        let repo = "five/twelve";
        let layer = b"a layer named by sha512".to_vec();
        let config = json!({"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [Digest::of(&layer)]}});
        let config = &serde_json::to_vec(&config).unwrap()[..];
        let (c512, l512) = (sha512_of(config), sha512_of(&layer));

        let r = reg
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={c512}"),
            )
            .body(config.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = reg
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={l512}"),
            )
            .body(b"other bytes".to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, "DIGEST_INVALID");
        let loc = start_session(&reg, repo).await;
        let r = patch(&reg, &loc, &format!("0-{}", layer.len() - 1), &layer).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = reg
            .send(Method::PUT, &format!("{loc}{sep}digest={l512}"))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = reg
            .send(Method::GET, &format!("/v2/{repo}/blobs/{l512}"))
            .await;
        assert_eq!(header(&r, "Docker-Content-Digest"), l512.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), &layer[..]);

        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c512, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l512, "size": layer.len()}],
        }))
        .unwrap();
        let m512 = sha512_of(&manifest);
        let r = reg
            .put_manifest(repo, m512.as_str(), OCI_MANIFEST, &manifest)
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        let r = reg
            .put_manifest(repo, &c512.to_string(), OCI_MANIFEST, &manifest)
            .await;
        assert_eq!(error_code(r).await, "DIGEST_INVALID");
        let r = reg
            .send(Method::GET, &format!("/v2/{repo}/manifests/{m512}"))
            .await;
        assert_eq!(header(&r, "Docker-Content-Digest"), m512.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), &manifest[..]);

        // The client: read and verify by sha512, then copy to distribution.
        let host = reg.server.url().trim_start_matches("http://").to_string();
        let by_digest = format!("{host}/{repo}@{m512}");
        let got = ggfs_cli(vec!["manifest".into(), by_digest.clone()]).await;
        assert_eq!(got.as_bytes(), &manifest[..]);
        let blob = ggfs_cli(vec!["blob".into(), format!("{host}/{repo}@{l512}")]).await;
        assert_eq!(blob.as_bytes(), &layer[..]);
        ggfs_cli(vec!["validate".into(), by_digest.clone()]).await;
        let dist = tokio::task::spawn_blocking(common::Distribution::start)
            .await
            .unwrap();
        let dst = dist.reference("copied/five:t");
        ggfs_cli(vec!["copy".into(), by_digest, dst.clone()]).await;
        ggfs_cli(vec!["validate".into(), dst.clone()]).await;
        let (code, body) =
            common::http_get(dist.addr(), &format!("/v2/copied/five/blobs/{l512}")).unwrap();
        assert_eq!((code, body), (200, layer.clone()));
    }
}

/// Load: 32 clients at once push (chunked, in two PATCHes) a blob of their
/// own and one all of them share, then a manifest by tag, while reading
/// back another client's image whole and by Range; no request fails and
/// every byte hashes to its digest. Disk storage, so uploads, renames and
/// links race for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_pushers_and_pullers() {
    const CLIENTS: usize = 32;
    let tmp = tempfile::tempdir().unwrap();
    let reg = std::sync::Arc::new(Reg::start(Storage::Disk(tmp.path().to_path_buf())).await);
    let shared: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let shared_d = Digest::of(&shared);
    let own = |i: usize| -> Vec<u8> {
        (0..300_000u32)
            .map(|j| ((j as usize * 7 + i) % 253) as u8)
            .collect()
    };
    let push = |i: usize| {
        let (reg, shared, mine) = (reg.clone(), shared.clone(), own(i));
        async move {
            let repo = format!("load/r{}", i % 8);
            let mut layers = Vec::new();
            for data in [&shared, &mine] {
                let d = Digest::of(data);
                let loc = start_session(&reg, &repo).await;
                let half = data.len() / 2;
                let r = patch(&reg, &loc, &format!("0-{}", half - 1), &data[..half]).await;
                assert_eq!(r.status(), StatusCode::ACCEPTED);
                let r = patch(
                    &reg,
                    &loc,
                    &format!("{half}-{}", data.len() - 1),
                    &data[half..],
                )
                .await;
                assert_eq!(r.status(), StatusCode::ACCEPTED);
                let sep = if loc.contains('?') { '&' } else { '?' };
                let r = reg
                    .send(Method::PUT, &format!("{loc}{sep}digest={d}"))
                    .await;
                assert_eq!(r.status(), StatusCode::CREATED, "client {i}");
                layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": data.len()}));
            }
            let cfg = reg
                .push_blob(&repo, format!("{{\"client\":{i}}}").as_bytes())
                .await;
            let m = json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": format!("{{\"client\":{i}}}").len()},
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&m).unwrap();
            let r = reg
                .put_manifest(&repo, &format!("c{i}"), OCI_MANIFEST, &bytes)
                .await;
            assert_eq!(r.status(), StatusCode::CREATED, "client {i}");
        }
    };
    let pull = |i: usize| {
        let reg = reg.clone();
        async move {
            // Wait for client i's tag, then check everything it names.
            let repo = format!("load/r{}", i % 8);
            let path = format!("/v2/{repo}/manifests/c{i}");
            let mut r = reg.send(Method::GET, &path).await;
            for _ in 0..600 {
                if r.status() == StatusCode::OK {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                r = reg.send(Method::GET, &path).await;
            }
            let m: Value = body(r).await;
            for l in m["layers"].as_array().unwrap() {
                let d = Digest::parse(l["digest"].as_str().unwrap()).unwrap();
                let r = reg
                    .send(Method::GET, &format!("/v2/{repo}/blobs/{d}"))
                    .await;
                assert_eq!(r.status(), StatusCode::OK);
                assert!(
                    d.matches(&r.bytes().await.unwrap()),
                    "blob {d} of client {i}"
                );
                let r = reg
                    .req(Method::GET, &format!("/v2/{repo}/blobs/{d}"))
                    .header("Range", "bytes=1000-1999")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
                assert_eq!(r.bytes().await.unwrap().len(), 1000);
            }
        }
    };
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        tasks.push(tokio::spawn(push(i)));
        tasks.push(tokio::spawn(pull((i + 1) % CLIENTS)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // One copy of the shared blob; each client's own and config once.
    let blobs = std::fs::read_dir(tmp.path().join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 1 + 2 * CLIENTS + CLIENTS, "shared {shared_d}");
}
