//! `WWW-Authenticate` challenges (RFC 7235): the header a registry answers
//! 401 with, parsed into the scheme (Bearer, Basic) and its parameters
//! (realm, service, scope).

use std::collections::BTreeMap;

use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn one(h: &str) -> Challenge {
        let c = parse_challenges(h).unwrap_or_else(|e| panic!("{h}: {e}"));
        assert_eq!(c.len(), 1, "{h}: {c:?}");
        c.into_iter().next().unwrap()
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
}
