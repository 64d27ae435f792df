//! Names in the namespace: what a repository, tag, image or index
//! directory lists, and what a name in one of them is.

use ggfs::Digest;

use super::fs::{join, Inner, Key, Node};
use crate::lower::tree;
use crate::namespace::{children_of, valid_component, Art, Fail, Res};

impl Inner {
    /// An image's or index's entries. A tag's `rootfs` is writable, and so
    /// is that of each platform of an index a tag points at.
    pub(crate) fn entries(&self, key: &Key, repo: &str, art: &Art) -> Vec<(String, Key)> {
        let mut out = Self::art_entries(repo, art);
        let tag = match key {
            Key::Tag(_, tag) => tag.clone(),
            Key::TagChild(_, tag, name, _) => format!("{tag}/{name}"),
            _ => return out,
        };
        for (name, k) in out.iter_mut() {
            match k {
                Key::Manifest(r, d) if matches!(key, Key::Tag(..)) => {
                    *k = Key::TagManifest(r.clone(), tag.clone(), d.clone());
                }
                Key::Config(r, d) if matches!(key, Key::Tag(..)) => {
                    *k = Key::TagConfig(r.clone(), tag.clone(), d.clone());
                }
                Key::Rootfs(r, d) => {
                    let base = self.work_base(r, &tag).unwrap_or_else(|| d.clone());
                    *k = Key::WRootfs(r.clone(), tag.clone(), base);
                }
                Key::Art(r, child) if matches!(key, Key::Tag(..)) => {
                    *k = Key::TagChild(r.clone(), tag.clone(), name.clone(), child.clone());
                }
                _ => {}
            }
        }
        out
    }

    pub(crate) fn art_entries(repo: &str, art: &Art) -> Vec<(String, Key)> {
        let r = repo.to_string();
        let d = art.raw().digest.clone();
        let mut out = vec![
            ("manifest.json".into(), Key::Manifest(r.clone(), d.clone())),
            ("digest".into(), Key::DigestFile(r.clone(), d.clone())),
            ("referrers".into(), Key::Referrers(r.clone(), d.clone())),
        ];
        match art {
            Art::Image { .. } => {
                out.push(("config.json".into(), Key::Config(r.clone(), d.clone())));
                out.push(("blobs".into(), Key::Blobs(r.clone(), d.clone())));
                out.push(("rootfs".into(), Key::Rootfs(r, d)));
            }
            Art::Index { children, .. } => {
                for (name, child) in children {
                    out.push((name.clone(), Key::Art(r.clone(), child.clone())));
                }
            }
        }
        out
    }

    /// The entries of a namespace directory.
    pub(crate) async fn list(&self, key: &Key) -> Res<Vec<(String, Key)>> {
        if let Some((repo, d)) = self.art_digest(key).await? {
            let art = self.ns.artifact(&repo, &d).await?;
            let mut out = self.entries(key, &repo, &art);
            if let Key::Tag(repo, tag) = key {
                // A tag that is also a child repository's name: the image's
                // own entries win, the repository's children follow.
                let path = join(repo, tag);
                if valid_component(tag) && self.may_be_repo(&path).await {
                    for (n, k) in self.list_repo(&path).await {
                        if !out.iter().any(|(o, _)| *o == n) {
                            out.push((n, k));
                        }
                    }
                }
            }
            return Ok(out);
        }
        match key {
            Key::Root => {
                let mut out = vec![(".ggfs".to_string(), Key::Meta)];
                out.extend(self.list_repo("").await);
                Ok(out)
            }
            Key::Repo(path) => Ok(self.list_repo(path).await),
            Key::Referrers(repo, d) => {
                let refs = self.ns.referrers(repo, d).await?;
                let mut out = vec![(
                    "index.json".to_string(),
                    Key::ReferrersIndex(repo.clone(), d.clone()),
                )];
                for r in &refs.digests {
                    out.push((r.to_string(), Key::Art(repo.clone(), r.clone())));
                }
                Ok(out)
            }
            Key::NewTag(repo, tag) => Ok(vec![(
                "manifest.json".into(),
                Key::NewManifest(repo.clone(), tag.clone()),
            )]),
            Key::Meta => Ok(vec![
                ("ctl".into(), Key::Ctl),
                ("stats".into(), Key::Stats),
                ("status".into(), Key::Status),
            ]),
            Key::Blobs(repo, d) => {
                let image = self.image(repo, d).await?;
                let mut out = Vec::new();
                let cfg = image.manifest.config();
                let descs = std::iter::once(cfg).chain(image.manifest.layers().iter());
                for desc in descs {
                    if let Ok(bd) = ggfs::image::manifest::digest_of(desc) {
                        let name = bd.to_string();
                        if !out.iter().any(|(n, _)| *n == name) {
                            out.push((name, Key::Blob(repo.clone(), bd, desc.size())));
                        }
                    }
                }
                Ok(out)
            }
            _ => Err(Fail::new(libc::ENOTDIR, "not a directory")),
        }
    }

    /// Child repository names below `path` according to the catalog.
    pub(crate) async fn repo_children(&self, path: &str) -> Vec<String> {
        match self.ns.catalog().await {
            Ok(Some(cat)) => children_of(&cat, path),
            _ => Vec::new(),
        }
    }

    /// Whether `path` may be a repository or a prefix of one: per the
    /// catalog, or always when the registry does not list its catalog.
    pub(crate) async fn may_be_repo(&self, path: &str) -> bool {
        match self.ns.catalog().await {
            Ok(Some(cat)) => {
                let prefix = format!("{path}/");
                cat.iter().any(|r| r == path || r.starts_with(&prefix))
            }
            _ => true,
        }
    }

    /// Whether `path` itself may be a repository (not only a prefix of
    /// some): per the catalog, or always when there is none.
    pub(crate) async fn may_be_repo_itself(&self, path: &str) -> bool {
        if path.is_empty() {
            return false;
        }
        let prefix = format!("{path}/");
        match self.ns.catalog().await {
            Ok(Some(cat)) if cat.iter().any(|r| r == path) => true,
            // A known prefix; anything else may have been pushed since.
            Ok(Some(cat)) => !cat.iter().any(|r| r.starts_with(&prefix)),
            _ => true,
        }
    }

    /// Tags first; child repositories whose name is also a tag are shadowed.
    pub(crate) async fn list_repo(&self, path: &str) -> Vec<(String, Key)> {
        let mut out: Vec<(String, Key)> = Vec::new();
        if !path.is_empty() {
            if let Ok(tags) = self.ns.tags(path).await {
                for t in tags.iter() {
                    out.push((t.clone(), Key::Tag(path.to_string(), t.clone())));
                }
            }
        }
        for t in self.new_tags(path) {
            if !out.iter().any(|(n, _)| *n == t) {
                out.push((t.clone(), Key::NewTag(path.to_string(), t)));
            }
        }
        for c in self.repo_children(path).await {
            if !out.iter().any(|(n, _)| *n == c) {
                out.push((c.clone(), Key::Repo(join(path, &c))));
            }
        }
        out
    }

    /// Look `name` up in a namespace directory.
    pub(crate) async fn lookup_ns(&self, key: &Key, name: &str) -> Res<Node> {
        if let Key::Rootfs(repo, d) = key {
            let r = self.build_rootfs(repo, d).await?;
            let id = r
                .tree
                .child(tree::ROOT, name.as_bytes())
                .ok_or_else(|| Fail::noent(name))?;
            return Ok(Node::Tree(r, id));
        }
        if let Key::WRootfs(repo, tag, d) = key {
            let r = self.wrootfs(repo, tag, d).await?;
            let attr = r.lookup(r.root_ino, name.as_bytes())?;
            return Ok(Node::W(r, attr.ino));
        }
        if let Some((repo, d)) = self.art_digest(key).await? {
            let art = match name {
                // Its lazy layers open (footer, TOC) while the config loads.
                "rootfs" => {
                    let warm = self.warm(self.ns.seeded_layers(&repo, &d));
                    tokio::join!(self.ns.artifact(&repo, &d), warm).0
                }
                _ => self.ns.artifact(&repo, &d).await,
            }?;
            if let Some((_, k)) = self
                .entries(key, &repo, &art)
                .into_iter()
                .find(|(n, _)| n == name)
            {
                return Ok(Node::Ns(k));
            }
            return match key {
                Key::Tag(repo, tag)
                    if valid_component(tag) && self.may_be_repo(&join(repo, tag)).await =>
                {
                    self.lookup_repo(&join(repo, tag), name).await
                }
                _ => Err(Fail::noent(name)),
            };
        }
        match key {
            Key::Root if name == ".ggfs" => Ok(Node::Ns(Key::Meta)),
            Key::Root => self.lookup_child_repo("", name).await,
            Key::Referrers(..) | Key::Blobs(..) => self
                .list(key)
                .await?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, k)| Node::Ns(k))
                .ok_or_else(|| Fail::noent(name)),
            Key::NewTag(repo, tag) if name == "manifest.json" => {
                Ok(Node::Ns(Key::NewManifest(repo.clone(), tag.clone())))
            }
            Key::Meta if name == "stats" => Ok(Node::Ns(Key::Stats)),
            Key::Meta if name == "status" => Ok(Node::Ns(Key::Status)),
            Key::Meta if name == "ctl" => Ok(Node::Ns(Key::Ctl)),
            Key::Repo(path) => self.lookup_repo(path, name).await,
            _ if key.is_dir() => Err(Fail::noent(name)),
            _ => Err(Fail::new(libc::ENOTDIR, "not a directory")),
        }
    }

    pub(crate) async fn lookup_repo(&self, path: &str, name: &str) -> Res<Node> {
        if name.starts_with("sha256:") {
            let d = Digest::parse(name).map_err(|_| Fail::noent(name))?;
            self.ns.artifact(path, &d).await?;
            return Ok(Node::Ns(Key::Art(path.to_string(), d)));
        }
        // A tag the repository's fresh listing names is shown without a
        // request (`ls -la` of a repository was a manifest per tag, one
        // after another); its manifest comes at the first look inside.
        if self.ns.lists_tag(path, name) {
            return Ok(Node::Ns(Key::Tag(path.to_string(), name.to_string())));
        }
        // Else a tag is looked up by its manifest, which is wanted next
        // anyway: one request, and no listing of the repository's tags.
        let mut refused = None;
        if ggfs::reference::is_valid_tag(name) && self.may_be_repo_itself(path).await {
            match self.ns.resolve(path, name).await {
                Ok(_) => return Ok(Node::Ns(Key::Tag(path.to_string(), name.to_string()))),
                // Refused: a private tag, or no tag at all (Docker Hub
                // answers 401 for a repository that does not exist) where
                // a repository below may still be: looked for below.
                Err(f) if f.errno == libc::EACCES => refused = Some(f),
                // A registry that does not answer is no sign the name is a prefix.
                Err(f) if f.errno == libc::ETIMEDOUT => return Err(f),
                // Nor is one that answered with what we refuse (a manifest
                // over the size limit, not JSON, not the digest it claims):
                // that tag is broken, say so rather than hide it.
                Err(f) if f.errno == libc::EIO => {
                    tracing::warn!("{path}:{name}: {}", f.msg);
                    return Err(f);
                }
                Err(_) => {}
            }
        }
        if self.new_tags(path).iter().any(|t| t == name) {
            return Ok(Node::Ns(Key::NewTag(path.to_string(), name.to_string())));
        }
        if let Some(f) = refused {
            // Refused the tag, and no repository below by that name (none
            // listed, no tags of its own): the refusal is the answer, not
            // an empty prefix directory.
            let child = join(path, name);
            let listed = self.listed(path, name).await.ok().flatten();
            if self.ns.tags(&child).await.is_err() && listed != Some(true) {
                return Err(f);
            }
        }
        self.lookup_child_repo(path, name).await
    }

    /// Whether the catalog lists `name` (a repository, or a prefix of
    /// some) below `path`; `None` where the registry keeps it to itself.
    async fn listed(&self, path: &str, name: &str) -> Res<Option<bool>> {
        match self.ns.catalog().await {
            Ok(Some(cat)) => Ok(Some(children_of(&cat, path).iter().any(|c| c == name))),
            Err(f) if f.errno == libc::ETIMEDOUT => Err(f),
            _ => Ok(None),
        }
    }

    /// A child repository (or repository prefix). Listed ones exist; an
    /// unlisted one exists when it has tags, or when the registry keeps its
    /// catalog to itself (a prefix cannot be told from nothing then).
    pub(crate) async fn lookup_child_repo(&self, path: &str, name: &str) -> Res<Node> {
        if !valid_component(name) {
            return Err(Fail::noent(name));
        }
        let child = join(path, name);
        let listed = self.listed(path, name).await?;
        if listed == Some(true) || self.ns.tags(&child).await.is_ok() || listed.is_none() {
            return Ok(Node::Ns(Key::Repo(child)));
        }
        Err(Fail::noent(name))
    }
}

/// Directories' listings taken at a READDIR from offset 0, by inode, so
/// the pages after it neither rebuild the listing nor see it shift. With
/// no OPENDIR/RELEASEDIR (fuse.rs `opendir`) nothing says when a reader is
/// done: the last [`Listings::KEEP`] directories listed are kept.
#[derive(Default)]
pub(crate) struct Listings {
    map: std::collections::HashMap<u64, (u64, std::sync::Arc<crate::fuse::Entries>)>,
    seq: u64,
}

impl Listings {
    const KEEP: usize = 64;

    pub(crate) fn get(&self, ino: u64) -> Option<std::sync::Arc<crate::fuse::Entries>> {
        self.map.get(&ino).map(|(_, e)| e.clone())
    }

    pub(crate) fn put(&mut self, ino: u64, entries: std::sync::Arc<crate::fuse::Entries>) {
        self.seq += 1;
        self.map.insert(ino, (self.seq, entries));
        if self.map.len() > Self::KEEP {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (s, _))| *s)
                .map(|(i, _)| *i);
            if let Some(i) = oldest {
                self.map.remove(&i);
            }
        }
    }
}
