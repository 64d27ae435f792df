//! Checks the shared test harness (tests/common) against the real binaries.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// A skopeo-pushed copy of the fixture image in a fresh registry.
fn registry_with_fixture(repo_tag: &str) -> Distribution {
    let reg = Distribution::start();
    let layout = tempdir();
    let layout_dir = layout.path().join("oci");
    umoci_image(&layout_dir, "latest");
    push_oci_layout(&layout_dir, "latest", &reg.reference(repo_tag));
    reg
}

#[test]
fn registry_serves_v2_and_stops_on_drop() {
    let reg = Distribution::start();
    let (status, _) = http_get(reg.addr(), "/v2/").unwrap();
    assert_eq!(status, 200);
    let addr = reg.addr().to_string();
    drop(reg);
    assert!(http_get(&addr, "/v2/").is_err(), "registry still answers");
}

#[test]
fn registry_restarts_and_pauses() {
    let mut reg = registry_with_fixture("fixture:latest");
    let tags = "/v2/fixture/tags/list";
    reg.kill();
    assert!(http_get(reg.addr(), tags).is_err());
    reg.restart();
    let (status, body) = http_get(reg.addr(), tags).unwrap();
    assert_eq!(status, 200, "storage kept across restart");
    assert!(String::from_utf8_lossy(&body).contains("latest"));

    reg.pause();
    let mut s = std::net::TcpStream::connect(reg.addr()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    std::io::Write::write_all(&mut s, b"GET /v2/ HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = [0u8; 16];
    assert!(s.read(&mut buf).is_err(), "a paused registry answered");
    reg.resume();
    assert!(s.read(&mut buf).unwrap() > 0, "no answer after resume");
}

#[test]
fn pushed_blobs_land_in_storage() {
    let reg = registry_with_fixture("fixture:latest");
    let manifest = skopeo_inspect_raw(&format!("docker://{}", reg.reference("fixture:latest")));
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let stored = fs::read(reg.blob_path(layer)).unwrap();
    assert_eq!(sha256_digest(&stored), layer);
    assert_eq!(
        stored.len() as u64,
        manifest["layers"][0]["size"].as_u64().unwrap()
    );
}

#[test]
fn v2s2_push_has_docker_media_types() {
    let reg = Distribution::start();
    let dst = reg.reference("docker:v2s2");
    push_oci_layout_v2s2(multilayer_image(), MULTILAYER_TAG, &dst);
    let manifest = skopeo_inspect_raw(&format!("docker://{dst}"));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
}

/// (HTTP status, body) of a curl invocation.
fn curl(args: &[&str]) -> (u16, String) {
    let out = run(Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args));
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn htpasswd_registry_requires_credentials() {
    let reg = Distribution::start_htpasswd("bob", "hunter2");
    let url = format!("{}/v2/", reg.url());
    assert_eq!(curl(&[&url]).0, 401);
    assert_eq!(curl(&["-u", "bob:wrong", &url]).0, 401);
    assert_eq!(curl(&["-u", "bob:hunter2", &url]).0, 200);
}

#[test]
fn token_auth_get_and_oauth2_post() {
    let tokens = TokenServer::start("alice", "secret");
    let reg = Distribution::start_token(&tokens);
    let (code, _) = curl(&[&format!("{}/v2/", reg.url())]);
    assert_eq!(code, 401);

    // Push through the token flow with a real client.
    let dst = format!("docker://{}", reg.reference("team/app:v1"));
    let src = format!("oci:{}:{MULTILAYER_TAG}", multilayer_image().display());
    skopeo_copy_with(&["--dest-creds", "alice:secret"], &src, &dst);
    let scopes = tokens.scopes();
    assert!(
        scopes
            .iter()
            .any(|s| s.starts_with("repository:team/app:") && s.contains("push")),
        "scopes asked: {scopes:?}"
    );

    // GET with Basic credentials, then use the token.
    let realm = format!(
        "{}?service={}&scope=repository:team/app:pull",
        tokens.realm(),
        tokens.service()
    );
    let (code, body) = curl(&["-u", "alice:secret", &realm]);
    assert_eq!(code, 200, "{body}");
    let token = serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest_url = format!("{}/v2/team/app/manifests/v1", reg.url());
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json";
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(curl(&["-H", &bearer, "-H", accept, &manifest_url]).0, 200);
    // A pull token does not allow deleting or pushing elsewhere.
    let other = format!("{}/v2/other/manifests/v1", reg.url());
    assert_eq!(curl(&["-H", &bearer, &other]).0, 401);

    assert_eq!(curl(&["-u", "alice:wrong", &realm]).0, 401);
    let last = tokens.requests().pop().unwrap();
    assert!(!last.granted);

    // OAuth2 password grant with a refresh token, then the refresh grant.
    let form = format!(
        "grant_type=password&username=alice&password=secret&service={}\
         &scope=repository:team/app:pull&client_id=ggfs&access_type=offline",
        tokens.service()
    );
    let (code, body) = curl(&["-d", &form, &tokens.realm()]);
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let refresh = json["refresh_token"].as_str().unwrap();
    let form = format!(
        "grant_type=refresh_token&refresh_token={refresh}&service={}\
         &scope=repository:team/app:pull&client_id=ggfs",
        tokens.service()
    );
    let (code, body) = curl(&["-d", &form, &tokens.realm()]);
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bearer = format!(
        "Authorization: Bearer {}",
        json["access_token"].as_str().unwrap()
    );
    assert_eq!(curl(&["-H", &bearer, "-H", accept, &manifest_url]).0, 200);
    let last = tokens.requests().pop().unwrap();
    assert_eq!(last.grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(last.user.as_deref(), Some("alice"));
}

#[test]
fn anonymous_pull_tokens_only_grant_pull() {
    let tokens = TokenServer::start_with(TokenOptions {
        anonymous_pull: true,
        ..TokenOptions::default()
    });
    let reg = Distribution::start_token(&tokens);
    let src = format!("oci:{}:{MULTILAYER_TAG}", multilayer_image().display());
    let dst = format!("docker://{}", reg.reference("pub/img:v1"));
    skopeo_copy_with(&["--dest-creds", "alice:secret"], &src, &dst);
    // Anonymous pull works; anonymous push is refused by the registry.
    skopeo_inspect_raw(&dst);
    let out = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false", &src])
        .arg(format!("docker://{}", reg.reference("pub/img:v2")))
        .output()
        .unwrap();
    assert!(!out.status.success(), "anonymous push succeeded");
}

#[test]
fn proxy_counts_bytes_and_requests() {
    let reg = registry_with_fixture("fixture:latest");
    let manifest = skopeo_inspect_raw(&format!("docker://{}", reg.reference("fixture:latest")));
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let size = manifest["layers"][0]["size"].as_u64().unwrap();
    let proxy = CountingProxy::start(reg.addr());
    let path = format!("/v2/fixture/blobs/{layer}");
    let (status, body) = http_get(proxy.addr(), &path).unwrap();
    assert_eq!((status, body.len() as u64), (200, size));
    assert!(proxy.bytes_down() >= size && proxy.bytes_down() < size + 4096);
    assert_eq!(
        proxy.requests(),
        vec![ProxyRequest {
            method: "GET".into(),
            path: path.clone(),
            range: None,
            content_range: None,
        }]
    );

    // A Range request only moves the range; keep-alive requests and a
    // request body are framed correctly.
    proxy.reset();
    let url = format!("http://{}{path}", proxy.addr());
    let out = run(Command::new("curl").args([
        "-s",
        "-r",
        "0-99",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        &url,
        &url,
    ]));
    assert!(out.is_empty());
    assert!(proxy.bytes_down() < 4096, "{} bytes", proxy.bytes_down());
    let reqs = proxy.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=0-99"));

    proxy.reset();
    let upload = format!("http://{}/v2/fixture/blobs/uploads/", proxy.addr());
    Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            "--data-binary",
            "GET /v2/ HTTP/1.1\r\n\r\n",
        ])
        .args([&upload, "--next", &format!("http://{}/v2/", proxy.addr())])
        .status()
        .unwrap();
    let methods: Vec<String> = proxy.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["POST", "GET"]);
}

#[test]
fn estargz_and_zstdchunked_conversions() {
    let reg = registry_with_fixture("fixture:latest");
    let esgz = estargz_image(&reg, "fixture:latest", "fixture:esgz");
    assert_eq!(
        esgz["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let zst = zstdchunked_image(&reg, "fixture:latest", "fixture:zstd");
    assert!(
        zst["layers"][0]["annotations"]["io.containers.zstd-chunked.manifest-checksum"].is_string()
    );
}

#[test]
fn rootfs_has_every_file_type() {
    let root = fixture_rootfs();
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(meta("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(meta("private").permissions().mode() & 0o7777, 0o700);
    assert_eq!(meta("usr/bin/suid").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta("hard/a").nlink(), 3);
    assert!(meta("dev/char").file_type().is_char_device());
    assert!(meta("dev/block").file_type().is_block_device());
    assert!(meta("dev/fifo").file_type().is_fifo());
    assert!(meta("links/dangling").file_type().is_symlink());
    assert_eq!(
        (meta("owned/dir").uid(), meta("owned/dir").gid()),
        (1234, 5678)
    );
    assert_eq!(meta("data/big-5m").len(), 5 << 20);
    assert_eq!(meta("small.txt").mtime(), 1_700_000_000);
    assert_eq!(meta("mtime/old").mtime(), 1_000_000_000);
    let xattr = run(Command::new("getfattr")
        .args(["-n", "user.ggfs", "--only-values"])
        .arg(root.join("xattr/file")));
    assert_eq!(xattr, "hello");
}

/// Path -> (entry type, mode, pax xattr names) of every entry of a layout's
/// layer blob `digest`.
fn layer_entries(
    layout: &Path,
    digest: &str,
) -> HashMap<String, (tar::EntryType, u32, Vec<String>)> {
    let blob = layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let gz = flate2::read::GzDecoder::new(fs::File::open(blob).unwrap());
    let mut archive = tar::Archive::new(gz);
    let mut out = HashMap::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut xattrs = Vec::new();
        if let Ok(Some(ext)) = e.pax_extensions() {
            for x in ext.flatten() {
                if let Some(name) = x.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.push(name.to_string());
                }
            }
        }
        let h = e.header();
        assert!(
            h.device_major().is_ok() && h.device_minor().is_ok(),
            "{path}: bad device fields"
        );
        let head = (h.entry_type(), h.mode().unwrap(), xattrs);
        let mut sink = Vec::new();
        e.read_to_end(&mut sink).unwrap();
        out.insert(path.trim_end_matches('/').to_string(), head);
    }
    out
}

fn layout_manifest(layout: &Path, tag: &str) -> serde_json::Value {
    skopeo_inspect_raw(&format!("oci:{}:{tag}", layout.display()))
}

#[test]
fn umoci_image_keeps_every_file_type() {
    let dir = tempdir();
    let layout = dir.path().join("oci");
    umoci_image(&layout, "t");
    let manifest = layout_manifest(&layout, "t");
    let entries = layer_entries(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    let kind = |p: &str| entries.get(p).unwrap_or_else(|| panic!("{p} missing")).0;
    assert_eq!(kind("dev/char"), tar::EntryType::Char);
    assert_eq!(kind("dev/block"), tar::EntryType::Block);
    assert_eq!(kind("dev/fifo"), tar::EntryType::Fifo);
    assert_eq!(kind("links/abs"), tar::EntryType::Symlink);
    let links = ["hard/a", "hard/b", "hard/c"].map(kind);
    assert_eq!(
        links.iter().filter(|k| **k == tar::EntryType::Link).count(),
        2
    );
    assert_eq!(entries["usr/bin/suid"].1 & 0o7777, 0o4755);
    assert!(entries["xattr/file"].2.contains(&"user.ggfs".to_string()));
    let cap = &entries["usr/bin/cap"].2;
    assert!(cap.contains(&"security.capability".to_string()), "{cap:?}");
    assert!(entries.contains_key(&format!("long/{}.txt", "l".repeat(251))));
}

#[test]
fn multilayer_image_has_whiteouts() {
    let layout = multilayer_image();
    let manifest = layout_manifest(layout, MULTILAYER_TAG);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    let l2 = layer_entries(layout, layers[1]["digest"].as_str().unwrap());
    assert!(l2.contains_key("opq/.wh..wh..opq"));
    assert!(l2.contains_key("base/.wh.to_delete.txt"));
    assert_eq!(l2["replaced"].0, tar::EntryType::Directory);
    let l3 = layer_entries(layout, layers[2]["digest"].as_str().unwrap());
    assert_eq!(l3["dir_to_file"].0, tar::EntryType::Regular);
}

#[test]
fn index_with_two_platforms_pushes_whole() {
    let reg = Distribution::start();
    let dir = tempdir();
    let layout = dir.path().join("oci");
    index_two_platforms(&layout, "multi");
    push_oci_layout(&layout, "multi", &reg.reference("multi:v1"));
    let index = skopeo_inspect_raw(&format!("docker://{}", reg.reference("multi:v1")));
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    for m in index["manifests"].as_array().unwrap() {
        let digest = m["digest"].as_str().unwrap();
        let image = skopeo_inspect_raw(&format!(
            "docker://{}",
            reg.reference(&format!("multi@{digest}"))
        ));
        assert_eq!(image["layers"].as_array().unwrap().len(), 1);
    }
}
