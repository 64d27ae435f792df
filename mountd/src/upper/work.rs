//! Writable trees: each tag's rootfs on the base its changes started from,
//! those left changed by an earlier mount, and the requests of `ggfs
//! commit` and `ggfs status`.

use std::sync::Arc;

use fuser::FileAttr;
use ggfs::Digest;

use crate::commit::{self as journal, Journal};
use crate::namespace::fs::{Inner, Key, Node, FOREVER};
use crate::namespace::{Fail, Res};
use crate::upper::rootfs::{RootFs, SetAttr, Work, WRITABLE_RANGE};
use crate::upper::Upper;

impl Inner {
    /// The writable rootfs of `repo:tag` on `base`: the base's merged tree
    /// (shared with its read-only rootfs) and an upper directory, made on
    /// the first change, in the journal directory of that tag.
    pub async fn wrootfs(&self, repo: &str, tag: &str, base: &Digest) -> Res<Arc<RootFs>> {
        let key = (repo.to_string(), tag.to_string(), base.clone());
        self.wrootfs
            .get(&key, FOREVER, self.ns.neg_ttl, || async {
                let ro = self.build_rootfs(repo, base).await?;
                let registry = self.ns.registry_name();
                let dir = journal::work_dir(self.cache.root(), &registry, repo, tag);
                // A platform of an index: which index the changes start from.
                let index = match tag.split_once('/') {
                    Some((t, _)) => Some(self.ns.resolve(repo, t).await?),
                    None => None,
                };
                let j = Journal::open(&dir, &registry, (repo, tag), base.clone(), index);
                let key = Key::WRootfs(repo.into(), tag.into(), base.clone());
                let root_ino = self.ino(key.clone());
                let mut inodes = self.lock();
                let b = inodes.place(&key, WRITABLE_RANGE);
                self.ns.stats.tree_built();
                let first_free = b + ro.tree.nodes.len() as u64;
                let log = inodes.log.clone().map(|l| (l, b));
                let known = inodes.uppers.remove(&b).unwrap_or_default();
                let work = Work::new(Upper::new(&dir), j, first_free, log, known);
                let r = Arc::new(RootFs {
                    tree: ro.tree.clone(),
                    layers: ro.layers.clone(),
                    base: b,
                    root_ino,
                    w: Some(work),
                    used: crate::upper::rootfs::now_secs().into(),
                });
                inodes.trees.insert(b, r.clone());
                drop(inodes);
                let k = (repo.to_string(), tag.to_string());
                let mut work = self.work.lock().unwrap_or_else(|p| p.into_inner());
                let keep = work
                    .get(&k)
                    .is_some_and(|old| old.w.as_ref().is_some_and(|w| w.journal.materialized()));
                if !keep {
                    work.insert(k.clone(), r.clone());
                    self.recovered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&k);
                }
                Ok(r)
            })
            .await
    }

    /// The base of the changes made to `repo:tag`, if there are any.
    pub(crate) fn work_base(&self, repo: &str, tag: &str) -> Option<Digest> {
        let k = (repo.to_string(), tag.to_string());
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = work.get(&k).and_then(|r| r.w.as_ref()) {
            if w.journal.materialized() {
                return Some(w.journal.saved().base);
            }
        }
        drop(work);
        let rec = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
        rec.get(&k).cloned()
    }

    /// Every writable tree with changes, opening those an earlier mount left.
    pub async fn writables(&self) -> Vec<Arc<RootFs>> {
        let left: Vec<((String, String), Digest)> = {
            let rec = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
            rec.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        for ((repo, tag), base) in left {
            if let Err(f) = self.wrootfs(&repo, &tag, &base).await {
                tracing::warn!(
                    "changes to {repo}:{tag} left by an earlier mount: {}",
                    f.msg
                );
            }
        }
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        work.values()
            .filter(|r| r.w.as_ref().is_some_and(|w| w.journal.materialized()))
            .cloned()
            .collect()
    }

    pub(crate) fn status(&self) -> String {
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines: Vec<String> = work
            .values()
            .filter_map(|r| r.w.as_ref())
            .filter(|w| w.journal.materialized())
            .map(|w| w.journal.line())
            .collect();
        drop(work);
        let rec = self.recovered.lock().unwrap_or_else(|p| p.into_inner());
        for ((repo, tag), base) in rec.iter() {
            lines.push(format!(
                "pending {repo}:{tag} base={base} pushed=- (not opened yet)"
            ));
        }
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// The writable tree behind `ino`, if it is in one (or its root).
    pub(crate) async fn writable(&self, ino: u64) -> Res<Option<Arc<RootFs>>> {
        Ok(match self.node(ino)? {
            Node::W(r, _) => Some(r),
            Node::Ns(Key::WRootfs(repo, tag, base)) => {
                Some(self.wrootfs(&repo, &tag, &base).await?)
            }
            _ => None,
        })
    }

    /// The writable tree behind `ino`, or EROFS.
    pub(crate) async fn must_write(&self, ino: u64) -> Res<Arc<RootFs>> {
        self.writable(ino).await?.ok_or_else(|| {
            Fail::new(
                libc::EROFS,
                "read-only: only a tag's rootfs/ takes changes (images by digest and the namespace do not)",
            )
        })
    }

    /// Serve a `ggfs commit` request.
    pub(crate) async fn control(&self, request: &[u8]) -> journal::Reply {
        let req: journal::Request = match serde_json::from_slice(request) {
            Ok(r) => r,
            Err(e) => return journal::Reply::error(format!("bad request: {e}")),
        };
        let path = req.path.trim_matches('/');
        let path = path.strip_suffix("/rootfs").unwrap_or(path);
        let Some((repo, tag)) = self.image_dir(path).await else {
            return journal::Reply::error(format!(
                "{path:?} is not an image directory (REPO/TAG, or REPO/TAG/PLATFORM of an index)"
            ));
        };
        let (repo, tag) = (repo.as_str(), tag.as_str());
        let base = match self.work_base(repo, tag) {
            Some(b) => b,
            None => match self.current_base(repo, tag).await {
                Ok(d) => d,
                Err(f) => return journal::Reply::error(format!("{repo}:{tag}: {}", f.msg)),
            },
        };
        match self.wrootfs(repo, tag, &base).await {
            Ok(r) => journal::commit(self, &r, &req).await,
            Err(f) => journal::Reply::error(format!("{repo}:{tag}: {}", f.msg)),
        }
    }

    /// `REPO/TAG` or `REPO/TAG/PLATFORM` (of an index) → (repo, tag), where a
    /// platform's "tag" is `TAG/PLATFORM`.
    async fn image_dir(&self, path: &str) -> Option<(String, String)> {
        let (head, last) = path.rsplit_once('/')?;
        if let Some((repo, tag)) = head.rsplit_once('/') {
            let key = format!("{tag}/{last}");
            if self.work_base(repo, &key).is_some() || self.current_base(repo, &key).await.is_ok() {
                return Some((repo.to_string(), key));
            }
        }
        Some((head.to_string(), last.to_string()))
    }

    /// What `repo:tag` (or `TAG/PLATFORM`) shows now, in the registry.
    async fn current_base(&self, repo: &str, tag: &str) -> Res<Digest> {
        let Some((t, platform)) = tag.split_once('/') else {
            return self.ns.resolve(repo, tag).await;
        };
        let index = self.ns.resolve(repo, t).await?;
        match &*self.ns.artifact(repo, &index).await? {
            crate::namespace::Art::Index { children, .. } => children
                .iter()
                .find(|(name, _)| name == platform)
                .map(|(_, d)| d.clone())
                .ok_or_else(|| Fail::noent(format!("{repo}:{t} platform {platform}"))),
            _ => Err(Fail::noent(format!("{repo}:{t} is not an index"))),
        }
    }

    /// Indexes this mount pushed to `repo:tag` (commits of its platforms).
    pub(crate) fn pushed_indexes(&self, repo: &str, tag: &str) -> Vec<Digest> {
        let work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("{tag}/");
        work.iter()
            .filter(|((r, t), _)| r == repo && t.starts_with(&prefix))
            .filter_map(|(_, rf)| rf.w.as_ref()?.journal.pushed_index())
            .collect()
    }

    /// Run a change on the writable tree behind `ino`, holding its lock.
    pub(crate) async fn change<T>(&self, ino: u64, f: impl FnOnce(&RootFs) -> Res<T>) -> Res<T> {
        let r = self.must_write(ino).await?;
        let _g = r.w.as_ref().expect("writable").lock.write().await;
        tokio::task::block_in_place(|| f(&r))
    }

    pub async fn setattr(&self, ino: u64, a: SetAttr) -> Res<FileAttr> {
        let r = self.must_write(ino).await?;
        let _g = r.w.as_ref().expect("writable").lock.write().await;
        if a.size.is_some_and(|s| s > 0) && r.bytes_below(ino) {
            r.bring_up(ino).await?;
        }
        tokio::task::block_in_place(|| r.setattr(ino, &a))
    }

    /// The writable tree `ino` is in, if it is built (nothing to wait for).
    pub(crate) fn built_writable(&self, ino: u64) -> Option<Arc<RootFs>> {
        match self.node(ino).ok()? {
            Node::W(r, _) => Some(r),
            Node::Ns(Key::WRootfs(repo, tag, base)) => self.wrootfs.peek(&(repo, tag, base)),
            _ => None,
        }
    }

    /// Run a change on this thread when `ino`'s tree is built and no commit
    /// holds it: local file system work, not worth a hand-off to the
    /// runtime (each costs wake-ups). `Err(f)` gives `f` back otherwise.
    pub(crate) fn change_now<T, F>(&self, ino: u64, f: F) -> Result<Res<T>, F>
    where
        F: FnOnce(&RootFs) -> Res<T>,
    {
        let Some(r) = self.built_writable(ino) else {
            return Err(f);
        };
        let Some(w) = &r.w else { return Err(f) };
        let out = match w.lock.try_write() {
            Ok(_g) => Ok(f(&r)),
            Err(_) => Err(f),
        };
        out
    }

    /// A built writable tree's attributes, on this thread. An open file
    /// keeps its attributes after its last name is gone.
    pub(crate) fn getattr_w(&self, r: &RootFs, ino: u64, fh: Option<u64>) -> Res<FileAttr> {
        match r.getattr(ino) {
            Err(e) => match fh.and_then(|fh| self.handle(fh)).as_deref() {
                Some(crate::handles::Handle::Upper(f, _)) => {
                    let md = f
                        .metadata()
                        .map_err(|e| crate::upper::rootfs::io_fail("fstat", e))?;
                    Ok(crate::upper::rootfs::attr_of(ino, &md))
                }
                _ => Err(e),
            },
            ok => ok,
        }
    }
}
