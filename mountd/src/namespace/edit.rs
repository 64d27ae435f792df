//! Writes to a tag's own files, as registry operations: writing
//! `manifest.json` tags the manifest written (blobs the repository lacks
//! are mounted from the repositories this mount has read); writing
//! `config.json` pushes the image with that config (its `rootfs` must stay
//! as it is); `mkdir REPO/NEWTAG` makes a tag directory that exists once a
//! manifest is written into it. The bytes are buffered and pushed when the
//! writer closes the file, whose close then reports how it went.

use std::sync::Mutex;

use bytes::Bytes;
use ggfs::image::bytes_stream;
use ggfs::image::manifest::Parsed;
use ggfs::{Digest, RawManifest};
use serde_json::Value;

use crate::namespace::fs::{Inner, Key};
use crate::namespace::{Fail, Res};

/// An open `manifest.json` or `config.json` of a tag being written.
pub struct Edit {
    pub repo: String,
    pub tag: String,
    /// The manifest the tag showed when the file was opened (none: new tag).
    pub base: Option<Digest>,
    pub config: bool,
    /// A file copied into `referrers/`: its name (the tag is unused).
    pub attach: Option<String>,
    pub buf: Mutex<Vec<u8>>,
    pub dirty: Mutex<bool>,
}

/// What a file copied into `referrers/` becomes (no type of its own is
/// known: `ggfs attach --artifact-type` gives one).
const ARTIFACT_TYPE: &str = "application/vnd.ggfs.file";
const FILE_MEDIA_TYPE: &str = "application/octet-stream";

fn invalid(what: impl std::fmt::Display) -> Fail {
    Fail::new(libc::EINVAL, what.to_string())
}

impl Edit {
    pub fn write(&self, offset: u64, data: &[u8]) -> u32 {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset as usize + data.len();
        if buf.len() < end {
            buf.resize(end, 0);
        }
        buf[offset as usize..end].copy_from_slice(data);
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = true;
        data.len() as u32
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Inner {
    /// Tags made with mkdir in `repo`, not pushed yet.
    pub(crate) fn new_tags(&self, repo: &str) -> Vec<String> {
        let t = self.new_tags.lock().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .filter(|(r, _)| r == repo)
            .map(|(_, tag)| tag.clone())
            .collect()
    }

    /// `mkdir REPO/TAG`: a directory to write a manifest into.
    pub(crate) async fn mkdir_tag(&self, repo: &str, tag: &str) -> Res<Key> {
        if !ggfs::reference::is_valid_tag(tag) {
            return Err(invalid(format!("{tag:?} is not a valid tag")));
        }
        if self
            .ns
            .tags(repo)
            .await
            .is_ok_and(|t| t.iter().any(|x| x == tag))
        {
            return Err(Fail::new(libc::EEXIST, format!("{repo}:{tag} exists")));
        }
        let mut t = self.new_tags.lock().unwrap_or_else(|p| p.into_inner());
        t.insert((repo.to_string(), tag.to_string()));
        Ok(Key::NewTag(repo.to_string(), tag.to_string()))
    }

    /// `rmdir REPO/TAG`: the tag goes from the registry, with the mount
    /// option --allow-delete and no uncommitted changes to its rootfs.
    pub(crate) async fn delete_tag(&self, repo: &str, tag: &str) -> Res<()> {
        if !self.ns.allow_delete {
            return Err(Fail::new(
                libc::EROFS,
                format!("{repo}:{tag}: deleting tags needs the mount option --allow-delete"),
            ));
        }
        if self
            .ns
            .tags(repo)
            .await
            .is_ok_and(|t| !t.iter().any(|x| x == tag))
        {
            return Err(Fail::new(libc::EROFS, format!("{repo}/{tag} is not a tag")));
        }
        if self.work_base(repo, tag).is_some() {
            return Err(Fail::new(
                libc::EBUSY,
                format!("{repo}:{tag}: its rootfs has changes not committed"),
            ));
        }
        self.ns.delete_tag(repo, tag).await?;
        tracing::info!("deleted {repo}:{tag}");
        Ok(())
    }

    pub(crate) fn rmdir_tag(&self, repo: &str, tag: &str) -> bool {
        let mut t = self.new_tags.lock().unwrap_or_else(|p| p.into_inner());
        t.remove(&(repo.to_string(), tag.to_string()))
    }

    /// Open a tag's file for writing; `truncate`: start from nothing.
    pub(crate) async fn open_edit(&self, key: &Key, truncate: bool) -> Res<Option<Edit>> {
        let (repo, tag, base, config) = match key {
            Key::TagManifest(r, t, d) => (r, t, Some(d.clone()), false),
            Key::TagConfig(r, t, d) => (r, t, Some(d.clone()), true),
            Key::NewManifest(r, t) => (r, t, None, false),
            _ => return Ok(None),
        };
        let now = match (&base, truncate) {
            (Some(_), false) => {
                let plain = key.plain().expect("a tag's file");
                self.read_ns(&plain, 0, u32::MAX).await?.to_vec()
            }
            _ => Vec::new(),
        };
        Ok(Some(Edit {
            repo: repo.clone(),
            tag: tag.clone(),
            base,
            config,
            attach: None,
            buf: Mutex::new(now),
            dirty: Mutex::new(false),
        }))
    }

    /// On close: push what was written.
    pub(crate) async fn apply_edit(&self, e: &Edit) -> Res<()> {
        {
            let mut dirty = e.dirty.lock().unwrap_or_else(|p| p.into_inner());
            if !*dirty {
                return Ok(());
            }
            *dirty = false;
        }
        let bytes = e.bytes();
        if let Some(name) = &e.attach {
            return self.attach(e, name, bytes).await;
        }
        let raw = if e.config {
            self.config_image(e, bytes).await?
        } else {
            RawManifest::new(Bytes::from(bytes), None)
                .map_err(|err| invalid(format!("manifest.json of {}:{}: {err}", e.repo, e.tag)))?
        };
        self.check_present(&e.repo, &raw).await?;
        let pushed = async {
            self.ns.sink(&e.repo)?.put_manifest(&raw, None).await?;
            self.ns.put_tag(&e.repo, &e.tag, &raw).await
        };
        pushed.await.map_err(|err| {
            Fail::new(
                libc::EIO,
                format!("tagging {}:{} as {}: {err}", e.repo, e.tag, raw.digest),
            )
        })?;
        self.rmdir_tag(&e.repo, &e.tag);
        tracing::info!("{}:{} is now {}", e.repo, e.tag, raw.digest);
        Ok(())
    }

    /// `cp FILE MOUNT/<repo>/<tag>/referrers/`: a file in `referrers/` being
    /// written, attached to `subject` at close.
    pub(crate) fn open_attach(&self, repo: &str, subject: &Digest, name: &str) -> (Key, Edit) {
        let key = Key::Attaching(repo.to_string(), subject.clone(), name.to_string());
        let edit = Edit {
            repo: repo.to_string(),
            tag: String::new(),
            base: Some(subject.clone()),
            config: false,
            attach: Some(name.to_string()),
            buf: Mutex::new(Vec::new()),
            dirty: Mutex::new(true),
        };
        (key, edit)
    }

    /// Push `bytes` as an artifact (titled `name`) whose subject is `e.base`.
    async fn attach(&self, e: &Edit, name: &str, bytes: Vec<u8>) -> Res<()> {
        let subject = e.base.as_ref().expect("an attachment has a subject");
        let what = format!("attaching {name} to {}@{subject}", e.repo);
        let io = |err: ggfs::Error| Fail::new(libc::EIO, format!("{what}: {err}"));
        let art = self.ns.artifact(&e.repo, subject).await?;
        let sink = self.ns.sink(&e.repo).map_err(io)?;
        let empty = Bytes::from_static(ggfs::image::attach::EMPTY);
        ggfs::image::attach::put_if_missing(sink.as_ref(), &Digest::of(&empty), empty)
            .await
            .map_err(io)?;
        let (digest, size) = (Digest::of(&bytes), bytes.len() as u64);
        ggfs::image::attach::put_if_missing(sink.as_ref(), &digest, bytes.into())
            .await
            .map_err(io)?;
        let layer = ggfs::image::attach::file_layer(FILE_MEDIA_TYPE, &digest, size, Some(name));
        let raw = ggfs::image::attach::manifest(
            art.raw(),
            ARTIFACT_TYPE,
            vec![layer],
            Default::default(),
        )
        .map_err(io)?;
        sink.put_manifest(&raw, None).await.map_err(io)?;
        self.ns.forget_referrers(&e.repo, subject);
        tracing::info!("{what}: {}", raw.digest);
        Ok(())
    }

    /// The image of `e`'s tag with `config` as its config, the config blob
    /// pushed.
    async fn config_image(&self, e: &Edit, config: Vec<u8>) -> Res<RawManifest> {
        let what = format!("config.json of {}:{}", e.repo, e.tag);
        if self.work_base(&e.repo, &e.tag).is_some() {
            return Err(Fail::new(
                libc::EBUSY,
                format!("{what}: its rootfs has changes not committed: ggfs commit them first"),
            ));
        }
        let base = e.base.as_ref().expect("a config belongs to an image");
        let image = self.image(&e.repo, base).await?;
        let new: Value =
            serde_json::from_slice(&config).map_err(|err| invalid(format!("{what}: {err}")))?;
        let old: Value = serde_json::from_slice(&image.config)
            .map_err(|err| invalid(format!("{what} as it was: {err}")))?;
        if new["rootfs"] != old["rootfs"] {
            return Err(invalid(format!(
                "{what}: rootfs (the layers' DiffIDs) must stay as it is"
            )));
        }
        let digest = Digest::of(&config);
        let size = config.len() as u64;
        let sink = self.ns.sink(&e.repo)?;
        let push = async {
            if !sink.has_blob(&digest).await? {
                sink.put_blob(&digest, size, bytes_stream(config.into()))
                    .await?;
            }
            Ok::<_, ggfs::Error>(())
        };
        push.await
            .map_err(|err| Fail::new(libc::EIO, format!("{what}: pushing it: {err}")))?;
        let mut m: Value = serde_json::from_slice(&image.raw.bytes)
            .map_err(|err| invalid(format!("manifest of {}:{}: {err}", e.repo, e.tag)))?;
        m["config"]["digest"] = digest.as_str().into();
        m["config"]["size"] = size.into();
        let bytes = serde_json::to_vec(&m).map_err(|err| invalid(err.to_string()))?;
        RawManifest::new(bytes.into(), Some(&image.raw.media_type))
            .map_err(|err| invalid(format!("{what}: {err}")))
    }

    /// Every blob (or, for an index, every manifest) `raw` names is in
    /// `repo`: blobs found in another repository this mount has read are
    /// mounted from it.
    async fn check_present(&self, repo: &str, raw: &RawManifest) -> Res<()> {
        let io = |err: ggfs::Error| Fail::new(libc::EIO, err.to_string());
        let parsed = raw.parse().map_err(|err| invalid(err.to_string()))?;
        let sink = self.ns.sink(repo).map_err(io)?;
        let (blobs, children) = match &parsed {
            Parsed::Image(m) => {
                let descs = std::iter::once(m.config()).chain(m.layers().iter());
                (descs.cloned().collect::<Vec<_>>(), Vec::new())
            }
            Parsed::Index(i) => (Vec::new(), i.manifests().clone()),
        };
        for desc in blobs {
            let d =
                ggfs::image::manifest::digest_of(&desc).map_err(|err| invalid(err.to_string()))?;
            if sink.has_blob(&d).await.map_err(io)? || self.mount_from_known(repo, &d).await {
                continue;
            }
            return Err(Fail::new(
                libc::ENOENT,
                format!("blob {d} is neither in {repo} nor in a repository this mount has read"),
            ));
        }
        for desc in children {
            let d =
                ggfs::image::manifest::digest_of(&desc).map_err(|err| invalid(err.to_string()))?;
            if self
                .ns
                .tag_digest(repo, d.as_str())
                .await
                .map_err(io)?
                .is_none()
            {
                return Err(Fail::new(
                    libc::ENOENT,
                    format!("manifest {d} of the index is not in {repo}"),
                ));
            }
        }
        Ok(())
    }

    async fn mount_from_known(&self, repo: &str, d: &Digest) -> bool {
        for from in self.ns.known_repos() {
            if from != repo && self.ns.mount_blob(repo, d, &from).await.unwrap_or(false) {
                return true;
            }
        }
        false
    }
}
