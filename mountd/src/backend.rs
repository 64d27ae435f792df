//! What the filesystem needs from a registry, as a small trait so the
//! namespace and merge logic do not depend on how the registry is reached.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use ggfs::image::{ByteStream, Sink, Source};
use ggfs::registry::{Client, ClientOptions, RegistryRepo};
use ggfs::{Digest, Error, RawManifest, Repository, Result};

#[async_trait]
pub trait Registry: Send + Sync {
    /// `host:port`, for messages.
    fn name(&self) -> String;

    /// Check that the registry answers `/v2/`.
    async fn ping(&self) -> Result<()>;

    /// Every repository, or `None` when the registry does not list them.
    async fn catalog(&self) -> Result<Option<Vec<String>>>;

    /// The tags of `repo`; `Error::NotFound` when there is no such repository.
    async fn tags(&self, repo: &str) -> Result<Vec<String>>;

    /// Manifests and blobs of one repository.
    fn source(&self, repo: &str) -> Arc<dyn Source>;

    /// Where commits to one repository go.
    fn sink(&self, repo: &str) -> Result<Arc<dyn Sink>>;

    /// The digest `reference` names in `repo` now (a HEAD), `None` if nothing.
    async fn head(&self, repo: &str, reference: &str) -> Result<Option<Digest>>;

    /// Mount blob `digest` of repository `from` into `repo`; false: not done.
    async fn mount(&self, repo: &str, digest: &Digest, from: &str) -> Result<bool>;

    /// Delete the manifest `reference` (a tag, where the registry can, or a
    /// digest) names in `repo`.
    async fn delete(&self, repo: &str, reference: &str) -> Result<()>;

    /// The referrers of `subject` in `repo` (referrers API or its tag fallback).
    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
    ) -> Result<ggfs::image::manifest::ImageIndex>;
}

/// The registry through the library's client (auth from the docker
/// keychain, retries, redirects, bounded concurrency).
pub struct LibRegistry {
    client: Client,
    host: String,
}

impl LibRegistry {
    /// `tls`: extra trusted root PEM files, and whether to skip verification.
    pub fn new(
        host: &str,
        insecure: bool,
        stall: std::time::Duration,
        tls: (Vec<std::path::PathBuf>, bool),
        keychain: ggfs::registry::auth::Keychain,
    ) -> Result<Arc<Self>> {
        let opts = ClientOptions {
            insecure: if insecure {
                vec![host.to_string()]
            } else {
                Vec::new()
            },
            insecure_all: false,
            jobs: 16,
            stall_timeout: stall,
            ca_files: tls.0,
            insecure_skip_tls_verify: tls.1,
        };
        Ok(Arc::new(LibRegistry {
            client: Client::builder(opts).keychain(keychain).build()?,
            host: ggfs::reference::normalize_registry(host),
        }))
    }

    fn repo(&self, repo: &str) -> Result<RegistryRepo> {
        Ok(self.client.repo(&Repository::new(&self.host, repo)?))
    }
}

#[async_trait]
impl Registry for LibRegistry {
    fn name(&self) -> String {
        self.host.clone()
    }

    async fn ping(&self) -> Result<()> {
        self.client.ping(&self.host).await
    }

    async fn catalog(&self) -> Result<Option<Vec<String>>> {
        match self.client.catalog(&self.host).await {
            Ok(repos) => Ok(Some(repos)),
            // Refused or not implemented: repositories are reachable by name only.
            Err(Error::NotFound(_) | Error::Registry { .. } | Error::Auth { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn tags(&self, repo: &str) -> Result<Vec<String>> {
        self.repo(repo)?.tags().await
    }

    fn source(&self, repo: &str) -> Arc<dyn Source> {
        match self.repo(repo) {
            Ok(r) => Arc::new(r),
            Err(e) => Arc::new(Invalid(repo.to_string(), e.to_string())),
        }
    }

    fn sink(&self, repo: &str) -> Result<Arc<dyn Sink>> {
        Ok(Arc::new(self.repo(repo)?))
    }

    async fn head(&self, repo: &str, reference: &str) -> Result<Option<Digest>> {
        Ok(self
            .repo(repo)?
            .head_manifest(reference)
            .await?
            .map(|(d, _, _)| d))
    }

    async fn mount(&self, repo: &str, digest: &Digest, from: &str) -> Result<bool> {
        self.repo(repo)?.mount(digest, from).await
    }

    async fn delete(&self, repo: &str, reference: &str) -> Result<()> {
        self.repo(repo)?.delete(reference).await
    }

    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
    ) -> Result<ggfs::image::manifest::ImageIndex> {
        self.repo(repo)?.referrers(subject, None).await
    }
}

/// The source of a repository name the registry could never have: every
/// request fails with the reason.
struct Invalid(String, String);

#[async_trait]
impl Source for Invalid {
    fn name(&self) -> String {
        self.0.clone()
    }
    async fn manifest(&self, _: &str) -> Result<RawManifest> {
        Err(Error::NotFound(format!(
            "repository {:?} ({})",
            self.0, self.1
        )))
    }
    async fn blob(&self, _: &Digest) -> Result<ByteStream> {
        Err(Error::NotFound(format!(
            "repository {:?} ({})",
            self.0, self.1
        )))
    }
    async fn blob_range(&self, _: &Digest, _: u64, _: u64) -> Result<Bytes> {
        Err(Error::NotFound(format!(
            "repository {:?} ({})",
            self.0, self.1
        )))
    }
    async fn blob_size(&self, _: &Digest) -> Result<u64> {
        Err(Error::NotFound(format!(
            "repository {:?} ({})",
            self.0, self.1
        )))
    }
}
