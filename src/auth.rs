//! Registry authentication: `WWW-Authenticate` challenges, the docker/podman
//! keychain (config.json `auths`, `credHelpers`, `credsStore`, podman's
//! auth.json), the token endpoint (GET with Basic, or OAuth2 POST), and the
//! `login`/`logout`/`get` helpers behind the CLI.
//!
//! Secrets never reach logs: [`Credential`] and [`Token`] redact themselves
//! in `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::reference::DOCKER_HUB;

/// The key docker uses for Docker Hub in config.json and with helpers.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

// ---------------------------------------------------------------------------
// WWW-Authenticate challenges (RFC 7235)
// ---------------------------------------------------------------------------

/// One challenge from a `WWW-Authenticate` header. `scheme` is lower-cased,
/// parameter names too; values are unquoted and unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased: `bearer`, `basic`, ...
    pub scheme: String,
    /// Parameters by lower-cased name, values unquoted.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// The value of parameter `name` (lower-case).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
    /// A `Bearer` challenge: get a token from `realm`.
    pub fn is_bearer(&self) -> bool {
        self.scheme == "bearer"
    }
    /// A `Basic` challenge: send the credential itself.
    pub fn is_basic(&self) -> bool {
        self.scheme == "basic"
    }
    /// Where to get a bearer token.
    pub fn realm(&self) -> Option<&str> {
        self.param("realm")
    }
    /// The `service` to name in the token request.
    pub fn service(&self) -> Option<&str> {
        self.param("service")
    }
    /// The scopes the challenge asks for (space-separated in the header).
    pub fn scopes(&self) -> Vec<String> {
        self.param("scope")
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

/// Parse every challenge in a `WWW-Authenticate` header value.
// Hand-written rather than `http_auth::parse_challenges` (0.1.10): that
// parser agrees with this one on quoting, escapes, commas inside quotes,
// several challenges and malformed input, but rejects the whole header when
// any challenge carries a token68 (`Negotiate abc+/def==`, allowed by RFC
// 7235 section 2.1), which would turn a usable Bearer challenge beside it into
// an auth failure. fuzz/src/bin/auth.rs checks this one round-trips.
pub fn parse_challenges(header: &str) -> Result<Vec<Challenge>> {
    let mut p = HeaderParser {
        s: header.as_bytes(),
        pos: 0,
        header,
    };
    let mut out = Vec::new();
    loop {
        p.skip(|b| b == b',' || is_ws(b));
        if p.done() {
            break;
        }
        let scheme = p.token();
        if scheme.is_empty() {
            return Err(p.error("expected an auth scheme"));
        }
        let params = p.params()?;
        out.push(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        });
    }
    if out.is_empty() {
        return Err(p.error("no challenge"));
    }
    Ok(out)
}

/// The challenge to act on: Bearer preferred over Basic; others ignored.
pub fn pick_challenge(challenges: &[Challenge]) -> Option<&Challenge> {
    challenges
        .iter()
        .find(|c| c.is_bearer())
        .or_else(|| challenges.iter().find(|c| c.is_basic()))
}

struct HeaderParser<'a> {
    s: &'a [u8],
    pos: usize,
    header: &'a str,
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)
}

impl HeaderParser<'_> {
    fn done(&self) -> bool {
        self.pos >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }
    fn skip(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
    }
    fn token(&mut self) -> String {
        let start = self.pos;
        self.skip(is_tchar);
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }
    fn error(&self, reason: &str) -> Error {
        Error::invalid(
            format!("WWW-Authenticate header {:?}", self.header),
            format!("{reason} at byte {}", self.pos),
        )
    }

    /// `name=value` pairs after a scheme, or a token68. Stops before a comma
    /// that starts the next challenge (a token not followed by `=`).
    fn params(&mut self) -> Result<BTreeMap<String, String>> {
        let mut params = BTreeMap::new();
        loop {
            self.skip(is_ws);
            let save = self.pos;
            let name = self.token();
            self.skip(is_ws);
            if name.is_empty() || self.peek() != Some(b'=') {
                self.pos = save;
                if params.is_empty() && !name.is_empty() {
                    self.token68();
                }
                return Ok(params);
            }
            self.pos += 1;
            if self.peek() == Some(b'=') || self.done() {
                // `abc==`: a token68 with padding, not a parameter.
                self.pos = save;
                self.token68();
                return Ok(params);
            }
            self.skip(is_ws);
            let value = if self.peek() == Some(b'"') {
                self.quoted()?
            } else {
                self.token()
            };
            params.insert(name.to_ascii_lowercase(), value);
            self.skip(is_ws);
            match self.peek() {
                None => return Ok(params),
                Some(b',') => {
                    if !self.next_is_param() {
                        return Ok(params);
                    }
                    self.pos += 1;
                }
                Some(_) => return Err(self.error("expected ',' after a parameter")),
            }
        }
    }

    /// After a comma: does a `name=` follow (same challenge) or a scheme?
    fn next_is_param(&mut self) -> bool {
        let save = self.pos;
        self.skip(|b| b == b',' || is_ws(b));
        let name = self.token();
        self.skip(is_ws);
        let param = !name.is_empty() && self.peek() == Some(b'=');
        self.pos = save;
        param
    }

    fn token68(&mut self) {
        self.skip(is_tchar);
        self.skip(|b| b == b'=');
    }

    fn quoted(&mut self) -> Result<String> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated quoted string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = self
                        .peek()
                        .ok_or_else(|| self.error("unterminated escape"))?;
                    out.push(c);
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Credentials and the keychain
// ---------------------------------------------------------------------------

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Username and password: Basic auth, or exchanged for a token.
    Basic {
        /// The account name.
        username: String,
        /// Its password (or a personal access token).
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in config.json, or a helper
    /// answering user `<token>`).
    IdentityToken {
        /// The account name, when the config or helper gave one.
        username: Option<String>,
        /// The refresh token.
        token: String,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
            Credential::IdentityToken { username, .. } => {
                write!(
                    f,
                    "IdentityToken {{ username: {username:?}, token: <redacted> }}"
                )
            }
        }
    }
}

impl Credential {
    /// The `Authorization` value for Basic auth, if this is a password.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credential::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Credential::IdentityToken { .. } => None,
        }
    }
}

/// Where credentials are looked up. `from_env` follows docker and podman.
#[derive(Clone, Debug, Default)]
pub struct Keychain {
    /// docker config.json files, first match wins.
    pub docker_configs: Vec<PathBuf>,
    /// podman/containers auth.json files, consulted after docker's.
    pub auth_files: Vec<PathBuf>,
    /// Kubernetes pull secrets, consulted before the files, first match wins.
    pub pull_secrets: Vec<PullSecret>,
}

/// The credentials of a Kubernetes image pull secret: the `auths` of its
/// `.dockerconfigjson` (or the map of a legacy `.dockercfg`), looked up as
/// config.json's are. Credential helpers are never run on a secret's say.
#[derive(Clone)]
pub struct PullSecret {
    origin: String,
    config: ConfigFile,
}

impl std::fmt::Debug for PullSecret {
    /// The origin and registries, never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullSecret")
            .field("origin", &self.origin)
            .field("registries", &self.config.auths.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PullSecret {
    /// A `.dockerconfigjson` document (`{"auths": {REGISTRY: {...}}}`), or
    /// with `legacy` a `.dockercfg` one (`{REGISTRY: {...}}`); `origin`
    /// names it in errors.
    pub fn parse(origin: &str, json: &[u8], legacy: bool) -> Result<Self> {
        let bad =
            |e: serde_json::Error| Error::invalid(format!("pull secret {origin}"), e.to_string());
        let auths = if legacy {
            serde_json::from_slice(json).map_err(bad)?
        } else {
            #[derive(Deserialize)]
            struct Doc {
                auths: BTreeMap<String, AuthEntry>,
            }
            serde_json::from_slice::<Doc>(json).map_err(bad)?.auths
        };
        Ok(PullSecret {
            origin: origin.to_string(),
            config: ConfigFile {
                auths,
                ..ConfigFile::default()
            },
        })
    }

    /// The registries (config keys) it holds credentials for.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.config.auths.keys().map(String::as_str)
    }
}

/// The directory holding docker's config.json: $DOCKER_CONFIG or ~/.docker.
pub fn docker_config_dir() -> Option<PathBuf> {
    std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")))
}

/// docker's config.json path.
pub fn docker_config_path() -> Option<PathBuf> {
    docker_config_dir().map(|d| d.join("config.json"))
}

impl Keychain {
    /// docker's config.json, then podman's auth.json: $REGISTRY_AUTH_FILE,
    /// or $XDG_RUNTIME_DIR/containers/auth.json and
    /// ~/.config/containers/auth.json.
    pub fn from_env() -> Self {
        let docker_configs = docker_config_path().into_iter().collect();
        let mut auth_files = Vec::new();
        if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
            auth_files.push(PathBuf::from(f));
        } else {
            if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
                auth_files.push(Path::new(&d).join("containers/auth.json"));
            }
            if let Some(h) = std::env::var_os("HOME") {
                auth_files.push(Path::new(&h).join(".config/containers/auth.json"));
            }
        }
        Keychain {
            docker_configs,
            auth_files,
            pull_secrets: Vec::new(),
        }
    }

    /// A keychain reading one docker config directory (tests, `--config`).
    pub fn docker_dir(dir: impl AsRef<Path>) -> Self {
        Keychain {
            docker_configs: vec![dir.as_ref().join("config.json")],
            ..Keychain::default()
        }
    }

    /// An empty keychain: every registry is anonymous.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// Credentials for `registry` (host\[:port\]); `repo` lets podman's
    /// namespaced keys (`quay.io/org`) match. `None` means anonymous.
    pub fn resolve(&self, registry: &str, repo: Option<&str>) -> Result<Option<Credential>> {
        for secret in &self.pull_secrets {
            let origin = Path::new(&secret.origin);
            if let Some(c) = secret.config.credential(origin, registry, repo)? {
                return Ok(Some(c));
            }
        }
        // docker's config.json knows no namespaced keys: only podman's files get `repo`.
        let docker = self.docker_configs.iter().map(|p| (p, None));
        let podman = self.auth_files.iter().map(|p| (p, repo));
        for (path, repo) in docker.chain(podman) {
            let Some(cfg) = ConfigFile::load(path)? else {
                continue;
            };
            if let Some(c) = cfg.credential(path, registry, repo)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

#[derive(Deserialize, Default, Clone)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

/// The registry a config.json key names: scheme and path dropped, Docker
/// Hub aliases folded into `index.docker.io`.
pub fn key_registry(key: &str) -> String {
    let k = strip_scheme(key).unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    crate::reference::normalize_registry(host)
}

/// Does a config key name a whole registry (`host`, `https://host/v1/`),
/// as opposed to podman's `host/namespace`? Keys with a scheme are docker's
/// URL form, whatever their path.
pub fn is_registry_key(key: &str) -> bool {
    strip_scheme(key).is_some() || !key.trim_end_matches('/').contains('/')
}

fn strip_scheme(key: &str) -> Option<&str> {
    key.strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
}

/// Does config key `key` stand for the whole of (normalised) `registry`?
fn names_registry(key: &str, registry: &str) -> bool {
    is_registry_key(key) && key_registry(key) == registry
}

/// The key docker writes for a registry (Docker Hub's is special).
pub fn registry_key(registry: &str) -> String {
    if crate::reference::normalize_registry(registry) == DOCKER_HUB {
        DOCKER_HUB_KEY.to_string()
    } else {
        registry.to_string()
    }
}

impl ConfigFile {
    fn load(path: &Path) -> Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path.display().to_string(), e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::invalid(
                format!("credentials file {}", path.display()),
                e.to_string(),
            )
        })
    }

    fn credential(
        &self,
        path: &Path,
        registry: &str,
        repo: Option<&str>,
    ) -> Result<Option<Credential>> {
        let registry = crate::reference::normalize_registry(registry);
        if let Some(helper) = self.helper_for(&registry) {
            return helper_get(helper, &registry);
        }
        if let Some(entry) = self.entry_for(&registry, repo) {
            if let Some(c) = entry_credential(path, &registry, entry)? {
                return Ok(Some(c));
            }
        }
        match &self.creds_store {
            Some(store) if !store.is_empty() => helper_get(store, &registry),
            _ => Ok(None),
        }
    }

    fn helper_for(&self, registry: &str) -> Option<&str> {
        self.cred_helpers
            .iter()
            .find(|(k, v)| !v.is_empty() && key_registry(k) == registry)
            .map(|(_, v)| v.as_str())
    }

    /// The most specific matching `auths` key: `registry/repo/path` prefixes
    /// (podman) before the bare registry.
    fn entry_for(&self, registry: &str, repo: Option<&str>) -> Option<&AuthEntry> {
        if let Some(repo) = repo {
            let mut path = format!("{registry}/{repo}");
            loop {
                if let Some(e) = self.auths.get(&path) {
                    return Some(e);
                }
                match path.rfind('/') {
                    Some(i) if i > registry.len() => path.truncate(i),
                    _ => break,
                }
            }
        }
        if let Some(e) = self.auths.get(registry) {
            return Some(e);
        }
        self.auths
            .iter()
            .find(|(k, _)| names_registry(k, registry))
            .map(|(_, e)| e)
    }
}

fn entry_credential(path: &Path, registry: &str, e: &AuthEntry) -> Result<Option<Credential>> {
    if let Some(token) = e.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        let username = match e.auth.as_deref().map(decode_auth).transpose() {
            Ok(up) => up.map(|(u, _)| u).or_else(|| e.username.clone()),
            Err(_) => e.username.clone(),
        };
        return Ok(Some(Credential::IdentityToken {
            username,
            token: token.clone(),
        }));
    }
    if let Some(auth) = e.auth.as_ref().filter(|a| !a.is_empty()) {
        let (username, password) = decode_auth(auth).map_err(|reason| {
            Error::invalid(
                format!("credentials for {registry} in {}", path.display()),
                reason,
            )
        })?;
        return Ok(Some(Credential::Basic { username, password }));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credential::Basic {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// Decode config.json's `auth`: base64 of `user:password`, padding optional.
fn decode_auth(auth: &str) -> std::result::Result<(String, String), String> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let raw = engine
        .decode(auth.trim())
        .map_err(|e| format!("`auth` is not base64: {e}"))?;
    let s = String::from_utf8(raw).map_err(|_| "`auth` is not UTF-8".to_string())?;
    let (u, p) = s
        .split_once(':')
        .ok_or_else(|| "`auth` must decode to user:password".to_string())?;
    Ok((u.to_string(), p.to_string()))
}

/// The server address a helper is asked about.
fn helper_server(registry: &str) -> String {
    registry_key(registry)
}

/// `docker-credential-<helper> get`. "credentials not found" is anonymous.
fn helper_get(helper: &str, registry: &str) -> Result<Option<Credential>> {
    let server = helper_server(registry);
    let cfg = serde_json::json!({ "credHelpers": { server.clone(): helper } });
    let reader = std::io::Cursor::new(cfg.to_string());
    use docker_credential::{CredentialRetrievalError as E, DockerCredential as D};
    match docker_credential::get_credential_from_reader(reader, &server) {
        Ok(D::UsernamePassword(username, password)) => {
            Ok(Some(Credential::Basic { username, password }))
        }
        Ok(D::IdentityToken(token)) => Ok(Some(Credential::IdentityToken {
            username: None,
            token,
        })),
        Err(E::HelperFailure { stdout, stderr, .. })
            if (stdout.clone() + &stderr)
                .to_lowercase()
                .contains("credentials not found") =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::auth(
            registry,
            format!(
                "credential helper docker-credential-{helper}: {}",
                first_line(&e.to_string())
            ),
        )),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Run `docker-credential-<helper> <verb>` with `input` on stdin.
fn helper_run(helper: &str, verb: &str, input: &str) -> Result<String> {
    let name = format!("docker-credential-{helper}");
    let ctx = || format!("credential helper {name} {verb}");
    let mut child = Command::new(&name)
        .arg(verb)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(ctx(), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| Error::io(ctx(), e))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::io(ctx(), e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        return Err(Error::invalid(ctx(), msg.trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    /// The token to send as `Authorization: Bearer`.
    pub token: String,
    /// When to fetch a new one (a little before the server's expiry).
    pub expires: Instant,
    /// A new refresh token, when the server handed one out.
    pub refresh_token: Option<String>,
    /// The lifetime in seconds the server gave, if it gave one.
    pub expires_in: Option<u64>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Token {{ <redacted>, expires in {:?} }}",
            self.expires.saturating_duration_since(Instant::now())
        )
    }
}

impl Token {
    /// True until `expires`.
    pub fn is_fresh(&self) -> bool {
        Instant::now() < self.expires
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
    refresh_token: Option<String>,
}

/// Docker's minimum token lifetime, used when the server names none.
const DEFAULT_TOKEN_LIFETIME: u64 = 60;
/// Stop using a token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;
/// Tries at the token endpoint on 5xx, 429 and connection failures.
const TOKEN_ATTEMPTS: u32 = 3;

/// Ask the token realm for a token covering `scopes`. With an identity token
/// this is an OAuth2 refresh POST; with a password a GET with Basic auth
/// (falling back to an OAuth2 password POST when GET is not allowed);
/// anonymous otherwise. A plain-http realm is refused unless it is on
/// loopback, or `allow_http` (the registry itself is spoken to over http)
/// and the realm is the registry's own host or no credential goes there.
pub async fn fetch_token(
    http: &reqwest::Client,
    registry: &str,
    challenge: &Challenge,
    scopes: &[String],
    cred: Option<&Credential>,
    allow_http: bool,
) -> Result<Token> {
    let realm = token_realm(registry, challenge, allow_http, cred.is_some())?;
    let endpoint = TokenEndpoint {
        http,
        realm: &realm,
        service: challenge.service().unwrap_or(registry),
        scopes,
    };
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        let r = endpoint.request(cred).await;
        let transient = match &r {
            Ok(resp) => resp.status().is_server_error() || resp.status().as_u16() == 429,
            // No retry mends a certificate.
            Err(e) => {
                (e.is_connect() || e.is_timeout())
                    && crate::registry::certificate_problem(e).is_none()
            }
        };
        if !transient || attempt >= TOKEN_ATTEMPTS {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    .map_err(|e| {
        let origin = realm.origin().ascii_serialization();
        let why = match crate::registry::certificate_problem(&e) {
            Some(p) => format!("TLS certificate not accepted: {p}"),
            None => e.without_url().to_string(),
        };
        Error::auth(registry, format!("token request to {origin}: {why}"))
    })?;
    parse_token_response(registry, &realm, resp).await
}

/// The challenge's realm, if it may be asked: https; http on loopback; http
/// when the registry itself is spoken to over http, but with credentials
/// only on the registry's own host (`--insecure` trusts that registry's
/// link, not wherever its challenge points).
fn token_realm(
    registry: &str,
    challenge: &Challenge,
    allow_http: bool,
    with_credentials: bool,
) -> Result<url::Url> {
    let realm = challenge
        .realm()
        .ok_or_else(|| Error::auth(registry, "Bearer challenge names no realm"))?;
    let url = url::Url::parse(realm)
        .map_err(|e| Error::auth(registry, format!("token realm {realm:?}: {e}")))?;
    let loopback = url.host_str().is_some_and(crate::registry::is_loopback);
    let registry_host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    let same_host = url.host_str() == Some(registry_host.trim_matches(['[', ']']));
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback || (allow_http && (same_host || !with_credentials)) => Ok(url),
        "http" if allow_http => Err(Error::auth(
            registry,
            format!(
                "token realm {realm:?} is plain http on another host: credentials for {registry} are not sent there in clear text"
            ),
        )),
        _ => Err(Error::auth(
            registry,
            format!("token realm {realm:?} is not https (credentials would travel in clear text)"),
        )),
    }
}

/// A token realm and what every request to it carries.
struct TokenEndpoint<'a> {
    http: &'a reqwest::Client,
    realm: &'a url::Url,
    service: &'a str,
    scopes: &'a [String],
}

impl TokenEndpoint<'_> {
    /// One token request in the form the credential calls for.
    async fn request(&self, cred: Option<&Credential>) -> reqwest::Result<reqwest::Response> {
        match cred {
            Some(Credential::IdentityToken { token, .. }) => {
                self.oauth_post("refresh_token", &[("refresh_token", token)])
                    .await
            }
            Some(Credential::Basic { username, password }) => match self.get(cred).await {
                Ok(r) if matches!(r.status().as_u16(), 404 | 405) => {
                    let extra = [("username", username), ("password", password)];
                    self.oauth_post("password", &extra).await
                }
                other => other,
            },
            None => self.get(None).await,
        }
    }

    /// Docker's token GET, with Basic auth when there is a password.
    async fn get(&self, cred: Option<&Credential>) -> reqwest::Result<reqwest::Response> {
        let mut url = self.realm.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("service", self.service);
            for s in self.scopes {
                q.append_pair("scope", s);
            }
        }
        let mut req = self.http.get(url);
        if let Some(h) = cred.and_then(Credential::basic_header) {
            req = req.header(reqwest::header::AUTHORIZATION, h);
        }
        req.send().await
    }

    /// An OAuth2 token POST with `grant` and its own fields.
    async fn oauth_post(
        &self,
        grant: &str,
        extra: &[(&str, &String)],
    ) -> reqwest::Result<reqwest::Response> {
        // Built in its own scope: the serializer is not Send, so it must be
        // gone before the await.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", grant)
                .append_pair("service", self.service)
                .append_pair("client_id", "ggfs")
                .append_pair("scope", &self.scopes.join(" "));
            for (k, v) in extra {
                form.append_pair(k, v);
            }
            form.finish()
        };
        self.http
            .post(self.realm.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
    }
}

async fn parse_token_response(
    registry: &str,
    realm: &url::Url,
    resp: reqwest::Response,
) -> Result<Token> {
    let status = resp.status();
    let origin = realm.origin().ascii_serialization();
    let body = read_capped(resp, MAX_TOKEN_RESPONSE)
        .await
        .map_err(|e| Error::auth(registry, format!("token response from {origin}: {e}")))?;
    if !status.is_success() {
        let detail = String::from_utf8_lossy(&body[..body.len().min(300)])
            .trim()
            .to_string();
        return Err(Error::auth(
            registry,
            format!("token server {origin} answered {status}: {detail}"),
        ));
    }
    let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
        Error::auth(
            registry,
            format!("token response from {origin} is not JSON: {e}"),
        )
    })?;
    let token = t
        .token
        .or(t.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Error::auth(
                registry,
                format!("token response from {origin} holds no token"),
            )
        })?;
    let life = Duration::from_secs(t.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME).max(1));
    let expires = Instant::now() + life.saturating_sub(TOKEN_MARGIN).max(life / 2);
    Ok(Token {
        token,
        expires,
        refresh_token: t.refresh_token,
        expires_in: t.expires_in,
    })
}

/// Read a response body, refusing more than `limit` bytes.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    limit: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        buf.extend_from_slice(&chunk);
        if buf.len() > limit {
            return Err(format!("body over {limit} bytes"));
        }
    }
    Ok(buf)
}

// ---------------------------------------------------------------------------
// login / logout / get
// ---------------------------------------------------------------------------

/// Check `user`/`pass` against `registry`, then store them: in the
/// credential helper config.json names for it, else in config.json `auths`.
/// Returns where they went.
pub async fn login(registry: &str, user: &str, pass: &str) -> Result<String> {
    let client = crate::registry::Client::new(crate::registry::ClientOptions::default())?;
    login_with(&client, registry, user, pass).await
}

/// [`login`] with a configured client (insecure registries and so on).
pub async fn login_with(
    client: &crate::registry::Client,
    registry: &str,
    user: &str,
    pass: &str,
) -> Result<String> {
    let registry = crate::reference::normalize_registry(registry);
    let cred = Credential::Basic {
        username: user.to_string(),
        password: pass.to_string(),
    };
    client.check_credential(&registry, &cred).await?;
    store(&registry, user, pass)
}

/// Store credentials without checking them.
pub fn store(registry: &str, user: &str, pass: &str) -> Result<String> {
    let path = config_path_for_write()?;
    let mut cfg = load_json(&path)?;
    let key = registry_key(registry);
    if let Some(helper) = helper_name(&cfg, registry) {
        let input = serde_json::json!({"ServerURL": key, "Username": user, "Secret": pass});
        helper_run(&helper, "store", &input.to_string())?;
        return Ok(format!("docker-credential-{helper}"));
    }
    let obj = as_object(&mut cfg, &path)?;
    let auths = obj.entry("auths").or_insert_with(|| serde_json::json!({}));
    let auths = auths
        .as_object_mut()
        .ok_or_else(|| Error::invalid(path.display().to_string(), "`auths` is not an object"))?;
    // Drop other spellings of the same registry so the new entry wins.
    let norm = crate::reference::normalize_registry(registry);
    auths.retain(|k, _| !names_registry(k, &norm));
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    auths.insert(key, serde_json::json!({ "auth": encoded }));
    save_json(&path, &cfg)?;
    Ok(path.display().to_string())
}

/// Forget the credentials stored for `registry`. `Ok(false)` when none were.
pub fn logout(registry: &str) -> Result<bool> {
    let path = config_path_for_write()?;
    let mut cfg = load_json(&path)?;
    let erased = match helper_name(&cfg, registry) {
        Some(helper) => {
            helper_run(&helper, "erase", &registry_key(registry))?;
            true
        }
        None => false,
    };
    let norm = crate::reference::normalize_registry(registry);
    let obj = as_object(&mut cfg, &path)?;
    let Some(auths) = obj.get_mut("auths").and_then(|a| a.as_object_mut()) else {
        return Ok(erased);
    };
    let before = auths.len();
    auths.retain(|k, _| !names_registry(k, &norm));
    let removed = auths.len() != before;
    if removed {
        save_json(&path, &cfg)?;
    }
    Ok(removed || erased)
}

/// What a docker credential helper's `get` prints.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HelperCredentials {
    /// The registry the credential is for.
    #[serde(rename = "ServerURL")]
    pub server_url: String,
    /// Account name (`<token>` for an identity token).
    pub username: String,
    /// Password or identity token.
    pub secret: String,
}

/// The stored credentials for `registry`, in credential-helper form
/// (`{"ServerURL":..,"Username":..,"Secret":..}`); identity tokens have
/// username `<token>`. Anonymous registries answer the helpers' error.
pub fn get(registry: &str) -> Result<HelperCredentials> {
    let server_url = registry_key(registry);
    let cred = Keychain::from_env().resolve(registry, None)?;
    match cred {
        Some(Credential::Basic { username, password }) => Ok(HelperCredentials {
            server_url,
            username,
            secret: password,
        }),
        Some(Credential::IdentityToken { token, .. }) => Ok(HelperCredentials {
            server_url,
            username: "<token>".into(),
            secret: token,
        }),
        None => Err(Error::NotFound(format!("credentials for {registry}"))),
    }
}

fn config_path_for_write() -> Result<PathBuf> {
    docker_config_path()
        .ok_or_else(|| Error::invalid("docker config", "neither $DOCKER_CONFIG nor $HOME is set"))
}

fn helper_name(cfg: &serde_json::Value, registry: &str) -> Option<String> {
    let norm = crate::reference::normalize_registry(registry);
    let from_helpers = cfg
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| {
            h.iter()
                .find(|(k, _)| key_registry(k) == norm)
                .and_then(|(_, v)| v.as_str().map(str::to_string))
        });
    from_helpers
        .or_else(|| {
            cfg.get("credsStore")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|s| !s.is_empty())
}

fn load_json(path: &Path) -> Result<serde_json::Value> {
    match std::fs::read(path) {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Ok(serde_json::json!({})),
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::invalid(path.display().to_string(), e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::json!({})),
        Err(e) => Err(Error::io(path.display().to_string(), e)),
    }
}

fn as_object<'a>(
    v: &'a mut serde_json::Value,
    path: &Path,
) -> Result<&'a mut serde_json::Map<String, serde_json::Value>> {
    v.as_object_mut()
        .ok_or_else(|| Error::invalid(path.display().to_string(), "not a JSON object"))
}

/// Write atomically with owner-only permissions: it holds secrets.
fn save_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let ctx = || path.display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(ctx(), e))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".config.json-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(ctx(), e))?;
    let text = serde_json::to_vec_pretty(v).map_err(|e| Error::invalid(ctx(), e.to_string()))?;
    tmp.write_all(&text).map_err(|e| Error::io(ctx(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(ctx(), e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(ctx(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(h: &str) -> Challenge {
        let c = parse_challenges(h).unwrap_or_else(|e| panic!("{h}: {e}"));
        assert_eq!(c.len(), 1, "{h}: {c:?}");
        c.into_iter().next().unwrap()
    }

    #[test]
    fn plain_http_realms_get_credentials_only_on_the_registrys_own_host() {
        let realm = |r: &str| parse_challenges(&format!("Bearer realm=\"{r}\",service=s")).unwrap();
        let ok = |reg: &str, r: &str, insecure: bool, cred: bool| {
            token_realm(reg, &realm(r)[0], insecure, cred).is_ok()
        };
        // https anywhere; http on loopback.
        assert!(ok(
            "reg.example:5000",
            "https://auth.example/token",
            false,
            true
        ));
        assert!(ok(
            "reg.example:5000",
            "http://127.0.0.1:9/token",
            false,
            true
        ));
        // --insecure: http to the registry's own host, with or without a
        // password; to another host only anonymously.
        assert!(ok(
            "reg.example:5000",
            "http://reg.example:5001/token",
            true,
            true
        ));
        assert!(ok(
            "reg.example:5000",
            "http://auth.example/token",
            true,
            false
        ));
        let err = token_realm(
            "reg.example:5000",
            &realm("http://auth.example/token")[0],
            true,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("another host") && err.contains("auth.example"),
            "{err}"
        );
        // Without --insecure no http realm off loopback.
        assert!(!ok(
            "reg.example:5000",
            "http://reg.example/token",
            false,
            false
        ));
    }

    #[test]
    fn bearer_with_params() {
        let c = one(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
        );
        assert!(c.is_bearer());
        assert_eq!(c.realm(), Some("https://auth.docker.io/token"));
        assert_eq!(c.service(), Some("registry.docker.io"));
        assert_eq!(c.scopes(), vec!["repository:library/ubuntu:pull"]);
    }

    #[test]
    fn odd_inputs() {
        // Case-insensitive scheme and names, spaces around '=', unquoted tokens.
        let c = one(r#"BEARER Realm = "http://x/t" , SERVICE=reg.io"#);
        assert!(c.is_bearer());
        assert_eq!(c.realm(), Some("http://x/t"));
        assert_eq!(c.service(), Some("reg.io"));
        // Commas and escapes inside quotes.
        let c = one(
            r#"Bearer realm="http://x/t?a=1,b=2",scope="repository:a:pull,push repository:b:pull",error="say \"hi\" \\ ok""#,
        );
        assert_eq!(c.realm(), Some("http://x/t?a=1,b=2"));
        assert_eq!(
            c.scopes(),
            vec!["repository:a:pull,push", "repository:b:pull"]
        );
        assert_eq!(c.param("error"), Some(r#"say "hi" \ ok"#));
        // Bare scheme, token68, trailing commas.
        let c = one("Basic");
        assert!(c.is_basic() && c.params.is_empty());
        let c = one("Negotiate abc+/def==,");
        assert_eq!(c.scheme, "negotiate");
        assert!(c.params.is_empty());
        // Empty quoted value.
        assert_eq!(one(r#"Basic realm="""#).realm(), Some(""));
    }

    #[test]
    fn several_challenges() {
        let cs = parse_challenges(
            r#"Basic realm="Registry Realm", Bearer realm="https://a/t",service="s", Negotiate"#,
        )
        .unwrap();
        assert_eq!(cs.len(), 3);
        assert_eq!(cs[0].realm(), Some("Registry Realm"));
        assert_eq!(cs[1].service(), Some("s"));
        assert_eq!(cs[2].scheme, "negotiate");
        assert!(pick_challenge(&cs).unwrap().is_bearer());
        let cs = parse_challenges("Digest a=b, Basic realm=x").unwrap();
        assert!(pick_challenge(&cs).unwrap().is_basic());
    }

    #[test]
    fn malformed_headers_are_errors() {
        for bad in [
            "",
            "  ,, ",
            r#"Bearer realm="unterminated"#,
            r#"Bearer realm="x\"#,
            "Bearer realm=x garbage=",
            "=x",
        ] {
            assert!(parse_challenges(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn write(dir: &Path, name: &str, v: serde_json::Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn keychain_auths() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "config.json",
            serde_json::json!({"auths": {
                "https://index.docker.io/v1/": {"auth": b64("hub:pw")},
                "http://localhost:5000": {"auth": b64("me:p:with:colons").trim_end_matches('=')},
                "reg.io": {"username": "u", "password": "p"},
                "tok.io": {"auth": b64("tu:"), "identitytoken": "refresh"},
                "bad.io": {"auth": "!!!"},
            }}),
        );
        let k = Keychain::docker_dir(dir.path());
        let basic = |u: &str, p: &str| {
            Some(Credential::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(k.resolve("docker.io", None).unwrap(), basic("hub", "pw"));
        assert_eq!(
            k.resolve("index.docker.io", None).unwrap(),
            basic("hub", "pw")
        );
        assert_eq!(
            k.resolve("localhost:5000", None).unwrap(),
            basic("me", "p:with:colons")
        );
        assert_eq!(k.resolve("reg.io", None).unwrap(), basic("u", "p"));
        assert_eq!(
            k.resolve("tok.io", None).unwrap(),
            Some(Credential::IdentityToken {
                username: Some("tu".into()),
                token: "refresh".into()
            })
        );
        assert_eq!(k.resolve("other.io", None).unwrap(), None);
        let err = k.resolve("bad.io", None).unwrap_err().to_string();
        assert!(err.contains("bad.io") && err.contains("base64"), "{err}");
        // Secrets stay out of Debug output.
        assert!(!format!("{:?}", basic("hub", "pw")).contains("pw"));
        // A missing file is anonymous, a broken one an error naming it.
        assert_eq!(
            Keychain::docker_dir(dir.path().join("nope"))
                .resolve("reg.io", None)
                .unwrap(),
            None
        );
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        assert!(k
            .resolve("reg.io", None)
            .unwrap_err()
            .to_string()
            .contains("config.json"));
    }

    #[test]
    fn podman_namespaced_keys_and_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let auth = write(
            dir.path(),
            "auth.json",
            serde_json::json!({"auths": {
                "quay.io": {"auth": b64("top:1")},
                "quay.io/org": {"auth": b64("org:2")},
            }}),
        );
        let k = Keychain {
            auth_files: vec![auth],
            ..Keychain::default()
        };
        let user = |r: &str, repo: Option<&str>| match k.resolve(r, repo).unwrap() {
            Some(Credential::Basic { username, .. }) => username,
            other => panic!("{other:?}"),
        };
        assert_eq!(user("quay.io", Some("org/app")), "org");
        assert_eq!(user("quay.io", Some("other/app")), "top");
        assert_eq!(user("quay.io", None), "top");

        // A helper that is not installed is a clear error naming it.
        let cfg = write(
            dir.path(),
            "config.json",
            serde_json::json!({"credHelpers": {"h.io": "ggfs-test-missing"}}),
        );
        let k = Keychain {
            docker_configs: vec![cfg],
            ..Keychain::default()
        };
        let err = k.resolve("h.io", None).unwrap_err().to_string();
        assert!(err.contains("docker-credential-ggfs-test-missing"), "{err}");
    }

    #[test]
    fn key_forms() {
        assert_eq!(key_registry(DOCKER_HUB_KEY), "index.docker.io");
        assert_eq!(
            key_registry("https://registry-1.docker.io"),
            "index.docker.io"
        );
        assert_eq!(key_registry("http://localhost:5000/v2/"), "localhost:5000");
        assert_eq!(registry_key("docker.io"), DOCKER_HUB_KEY);
        assert_eq!(registry_key("ghcr.io"), "ghcr.io");
    }
}
