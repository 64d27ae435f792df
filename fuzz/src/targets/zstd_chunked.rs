//! zstd:chunked blobs: both footers (`parse_footer`), the position
//! annotation (`parse_position`), the compressed TOC in its skippable frame
//! (`zstd_chunked::open`, over the input as the whole blob), then every
//! small regular file read through its zstd chunks.
//!
//! An input starting with `@` is `@POSITION\n` then the blob: the TOC is
//! found by the manifest-position annotation instead of the footer.

use std::collections::HashMap;

use super::super::{blob_digest, check_toc, Mem};
use bytes::Bytes;
use futures::executor::block_on;
use ggfs::formats::zstd_chunked::{self, MANIFEST_POSITION_ANNOTATION};

/// One input.
pub fn run(data: &[u8]) {
    let mut blob = data;
    let mut annotations = None;
    if let Some(rest) = data.strip_prefix(b"@") {
        let n = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let Ok(pos) = std::str::from_utf8(&rest[..n]) else {
            return;
        };
        if let Ok(p) = zstd_chunked::parse_position(pos) {
            let shown = format!(
                "{}:{}:{}:{}",
                p.offset, p.compressed_len, p.uncompressed_len, p.kind
            );
            assert_eq!(zstd_chunked::parse_position(&shown).unwrap(), p);
        }
        let ann = HashMap::from([(MANIFEST_POSITION_ANNOTATION.to_string(), pos.to_string())]);
        annotations = Some(ann);
        blob = rest.get(n + 1..).unwrap_or(&[]);
    }
    if let Ok(p) = zstd_chunked::parse_footer(blob) {
        // The fields are read from the last 48 or 72 bytes.
        assert!(blob.len() >= zstd_chunked::FOOTER_SIZE as usize);
        let _ = p;
    }
    let src = Mem(Bytes::copy_from_slice(blob));
    let Ok(toc) = block_on(zstd_chunked::open(
        &src,
        &blob_digest(),
        blob.len() as u64,
        annotations.as_ref(),
    )) else {
        return;
    };
    assert!(toc.toc_offset < blob.len() as u64);
    check_toc(&toc, &src);
}
