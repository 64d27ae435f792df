//! `WWW-Authenticate` headers (`ggfs::registry::auth::parse_challenges`). What parses
//! is lower-cased where it must be, and re-serialized (every value quoted
//! and escaped) parses to the same challenges.

use ggfs::registry::auth::{parse_challenges, pick_challenge, Challenge};

fn quote(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn serialize(cs: &[Challenge]) -> String {
    cs.iter()
        .map(|c| {
            let params: Vec<String> = c
                .params
                .iter()
                .map(|(k, v)| format!("{k}={}", quote(v)))
                .collect();
            if params.is_empty() {
                c.scheme.clone()
            } else {
                format!("{} {}", c.scheme, params.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One input.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cs) = parse_challenges(s) else {
        return;
    };
    assert!(!cs.is_empty());
    for c in &cs {
        assert!(!c.scheme.is_empty(), "{s:?}");
        assert_eq!(c.scheme, c.scheme.to_ascii_lowercase(), "{s:?}");
        for k in c.params.keys() {
            assert!(!k.is_empty(), "{s:?}");
            assert_eq!(*k, k.to_ascii_lowercase(), "{s:?}");
        }
        let _ = (c.realm(), c.service(), c.scopes());
    }
    if let Some(p) = pick_challenge(&cs) {
        assert!(p.is_bearer() || p.is_basic());
    }
    let shown = serialize(&cs);
    let again = parse_challenges(&shown)
        .unwrap_or_else(|e| panic!("{s:?} re-serialized as {shown:?} fails: {e}"));
    assert_eq!(again, cs, "{s:?} re-serialized as {shown:?}");
}
