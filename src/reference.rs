//! Image references, parsed the way docker does:
//! `[registry[:port]/]repo/path[:tag][@sha256:hex]`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "index.docker.io";
/// The tag a reference gets when it names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;

/// A registry plus repository name, without tag or digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    /// Registry host\[:port\], normalized (`docker.io` becomes `index.docker.io`).
    pub registry: String,
    /// Repository path, `library/` added for Docker Hub's official images.
    pub name: String,
}

impl Repository {
    /// Parse `registry/repo` or a bare `repo` (Docker Hub).
    pub fn parse(s: &str) -> Result<Self> {
        match parse_parts(s)? {
            (repo, None, None) => Ok(repo),
            // `host:port` alone reads as the repository `host` tagged `port`.
            _ if !s.contains('/') && s.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) => {
                Err(bad(
                    s,
                    "that is a registry, not a repository: name one (HOST/REPO), or list them with `ggfs catalog HOST`",
                ))
            }
            _ => Err(bad(s, "a repository takes no tag or digest")),
        }
    }

    /// A repository on a known registry: `name` is checked against the grammar.
    pub fn new(registry: &str, name: &str) -> Result<Self> {
        validate_name(name, name)?;
        Ok(Self {
            registry: normalize_registry(registry),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A parsed reference. `tag` is `None` only when a digest was given without
/// a tag; with neither, the tag defaults to `latest`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry and repository.
    pub repo: Repository,
    /// The tag.
    pub tag: Option<String>,
    /// The digest pinned, when given.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parse `[registry/]repo[:tag][@digest]` the way docker does.
    pub fn parse(input: &str) -> Result<Self> {
        let (repo, tag, digest) = parse_parts(input)?;
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag,
        };
        Ok(Reference { repo, tag, digest })
    }

    /// The registry host\[:port\].
    pub fn registry(&self) -> &str {
        &self.repo.registry
    }

    /// The repository path.
    pub fn repository(&self) -> &str {
        &self.repo.name
    }

    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn identifier(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The same repository at `tag` (no digest).
    pub fn with_tag(&self, tag: &str) -> Result<Self> {
        validate_tag(tag, tag)?;
        Ok(Reference {
            repo: self.repo.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }

    /// The same repository pinned to `digest`.
    pub fn with_digest(&self, digest: Digest) -> Self {
        Reference {
            repo: self.repo.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

/// Split a reference into repository, tag and digest, with no defaults applied.
fn parse_parts(input: &str) -> Result<(Repository, Option<String>, Option<Digest>)> {
    if input.is_empty() {
        return Err(bad(input, "empty reference"));
    }
    let (rest, digest) = match input.split_once('@') {
        Some((rest, d)) => {
            let digest = Digest::parse(d).map_err(|e| bad(input, &e.to_string()))?;
            (rest, Some(digest))
        }
        None => (input, None),
    };
    // A ':' after the last '/' starts a tag; one before it is a port.
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        validate_tag(input, tag)?;
    }
    let (registry, path) = split_registry(name);
    if registry.is_empty() || path.is_empty() {
        return Err(bad(input, "empty registry or repository"));
    }
    validate_registry(input, registry)?;
    let registry = normalize_registry(registry);
    let path = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    validate_name(input, &path)?;
    let repo = Repository {
        registry,
        name: path,
    };
    Ok((repo, tag.map(str::to_string), digest))
}

/// `docker.io` and its aliases become `index.docker.io`.
pub fn normalize_registry(registry: &str) -> String {
    match registry {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => DOCKER_HUB.to_string(),
        r => r.to_string(),
    }
}

/// The first component names a registry only if it looks like a host:
/// it has a '.' or ':', is `localhost`, or has upper-case letters
/// (repository names cannot).
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

fn bad(input: &str, reason: &str) -> Error {
    Error::Reference {
        input: input.to_string(),
        reason: reason.to_string(),
    }
}

fn validate_registry(input: &str, registry: &str) -> Result<()> {
    let (host, port) = match registry.rsplit_once(':') {
        // An IPv6 literal like [::1] has colons inside brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (registry, None),
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                input,
                &format!("registry port {port:?} is not a number"),
            ));
        }
    }
    let ok_host = if host.starts_with('[') {
        host.ends_with(']')
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    };
    if !ok_host {
        return Err(bad(
            input,
            &format!("registry host {host:?} is not a valid host name"),
        ));
    }
    Ok(())
}

/// Repository path: components of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by '/'.
fn validate_name(input: &str, name: &str) -> Result<()> {
    match repository_name_problem(name) {
        Some(reason) => Err(bad(input, &reason)),
        None => Ok(()),
    }
}

/// What is wrong with a repository name (components of
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by '/', at most 255
/// characters), or `None` when it is valid. Shared with the registry server.
pub fn repository_name_problem(name: &str) -> Option<String> {
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "repository name longer than {MAX_NAME_LEN} characters"
        ));
    }
    let component = name.split('/').find(|c| !valid_component(c))?;
    Some(format!(
        "repository component {component:?} must be lower-case letters and digits, \
         separated by '.', '_', '__' or '-'"
    ))
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or any number of '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn validate_tag(input: &str, tag: &str) -> Result<()> {
    if !is_valid_tag(tag) {
        return Err(bad(
            input,
            &format!("tag {tag:?} must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"),
        ));
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, the distribution spec's tag.
pub fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn parts(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r = Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        (
            r.repo.registry,
            r.repo.name,
            r.tag,
            r.digest.map(|d| d.to_string()),
        )
    }

    #[test]
    fn docker_hub_defaults() {
        let hub = |n: &str, t: Option<&str>| {
            (
                DOCKER_HUB.to_string(),
                n.to_string(),
                t.map(str::to_string),
                None,
            )
        };
        assert_eq!(parts("ubuntu"), hub("library/ubuntu", Some("latest")));
        assert_eq!(parts("ubuntu:22.04"), hub("library/ubuntu", Some("22.04")));
        assert_eq!(
            parts("docker.io/ubuntu"),
            hub("library/ubuntu", Some("latest"))
        );
        assert_eq!(
            parts("index.docker.io/library/ubuntu:x"),
            hub("library/ubuntu", Some("x"))
        );
        assert_eq!(parts("bitnami/redis"), hub("bitnami/redis", Some("latest")));
        assert_eq!(parts("docker.io/a/b/c:t"), hub("a/b/c", Some("t")));
    }

    #[test]
    fn registries_ports_and_digests() {
        assert_eq!(
            parts("localhost:5000/foo/bar:v1"),
            (
                "localhost:5000".into(),
                "foo/bar".into(),
                Some("v1".into()),
                None
            )
        );
        assert_eq!(
            parts("localhost/foo"),
            (
                "localhost".into(),
                "foo".into(),
                Some("latest".into()),
                None
            )
        );
        assert_eq!(
            parts(&format!("127.0.0.1:5000/x@{D}")),
            ("127.0.0.1:5000".into(), "x".into(), None, Some(D.into()))
        );
        assert_eq!(
            parts(&format!("gcr.io/p/x:t@{D}")),
            (
                "gcr.io".into(),
                "p/x".into(),
                Some("t".into()),
                Some(D.into())
            )
        );
        // A first component without '.', ':' or "localhost" is part of the path.
        assert_eq!(parts("foo/bar").0, DOCKER_HUB);
        // ...unless it has upper case, which only a host can have.
        assert_eq!(parts("Foo/bar").0, "Foo");
        assert_eq!(parts("[::1]:5000/x").0, "[::1]:5000");
        // Separators inside components.
        assert_eq!(parts("a.b/c__d/e-----f/g.h_i").1, "c__d/e-----f/g.h_i");
    }

    #[test]
    fn errors_name_the_wrong_part() {
        let err = |s: &str| Reference::parse(s).unwrap_err().to_string();
        assert!(err("").contains("empty"));
        assert!(err("UPPER").contains("repository component"));
        assert!(err("foo:bad tag").contains("tag"));
        assert!(err("foo:-x").contains("tag"));
        assert!(err(&format!("foo:{}", "a".repeat(129))).contains("tag"));
        assert!(err("foo@sha256:abc").contains("64 hex digits"));
        assert!(err("foo@md5:abc").contains("algorithm"));
        assert!(err("localhost:abc/foo:x").contains("port"));
        assert!(err("a..b/x").contains("host"));
        assert!(err("foo//bar").contains("component"));
        assert!(err("foo/bar_").contains("component"));
        assert!(err("foo/a___b").contains("component"));
        assert!(err(&format!("x.io/{}", "a".repeat(256))).contains("longer"));
        assert!(err("x.io/").contains("empty"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "localhost:5000/a/b:c",
            &format!("x.io/y@{D}"),
            "index.docker.io/library/busybox:latest",
        ] {
            assert_eq!(Reference::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            Repository::parse("docker.io/busybox").unwrap().to_string(),
            "index.docker.io/library/busybox"
        );
        assert!(Repository::parse("busybox:1").is_err());
    }
}
