//! Registry client (OCI distribution API): manifests, blobs with Range,
//! uploads with cross-repo mount, tags, catalog, referrers, delete.
//!
//! CONTRACT (filled in by the registry work; signatures are what callers use):
//!
//! ```ignore
//! pub struct ClientOptions { pub insecure: Vec<String> /* registries */, pub insecure_all: bool, pub jobs: usize }
//! #[derive(Clone)] pub struct Client;              // one per process, cheap to clone
//! impl Client {
//!     pub fn new(opts: ClientOptions) -> Result<Client>;
//!     pub fn repo(&self, repo: &Repository) -> RegistryRepo;   // implements image::Source + image::Sink
//!     pub async fn ping(&self, registry: &str) -> Result<()>;
//!     pub async fn catalog(&self, registry: &str) -> Result<Vec<String>>;          // all pages
//!     pub async fn catalog_page(&self, registry: &str, n: usize, last: Option<&str>) -> Result<Page>;
//! }
//! #[derive(Clone)] pub struct RegistryRepo;        // Arc inside
//! impl RegistryRepo {
//!     pub fn repository(&self) -> &Repository;
//!     pub async fn tags(&self) -> Result<Vec<String>>;                              // all pages
//!     pub async fn tags_page(&self, n: usize, last: Option<&str>) -> Result<Page>;
//!     pub async fn head_manifest(&self, reference: &str) -> Result<Option<(Digest, String /*media type*/, u64)>>;
//!     pub async fn delete(&self, reference: &str) -> Result<()>;
//!     pub async fn referrers(&self, subject: &Digest, artifact_type: Option<&str>) -> Result<ImageIndex>;
//! }
//! pub struct Page { pub items: Vec<String>, pub next: Option<String> /* `last` for the next call */ }
//! ```
