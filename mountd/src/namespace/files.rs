//! The bytes of the namespace's files: manifests, configs, digests, the
//! stats, blobs (whole from the cache, or by Range from a plain layer's
//! verified blocks), symlink targets and extended attributes.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ggfs::{Digest, Error};

use super::fs::{slice, Inner, Key, Node};
use crate::lower::cache;
use crate::lower::tree;
use crate::namespace::{Fail, Res};

impl Inner {
    pub(crate) async fn read_ns(&self, key: &Key, offset: u64, size: u32) -> Res<Bytes> {
        if let Some(plain) = key.plain() {
            return Box::pin(self.read_ns(&plain, offset, size)).await;
        }
        match key {
            Key::NewManifest(..) | Key::Attaching(..) => Ok(Bytes::new()),
            Key::ReferrersIndex(repo, d) => {
                Ok(slice(&self.ns.referrers(repo, d).await?.json, offset, size))
            }
            Key::Manifest(repo, d) => {
                let art = self.ns.artifact(repo, d).await?;
                Ok(slice(&art.raw().bytes, offset, size))
            }
            Key::Config(repo, d) => Ok(slice(&self.image(repo, d).await?.config, offset, size)),
            Key::DigestFile(_, d) => Ok(slice(format!("{d}\n").as_bytes(), offset, size)),
            Key::Stats => Ok(slice(self.stats().as_bytes(), offset, size)),
            Key::Status => Ok(slice(self.status().as_bytes(), offset, size)),
            Key::Blob(repo, d, len) => {
                if offset >= *len {
                    return Ok(Bytes::new());
                }
                let n = (size as u64).min(len - offset) as usize;
                // A plain layer in use has its blob's block digests: its
                // bytes come by Range, not with the whole blob first.
                let layer = self.layers.opened(d);
                if let Some(l) = layer.filter(|_| !self.cache.path(cache::Kind::Blob, d).exists()) {
                    if let Some(b) = l.blob_range(offset, n as u64).await.map_err(|e| {
                        tracing::error!("blob {d}: {e}");
                        Fail::from(e)
                    })? {
                        return Ok(b);
                    }
                }
                let file = self.blob_file(repo, d, *len).await?;
                let d = d.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, offset)
                        .map_err(|e| Fail::new(libc::EIO, format!("cached blob {d}: {e}")))?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| Fail::new(libc::EIO, e.to_string()))?
            }
            _ => Err(Fail::new(libc::EISDIR, "is a directory")),
        }
    }

    /// A whole blob in the cache, downloaded and verified on first use.
    pub(crate) async fn blob_file(
        &self,
        repo: &str,
        d: &Digest,
        size: u64,
    ) -> Res<Arc<std::fs::File>> {
        // Held briefly: an evicted blob's space is freed once readers move on.
        self.blobs
            .get(d, Duration::from_secs(30), self.ns.neg_ttl, || async {
                let path = match self.cache.get(cache::Kind::Blob, d) {
                    Some(p) => p,
                    None => self.download(repo, d, size).await.inspect_err(|e| {
                        tracing::error!("blob {d}: {e}");
                    })?,
                };
                let f = std::fs::File::open(&path)
                    .map_err(|e| Error::io(path.display().to_string(), e))?;
                Ok(Arc::new(f))
            })
            .await
    }

    pub(crate) async fn download(
        &self,
        repo: &str,
        d: &Digest,
        size: u64,
    ) -> ggfs::Result<std::path::PathBuf> {
        use futures::StreamExt;
        use std::io::Write;
        let dest = self.cache.path(cache::Kind::Blob, d);
        let mut w = ggfs::digest::BlobWriter::create(&dest, d.clone(), Some(size))?;
        let mut stream = self.ns.source(repo).blob(d).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ggfs::error::from_io(format!("blob {d}"), e))?;
            // The disk write (and hash) off the async worker.
            tokio::task::block_in_place(|| w.write_all(&chunk))
                .map_err(|e| Error::io(dest.display().to_string(), e))?;
        }
        let path = tokio::task::spawn_blocking(move || w.commit())
            .await
            .map_err(|e| Error::io("commit task", std::io::Error::other(e)))??;
        self.cache.added(size);
        Ok(path)
    }

    pub async fn readlink(&self, ino: u64) -> Res<Bytes> {
        if let Some(r) = self.writable(ino).await? {
            return Ok(Bytes::from(r.readlink(ino)?));
        }
        match self.node(ino)? {
            Node::Tree(r, id) if r.tree.node(id).meta.kind == tree::Kind::Symlink => {
                Ok(Bytes::copy_from_slice(&r.tree.node(id).meta.link))
            }
            _ => Err(Fail::new(libc::EINVAL, "not a symlink")),
        }
    }

    pub async fn xattrs(&self, ino: u64) -> Res<Vec<(Vec<u8>, Vec<u8>)>> {
        // rootfs/ itself keeps implicit metadata, without xattrs: `ls -l`
        // of a tag asks for them, and that fetches no layer.
        let unbuilt = match self.node(ino)? {
            Node::Ns(Key::Rootfs(..)) => true,
            Node::Ns(Key::WRootfs(repo, tag, d)) => self.wrootfs.peek(&(repo, tag, d)).is_none(),
            _ => false,
        };
        if unbuilt {
            return Ok(Vec::new());
        }
        if let Some(r) = self.writable(ino).await? {
            return r.xattrs(ino);
        }
        let node = self.node(ino)?;
        Ok(match self.tree_node(&node).await? {
            Some((r, id)) => r.tree.node(id).meta.xattrs.clone(),
            None => Vec::new(),
        })
    }
}
