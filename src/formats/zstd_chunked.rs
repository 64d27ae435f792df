//! zstd:chunked: lazily readable zstd layers. Every file (or chunk of one)
//! is its own zstd frame; the TOC ("manifest", the eStargz JSON shape) is a
//! zstd frame inside a skippable frame near the end, located by a footer or
//! by layer annotations. The TOC model and chunk reads are
//! [`crate::formats::estargz::Toc`]'s, with [`ChunkCompression::Zstd`].
//!
//! Two footers exist: ctr-remote's (48 bytes: skippable-frame header + 40
//! bytes: manifest offset, compressed and uncompressed length, type, magic
//! `GnUlInUx`) and containers/storage's (72 bytes: header + 64, with the
//! tar-split position before the magic `GNUlInUx`). Both are accepted.

use std::collections::HashMap;
use std::io::Read;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::formats::estargz::{ChunkCompression, Toc, MAX_TOC_SIZE, TOC_DIGEST_ANNOTATION};
use crate::image::Source;

/// Descriptor annotation: `offset:length:uncompressed:type` of the TOC (containers/storage).
pub const MANIFEST_POSITION_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-position";
/// The same, under its older `io.github.containers` name.
pub const GITHUB_MANIFEST_POSITION_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-position";
/// sha256 of the compressed manifest.
pub const MANIFEST_CHECKSUM_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-checksum";
/// The same, under its older `io.github.containers` name.
pub const GITHUB_MANIFEST_CHECKSUM_ANNOTATION: &str =
    "io.github.containers.zstd-chunked.manifest-checksum";

/// ctr-remote's footer: skippable-frame header (8) + 40 bytes.
pub const FOOTER_SIZE: u64 = 48;
/// containers/storage's footer: skippable-frame header (8) + 64 bytes.
pub const FOOTER_SIZE_V2: u64 = 72;

const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const MAGIC_CTR_REMOTE: &[u8; 8] = b"GnUlInUx";
const MAGIC_CONTAINERS: &[u8; 8] = b"GNUlInUx";
/// Manifest type 1: the CRFS/eStargz TOC JSON.
const MANIFEST_TYPE_TOC: u64 = 1;

/// Where the compressed TOC (manifest) lies in the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestPosition {
    /// Offset of the TOC's zstd frame (after the skippable-frame header).
    pub offset: u64,
    /// Compressed length of the TOC frame.
    pub compressed_len: u64,
    /// Length of the TOC JSON.
    pub uncompressed_len: u64,
    /// Manifest type; 1 is the TOC JSON.
    pub kind: u64,
}

/// Parse a `offset:compressedLen:uncompressedLen:type` annotation value.
pub fn parse_position(s: &str) -> Result<ManifestPosition> {
    let bad = || {
        Error::invalid(
            format!("zstd:chunked manifest position {s:?}"),
            "want offset:compressed:uncompressed:type",
        )
    };
    let parts: Vec<u64> = s
        .split(':')
        .map(|p| p.trim().parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    match parts[..] {
        [offset, compressed_len, uncompressed_len, kind] => Ok(ManifestPosition {
            offset,
            compressed_len,
            uncompressed_len,
            kind,
        }),
        _ => Err(bad()),
    }
}

/// Parse the footer from the last bytes of a blob (at least 48; 72 to
/// recognise the containers/storage form).
pub fn parse_footer(tail: &[u8]) -> Result<ManifestPosition> {
    let le =
        |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    for (size, content) in [(FOOTER_SIZE_V2 as usize, 64u32), (FOOTER_SIZE as usize, 40)] {
        let Some(f) = tail.len().checked_sub(size).map(|s| &tail[s..]) else {
            continue;
        };
        let magic = &f[size - 8..];
        if f[..4] == SKIPPABLE_MAGIC
            && f[4..8] == content.to_le_bytes()
            && (magic == MAGIC_CTR_REMOTE || magic == MAGIC_CONTAINERS)
        {
            let body = &f[8..];
            return Ok(ManifestPosition {
                offset: le(body, 0),
                compressed_len: le(body, 1),
                uncompressed_len: le(body, 2),
                kind: le(body, 3),
            });
        }
    }
    Err(Error::invalid(
        "zstd:chunked footer",
        if tail.len() < FOOTER_SIZE as usize {
            format!("blob tail is {} bytes, shorter than the footer", tail.len())
        } else {
            "no skippable frame with the GNUlInUx magic at the end of the blob".into()
        },
    ))
}

fn annotation<'a>(ann: Option<&'a HashMap<String, String>>, keys: &[&str]) -> Option<&'a str> {
    let ann = ann?;
    keys.iter().find_map(|k| ann.get(*k).map(String::as_str))
}

fn annotation_digest(
    ann: Option<&HashMap<String, String>>,
    keys: &[&str],
) -> Result<Option<Digest>> {
    annotation(ann, keys).map(Digest::parse).transpose()
}

/// Read a zstd:chunked blob's TOC: from the position annotation when the
/// layer descriptor has one (one Range GET), else footer then TOC (two). The
/// compressed TOC is checked against the manifest-checksum annotation and
/// the JSON against `containerd.io/snapshot/stargz/toc.digest`, when present.
pub async fn open(
    source: &dyn Source,
    digest: &Digest,
    blob_size: u64,
    annotations: Option<&HashMap<String, String>>,
) -> Result<Toc> {
    let pos_keys = [
        MANIFEST_POSITION_ANNOTATION,
        GITHUB_MANIFEST_POSITION_ANNOTATION,
    ];
    let pos = match annotation(annotations, &pos_keys) {
        Some(s) => parse_position(s)?,
        None => {
            let n = FOOTER_SIZE_V2.min(blob_size);
            let tail = source.blob_range(digest, blob_size - n, n).await?;
            parse_footer(&tail).map_err(|e| in_blob(e, digest))?
        }
    };
    check_position(&pos, blob_size).map_err(|e| in_blob(e, digest))?;
    let compressed = source
        .blob_range(digest, pos.offset, pos.compressed_len)
        .await?;
    let checksum = annotation_digest(
        annotations,
        &[
            MANIFEST_CHECKSUM_ANNOTATION,
            GITHUB_MANIFEST_CHECKSUM_ANNOTATION,
        ],
    )?;
    let toc_digest = annotation_digest(annotations, &[TOC_DIGEST_ANNOTATION])?;
    toc_from_compressed(
        &compressed,
        &pos,
        digest.clone(),
        checksum.as_ref(),
        toc_digest.as_ref(),
    )
}

fn in_blob(e: Error, digest: &Digest) -> Error {
    match e {
        Error::Invalid { what, reason } => {
            Error::invalid(format!("{what} of blob {digest}"), reason)
        }
        other => other,
    }
}

fn check_position(pos: &ManifestPosition, blob_size: u64) -> Result<()> {
    let bad = |reason: String| Error::invalid("zstd:chunked manifest position", reason);
    if pos.kind != MANIFEST_TYPE_TOC {
        return Err(bad(format!(
            "manifest type {} (only 1, the TOC JSON, is known)",
            pos.kind
        )));
    }
    if pos.offset < 8 || pos.offset.saturating_add(pos.compressed_len) > blob_size {
        return Err(bad(format!(
            "{}+{} is outside the {blob_size}-byte blob",
            pos.offset, pos.compressed_len
        )));
    }
    for len in [pos.compressed_len, pos.uncompressed_len] {
        if len > MAX_TOC_SIZE {
            return Err(Error::TooLarge {
                what: "zstd:chunked manifest".into(),
                size: len,
                limit: MAX_TOC_SIZE,
            });
        }
    }
    Ok(())
}

/// Verify and decompress a compressed TOC and parse it.
pub fn toc_from_compressed(
    compressed: &[u8],
    pos: &ManifestPosition,
    blob: Digest,
    checksum: Option<&Digest>,
    toc_digest: Option<&Digest>,
) -> Result<Toc> {
    let what = || format!("zstd:chunked manifest of blob {blob}");
    if let Some(expected) = checksum {
        let actual = Digest::of(compressed);
        if actual != *expected {
            return Err(Error::ContentMismatch {
                what: what(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    let mut json = Vec::with_capacity(pos.uncompressed_len.min(64 << 20) as usize);
    zstd::stream::read::Decoder::with_buffer(compressed)
        .and_then(|d| d.take(MAX_TOC_SIZE + 1).read_to_end(&mut json))
        .map_err(|e| Error::invalid(what(), format!("decompressing: {e}")))?;
    if pos.uncompressed_len != 0 && json.len() as u64 != pos.uncompressed_len {
        return Err(Error::invalid(
            what(),
            format!(
                "decompresses to {} bytes, position says {}",
                json.len(),
                pos.uncompressed_len
            ),
        ));
    }
    // Payloads end where the skippable frame holding the TOC begins.
    let toc_offset = pos
        .offset
        .checked_sub(8)
        .ok_or_else(|| Error::invalid(what(), "offset leaves no room for its skippable frame"))?;
    let mut toc = Toc::from_json(&json, blob, ChunkCompression::Zstd, toc_offset, toc_digest)?;
    toc.verified = checksum.is_some() || toc_digest.is_some();
    Ok(toc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer(magic: &[u8; 8], v2: bool) -> Vec<u8> {
        let mut f = SKIPPABLE_MAGIC.to_vec();
        f.extend_from_slice(&(if v2 { 64u32 } else { 40 }).to_le_bytes());
        for v in [3967103u64, 1109, 3948, 1] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        if v2 {
            for v in [5000000u64, 10, 20] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        }
        f.extend_from_slice(magic);
        f
    }

    #[test]
    fn footers_both_forms() {
        let want = ManifestPosition {
            offset: 3967103,
            compressed_len: 1109,
            uncompressed_len: 3948,
            kind: 1,
        };
        // ctr-remote: exactly what it wrote here (48 bytes), with junk before.
        let mut tail = vec![0xaa; 24];
        tail.extend(footer(MAGIC_CTR_REMOTE, false));
        assert_eq!(parse_footer(&tail).unwrap(), want);
        assert_eq!(parse_footer(&tail[24..]).unwrap(), want);
        // containers/storage: 72 bytes.
        let f = footer(MAGIC_CONTAINERS, true);
        assert_eq!(f.len(), 72);
        assert_eq!(parse_footer(&f).unwrap(), want);
    }

    #[test]
    fn footer_garbage() {
        for tail in [
            &b""[..],
            &[0u8; 47][..],
            &[0u8; 200][..],
            &footer(b"GNUlInUX", false)[..],
        ] {
            let err = parse_footer(tail).unwrap_err().to_string();
            assert!(err.contains("zstd:chunked footer"), "{err}");
        }
    }

    #[test]
    fn positions() {
        let p = parse_position("107123052:1009822:5525223:1").unwrap();
        assert_eq!(
            (p.offset, p.compressed_len, p.uncompressed_len, p.kind),
            (107123052, 1009822, 5525223, 1)
        );
        for bad in ["", "1:2:3", "1:2:3:4:5", "a:b:c:d", "-1:2:3:1"] {
            assert!(parse_position(bad).is_err(), "{bad}");
        }
        let p = parse_position("5:1:1:2").unwrap();
        assert!(check_position(&p, 100)
            .unwrap_err()
            .to_string()
            .contains("type 2"));
        let p = parse_position("90:20:1:1").unwrap();
        assert!(check_position(&p, 100)
            .unwrap_err()
            .to_string()
            .contains("outside"));
    }

    #[test]
    fn toc_checksums() {
        let json = br#"{"version":1,"entries":[{"name":"d/","type":"dir"}]}"#;
        let compressed = zstd::bulk::compress(json, 3).unwrap();
        let pos = ManifestPosition {
            offset: 100,
            compressed_len: compressed.len() as u64,
            uncompressed_len: json.len() as u64,
            kind: 1,
        };
        let blob = Digest::of(b"b");
        let sum = Digest::of(&compressed);
        let toc = toc_from_compressed(
            &compressed,
            &pos,
            blob.clone(),
            Some(&sum),
            Some(&Digest::of(json)),
        )
        .unwrap();
        assert!(toc.verified);
        assert_eq!(toc.toc_offset, 92);
        assert_eq!(toc.entries.len(), 1);
        let err = toc_from_compressed(
            &compressed,
            &pos,
            blob.clone(),
            Some(&Digest::of(b"x")),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, Error::ContentMismatch { .. }));
        let err = toc_from_compressed(
            &compressed,
            &pos,
            blob.clone(),
            None,
            Some(&Digest::of(b"x")),
        )
        .unwrap_err();
        assert!(matches!(err, Error::ContentMismatch { .. }));
        assert!(toc_from_compressed(b"garbage", &pos, blob, None, None).is_err());
    }
}
