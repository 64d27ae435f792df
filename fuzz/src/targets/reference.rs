//! The image reference grammar: `Reference::parse`, `Repository::parse`,
//! `Digest::parse`. What parses prints back to a string that parses to the
//! same value, and only valid names and tags get through.

use ggfs::reference::{is_valid_tag, repository_name_problem};
use ggfs::{Digest, Reference, Repository};

/// One input.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(s) {
        assert!(r.tag.is_some() || r.digest.is_some(), "{s:?}: {r:?}");
        if let Some(t) = &r.tag {
            assert!(is_valid_tag(t), "{s:?}: tag {t:?}");
        }
        assert_eq!(repository_name_problem(&r.repo.name), None, "{s:?}");
        assert!(!r.registry().is_empty(), "{s:?}");
        let shown = r.to_string();
        let again = Reference::parse(&shown)
            .unwrap_or_else(|e| panic!("{s:?} shows as {shown:?}, which fails: {e}"));
        assert_eq!(again, r, "{s:?} shows as {shown:?}");
        // The same repository, re-tagged or pinned, stays itself.
        let pinned = r.with_digest(Digest::of(data));
        assert_eq!(Reference::parse(&pinned.to_string()).unwrap(), pinned);
        let ident = r.identifier();
        assert!(!ident.is_empty());
        if let Ok(t) = r.with_tag("t") {
            assert_eq!(t.repo, r.repo);
        }
    }
    if let Ok(repo) = Repository::parse(s) {
        let shown = repo.to_string();
        let again = Repository::parse(&shown)
            .unwrap_or_else(|e| panic!("{s:?} shows as {shown:?}, which fails: {e}"));
        assert_eq!(again, repo, "{s:?} shows as {shown:?}");
        let made = Repository::new(&repo.registry, &repo.name).expect("a parsed name is valid");
        assert_eq!(made, repo);
    }
    if let Ok(d) = Digest::parse(s) {
        assert_eq!(d.as_str(), s);
        assert_eq!(format!("{}:{}", d.algorithm(), d.hex()), s);
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
    }
}
