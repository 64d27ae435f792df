//! Manifests and indexes crafted to attack, against the CLI and the mount:
//! indexes nesting deeper than any image needs, and fanning out to the
//! same child over and over (2^depth paths through a handful of
//! manifests), wrong media types, a manifest of thousands of layers (all
//! on the real distribution registry), and what no registry here stores
//! (over 4 MiB, JSON nested past serde_json's limit), served by a hostile
//! server: every command returns, with an error naming what is at fault.

mod common;

use std::io::{Read, Write};

use common::mount::{within, Mount};
use common::{ggfs, ggfs_fails, CountingProxy, Distribution};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A minimal HTTP/1.0 PUT of `body`: the status.
fn http_put(addr: &str, path: &str, content_type: &str, body: &[u8]) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// PUTs `json` as a manifest of `repo` (by digest, and as `tag` if given);
/// returns its descriptor.
fn put(
    reg: &Distribution,
    repo: &str,
    mt: &str,
    json: &serde_json::Value,
    tag: Option<&str>,
) -> serde_json::Value {
    let body = serde_json::to_vec(json).unwrap();
    let digest = common::sha256_digest(&body);
    for r in std::iter::once(digest.as_str()).chain(tag) {
        let status = http_put(reg.addr(), &format!("/v2/{repo}/manifests/{r}"), mt, &body);
        assert_eq!(status, 201, "PUT {repo}:{r}: {}", reg.log());
    }
    serde_json::json!({"mediaType": mt, "digest": digest, "size": body.len()})
}

/// A one-file image `repo:base` on `reg`; returns its manifest's bytes.
fn base_image(reg: &Distribution, repo: &str) -> Vec<u8> {
    let work = common::tempdir();
    std::fs::write(work.path().join("hello"), b"hello\n").unwrap();
    ggfs(&[
        "append",
        "-f",
        work.path().to_str().unwrap(),
        "-t",
        &reg.reference(&format!("{repo}:base")),
    ]);
    base_manifest(reg, repo)
}

/// The bytes of `repo:base`'s manifest.
fn base_manifest(reg: &Distribution, repo: &str) -> Vec<u8> {
    ggfs(&["manifest", &reg.reference(&format!("{repo}:base"))]).into_bytes()
}

/// An index of `depth` levels above the base image, each listing the level
/// below twice: `depth + 1` manifests, 2^depth paths to the image.
fn doubling_index(reg: &Distribution, repo: &str, depth: usize, tag: &str) -> Vec<String> {
    let body = base_image(reg, repo);
    let mut child = serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": common::sha256_digest(&body),
        "size": body.len(),
        "platform": {"os": "linux", "architecture": "amd64"},
    });
    let mut digests = Vec::new();
    for level in 1..=depth {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [child, child],
        });
        let t = (level == depth).then_some(tag);
        child = put(reg, repo, OCI_INDEX, &index, t);
        digests.push(child["digest"].as_str().unwrap().to_string());
    }
    digests
}

/// Indexes listing the same child over and over: a copy fetches each
/// manifest once (not once per path: 2^10 here) and copies the image
/// whole; past 16 levels of nesting it stops, naming the index and the
/// depth, instead of walking 2^24 paths.
#[test]
fn doubling_indexes_copy_once_and_stop_deep() {
    let src = Distribution::start();
    let dst = Distribution::start();
    let proxy = CountingProxy::start(src.addr());
    doubling_index(&src, "h/dag", 10, "ten");
    let from = format!("{}/h/dag:ten", proxy.addr());
    within(120, "copy", {
        let (from, to) = (from.clone(), dst.reference("h/dag:ten"));
        move || ggfs(&["copy", &from, &to])
    });
    let gets = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/manifests/"))
        .count();
    assert!(gets <= 2 * 11, "{gets} manifest GETs for 11 manifests");
    assert_eq!(
        ggfs(&["digest", &dst.reference("h/dag:ten")]),
        ggfs(&["digest", &src.reference("h/dag:ten")])
    );
    let base = common::sha256_digest(&base_manifest(&src, "h/dag"));
    ggfs(&["validate", &dst.reference(&format!("h/dag@{base}"))]);

    let deep = doubling_index(&src, "h/deep", 24, "deep");
    let err = within(120, "copy", {
        let (from, to) = (src.reference("h/deep:deep"), dst.reference("h/deep:deep"));
        move || ggfs_fails(&["copy", &from, &to])
    });
    assert!(err.contains("16"), "{err}");
    // The 17th index from the top (the 8th above the image) is named.
    assert!(err.contains(&deep[deep.len() - 17][7..19]), "{err}");
    let (code, _) = common::http_get(dst.addr(), "/v2/h/deep/manifests/deep").unwrap();
    assert_eq!(code, 404, "a tag was pushed for a copy that failed");

    // The mount walks nested indexes lazily, a directory per index entry
    // (one manifest fetched per directory entered): every level of the 24
    // answers, the same child listed twice is two directories, and the
    // image at the bottom reads.
    let m = Mount::start(src.addr(), &[]);
    let mut dir = m.path("h/deep/deep");
    for level in (0..24).rev() {
        let d = dir.clone();
        let mut names: Vec<String> = within(60, "readdir", move || {
            std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sha256:") || n.starts_with("linux-"))
                .collect()
        });
        names.sort();
        assert_eq!(names.len(), 2, "level {level}: {names:?}");
        dir = dir.join(&names[0]);
    }
    let hello = within(60, "read", move || std::fs::read(dir.join("rootfs/hello")));
    assert_eq!(hello.unwrap(), b"hello\n");
    assert!(m.pid_alive());
}

/// What the hostile server answers for a manifest path.
#[derive(Clone)]
enum Body {
    /// These bytes, with a Content-Length.
    Sized(Vec<u8>),
    /// JSON (a catalog, a tag list).
    Json(String),
    /// Manifest-looking bytes without end (no Content-Length: the body
    /// runs until the client hangs up).
    Endless,
}

/// A registry that answers `/v2/` and `routes` (a manifest path → body, as
/// an OCI manifest; a catalog or tag list → JSON), nothing else;
/// one request per connection. Serves until the test process ends.
fn hostile_server(routes: Vec<(String, Body)>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let routes = routes.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let mut words = head.split(' ');
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let found = routes.iter().find(|(p, _)| p == path).map(|(_, b)| b);
                let _ = match (path, found) {
                    ("/v2/", _) => s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    ),
                    (_, Some(Body::Sized(body))) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        if method == "GET" {
                            s.write_all(body)
                        } else {
                            Ok(())
                        }
                    }
                    (_, Some(Body::Json(body))) => write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    (_, Some(Body::Endless)) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Type: {OCI_MANIFEST}\r\nConnection: close\r\n\r\n"
                        );
                        let _ = s.write_all(br#"{"schemaVersion":2,"annotations":{"a":""#);
                        let chunk = vec![b'a'; 64 << 10];
                        // Until the client hangs up (or 1 GiB: a bound on a broken test).
                        let mut sent = 0u64;
                        while method == "GET" && sent < 1 << 30 && s.write_all(&chunk).is_ok() {
                            sent += chunk.len() as u64;
                        }
                        Ok(())
                    }
                    _ => s.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            });
        }
    });
    addr
}

/// A manifest of `size` bytes or more (padded in an annotation).
fn padded_manifest(size: usize) -> Vec<u8> {
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", "0".repeat(64)),
            "size": 2,
        },
        "layers": [],
        "annotations": {"pad": "p".repeat(size)},
    });
    serde_json::to_vec(&m).unwrap()
}

/// JSON arrays nested `depth` deep inside an otherwise valid manifest.
fn nested_manifest(depth: usize) -> Vec<u8> {
    let m = String::from_utf8(padded_manifest(0)).unwrap();
    let nest = "[".repeat(depth) + &"]".repeat(depth);
    m.replacen('{', &format!(r#"{{"x":{nest},"#), 1)
        .into_bytes()
}

/// Over 4 MiB (with a Content-Length, or endless without one), and JSON
/// nested 100,000 deep in a field (past serde_json's recursion limit of
/// 128 for a `Value`). Distribution refuses to store either, so a hostile
/// server serves them. `ggfs manifest` and `ggfs validate` fail at once,
/// in one line naming the repository (and the 4 MiB limit for the big
/// ones), with no stack overflow: the nested field is one the manifest
/// type does not know, which serde skips without recursing, so the
/// manifest parses and fails on the (missing) config blob it names
/// (`ggfs manifest` prints it: it does not parse). The mount answers EIO
/// for the big ones and logs why (it used to take the refused tag for a
/// repository prefix: ENOENT, nothing logged), ENOENT for the nested
/// one's missing config, and lives.
#[test]
fn oversize_and_deeply_nested_manifests_are_refused() {
    let reg = Distribution::start();
    let big = padded_manifest(5 << 20);
    let status = http_put(reg.addr(), "/v2/h/big/manifests/t", OCI_MANIFEST, &big);
    assert_ne!(
        status,
        201,
        "distribution stored a {} byte manifest",
        big.len()
    );
    let deep = nested_manifest(100_000);
    assert!(serde_json::from_slice::<serde_json::Value>(&deep).is_err());
    let status = http_put(reg.addr(), "/v2/h/deep/manifests/t", OCI_MANIFEST, &deep);
    assert_ne!(
        status, 201,
        "distribution stored a manifest nested 100,000 deep"
    );
    // The same framing, shallow, parses: the depth is what is refused.
    assert!(serde_json::from_slice::<serde_json::Value>(&nested_manifest(8)).is_ok());

    let mut routes = vec![
        ("/v2/h/big/manifests/t".into(), Body::Sized(big)),
        ("/v2/h/endless/manifests/t".into(), Body::Endless),
        ("/v2/h/deep/manifests/t".into(), Body::Sized(deep)),
        (
            "/v2/_catalog".into(),
            Body::Json(r#"{"repositories":["h/big","h/deep","h/endless"]}"#.into()),
        ),
    ];
    for repo in ["big", "endless", "deep"] {
        routes.push((
            format!("/v2/h/{repo}/tags/list"),
            Body::Json(format!(r#"{{"name":"h/{repo}","tags":["t"]}}"#)),
        ));
    }
    let addr = hostile_server(routes);
    for repo in ["big", "endless", "deep"] {
        let image = format!("{addr}/h/{repo}:t");
        // `ggfs manifest` prints the bytes as they are: it does not parse
        // them, so the nested one is only refused where it is parsed.
        let verbs: &[&str] = if repo == "deep" {
            &["validate"]
        } else {
            &["manifest", "validate"]
        };
        for &verb in verbs {
            let err = within(60, verb, {
                let image = image.clone();
                move || ggfs_fails(&[verb, &image])
            });
            assert!(err.contains(&format!("h/{repo}")), "{verb} {repo}: {err}");
            if repo != "deep" {
                assert!(err.contains("4194304"), "{verb} {repo}: {err}");
            } else {
                // Parsed past the nesting (serde skips a field it does not
                // know without recursing), it fails on the blob it names.
                assert!(
                    err.contains("not found") && err.contains(&"0".repeat(64)),
                    "{err}"
                );
            }
        }
    }
    let m = Mount::start(&addr, &[]);
    for repo in ["big", "endless", "deep"] {
        let dir = m.path(&format!("h/{repo}/t/rootfs"));
        let e = within(60, "readdir", move || {
            std::fs::read_dir(dir)?.collect::<std::io::Result<Vec<_>>>()
        })
        .expect_err(&format!(
            "{repo}: a refused manifest was mounted: {}",
            m.log()
        ));
        // The nested one parses, and its config blob is missing (ENOENT).
        let want = if repo == "deep" {
            libc::ENOENT
        } else {
            libc::EIO
        };
        assert_eq!(e.raw_os_error(), Some(want), "{repo}: {e}: {}", m.log());
    }
    assert!(m.pid_alive(), "the daemon died: {}", m.log());
    let log = m.log();
    for repo in ["big", "endless"] {
        assert!(
            log.contains(&format!("h/{repo}:t: manifest {addr}/h/{repo}:t is"))
                && log.contains("over the 4194304-byte limit"),
            "{log}"
        );
    }
}

/// Uploads `bytes` as a blob of `repo` (POST, then one PUT of the whole
/// blob to the upload's Location); returns (digest, size).
fn put_blob(reg: &Distribution, repo: &str, bytes: &[u8]) -> (String, usize) {
    let digest = common::sha256_digest(bytes);
    let request = |head: String, body: &[u8]| {
        let mut s = std::net::TcpStream::connect(reg.addr()).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let host = reg.addr();
    let answer = request(
        format!(
            "POST /v2/{repo}/blobs/uploads/ HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
        ),
        b"",
    );
    let location = answer
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .unwrap_or_else(|| panic!("{answer}"))
        .trim();
    let path = location
        .strip_prefix(&format!("http://{host}"))
        .unwrap_or(location);
    let sep = if path.contains('?') { '&' } else { '?' };
    let answer = request(
        format!(
            "PUT {path}{sep}digest={digest} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            bytes.len()
        ),
        bytes,
    );
    assert!(
        answer.starts_with("HTTP/1.0 201") || answer.starts_with("HTTP/1.1 201"),
        "{answer}"
    );
    (digest, bytes.len())
}

/// A manifest of 10,000 layers (all the same blob, 1.5 MB of JSON): the
/// copy sends that blob once, the mount answers with the merged file, and
/// both return at all (within a minute; here well under).
#[test]
fn ten_thousand_layers_copy_and_mount() {
    const LAYERS: usize = 10_000;
    let src = Distribution::start();
    let base: serde_json::Value = serde_json::from_slice(&base_image(&src, "h/many")).unwrap();
    let config_digest = base["config"]["digest"].as_str().unwrap();
    let config = ggfs(&["blob", &src.reference(&format!("h/many@{config_digest}"))]);
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let diff_id = config["rootfs"]["diff_ids"][0].clone();
    config["rootfs"]["diff_ids"] = vec![diff_id; LAYERS].into();
    let (cd, cs) = put_blob(&src, "h/many", &serde_json::to_vec(&config).unwrap());
    let mut manifest = base.clone();
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    manifest["layers"] = vec![base["layers"][0].clone(); LAYERS].into();
    let body = serde_json::to_vec(&manifest).unwrap();
    assert!(body.len() > 1 << 20, "{}", body.len());
    put(&src, "h/many", OCI_MANIFEST, &manifest, Some("t"));

    let dst = Distribution::start();
    let proxy = CountingProxy::start(dst.addr());
    let target = format!("{}/h/many:t", proxy.addr());
    within(60, "copy", {
        let (from, to) = (src.reference("h/many:t"), target.clone());
        move || ggfs(&["copy", &from, &to])
    });
    let uploads = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("/blobs/uploads/"))
        .count();
    assert!(uploads <= 2, "{uploads} blob uploads for two blobs");
    assert_eq!(
        ggfs(&["digest", &target]),
        ggfs(&["digest", &src.reference("h/many:t")])
    );

    let m = Mount::start(src.addr(), &[]);
    let hello = m.path("h/many/t/rootfs/hello");
    let got = within(60, "read", move || std::fs::read(hello));
    assert_eq!(got.unwrap(), b"hello\n");
    assert!(m.pid_alive());
}

/// Media types that lie: a layer typed as an index (its bytes a real gzip
/// layer), a config typed as a layer, an index entry typed as an image
/// that is an index. Distribution stores them all. `ggfs copy` copies them
/// as they are (same digests). The mount skips the mistyped layer and logs
/// it by digest, ignores the config's type, and shows the lying entry as
/// the index it is (no rootfs); `ggfs export` refuses the mistyped layer
/// naming it (it used to name only the media type) and the entry that is
/// an index naming that index, and exports the other.
#[test]
fn wrong_media_types() {
    let src = Distribution::start();
    let base: serde_json::Value = serde_json::from_slice(&base_image(&src, "h/mt")).unwrap();
    let layer = base["layers"][0]["digest"].as_str().unwrap().to_string();
    let mut m = base.clone();
    m["layers"][0]["mediaType"] = OCI_INDEX.into();
    put(&src, "h/mt", OCI_MANIFEST, &m, Some("layer-as-index"));
    let mut m = base.clone();
    m["config"]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    put(&src, "h/mt", OCI_MANIFEST, &m, Some("config-as-layer"));
    let empty = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []});
    let inner = put(&src, "h/mt", OCI_INDEX, &empty, None);
    let mut entry = inner.clone();
    entry["mediaType"] = OCI_MANIFEST.into();
    entry["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let lying =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]});
    put(&src, "h/mt", OCI_INDEX, &lying, Some("index-entry-lies"));

    let mnt = Mount::start(src.addr(), &[]);
    let ls = |p: &str| {
        let d = mnt.path(p);
        let mut names = within(60, "readdir", move || {
            std::fs::read_dir(d)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .unwrap();
        names.sort();
        names
    };
    assert_eq!(ls("h/mt/layer-as-index/rootfs"), Vec::<String>::new());
    assert!(
        mnt.log().contains(&format!("skipping layer {layer}")),
        "{}",
        mnt.log()
    );
    assert_eq!(ls("h/mt/config-as-layer/rootfs"), ["hello"]);
    assert_eq!(
        ls("h/mt/index-entry-lies/linux-amd64"),
        ["digest", "manifest.json", "referrers"]
    );
    assert!(mnt.pid_alive());

    let dst = Distribution::start();
    let work = common::tempdir();
    let out = work.path().join("x.tar");
    let out = out.to_str().unwrap();
    for t in ["layer-as-index", "config-as-layer", "index-entry-lies"] {
        let (from, to) = (
            src.reference(&format!("h/mt:{t}")),
            dst.reference(&format!("h/mt:{t}")),
        );
        ggfs(&["copy", &from, &to]);
        assert_eq!(ggfs(&["digest", &from]), ggfs(&["digest", &to]), "{t}");
    }
    let err = ggfs_fails(&["export", &src.reference("h/mt:layer-as-index"), out]);
    assert!(err.contains(&layer) && err.contains(OCI_INDEX), "{err}");
    ggfs(&["export", &src.reference("h/mt:config-as-layer"), out]);
    let err = ggfs_fails(&["export", &src.reference("h/mt:index-entry-lies"), out]);
    let inner = inner["digest"].as_str().unwrap();
    assert!(err.contains(inner) && err.contains("nested index"), "{err}");
}
