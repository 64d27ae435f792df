//! Bearer tokens: asking a challenge's token realm for one (docker's GET
//! with Basic auth, or an OAuth2 POST), when to stop using it, and the
//! client's cache of them by registry and scope set.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{Challenge, Credential};
use crate::error::{Error, Result};

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

/// Bearer tokens by registry and scope set (the key: the registry, and the
/// sorted scopes joined by spaces). A map, not a TTL cache crate: each
/// token's lifetime is the server's `expires_in` ([`Token::is_fresh`]), a 401
/// drops it, and the keys are few (one per registry and scope set).
#[derive(Default)]
pub(crate) struct TokenCache(Mutex<HashMap<(String, String), Token>>);

impl TokenCache {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Token>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token cached under `key`, while it is fresh.
    pub(crate) fn fresh(&self, key: &(String, String)) -> Option<String> {
        let map = self.map();
        map.get(key)
            .filter(|t| t.is_fresh())
            .map(|t| t.token.clone())
    }

    /// Keep `token` under `key`, replacing any before it.
    pub(crate) fn insert(&self, key: (String, String), token: Token) {
        self.map().insert(key, token);
    }

    /// Drop the token under `key` (the registry refused it).
    pub(crate) fn forget(&self, key: &(String, String)) {
        self.map().remove(key);
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
    // The client's read timeout restarts with each piece: one that fires
    // means the token server stopped sending for the whole stall period.
    let failed = |e: reqwest::Error| match e.is_timeout() {
        true => "stalled: no bytes of the body within --timeout".to_string(),
        false => e.to_string(),
    };
    while let Some(chunk) = resp.chunk().await.map_err(failed)? {
        buf.extend_from_slice(&chunk);
        if buf.len() > limit {
            return Err(format!("body over {limit} bytes"));
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::auth::parse_challenges;

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
}
