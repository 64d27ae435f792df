//! A token server after the distribution token-auth spec: GET with Basic
//! credentials and the OAuth2 POST form (grant_type=password and
//! refresh_token). Issues ES256 JWTs whose x5c header carries a self-signed
//! certificate the registry trusts through `rootcertbundle`. Records every
//! request so tests can assert on the scopes a client asked for.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;

use super::{run, tempdir};

const SERVICE: &str = "ggfs-test-registry";
const ISSUER: &str = "ggfs-test-token-issuer";

/// How the token server decides.
#[derive(Clone, Debug)]
pub struct TokenOptions {
    pub user: String,
    pub pass: String,
    /// Requests without credentials get the `pull` part of what they ask
    /// (like Docker Hub for public repositories); otherwise they get 401.
    pub anonymous_pull: bool,
    /// Repositories anonymous requests get no access to (private ones).
    pub private: Vec<String>,
    /// Token lifetime in seconds (distribution allows 60s of clock skew).
    pub expires_in: u64,
}

impl Default for TokenOptions {
    fn default() -> Self {
        TokenOptions {
            user: "alice".into(),
            pass: "secret".into(),
            anonymous_pull: false,
            private: Vec::new(),
            expires_in: 300,
        }
    }
}

/// One request the token server answered (or refused).
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// POST only: `password` or `refresh_token`.
    pub grant_type: Option<String>,
    /// The authenticated account, `None` when anonymous or refused.
    pub user: Option<String>,
    pub service: Option<String>,
    /// Scopes as sent, e.g. `repository:foo/bar:pull,push`.
    pub scopes: Vec<String>,
    /// Whether a token was issued.
    pub granted: bool,
}

struct State {
    opts: TokenOptions,
    key: jsonwebtoken::EncodingKey,
    cert_der_b64: String,
    log: Mutex<Vec<TokenRequest>>,
    refresh: Mutex<HashMap<String, String>>,
}

pub struct TokenServer {
    addr: String,
    dir: tempfile::TempDir,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TokenServer {
    /// Accepts `user`/`pass`, refuses anonymous requests.
    pub fn start(user: &str, pass: &str) -> TokenServer {
        Self::start_with(TokenOptions {
            user: user.into(),
            pass: pass.into(),
            ..TokenOptions::default()
        })
    }

    pub fn start_with(opts: TokenOptions) -> TokenServer {
        let dir = tempdir();
        let (key_pem, cert_pem) = make_cert(&dir);
        let state = Arc::new(State {
            opts,
            key: jsonwebtoken::EncodingKey::from_ec_pem(key_pem.as_bytes())
                .expect("parse generated EC key"),
            cert_der_b64: pem_body(&cert_pem),
            log: Mutex::new(Vec::new()),
            refresh: Mutex::new(HashMap::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let addr = listener.local_addr().expect("local addr").to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        std::thread::spawn(move || serve(listener, st, rx));
        TokenServer {
            addr,
            dir,
            state,
            shutdown: Some(tx),
        }
    }

    /// `127.0.0.1:PORT` of the token endpoint.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT/token`, the realm registries advertise.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn service(&self) -> &'static str {
        SERVICE
    }

    pub fn issuer(&self) -> &'static str {
        ISSUER
    }

    /// The PEM certificate a registry's `rootcertbundle` must name.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// All scopes asked for so far, in order, flattened.
    pub fn scopes(&self) -> Vec<String> {
        self.requests().into_iter().flat_map(|r| r.scopes).collect()
    }

    pub fn reset(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A P-256 key and a self-signed certificate for it, via the openssl CLI.
fn make_cert(dir: &tempfile::TempDir) -> (String, String) {
    let key = dir.path().join("key.pem");
    let cert = dir.path().join("cert.pem");
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650"])
        .args(["-subj", "/CN=ggfs-test-token-issuer", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    let read = |p: &PathBuf| std::fs::read_to_string(p).expect("read generated PEM");
    (read(&key), read(&cert))
}

/// The base64 body of a single-block PEM file (= standard base64 of the DER,
/// what a JWS `x5c` entry holds).
fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("token server runtime");
    rt.block_on(async move {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let app = axum::Router::new().route(
            "/token",
            axum::routing::any(move |m: Method, h: HeaderMap, u: Uri, b: Bytes| {
                let st = state.clone();
                async move { handle(&st, m, &h, &u, &b) }
            }),
        );
        let stop = async {
            let _ = shutdown.await;
        };
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await;
    });
}

fn handle(st: &State, method: Method, headers: &HeaderMap, uri: &Uri, body: &[u8]) -> Response {
    let form: Vec<(String, String)> = if method == Method::POST {
        url::form_urlencoded::parse(body).into_owned().collect()
    } else {
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect()
    };
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    // GET repeats `scope`; the OAuth2 form joins scopes with spaces.
    let scopes: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter(|s| !s.is_empty()).map(String::from))
        .collect();
    let mut req = TokenRequest {
        method: method.to_string(),
        grant_type: get("grant_type"),
        user: None,
        service: get("service"),
        scopes: scopes.clone(),
        granted: false,
    };
    let who = authenticate(st, &method, headers, &get);
    let resp = match who {
        Auth::Refused => unauthorized(),
        Auth::User(user) => {
            req.user = Some(user.clone());
            req.granted = true;
            let offline = get("access_type").as_deref() == Some("offline")
                || get("offline_token").as_deref() == Some("true")
                || get("grant_type").as_deref() == Some("refresh_token");
            issue(st, &user, &scopes, false, offline)
        }
        Auth::Anonymous => {
            req.granted = true;
            issue(st, "", &scopes, true, false)
        }
    };
    st.log.lock().unwrap().push(req);
    resp
}

enum Auth {
    User(String),
    Anonymous,
    Refused,
}

fn authenticate(
    st: &State,
    method: &Method,
    headers: &HeaderMap,
    get: &dyn Fn(&str) -> Option<String>,
) -> Auth {
    let ok = |u: &str, p: &str| u == st.opts.user && p == st.opts.pass;
    if *method == Method::POST {
        return match get("grant_type").as_deref() {
            Some("password") => match (get("username"), get("password")) {
                (Some(u), Some(p)) if ok(&u, &p) => Auth::User(u),
                _ => Auth::Refused,
            },
            Some("refresh_token") => {
                let known =
                    get("refresh_token").and_then(|t| st.refresh.lock().unwrap().get(&t).cloned());
                known.map_or(Auth::Refused, Auth::User)
            }
            _ => Auth::Refused,
        };
    }
    match basic_credentials(headers) {
        Some((u, p)) if ok(&u, &p) => Auth::User(u),
        Some(_) => Auth::Refused,
        None if st.opts.anonymous_pull => Auth::Anonymous,
        None => Auth::Refused,
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"ggfs-test\"")],
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
    )
        .into_response()
}

#[derive(Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

#[derive(Serialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

/// `type:name:actions`; the name may itself contain colons
/// (`repository:host:5000/x:pull` never occurs, but be lenient).
fn parse_scope(scope: &str, pull_only: bool) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions = actions
        .split(',')
        .filter(|a| !a.is_empty() && (!pull_only || *a == "pull"))
        .map(String::from)
        .collect();
    Some(Access {
        kind: kind.into(),
        name: name.into(),
        actions,
    })
}

fn issue(st: &State, user: &str, scopes: &[String], pull_only: bool, offline: bool) -> Response {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = Claims {
        iss: ISSUER.into(),
        sub: user.into(),
        aud: SERVICE.into(),
        exp: now + st.opts.expires_in,
        nbf: now.saturating_sub(5),
        iat: now,
        jti: random_hex(),
        access: scopes
            .iter()
            .filter_map(|s| parse_scope(s, pull_only))
            .filter(|a| !user.is_empty() || !st.opts.private.contains(&a.name))
            .collect(),
    };
    let mut head = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    head.x5c = Some(vec![st.cert_der_b64.clone()]);
    let token = jsonwebtoken::encode(&head, &claims, &st.key).expect("sign JWT");
    let mut body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": st.opts.expires_in,
        "issued_at": chrono::DateTime::from_timestamp(now as i64, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    });
    if offline {
        let refresh = random_hex();
        st.refresh
            .lock()
            .unwrap()
            .insert(refresh.clone(), user.to_string());
        body["refresh_token"] = refresh.into();
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
