//! The index of a plain layer (tar, tar+gzip, tar+zstd) as a file: the tar
//! index with its gzip checkpoints / zstd frame starts
//! ([`LayerIndex`]) plus the sha256 of every block of the blob, built in
//! one streaming pass that also checks the blob's digest. The mount keeps
//! it in its cache; `ggfs index push` (or the mount's `--push-index`)
//! publishes it as an OCI referrer of the image, so a mount elsewhere can
//! read the layer by verified Range blocks without streaming it first.
//!
//! An index from a registry is trusted as much as the registry's
//! referrers: the blocks it names are verified before any byte is used,
//! but where a file's bytes sit (and the checkpoints' windows) is taken on
//! its word until [`audit`] has compared it with an index built from the
//! whole, verified blob.

use std::io::{self, Read, Write};

use bytes::Bytes;

use crate::digest::{Digest, Hasher};
use crate::error::{from_io, Error, Result};
use crate::formats::tarindex::{self, LayerIndex};
use crate::formats::zran::{seal, unseal, Dec, Enc};
use crate::formats::{estargz, zstd_chunked};
use crate::image::attach;
use crate::image::manifest::{Compression, Descriptor, Parsed, RawManifest};
use crate::image::{bytes_stream, Sink, Source};

/// `artifactType` of the referrer, and media type of each index blob in it.
pub const ARTIFACT_TYPE: &str = "application/vnd.ggfs.layer-index.v1";
/// Media type of each index blob (same as the artifact type).
pub const MEDIA_TYPE: &str = "application/vnd.ggfs.layer-index.v1";
/// Annotation on each index blob: the digest of the layer it indexes.
pub const LAYER_ANNOTATION: &str = "dev.ggfs.layer.digest";
/// Block size of the digests this build records.
pub const BLOCK: u64 = 1 << 20;
/// Index blobs larger than this are not fetched.
pub const MAX_FILE_SIZE: u64 = 256 << 20;
/// Longest read a caller may make through one checkpoint; [`audit`]
/// covers reads up to this long that start anywhere.
pub const MAX_READ: u64 = 1 << 20;

const MAGIC: &[u8; 8] = b"GGFSLBX1";
const VERSION: u32 = 1;
/// Block sizes accepted from a file.
const MIN_BLOCK: u64 = 4 << 10;
const MAX_BLOCK: u64 = 64 << 20;
/// Uncompressed bytes after one checkpoint that [`audit`] re-reads.
const AUDIT_SPAN: u64 = 64 << 20;
const AUDIT_PIECE: u64 = 8 << 20;

/// A plain layer's index and block digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndexFile {
    /// The layer blob indexed, and its size.
    pub layer: Digest,
    /// The layer blob's size.
    pub size: u64,
    /// Size of the blocks hashed in `blocks`.
    pub block_size: u64,
    /// sha256 of each `block_size` block of the blob (the last may be short).
    pub blocks: Vec<Digest>,
    /// Where each file lies in the layer.
    pub index: LayerIndex,
}

impl LayerIndexFile {
    /// Stream the blob once: hash it whole and per [`BLOCK`], index the tar
    /// (writing it to `tar`), and check the whole digest and size. Nothing
    /// is returned for a blob that does not match.
    pub fn build(
        body: impl Read,
        compression: Compression,
        layer: &Digest,
        size: u64,
        tar: impl Write,
    ) -> Result<Self> {
        let mut hashed = Tee {
            inner: body,
            out: BlockHasher::new(BLOCK),
        };
        let index = tarindex::index_layer_tee(&mut hashed, compression, tar, |_| {})?;
        // Whatever follows the compressed stream is part of the blob too.
        io::copy(&mut hashed, &mut io::sink()).map_err(|e| from_io(format!("layer {layer}"), e))?;
        let blocks = hashed.out.finish(layer, size)?;
        Ok(LayerIndexFile {
            layer: layer.clone(),
            size,
            block_size: BLOCK,
            blocks,
            index,
        })
    }

    /// The file's bytes, as pushed as a referrer blob.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut e = Enc::default();
        e.bytes(self.layer.as_str().as_bytes());
        e.u64(self.size);
        e.u64(self.block_size);
        e.u64(self.blocks.len() as u64);
        for b in &self.blocks {
            let raw =
                hex::decode(b.hex()).map_err(|e| Error::invalid("block digest", e.to_string()))?;
            e.0.extend_from_slice(&raw);
        }
        e.bytes(&self.index.to_bytes()?);
        seal(MAGIC, VERSION, &e.0)
    }

    /// Parse an index file that must be the one of `layer` (`size` bytes,
    /// `compression`): anything else, or anything inconsistent, is an error.
    pub fn from_bytes(
        bytes: &[u8],
        layer: &Digest,
        size: u64,
        compression: Compression,
    ) -> Result<Self> {
        let body = unseal(MAGIC, VERSION, bytes, "layer index file")?;
        Self::from_body(&body, layer, size, compression)
    }

    /// Decode the body [`from_bytes`](Self::from_bytes) finds inside the
    /// checksummed, compressed envelope, with the same checks. For the fuzz
    /// targets (`fuzz/`), which cannot forge the envelope's sha256.
    #[doc(hidden)]
    pub fn from_body(
        body: &[u8],
        layer: &Digest,
        size: u64,
        compression: Compression,
    ) -> Result<Self> {
        let mut d = Dec::new(body, "layer index file");
        let named = std::str::from_utf8(d.bytes()?).map_err(|_| d.bad("layer digest"))?;
        let what = format!("index of layer {layer}");
        if named != layer.as_str() {
            return Err(Error::invalid(what, format!("it indexes {named}")));
        }
        if d.u64()? != size {
            return Err(Error::invalid(what, "it gives another blob size"));
        }
        let block_size = d.u64()?;
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(Error::invalid(what, format!("block size {block_size}")));
        }
        let n = d.len(32)?;
        if n as u64 != size.div_ceil(block_size) {
            return Err(Error::invalid(what, format!("{n} block digests")));
        }
        let blocks = (0..n)
            .map(|_| {
                let raw = d.raw(32)?;
                Digest::parse(&format!("sha256:{}", hex::encode(raw)))
            })
            .collect::<Result<Vec<_>>>()?;
        let index = LayerIndex::from_bytes(d.bytes()?)?;
        d.finish()?;
        check_index(&index, size, compression).map_err(|r| Error::invalid(&what, r))?;
        Ok(LayerIndexFile {
            layer: layer.clone(),
            size,
            block_size,
            blocks,
            index,
        })
    }

    /// Offset and length of block `b` of the blob.
    pub fn block_range(&self, b: u64) -> Option<(u64, u64)> {
        let at = b.checked_mul(self.block_size)?;
        (b < self.blocks.len() as u64).then(|| (at, self.block_size.min(self.size - at)))
    }

    /// Check bytes fetched for block `b` against its recorded digest.
    pub fn verify_block(&self, b: u64, bytes: &[u8]) -> Result<()> {
        let what = || format!("block {b} of blob {}", self.layer);
        let (_, len) = self
            .block_range(b)
            .ok_or_else(|| Error::invalid(what(), "past the end of the blob"))?;
        let actual = Digest::of(bytes);
        let expected = self.blocks[b as usize].clone();
        if actual != expected || bytes.len() as u64 != len {
            return Err(Error::ContentMismatch {
                what: format!("bytes {}+{len} of blob {}", b * self.block_size, self.layer),
                expected,
                actual,
            });
        }
        Ok(())
    }
}

/// What a parsed index must agree with: the layer's compression and size.
fn check_index(i: &LayerIndex, size: u64, compression: Compression) -> Result<(), String> {
    if i.compression != compression {
        return Err(format!("it says {:?}", i.compression));
    }
    if i.compressed_size > size {
        return Err("its compressed stream is longer than the blob".into());
    }
    if let Some(gz) = &i.gzip {
        if gz.compressed_size > size || gz.uncompressed_size != i.uncompressed_size {
            return Err("its gzip checkpoints disagree with its sizes".into());
        }
    }
    if compression == Compression::Gzip && i.gzip.is_none() {
        return Err("gzip layer without checkpoints".into());
    }
    Ok(())
}

/// Whether the mount reads `desc` by a plain index: a tar layer that is
/// not eStargz or zstd:chunked (those carry their own TOC).
pub fn is_plain(desc: &Descriptor) -> bool {
    let mt = desc.media_type().to_string();
    if !crate::image::is_layer_media_type(&mt) {
        return false;
    }
    let ann = desc.annotations().clone().unwrap_or_default();
    ![
        estargz::TOC_DIGEST_ANNOTATION,
        zstd_chunked::MANIFEST_POSITION_ANNOTATION,
        zstd_chunked::GITHUB_MANIFEST_POSITION_ANNOTATION,
    ]
    .iter()
    .any(|k| ann.contains_key(*k))
}

/// Push an index artifact for `subject`: the empty config, one blob per
/// index file, and the manifest (by digest; the registry client adds it to
/// the `sha256-<hex>` referrers tag where there is no referrers API).
pub async fn push(
    sink: &dyn Sink,
    subject: &RawManifest,
    files: &[LayerIndexFile],
) -> Result<RawManifest> {
    let empty = Bytes::from_static(attach::EMPTY);
    attach::put_if_missing(sink, &Digest::of(&empty), empty).await?;
    let mut layers = Vec::new();
    for f in files {
        let bytes = Bytes::from(f.to_bytes()?);
        let digest = Digest::of(&bytes);
        let size = bytes.len() as u64;
        if !sink.has_blob(&digest).await? {
            sink.put_blob(&digest, size, bytes_stream(bytes)).await?;
        }
        layers.push(serde_json::json!({
            "mediaType": MEDIA_TYPE,
            "digest": digest,
            "size": size,
            "annotations": {LAYER_ANNOTATION: f.layer},
        }));
    }
    let raw = attach::manifest(subject, ARTIFACT_TYPE, layers, Default::default())?;
    sink.put_manifest(&raw, None).await?;
    Ok(raw)
}

/// The index blobs an artifact manifest lists: (layer digest, descriptor).
/// Empty for a manifest that is not an index artifact.
pub fn listed(artifact: &RawManifest) -> Vec<(Digest, Descriptor)> {
    let Ok(Parsed::Image(m)) = artifact.parse() else {
        return Vec::new();
    };
    if m.artifact_type().as_ref().map(|t| t.to_string()).as_deref() != Some(ARTIFACT_TYPE) {
        return Vec::new();
    }
    m.layers()
        .iter()
        .filter(|l| l.media_type().to_string() == MEDIA_TYPE)
        .filter_map(|l| {
            let named = l.annotations().as_ref()?.get(LAYER_ANNOTATION)?;
            Some((Digest::parse(named).ok()?, l.clone()))
        })
        .collect()
}

/// Fetch an index blob (verified against its descriptor, size-capped) and
/// parse it as the index of `layer`.
pub async fn fetch(
    source: &dyn Source,
    blob: &Descriptor,
    layer: &Digest,
    size: u64,
    compression: Compression,
) -> Result<LayerIndexFile> {
    let digest = crate::image::manifest::digest_of(blob)?;
    if blob.size() > MAX_FILE_SIZE {
        return Err(Error::TooLarge {
            what: format!("layer index {digest}"),
            size: blob.size(),
            limit: MAX_FILE_SIZE,
        });
    }
    let bytes = crate::image::read_blob(source, &digest, blob.size()).await?;
    if bytes.len() as u64 != blob.size() {
        return Err(Error::SizeMismatch {
            digest,
            expected: blob.size(),
            actual: bytes.len() as u64,
        });
    }
    LayerIndexFile::from_bytes(&bytes, layer, size, compression)
}

/// Compare an index taken on trust (`claimed`) with one built from the
/// whole blob after its digest checked out (`built`): same block digests,
/// same entries, and every read of up to [`MAX_READ`] bytes that starts
/// within `AUDIT_SPAN` (64 MiB) after one of the claimed restart points gives the
/// bytes the built index gives. `fetch(offset, len)` reads the (verified)
/// blob. Returns the uncompressed bytes left unchecked (restart points
/// further apart than that).
pub fn audit(
    claimed: &LayerIndexFile,
    built: &LayerIndexFile,
    mut fetch: impl FnMut(u64, u64) -> Result<Bytes>,
) -> Result<u64> {
    let (c, b) = (&claimed.index, &built.index);
    let what = format!("index of layer {}", claimed.layer);
    let mismatch = |reason: &str| Error::invalid(&what, format!("{reason} (the index lied)"));
    if (claimed.block_size == built.block_size && claimed.blocks != built.blocks)
        || c.compression != b.compression
        || c.uncompressed_size != b.uncompressed_size
    {
        return Err(mismatch("its blocks or sizes differ from the blob's"));
    }
    if c.entries != b.entries {
        return Err(mismatch("its tar entries differ from the blob's"));
    }
    let starts = restart_points(c);
    let mut unchecked = 0;
    for (i, &s) in starts.iter().enumerate() {
        let next = starts.get(i + 1).copied().unwrap_or(c.uncompressed_size);
        let upto = next.min(s.saturating_add(AUDIT_SPAN));
        unchecked += next - upto;
        let mut at = s;
        while at < upto {
            let len = (AUDIT_PIECE.min(upto - at) + MAX_READ) as usize;
            let want = b.read_at(at, len, &mut fetch)?;
            if c.read_at(at, len, &mut fetch).ok().as_ref() != Some(&want) {
                return Err(mismatch(&format!(
                    "bytes at uncompressed offset {at} differ"
                )));
            }
            at += AUDIT_PIECE;
        }
    }
    Ok(unchecked)
}

/// Uncompressed offsets reads restart from: gzip checkpoints, zstd frames.
fn restart_points(i: &LayerIndex) -> Vec<u64> {
    match (&i.gzip, i.compression) {
        (Some(gz), _) => gz.points.iter().map(|p| p.uncompressed).collect(),
        (None, Compression::Zstd) => {
            let mut v: Vec<u64> = i.zstd_frames.iter().map(|f| f.uncompressed).collect();
            if v.first() != Some(&0) {
                v.insert(0, 0);
            }
            v
        }
        // Uncompressed: reads are the blob's own (verified) bytes.
        _ => Vec::new(),
    }
}

/// Copies everything read from `inner` into `out`.
struct Tee<R, W> {
    inner: R,
    out: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Hashes a stream whole and per block.
struct BlockHasher {
    size: u64,
    whole: Hasher,
    block: Hasher,
    blocks: Vec<Digest>,
}

impl BlockHasher {
    fn new(size: u64) -> Self {
        BlockHasher {
            size,
            whole: Hasher::new(),
            block: Hasher::new(),
            blocks: Vec::new(),
        }
    }

    /// Check the whole blob; the block digests are only returned if it matches.
    fn finish(mut self, digest: &Digest, size: u64) -> Result<Vec<Digest>> {
        if !self.block.is_empty() {
            let last = std::mem::take(&mut self.block);
            self.blocks.push(last.finish());
        }
        self.whole.verify(digest, Some(size))?;
        Ok(self.blocks)
    }
}

impl Write for BlockHasher {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            let room = (self.size - self.block.len()) as usize;
            let take = room.min(buf.len());
            self.whole.update(&buf[..take]);
            self.block.update(&buf[..take]);
            buf = &buf[take..];
            if self.block.len() == self.size {
                let full = std::mem::take(&mut self.block);
                self.blocks.push(full.finish());
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip layer of a few files, big enough for several checkpoints.
    fn layer() -> (Vec<u8>, Digest) {
        let mut b = tar::Builder::new(Vec::new());
        let mut x = 0x9e3779b97f4a7c15u64;
        for name in ["a", "b", "c"] {
            // Random words: compressible (back-references reach into
            // checkpoint windows) yet several blocks long.
            let mut data = Vec::new();
            while data.len() < 3_000_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(format!("w{} ", x % 5000).as_bytes());
            }
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let blob = gz.finish().unwrap();
        let d = Digest::of(&blob);
        (blob, d)
    }

    fn build(blob: &[u8], d: &Digest) -> LayerIndexFile {
        LayerIndexFile::build(blob, Compression::Gzip, d, blob.len() as u64, io::sink()).unwrap()
    }

    #[test]
    fn round_trip_and_checks() {
        let (blob, d) = layer();
        let f = build(&blob, &d);
        assert_eq!(f.blocks.len() as u64, (blob.len() as u64).div_ceil(BLOCK));
        assert_eq!(f.blocks[0], Digest::of(&blob[..BLOCK as usize]));
        let bytes = f.to_bytes().unwrap();
        let size = blob.len() as u64;
        let back = LayerIndexFile::from_bytes(&bytes, &d, size, Compression::Gzip).unwrap();
        assert_eq!(back, f);
        // Another layer, size or compression: refused.
        let other = Digest::of(b"x");
        assert!(LayerIndexFile::from_bytes(&bytes, &other, size, Compression::Gzip).is_err());
        assert!(LayerIndexFile::from_bytes(&bytes, &d, size + 1, Compression::Gzip).is_err());
        assert!(LayerIndexFile::from_bytes(&bytes, &d, size, Compression::Zstd).is_err());
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                LayerIndexFile::from_bytes(&bytes[..cut], &d, size, Compression::Gzip).is_err()
            );
        }
        // A wrong blob digest: nothing built.
        assert!(
            LayerIndexFile::build(&blob[..], Compression::Gzip, &other, size, io::sink()).is_err()
        );
        assert!(f.verify_block(0, &blob[..BLOCK as usize]).is_ok());
        let mut bad = blob[..BLOCK as usize].to_vec();
        bad[7] ^= 1;
        assert!(matches!(
            f.verify_block(0, &bad),
            Err(Error::ContentMismatch { .. })
        ));
        assert!(f.verify_block(f.blocks.len() as u64, b"").is_err());
    }

    fn fetcher(blob: &[u8]) -> impl FnMut(u64, u64) -> Result<Bytes> + '_ {
        |o, l| Ok(Bytes::copy_from_slice(&blob[o as usize..(o + l) as usize]))
    }

    #[test]
    fn audit_catches_lies() {
        let (blob, d) = layer();
        let built = build(&blob, &d);
        assert!(built.index.gzip.as_ref().unwrap().points.len() > 1);
        assert_eq!(audit(&built, &built, fetcher(&blob)).unwrap(), 0);
        // A file's data said to be elsewhere.
        let mut moved = built.clone();
        moved.index.entries[1].offset = moved.index.entries[0].offset;
        assert!(audit(&moved, &built, fetcher(&blob)).is_err());
        // A checkpoint window changed: same entries, wrong bytes.
        let mut window = built.clone();
        let p = &mut window.index.gzip.as_mut().unwrap().points[1];
        p.window.iter_mut().for_each(|b| *b ^= 0x55);
        assert!(audit(&window, &built, fetcher(&blob)).is_err());
        let mut block = built.clone();
        block.blocks[0] = Digest::of(b"not it");
        assert!(audit(&block, &built, fetcher(&blob)).is_err());
    }

    #[test]
    fn plain_layers() {
        let desc = |mt: &str, ann: Option<(&str, &str)>| -> Descriptor {
            let mut v = serde_json::json!({"mediaType": mt, "digest": Digest::of(b""), "size": 0});
            if let Some((k, val)) = ann {
                v["annotations"] = serde_json::json!({k: val});
            }
            serde_json::from_value(v).unwrap()
        };
        use crate::image::manifest::media;
        assert!(is_plain(&desc(media::OCI_LAYER_GZIP, None)));
        assert!(is_plain(&desc(media::DOCKER_LAYER_GZIP, Some(("x", "y")))));
        assert!(!is_plain(&desc(
            media::OCI_LAYER_GZIP,
            Some((estargz::TOC_DIGEST_ANNOTATION, "sha256:00"))
        )));
        assert!(!is_plain(&desc(media::OCI_CONFIG, None)));
    }
}
