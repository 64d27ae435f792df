//! Auth against real registries: Basic (htpasswd) and Bearer (the harness
//! token server), credentials from docker config files, login/logout/get.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use ggfs::error::Error;
use ggfs::image::manifest::RawManifest;
use ggfs::image::{self, Sink, Source};
use ggfs::registry::auth::{self, Credential, Keychain};
use ggfs::registry::{Client, ClientOptions, RegistryRepo};
use ggfs::Digest;

use common::client::{image_manifest, put, repo, stream_of, CONFIG};
use common::{CountingProxy, Distribution, TokenOptions, TokenServer};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A docker config dir whose config.json holds `auths`.
fn docker_dir(auths: serde_json::Value) -> tempfile::TempDir {
    let dir = common::tempdir();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::json!({ "auths": auths }).to_string(),
    )
    .unwrap();
    dir
}

fn client_with(dir: &Path) -> Client {
    Client::builder(ClientOptions::default())
        .keychain(Keychain::docker_dir(dir))
        .build()
        .unwrap()
}

/// Push a config blob and an image manifest tagged `tag`; pull both back.
async fn push_and_pull(r: &RegistryRepo, tag: &str) -> Result<RawManifest, Error> {
    let cfg = put(r, CONFIG).await?;
    let m = image_manifest(&cfg, CONFIG.len(), &[]);
    r.put_manifest(&m, Some(tag)).await?;
    let got = r.manifest(tag).await?;
    assert_eq!(got.digest, m.digest);
    assert_eq!(image::read_blob(r, &cfg, 1 << 20).await?, CONFIG);
    Ok(m)
}

#[tokio::test]
async fn basic_auth_with_htpasswd_and_docker_config() {
    let reg = Distribution::start_htpasswd("alice", "s3cret");
    let proxy = CountingProxy::start(reg.addr());
    let good = docker_dir(serde_json::json!({ proxy.addr(): {"auth": b64("alice:s3cret")} }));
    let c = client_with(good.path());
    c.ping(proxy.addr()).await.unwrap();
    push_and_pull(&repo(&c, proxy.addr(), "private/app"), "v1")
        .await
        .unwrap();
    // After the first challenge, Basic goes out with every request: no 401 round trips.
    proxy.reset();
    let r = repo(&c, proxy.addr(), "private/app");
    for _ in 0..3 {
        r.manifest("v1").await.unwrap();
    }
    assert_eq!(proxy.request_count(), 3);

    let bad =
        docker_dir(serde_json::json!({ reg.addr(): {"username": "alice", "password": "nope"} }));
    let err = repo(&client_with(bad.path()), reg.addr(), "private/app")
        .manifest("v1")
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Auth { .. }), "{msg}");
    assert!(
        msg.contains("credentials rejected") && msg.contains("\"alice\"") && !msg.contains("nope"),
        "{msg}"
    );

    let none = docker_dir(serde_json::json!({}));
    let err = repo(&client_with(none.path()), reg.addr(), "private/app")
        .manifest("v1")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("credentials required"), "{err}");
}

#[tokio::test]
async fn bearer_flow_scopes_and_token_reuse() {
    let ts = TokenServer::start("alice", "secret");
    let reg = Distribution::start_token(&ts);
    let dir = docker_dir(serde_json::json!({ reg.addr(): {"auth": b64("alice:secret")} }));
    let c = client_with(dir.path());
    let app = repo(&c, reg.addr(), "team/app");
    let m = push_and_pull(&app, "v1").await.unwrap();

    let reqs = ts.requests();
    assert!(
        reqs.iter()
            .all(|r| r.granted && r.user.as_deref() == Some("alice")),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .all(|r| r.method == "GET" && r.service.as_deref() == Some(ts.service())),
        "{reqs:?}"
    );
    assert!(
        ts.scopes()
            .contains(&"repository:team/app:pull,push".to_string()),
        "{:?}",
        ts.scopes()
    );

    // One token per scope set: push_and_pull's pulls (manifest, config
    // blob) shared one, and later pulls ask for none.
    let pulls = reqs
        .iter()
        .filter(|r| r.scopes == ["repository:team/app:pull"])
        .count();
    assert_eq!(pulls, 1, "{reqs:?}");
    ts.reset();
    for _ in 0..3 {
        app.manifest(m.digest.as_str()).await.unwrap();
        app.head_manifest("v1").await.unwrap().unwrap();
    }
    assert_eq!(ts.requests().len(), 0, "{:?}", ts.requests());

    // A cross-repo mount asks for both repositories in one token.
    ts.reset();
    let other = repo(&c, reg.addr(), "team/other");
    assert!(other.mount_blob(&Digest::of(CONFIG), &app).await.unwrap());
    let mut scopes = ts.requests().last().unwrap().scopes.clone();
    scopes.sort();
    assert_eq!(
        scopes,
        [
            "repository:team/app:pull",
            "repository:team/other:pull,push"
        ]
    );
    assert!(other.has_blob(&Digest::of(CONFIG)).await.unwrap());

    // Wrong password: the token server's refusal, clearly.
    let bad = docker_dir(serde_json::json!({ reg.addr(): {"auth": b64("alice:wrong")} }));
    let err = repo(&client_with(bad.path()), reg.addr(), "team/app")
        .manifest("v1")
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Auth { .. }) && msg.contains("401") && msg.contains("token"),
        "{msg}"
    );
    assert!(!msg.contains("wrong"), "{msg}");
}

#[tokio::test]
async fn identity_tokens_use_the_oauth2_refresh_grant() {
    let ts = TokenServer::start("alice", "secret");
    let reg = Distribution::start_token(&ts);
    // What `docker login` does for an identity token: a password grant, offline.
    let form = format!("grant_type=password&username=alice&password=secret&service={}&client_id=t&access_type=offline", ts.service());
    let resp = reqwest::Client::new()
        .post(ts.realm())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let refresh = body["refresh_token"].as_str().unwrap().to_string();
    ts.reset();

    let dir = docker_dir(
        serde_json::json!({ reg.addr(): {"auth": b64("alice:"), "identitytoken": refresh} }),
    );
    let c = client_with(dir.path());
    push_and_pull(&repo(&c, reg.addr(), "tok/app"), "v1")
        .await
        .unwrap();
    let reqs = ts.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(
            (r.method.as_str(), r.grant_type.as_deref(), r.granted),
            ("POST", Some("refresh_token"), true),
            "{reqs:?}"
        );
    }
}

#[tokio::test]
async fn tokens_expire_as_the_server_says() {
    let ts = TokenServer::start_with(TokenOptions {
        expires_in: 2,
        ..TokenOptions::default()
    });
    let reg = Distribution::start_token(&ts);
    let dir =
        docker_dir(serde_json::json!({ reg.addr(): {"username": "alice", "password": "secret"} }));
    let c = client_with(dir.path());
    let r = repo(&c, reg.addr(), "exp/app");
    push_and_pull(&r, "v1").await.unwrap();
    ts.reset();
    r.manifest("v1").await.unwrap();
    r.manifest("v1").await.unwrap();
    assert_eq!(ts.requests().len(), 0, "fresh token reused");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    r.manifest("v1").await.unwrap();
    assert_eq!(ts.requests().len(), 1, "expired token replaced");
}

#[tokio::test]
async fn check_credential_against_both_schemes() {
    let reg = Distribution::start_htpasswd("bob", "pw");
    let c = client_with(docker_dir(serde_json::json!({})).path());
    let cred = |u: &str, p: &str| Credential::Basic {
        username: u.into(),
        password: p.into(),
    };
    c.check_credential(reg.addr(), &cred("bob", "pw"))
        .await
        .unwrap();
    assert!(matches!(
        c.check_credential(reg.addr(), &cred("bob", "x")).await,
        Err(Error::Auth { .. })
    ));

    let ts = TokenServer::start("carol", "pw2");
    let treg = Distribution::start_token(&ts);
    c.check_credential(treg.addr(), &cred("carol", "pw2"))
        .await
        .unwrap();
    assert!(matches!(
        c.check_credential(treg.addr(), &cred("carol", "no")).await,
        Err(Error::Auth { .. })
    ));
}

/// Everything that reads the process environment (DOCKER_CONFIG, PATH) in
/// one test, so parallel tests in this binary never race on it.
#[tokio::test]
async fn login_get_logout_and_credential_helpers_via_env() {
    let reg = Distribution::start_htpasswd("alice", "s3cret");
    let home = common::tempdir();
    std::env::set_var("DOCKER_CONFIG", home.path());
    std::env::remove_var("REGISTRY_AUTH_FILE");
    std::env::remove_var("XDG_RUNTIME_DIR");
    let config = home.path().join("config.json");
    std::fs::write(&config, r#"{"auths":{},"psFormat":"table {{.ID}}"}"#).unwrap();

    let err = auth::login(reg.addr(), "alice", "wrong").await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(
        !std::fs::read_to_string(&config)
            .unwrap()
            .contains(reg.addr()),
        "bad credentials stored"
    );

    auth::login(reg.addr(), "alice", "s3cret").await.unwrap();
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert_eq!(saved["auths"][reg.addr()]["auth"], b64("alice:s3cret"));
    assert_eq!(saved["psFormat"], "table {{.ID}}", "other settings kept");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The default client (Keychain::from_env) now pulls with them.
    let c = Client::new(ClientOptions::default()).unwrap();
    push_and_pull(&repo(&c, reg.addr(), "env/app"), "v1")
        .await
        .unwrap();
    let got = auth::get(reg.addr()).unwrap();
    assert_eq!(
        (got.username.as_str(), got.secret.as_str()),
        ("alice", "s3cret")
    );
    let printed = serde_json::to_value(&got).unwrap();
    assert_eq!(
        printed,
        serde_json::json!({"ServerURL": reg.addr(), "Username": "alice", "Secret": "s3cret"})
    );

    assert!(auth::logout(reg.addr()).unwrap());
    assert!(!auth::logout(reg.addr()).unwrap());
    assert!(auth::get(reg.addr()).unwrap_err().is_not_found());

    // Docker Hub's key.
    auth::store("docker.io", "hubuser", "hubpw").unwrap();
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert_eq!(
        saved["auths"][auth::DOCKER_HUB_KEY]["auth"],
        b64("hubuser:hubpw")
    );
    assert_eq!(auth::get("index.docker.io").unwrap().username, "hubuser");

    // credsStore: a real helper executable speaking the helper protocol.
    let bin = common::tempdir();
    let script = bin.path().join("docker-credential-ggfstest");
    std::fs::write(
        &script,
        "#!/bin/sh\nstore=\"$(dirname \"$0\")/stored.json\"\ncase \"$1\" in\n\
         store) cat > \"$store\" ;;\n\
         get) read server; if [ -f \"$store\" ]; then cat \"$store\"; else echo 'credentials not found in native keychain'; exit 1; fi ;;\n\
         erase) read server; rm -f \"$store\" ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::env::set_var("PATH", path);
    std::fs::write(&config, r#"{"credsStore":"ggfstest"}"#).unwrap();
    assert!(
        Keychain::from_env()
            .resolve(reg.addr(), None)
            .unwrap()
            .is_none(),
        "helper said not found"
    );
    let via = auth::login(reg.addr(), "alice", "s3cret").await.unwrap();
    assert!(via.contains("docker-credential-ggfstest"), "{via}");
    assert!(
        !std::fs::read_to_string(&config).unwrap().contains("s3cret"),
        "secret went to the file, not the helper"
    );
    let c = Client::new(ClientOptions::default()).unwrap();
    push_and_pull(&repo(&c, reg.addr(), "helper/app"), "v1")
        .await
        .unwrap();
    auth::logout(reg.addr()).unwrap();
    assert!(
        !bin.path().join("stored.json").exists(),
        "erase reached the helper"
    );
}

/// Captured log output, shared with the subscriber.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_logs_even_at_trace() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let basic = Distribution::start_htpasswd("alice", "s3cret-basic");
    let ts = TokenServer::start("alice", "s3cret-token");
    let bearer = Distribution::start_token(&ts);
    let dir = docker_dir(serde_json::json!({
        basic.addr(): {"auth": b64("alice:s3cret-basic")},
        bearer.addr(): {"auth": b64("alice:s3cret-token")},
    }));
    let c = client_with(dir.path());
    push_and_pull(&repo(&c, basic.addr(), "log/app"), "v1")
        .await
        .unwrap();
    push_and_pull(&repo(&c, bearer.addr(), "log/app"), "v1")
        .await
        .unwrap();

    let text = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("/v2/log/app/manifests/v1"),
        "nothing captured: {text}"
    );
    for secret in [
        "s3cret",
        &b64("alice:s3cret-basic"),
        &b64("alice:s3cret-token"),
        "Bearer ey",
        "authorization",
    ] {
        assert!(
            !text.to_lowercase().contains(&secret.to_lowercase()),
            "{secret:?} logged:\n{text}"
        );
    }
}

#[tokio::test]
async fn anonymous_bearer_pulls_but_cannot_push() {
    let ts = TokenServer::start_with(TokenOptions {
        anonymous_pull: true,
        ..TokenOptions::default()
    });
    let reg = Distribution::start_token(&ts);
    let alice =
        docker_dir(serde_json::json!({ reg.addr(): {"username": "alice", "password": "secret"} }));
    let m = push_and_pull(
        &repo(&client_with(alice.path()), reg.addr(), "pub/app"),
        "v1",
    )
    .await
    .unwrap();

    let anon = client_with(docker_dir(serde_json::json!({})).path());
    let r = repo(&anon, reg.addr(), "pub/app");
    assert_eq!(r.manifest("v1").await.unwrap().digest, m.digest);
    let last = ts.requests().last().cloned().unwrap();
    assert_eq!((last.user, last.granted), (None, true));

    let d = Digest::of(b"anon push");
    let err = r
        .put_blob(&d, 9, stream_of(b"anon push"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Auth { .. }) && msg.contains("denied"),
        "{msg}"
    );
    assert!(msg.contains("no credentials configured"), "{msg}");
}

/// A credential helper that never answers: the command fails within its
/// `--timeout` naming the registry and the keychain, instead of hanging
/// with it (the lookup runs on a blocking thread, under the deadline).
#[test]
fn a_hung_credential_helper_fails_within_the_timeout() {
    use std::os::unix::fs::PermissionsExt;
    let reg = Distribution::start_htpasswd("alice", "s3cret");
    let home = common::tempdir();
    let helper = home.path().join("docker-credential-ggfshang");
    std::fs::write(&helper, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = serde_json::json!({ "credHelpers": { reg.addr(): "ggfshang" } });
    std::fs::write(home.path().join("config.json"), config.to_string()).unwrap();
    let path = format!(
        "{}:{}",
        home.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let image = format!("{}/private/app:v1", reg.addr());
    let mut child = std::process::Command::new(common::ggfs_bin())
        .args(["--timeout", "2", "manifest", &image])
        .env("DOCKER_CONFIG", home.path())
        .env("REGISTRY_AUTH_FILE", home.path().join("none.json"))
        .env("PATH", path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("ggfs waited on the hung helper for 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains(reg.addr()) && err.contains("no answer within 2 s"),
        "{err}"
    );
}

/// A private repository on a registry that lets anonymous clients pull
/// the public ones: a mount without credentials reads the public image,
/// and the private one answers `EACCES`: the registry's refusal reaches
/// the reader as such, not as a missing file or an I/O error.
#[test]
fn a_refused_repository_is_eacces_in_the_mount() {
    let ts = TokenServer::start_with(TokenOptions {
        anonymous_pull: true,
        private: vec!["private/app".into()],
        ..TokenOptions::default()
    });
    let reg = Distribution::start_token(&ts);
    let alice =
        docker_dir(serde_json::json!({ reg.addr(): {"username": "alice", "password": "secret"} }));
    let tree = common::tempdir();
    std::fs::write(tree.path().join("f"), "x\n").unwrap();
    for repo in ["public/app", "private/app"] {
        let out = std::process::Command::new(common::ggfs_bin())
            .args(["append", "-f", tree.path().to_str().unwrap(), "-t"])
            .arg(reg.reference(&format!("{repo}:v1")))
            .env("DOCKER_CONFIG", alice.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let anon = docker_dir(serde_json::json!({}));
    // This test's process alone reads the variable (nextest: a process per test).
    std::env::set_var("DOCKER_CONFIG", anon.path());
    let m = common::mount::Mount::start(reg.addr(), &[]);
    let public = std::fs::read_to_string(m.path("public/app/v1/rootfs/f"));
    assert_eq!(public.unwrap(), "x\n");
    let err = std::fs::metadata(m.path("private/app/v1")).expect_err("a private tag");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    // Its repository, listed by nobody and refused, is no empty prefix.
    let err = std::fs::read_dir(m.path("private/app/v1/rootfs")).expect_err("beneath it");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
}
