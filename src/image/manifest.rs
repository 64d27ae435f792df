//! Manifests, indexes and platforms. The registry's raw bytes are the source of
//! truth (digests are of them); `oci-spec` types give the parsed view.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
pub use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Manifests larger than this are refused (the distribution spec's suggested limit).
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// Media types of manifests, configs and layers (OCI and Docker).
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// Uncompressed OCI layer.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// gzip OCI layer.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// zstd OCI layer.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// The empty descriptor's `{}` (artifacts with no config).
    pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Uncompressed Docker layer.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// gzip Docker layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker foreign (non-distributable) layer, gzip.
    pub const DOCKER_FOREIGN_LAYER: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    /// What we send in `Accept` when fetching manifests.
    pub const MANIFEST_ACCEPT: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

    /// An index or manifest list.
    pub fn is_index(mt: &str) -> bool {
        mt == OCI_INDEX || mt == DOCKER_LIST
    }

    /// A single-image manifest (OCI or Docker).
    pub fn is_manifest(mt: &str) -> bool {
        mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
    }
}

/// How a layer's tar stream is compressed, judged from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (also eStargz, which is gzip).
    Gzip,
    /// zstd (also zstd:chunked, which is zstd).
    Zstd,
}

impl Compression {
    /// Judge a layer media type; unknown ones are [`Error::MediaType`].
    pub fn of_media_type(mt: &str) -> Result<Self> {
        let mt = mt.trim();
        if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") || mt.ends_with("tar.gz") {
            Ok(Compression::Gzip)
        } else if mt.ends_with("+zstd") {
            Ok(Compression::Zstd)
        } else if mt.ends_with(".tar") || mt.ends_with("diff.tar") {
            Ok(Compression::None)
        } else {
            Err(Error::MediaType(mt.to_string()))
        }
    }

    /// Sniff from the first bytes of a blob (for sources with no media type).
    pub fn sniff(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }

    /// The layer media type for this compression, in a docker schema-2
    /// manifest (`docker`) or an OCI one. Docker has no zstd type: OCI's.
    pub fn layer_media_type(self, docker: bool) -> &'static str {
        match (self, docker) {
            (Compression::None, true) => media::DOCKER_LAYER,
            (Compression::Gzip, true) => media::DOCKER_LAYER_GZIP,
            (Compression::None, false) => media::OCI_LAYER,
            (Compression::Gzip, false) => media::OCI_LAYER_GZIP,
            (Compression::Zstd, _) => media::OCI_LAYER_ZSTD,
        }
    }
}

/// A manifest or index exactly as served, with its digest and media type.
#[derive(Clone, Debug)]
pub struct RawManifest {
    /// The bytes as served: the digest is theirs, so they are never re-serialized.
    pub bytes: Bytes,
    /// Manifest or index media type.
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: Digest,
}

/// The parsed form of a [`RawManifest`].
// Short-lived (one per fetch): boxing the larger variant would only add an
// allocation, and would change every match in other crates.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Parsed {
    /// An image manifest.
    Image(ImageManifest),
    /// An index.
    Index(ImageIndex),
}

impl RawManifest {
    /// Wrap bytes, taking the media type from the caller (Content-Type) or,
    /// failing that, from the JSON itself. Refuses oversized input.
    pub fn new(bytes: Bytes, content_type: Option<&str>) -> Result<Self> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(Error::TooLarge {
                what: "manifest".into(),
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let media_type = match content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
            Some(ct) if media::is_index(ct) || media::is_manifest(ct) => ct.to_string(),
            _ => sniff_media_type(&bytes)?,
        };
        let digest = Digest::of(&bytes);
        Ok(Self {
            bytes,
            media_type,
            digest,
        })
    }

    /// Like [`RawManifest::new`], but the bytes must hash to `expected`
    /// (in its algorithm; the manifest's digest stays sha256).
    pub fn verified(bytes: Bytes, content_type: Option<&str>, expected: &Digest) -> Result<Self> {
        let m = Self::new(bytes, content_type)?;
        expected.verify(&m.bytes)?;
        Ok(m)
    }

    /// Serialize `value` (pretty JSON) into a new manifest.
    pub fn from_json<T: serde::Serialize>(value: &T) -> Result<Self> {
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::invalid("manifest", e.to_string()))?;
        Self::new(Bytes::from(bytes), None)
    }

    /// True for an index or manifest list.
    pub fn is_index(&self) -> bool {
        media::is_index(&self.media_type)
    }

    /// Parse as an image manifest or index, by media type.
    pub fn parse(&self) -> Result<Parsed> {
        let what = format!("manifest {}", self.digest);
        if self.is_index() {
            serde_json::from_slice(&self.bytes)
                .map(Parsed::Index)
                .map_err(|e| Error::invalid(what, e.to_string()))
        } else {
            serde_json::from_slice(&self.bytes)
                .map(Parsed::Image)
                .map_err(|e| Error::invalid(what, e.to_string()))
        }
    }

    /// Parse as an image manifest; an index is an error.
    pub fn image(&self) -> Result<ImageManifest> {
        match self.parse()? {
            Parsed::Image(m) => Ok(m),
            Parsed::Index(_) => Err(Error::invalid(
                format!("manifest {}", self.digest),
                "is an index, not an image manifest (pick a --platform)",
            )),
        }
    }

    /// Parse as an index; an image manifest is an error.
    pub fn index(&self) -> Result<ImageIndex> {
        match self.parse()? {
            Parsed::Index(i) => Ok(i),
            Parsed::Image(_) => Err(Error::invalid(
                format!("manifest {}", self.digest),
                "is an image manifest, not an index",
            )),
        }
    }

    /// A descriptor pointing at these bytes.
    pub fn descriptor(&self) -> Descriptor {
        descriptor(&self.media_type, &self.digest, self.bytes.len() as u64)
    }
}

/// Build an OCI descriptor (`oci-spec` keeps its own digest type).
pub fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
    let d = oci_spec::image::Digest::from_str(digest.as_str()).expect("valid digest");
    Descriptor::new(media_type.into(), size, d)
}

/// The digest of a descriptor, in our type.
pub fn digest_of(desc: &Descriptor) -> Result<Digest> {
    Digest::parse(desc.digest().as_ref())
}

/// The media type of a descriptor as a string.
pub fn media_type_of(desc: &Descriptor) -> String {
    desc.media_type().to_string()
}

fn sniff_media_type(bytes: &[u8]) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let p: Probe =
        serde_json::from_slice(bytes).map_err(|e| Error::invalid("manifest", e.to_string()))?;
    match (p.media_type, p.manifests, p.layers) {
        (Some(mt), _, _) if media::is_index(&mt) || media::is_manifest(&mt) => Ok(mt),
        (Some(mt), _, _) => Err(Error::MediaType(mt)),
        (None, Some(_), _) => Ok(media::OCI_INDEX.to_string()),
        (None, _, Some(_)) => Ok(media::OCI_MANIFEST.to_string()),
        _ => Err(Error::invalid(
            "manifest",
            "neither an image manifest nor an index",
        )),
    }
}

/// `os/arch[/variant]`, as in `--platform linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `linux`, ...
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v8`, `v7`, ...
    pub variant: Option<String>,
}

impl Platform {
    /// Does an index entry's platform satisfy this wanted platform? An unset
    /// variant matches any; arm64's implicit variant is v8.
    pub fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        if self.os != p.os().to_string() || self.architecture != p.architecture().to_string() {
            return false;
        }
        match (&self.variant, p.variant()) {
            (None, _) => true,
            (Some(w), Some(v)) => w == v,
            (Some(w), None) => self.architecture == "arm64" && w == "v8",
        }
    }

    /// The platform an index entry names.
    pub fn of(p: &oci_spec::image::Platform) -> Self {
        Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone(),
        }
    }

    /// A name usable as a directory: `linux-arm64-v8`.
    pub fn dir_name(&self) -> String {
        self.to_string().replace('/', "-")
    }

    /// The platform this binary runs on, in OCI's vocabulary.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: arch.to_string(),
            variant: None,
        }
    }
}

impl FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || Error::invalid(format!("platform {s:?}"), "want os/arch[/variant]");
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_from_header_or_body() {
        let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}"#;
        let m = RawManifest::new(Bytes::from_static(docker), None).unwrap();
        assert_eq!(m.media_type, media::DOCKER_MANIFEST);
        let oci = br#"{"schemaVersion":2,"manifests":[]}"#;
        let m = RawManifest::new(Bytes::from_static(oci), Some("text/plain")).unwrap();
        assert!(m.is_index());
        assert_eq!(m.digest, Digest::of(oci));
        let big = Bytes::from(vec![b' '; MAX_MANIFEST_SIZE as usize + 1]);
        assert!(RawManifest::new(big, None)
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }

    #[test]
    fn platforms() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.dir_name(), "linux-arm64-v8");
        let spec: oci_spec::image::Platform =
            serde_json::from_str(r#"{"os":"linux","architecture":"arm64"}"#).unwrap();
        assert!(p.matches(&spec));
        assert!("linux/arm64".parse::<Platform>().unwrap().matches(&spec));
        assert!(!"linux/amd64".parse::<Platform>().unwrap().matches(&spec));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v7".parse::<Platform>().is_err());
    }

    #[test]
    fn compression() {
        assert_eq!(
            Compression::of_media_type(media::DOCKER_LAYER_GZIP).unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::of_media_type(media::OCI_LAYER).unwrap(),
            Compression::None
        );
        assert_eq!(
            Compression::of_media_type(media::OCI_LAYER_ZSTD).unwrap(),
            Compression::Zstd
        );
        assert!(Compression::of_media_type("text/plain").is_err());
    }
}
