//! More of issue 9's CLI against the real registry (CNCF distribution),
//! results read back by skopeo: gcrane's `copy -r`; `--ca-file` and
//! `--insecure-skip-tls-verify` against distribution serving TLS (CLI and
//! mount); `--pull-secret` against distribution with htpasswd auth;
//! `unmount --help`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{sha256_digest, skopeo_raw, Distribution};

/// `ggfs args…`, its output whatever the exit status.
fn ggfs_output(args: &[&str]) -> Output {
    Command::new(common::ggfs_bin())
        .args(args)
        .output()
        .unwrap()
}

/// `ggfs args…` expected to succeed; returns its stderr.
fn ggfs_stderr(args: &[&str]) -> String {
    let out = ggfs_output(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ggfs {args:?} failed: {err}");
    err
}

/// sha256 of the manifest bytes skopeo reads at `docker://image`.
fn skopeo_digest(image: &str) -> String {
    sha256_digest(skopeo_raw(&format!("docker://{image}")).as_bytes())
}

/// A one-file image built by umoci, pushed by skopeo to `at`.
fn push_image(work: &Path, name: &str, content: &str, at: &str) {
    let tree = work.join(format!("{name}-tree"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("file"), content).unwrap();
    let layout = work.join(format!("{name}-layout"));
    common::umoci_image_from(&layout, "t", &tree);
    common::push_oci_layout(&layout, "t", at);
}

/// The repositories distribution's own catalog lists.
fn catalog(reg: &Distribution) -> Vec<String> {
    let (status, body) = common::http_get(reg.addr(), "/v2/_catalog").unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut names: Vec<String> = v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn copy_recursive_copies_every_repository_below_the_prefix_once() {
    let src = Distribution::start();
    let dst = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    push_image(w, "a1", "one\n", &src.reference("proj/a:v1"));
    push_image(w, "a2", "two\n", &src.reference("proj/a:v2"));
    common::skopeo_copy(
        &format!("docker://{}", src.reference("proj/a:v1")),
        &format!("docker://{}", src.reference("proj/a:latest")),
    );
    let layout = w.join("index-layout");
    common::index_two_platforms(&layout, "t");
    common::push_oci_layout(&layout, "t", &src.reference("proj/sub/b:t"));
    push_image(w, "c", "outside\n", &src.reference("other/c:x"));
    // A repository whose name only starts like the prefix is not below it.
    push_image(w, "d", "lookalike\n", &src.reference("projx/d:y"));

    let from = src.reference("proj");
    let to = dst.reference("mirror");
    let err = ggfs_stderr(&["copy", "-r", &from, &to, "-j", "3"]);
    assert!(
        err.contains("2 repositories, copied 3 images (4 tags) and 0 untagged, skipped 0 tags"),
        "{err}"
    );

    assert_eq!(catalog(&dst), ["mirror/a", "mirror/sub/b"]);
    for (s, d) in [
        ("proj/a:v1", "mirror/a:v1"),
        ("proj/a:v2", "mirror/a:v2"),
        ("proj/a:latest", "mirror/a:latest"),
        ("proj/sub/b:t", "mirror/sub/b:t"),
    ] {
        assert_eq!(
            skopeo_digest(&src.reference(s)),
            skopeo_digest(&dst.reference(d)),
            "{s} vs {d}"
        );
    }
    // The index's children came along: skopeo reads each one by digest.
    let index: serde_json::Value = serde_json::from_str(&skopeo_raw(&format!(
        "docker://{}",
        dst.reference("mirror/sub/b:t")
    )))
    .unwrap();
    for child in index["manifests"].as_array().unwrap() {
        let digest = child["digest"].as_str().unwrap();
        let at = format!("{}@{digest}", dst.reference("mirror/sub/b"));
        assert_eq!(skopeo_digest(&at), digest);
    }

    // Again: nothing new to copy.
    let err = ggfs_stderr(&["cp", "-r", &from, &to]);
    assert!(
        err.contains(
            "2 repositories, copied 0 images (0 tags) and 0 untagged, skipped 4 tags already at the destination"
        ),
        "{err}"
    );
    assert!(!err.contains(" -> "), "{err}");

    // A moved tag is copied again, the others skipped.
    push_image(w, "a3", "three\n", &src.reference("proj/a:v2"));
    let err = ggfs_stderr(&["cp", "-r", &from, &to]);
    assert!(
        err.contains("copied 1 images (1 tags) and 0 untagged, skipped 3 tags"),
        "{err}"
    );
    assert_eq!(
        skopeo_digest(&src.reference("proj/a:v2")),
        skopeo_digest(&dst.reference("mirror/a:v2"))
    );

    // A whole registry: every repository, the same names.
    let dst2 = Distribution::start();
    let err = ggfs_stderr(&["cp", "-r", src.addr(), dst2.addr()]);
    assert!(
        err.contains("4 repositories, copied 5 images (6 tags) and 0 untagged"),
        "{err}"
    );
    assert_eq!(catalog(&dst2), catalog(&src));
    assert_eq!(
        skopeo_digest(&src.reference("other/c:x")),
        skopeo_digest(&dst2.reference("other/c:x"))
    );

    // A prefix with nothing below it: one line naming it.
    let err = common::ggfs_fails(&["cp", "-r", &src.reference("nothing"), &to]);
    assert!(err.contains("nothing"), "{err}");
}

#[test]
fn copy_recursive_copies_untagged_manifests_where_the_source_lists_them() {
    // `ggfs registry serve` lists every manifest (GCR's `manifest` map).
    let src = common::GgfsRegistry::start();
    let dst = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    push_image(w, "old", "old\n", &src.reference("app/x:t"));
    let old = skopeo_digest(&src.reference("app/x:t"));
    push_image(w, "new", "new\n", &src.reference("app/x:t"));
    let new = skopeo_digest(&src.reference("app/x:t"));
    assert_ne!(old, new);

    let err = ggfs_stderr(&["cp", "-r", &src.reference("app"), &dst.reference("m")]);
    assert!(
        err.contains("1 repositories, copied 1 images (1 tags) and 1 untagged"),
        "{err}"
    );
    assert_eq!(skopeo_digest(&dst.reference("m/x:t")), new);
    let at = format!("{}@{old}", dst.reference("m/x"));
    assert_eq!(skopeo_digest(&at), old);
    let err = ggfs_stderr(&["cp", "-r", &src.reference("app"), &dst.reference("m")]);
    assert!(
        err.contains("copied 0 images (0 tags) and 0 untagged, skipped 1 tags"),
        "{err}"
    );
}

/// This host's address on the interface of its default route: ggfs speaks
/// plain HTTP to loopback registries whatever they serve, so a TLS registry
/// under test must listen elsewhere.
fn non_loopback_ip() -> String {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connect only picks the route and source address.
    s.connect("203.0.113.1:9")
        .expect("the TLS test needs a non-loopback IPv4 address (a default route)");
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "{ip}");
    ip.to_string()
}

/// A self-signed CA named `cn`, made by openssl in `dir` as `NAME.pem`
/// with its key `NAME.key`.
fn make_ca(dir: &Path, name: &str, cn: &str) {
    common::run(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={cn}"),
        "-keyout",
        &format!("{name}.key"),
        "-out",
        &format!("{name}.pem"),
    ]));
}

/// A CA (`ca.pem`) and a certificate it signed for `ip` (`cert.pem`,
/// `key.pem`), made by openssl in `dir`.
fn make_ca_and_cert(dir: &Path, ip: &str) {
    let openssl = |args: &[&str]| {
        common::run(Command::new("openssl").current_dir(dir).args(args));
    };
    make_ca(dir, "ca", "ggfs test CA");
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={ip}"),
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
}

/// CNCF distribution serving HTTPS on `ip` with `dir`'s cert.pem/key.pem.
struct TlsRegistry {
    child: std::process::Child,
    addr: String,
}

impl TlsRegistry {
    fn start(dir: &Path, ip: &str) -> TlsRegistry {
        let port = common::free_port();
        let addr = format!("{ip}:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  secret: ggfs-test-secret\n  tls:\n    \
                 certificate: {}\n    key: {}\n",
                dir.join("storage").display(),
                dir.join("cert.pem").display(),
                dir.join("key.pem").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let reg = TlsRegistry { child, addr };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&reg.addr).is_ok() {
                return reg;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "docker-registry never listened on {}: {}",
            reg.addr,
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS registry holding one image (pushed by skopeo trusting the CA):
/// the work dir (with `ca.pem`), the registry, the image, its digest.
fn tls_registry_with_image() -> (tempfile::TempDir, TlsRegistry, String, String) {
    let ip = non_loopback_ip();
    let work = common::tempdir();
    let w = work.path();
    make_ca_and_cert(w, &ip);
    let reg = TlsRegistry::start(w, &ip);
    let image = format!("{}/tls/img:v1", reg.addr);
    // skopeo, trusting the CA, pushes the image over HTTPS.
    let tree = w.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("file"), "over tls\n").unwrap();
    common::umoci_image_from(&w.join("layout"), "t", &tree);
    let certs = w.join("skopeo-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(w.join("ca.pem"), certs.join("ca.crt")).unwrap();
    common::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-cert-dir",
        certs.to_str().unwrap(),
        &format!("oci:{}:t", w.join("layout").display()),
        &format!("docker://{image}"),
    ]));
    let want = sha256_digest(
        common::run(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--cert-dir",
            certs.to_str().unwrap(),
            &format!("docker://{image}"),
        ]))
        .as_bytes(),
    );
    (work, reg, image, want)
}

#[test]
fn tls_registry_needs_its_ca_or_an_explicit_skip() {
    let (work, reg, image, want) = tls_registry_with_image();
    let w = work.path();

    // Not trusted: one line naming the registry and the certificate problem.
    let err = common::ggfs_fails(&["digest", &image]);
    assert!(err.contains(&reg.addr), "{err}");
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains("--ca-file"), "no hint: {err}");
    assert!(
        !err.contains("tried"),
        "a certificate problem is not retried: {err}"
    );

    // With the CA: the digest skopeo sees.
    let ca = w.join("ca.pem");
    let ca = ca.to_str().unwrap();
    assert_eq!(
        common::ggfs(&["digest", "--ca-file", ca, &image]).trim(),
        want
    );
    // Repeatable: another CA first, this one second.
    make_ca(w, "other", "other CA");
    let other = w.join("other.pem");
    let other = other.to_str().unwrap();
    let err = common::ggfs_fails(&["digest", "--ca-file", other, &image]);
    assert!(err.contains("UnknownIssuer"), "{err}");
    let both = ["digest", "--ca-file", other, "--ca-file", ca, &image];
    assert_eq!(common::ggfs(&both).trim(), want);
    // A copy out of it and back in, bytes intact.
    let copy = format!("{}/tls/copy:v1", reg.addr);
    common::ggfs(&["copy", "--ca-file", ca, &image, &copy]);
    assert_eq!(
        common::ggfs(&["digest", "--ca-file", ca, &copy]).trim(),
        want
    );

    // Verification off: works, and says so on stderr.
    let out = ggfs_output(&["digest", "--insecure-skip-tls-verify", &image]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("not verified"),
        "{err}"
    );

    // --insecure is plain HTTP, not a way around the certificate.
    let err = common::ggfs_fails(&["digest", "--insecure", &image]);
    assert!(err.contains(&reg.addr), "{err}");

    // A CA file that is not one: one line naming it.
    let bogus = w.join("ext.cnf");
    let err = common::ggfs_fails(&["digest", "--ca-file", bogus.to_str().unwrap(), &image]);
    assert!(err.contains("ext.cnf"), "{err}");
}

/// A loopback "registry" answering every request 401 with a Bearer
/// challenge whose realm is `realm`; its `HOST:PORT`.
fn challenging_registry(realm: String) -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = write!(
                conn,
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"s\"\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    addr
}

#[test]
fn ca_file_is_trusted_for_token_realms_too() {
    let (work, reg, _image, _) = tls_registry_with_image();
    let ca = work.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    // The realm is the TLS registry: it serves no tokens (404), but which
    // error comes back tells whether its certificate was accepted.
    let fake = challenging_registry(format!("https://{}/token", reg.addr));
    let image = format!("{fake}/repo:tag");
    let err = common::ggfs_fails(&["digest", &image]);
    assert!(err.contains(&fake), "{err}");
    assert!(err.contains("TLS certificate not accepted"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    let err = common::ggfs_fails(&["digest", "--ca-file", ca, &image]);
    assert!(err.contains(&fake), "{err}");
    assert!(
        !err.contains("certificate"),
        "the CA was not used for the realm: {err}"
    );
    assert!(err.contains("404"), "{err}");
}

/// Unmounts (lazily) on drop, so a failed assertion leaves no mount.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if common::mount::is_mounted(&self.0) {
            common::mount::lazy_unmount(&self.0);
        }
    }
}

#[test]
fn mount_takes_the_tls_flags() {
    let (work, reg, _image, _) = tls_registry_with_image();
    let w = work.path();
    let ca = w.join("ca.pem");
    let mp = w.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp_s = mp.to_str().unwrap();
    let cache = |n: &str| w.join(n).to_str().unwrap().to_string();
    let ca_s = ca.to_str().unwrap();
    // Passed on to the daemon, which reads it: a PEM file is no Secret.
    let err = common::ggfs_fails(&["--pull-secret", ca_s, "mount", &reg.addr, mp_s]);
    assert!(err.contains("pull secret") && err.contains(ca_s), "{err}");

    let err = common::ggfs_fails(&["mount", &reg.addr, mp_s, "--cache-dir", &cache("c0")]);
    assert!(
        err.contains(&reg.addr) && err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(!common::mount::is_mounted(&mp));

    // Each flag after the registry, or before the verb as a global flag.
    for (i, (before, after)) in [
        (vec![], vec!["--ca-file", ca_s]),
        (vec![], vec!["--insecure-skip-tls-verify"]),
        (vec!["--ca-file", ca_s], vec![]),
        (vec!["--insecure-skip-tls-verify"], vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let c = cache(&format!("c{}", i + 1));
        let mut args = before.clone();
        args.extend(["mount", &reg.addr, mp_s]);
        args.extend(after.iter().copied());
        args.extend(["--cache-dir", &c]);
        let flags = [before, after].concat();
        let out = ggfs_output(&args);
        let _guard = Unmount(mp.clone());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let skip = flags[0] == "--insecure-skip-tls-verify";
        assert_eq!(err.contains("not verified"), skip, "{err}");
        let file = mp.join("tls/img/v1/rootfs/file");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "over tls\n");
        common::ggfs(&["unmount", mp_s]);
    }
}

/// `ggfs args…` with `DOCKER_CONFIG=docker_config`, whatever the outcome.
fn ggfs_with_config(docker_config: &Path, args: &[&str]) -> Output {
    Command::new(common::ggfs_bin())
        .env("DOCKER_CONFIG", docker_config)
        .env_remove("REGISTRY_AUTH_FILE")
        .env("XDG_RUNTIME_DIR", docker_config)
        .env("HOME", docker_config)
        .args(args)
        .output()
        .unwrap()
}

/// A `.dockerconfigjson` giving `user:pass` for `registry`.
fn dockerconfigjson(registry: &str, user: &str, pass: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    serde_json::json!({"auths": {registry: {
        "username": user, "password": pass, "auth": b64(&format!("{user}:{pass}"))
    }}})
    .to_string()
}

/// A Secret as `kubectl get secret NAME -o yaml` prints it.
fn secret_yaml(name: &str, config_json: &str) -> String {
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(config_json);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: default\n\
         type: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: {data}\n"
    )
}

#[test]
fn pull_secret_credentials_come_before_the_docker_config() {
    let reg = Distribution::start_htpasswd("alice", "s3cret");
    let work = common::tempdir();
    let w = work.path();
    let tree = w.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("file"), "behind a secret\n").unwrap();
    common::umoci_image_from(&w.join("layout"), "t", &tree);
    let image = reg.reference("private/img:v1");
    common::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:s3cret",
        &format!("oci:{}:t", w.join("layout").display()),
        &format!("docker://{image}"),
    ]));
    let want = sha256_digest(
        common::run(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            "alice:s3cret",
            &format!("docker://{image}"),
        ]))
        .as_bytes(),
    );
    let empty = w.join("empty-docker");
    std::fs::create_dir_all(&empty).unwrap();
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).trim().to_string();
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).to_string();

    // No credentials: refused.
    let out = ggfs_with_config(&empty, &["digest", &image]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(reg.addr()), "{}", stderr(&out));

    // A YAML Secret.
    let good = dockerconfigjson(reg.addr(), "alice", "s3cret");
    let yaml = w.join("secret.yaml");
    std::fs::write(&yaml, secret_yaml("regcred", &good)).unwrap();
    let yaml_s = yaml.to_str().unwrap();
    let out = ggfs_with_config(&empty, &["digest", "--pull-secret", yaml_s, &image]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), want);

    // The mount takes it too: the daemon reads the image behind the secret.
    let mp = w.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp_s = mp.to_str().unwrap();
    let mcache = w.join("mcache");
    let mount = [
        "--pull-secret",
        yaml_s,
        "mount",
        reg.addr(),
        mp_s,
        "--insecure",
    ];
    let out = ggfs_with_config(
        &empty,
        &[&mount[..], &["--cache-dir", mcache.to_str().unwrap()]].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let read = std::fs::read_to_string(mp.join("private/img/v1/rootfs/file"));
    let out = ggfs_with_config(&empty, &["unmount", mp_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read.unwrap(), "behind a secret\n");

    // The same as JSON (`kubectl get secret -o json`), among other Secrets of
    // a List; a pull that reads the blobs too, bytes as pushed.
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(&good);
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other"},
         "type": "kubernetes.io/dockerconfigjson",
         "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD
             .encode(dockerconfigjson("elsewhere.example", "x", "y"))}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "regcred"},
         "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": data}},
    ]});
    let json = w.join("secrets.json");
    std::fs::write(&json, serde_json::to_string_pretty(&list).unwrap()).unwrap();
    let json_s = json.to_str().unwrap();
    let layout = w.join("pulled");
    let out = ggfs_with_config(
        &empty,
        &[
            "pull",
            "--pull-secret",
            json_s,
            &image,
            layout.to_str().unwrap(),
            "--format",
            "oci",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rootfs = common::umoci_unpack(&layout, "v1", &w.join("bundle"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("file")).unwrap(),
        "behind a secret\n"
    );

    // Ahead of the docker config: a secret's right password beats the
    // config's wrong one, and a secret's wrong one is what is tried.
    let docker = w.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        dockerconfigjson(reg.addr(), "alice", "wrong"),
    )
    .unwrap();
    let out = ggfs_with_config(&docker, &["digest", &image]);
    assert!(!out.status.success(), "the config's password is wrong");
    let out = ggfs_with_config(&docker, &["digest", "--pull-secret", yaml_s, &image]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), want);
    std::fs::write(docker.join("config.json"), &good).unwrap();
    let bad = w.join("bad.yaml");
    std::fs::write(
        &bad,
        secret_yaml("stale", &dockerconfigjson(reg.addr(), "alice", "old")),
    )
    .unwrap();
    let out = ggfs_with_config(
        &docker,
        &["digest", "--pull-secret", bad.to_str().unwrap(), &image],
    );
    assert!(
        !out.status.success(),
        "the secret's stale password was not used"
    );
    let err = stderr(&out);
    assert!(
        err.contains(reg.addr()) && err.trim_end().lines().count() == 1,
        "{err}"
    );

    // Several YAML documents, `stringData` (plain) instead of `data`, and
    // the legacy `kubernetes.io/dockercfg` (the `auths` map alone).
    let legacy_cfg = |user: &str, pass: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&dockerconfigjson(reg.addr(), user, pass)).unwrap();
        v["auths"].to_string()
    };
    let docs = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: one\ntype: kubernetes.io/dockerconfigjson\n\
         stringData:\n  .dockerconfigjson: '{}'\n---\n{}",
        dockerconfigjson("elsewhere.example", "x", "y"),
        secret_yaml("two", &good)
    );
    let multi = w.join("multi.yaml");
    std::fs::write(&multi, docs).unwrap();
    let plain = w.join("plain.yaml");
    std::fs::write(
        &plain,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: legacy\ntype: kubernetes.io/dockercfg\n\
             stringData:\n  .dockercfg: '{}'\n",
            legacy_cfg("alice", "s3cret")
        ),
    )
    .unwrap();
    let legacy = w.join("legacy.yaml");
    let data = base64::engine::general_purpose::STANDARD.encode(legacy_cfg("alice", "s3cret"));
    std::fs::write(
        &legacy,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: legacy\ntype: kubernetes.io/dockercfg\n\
             data:\n  .dockercfg: {data}\n"
        ),
    )
    .unwrap();
    for f in [&multi, &plain, &legacy] {
        let out = ggfs_with_config(
            &empty,
            &["digest", "--pull-secret", f.to_str().unwrap(), &image],
        );
        assert!(out.status.success(), "{}: {}", f.display(), stderr(&out));
        assert_eq!(stdout(&out), want);
    }

    // Not a pull secret: one line naming the file and what is wrong.
    let opaque = w.join("opaque.yaml");
    std::fs::write(
        &opaque,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ntype: Opaque\ndata:\n  pw: eA==\n",
    )
    .unwrap();
    let out = ggfs_with_config(
        &empty,
        &["digest", "--pull-secret", opaque.to_str().unwrap(), &image],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("opaque.yaml") && err.contains("Opaque"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn unmount_help_shows_its_argument_and_no_registry_flags() {
    let help = common::ggfs(&["unmount", "--help"]);
    assert!(help.contains("Usage: ggfs unmount <MOUNTPOINT>"), "{help}");
    let line = help
        .lines()
        .find(|l| l.trim_start().starts_with("<MOUNTPOINT>"))
        .unwrap_or_else(|| panic!("no MOUNTPOINT line: {help}"));
    assert!(
        line.contains("mounted on"),
        "MOUNTPOINT undescribed: {line}"
    );
    for flag in [
        "--platform",
        "--insecure",
        "--timeout",
        "--ca-file",
        "--pull-secret",
        "--verbose",
    ] {
        assert!(!help.contains(flag), "{flag} in: {help}");
    }
    assert_eq!(common::ggfs(&["help", "unmount"]), help);
    assert_eq!(common::ggfs(&["unmount", "-h"]), help);
    // Another verb keeps the registry flags.
    assert!(common::ggfs(&["ls", "--help"]).contains("--insecure"));
    // Unmounting what is no mount: one line naming it, exit status 1.
    let dir = common::tempdir();
    let out = ggfs_output(&["unmount", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(dir.path().to_str().unwrap()) && err.contains("not mounted"),
        "{err}"
    );
}

#[test]
fn mount_takes_platform_given_before_the_verb() {
    let reg = Distribution::start();
    let work = common::tempdir();
    let w = work.path();
    let layout = w.join("index-layout");
    common::index_two_platforms(&layout, "t");
    common::push_oci_layout(&layout, "t", &reg.reference("multi:t"));
    let mp = w.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp_s = mp.to_str().unwrap();
    let cache = w.join("cache");
    let cache_s = cache.to_str().unwrap();
    let platforms = || {
        let mut names: Vec<String> = std::fs::read_dir(mp.join("multi/t"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("linux-"))
            .collect();
        names.sort();
        names
    };
    let _guard = Unmount(mp.clone());
    common::ggfs(&["mount", reg.addr(), mp_s, "--cache-dir", cache_s]);
    assert_eq!(platforms(), ["linux-amd64", "linux-arm64"]);
    common::ggfs(&["unmount", mp_s]);
    let global = ["--platform", "linux/arm64"];
    let mount = ["mount", reg.addr(), mp_s, "--cache-dir", cache_s];
    common::ggfs(&[&global[..], &mount[..]].concat());
    assert_eq!(platforms(), ["linux-arm64"]);
    common::ggfs(&["unmount", mp_s]);
}
