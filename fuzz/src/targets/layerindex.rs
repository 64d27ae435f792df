//! The cached layer-index file (`LayerIndexFile::from_body`, the body inside
//! `from_bytes`'s checksummed envelope, and `from_bytes` on the raw input).
//!
//! Input: a flags byte, the length (u16 LE) of the file body up to its last
//! field, that part of the body, then the body of the tar index the last
//! field holds. The harness seals that tar index as the cache does (when it
//! decodes; else passes it raw, to be refused) and appends it, so the
//! fuzzer reaches the checks on a well-formed inner index. Flags: bits 0-1
//! the layer's compression; bit 2 set: expect the layer digest and size the
//! body names (else fixed ones, which it must refuse unless it names them).
//!
//! What decodes re-encodes and decodes to itself, and its blocks cover the
//! blob exactly.

use super::super::{blob_digest, take_u64};
use ggfs::formats::layerindex::LayerIndexFile;
use ggfs::formats::tarindex::LayerIndex;
use ggfs::image::manifest::Compression;
use ggfs::Digest;

/// One input.
pub fn run(data: &[u8]) {
    let mut rest = data;
    let flags = take_u64(&mut rest, 1);
    let compression = match flags & 3 {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let _ = LayerIndexFile::from_bytes(rest, &blob_digest(), 1 << 20, compression);
    let n = (take_u64(&mut rest, 2) as usize).min(rest.len());
    let (head, inner) = rest.split_at(n);
    let sealed = match LayerIndex::from_body(inner) {
        Ok(i) => i.to_bytes().expect("a decoded index encodes"),
        Err(_) => inner.to_vec(),
    };
    let mut body = head.to_vec();
    body.extend_from_slice(&(sealed.len() as u64).to_le_bytes());
    body.extend_from_slice(&sealed);
    // What the body names: a length-prefixed digest, then the size.
    let (mut layer, mut size) = (blob_digest(), 1 << 20);
    if flags & 4 != 0 {
        let mut h = head;
        let len = (take_u64(&mut h, 8) as usize).min(h.len());
        let named = std::str::from_utf8(&h[..len])
            .ok()
            .and_then(|s| Digest::parse(s).ok());
        h = &h[len..];
        if let Some(d) = named {
            layer = d;
        }
        size = take_u64(&mut h, 8);
    }
    let Ok(file) = LayerIndexFile::from_body(&body, &layer, size, compression) else {
        return;
    };
    assert_eq!(file.layer, layer);
    assert_eq!(file.size, size);
    assert_eq!(file.index.compression, compression);
    assert!(file.index.compressed_size <= size);
    let bytes = file.to_bytes().expect("a decoded file encodes");
    let again = LayerIndexFile::from_bytes(&bytes, &layer, size, compression).expect("and decodes");
    assert_eq!(again, file);
    let mut covered = 0u64;
    for b in 0..file.blocks.len() as u64 {
        let (at, len) = file.block_range(b).expect("a listed block has a range");
        assert_eq!(at, covered);
        assert!(len > 0 && len <= file.block_size);
        covered += len;
        assert!(file.verify_block(b, &[]).is_err());
    }
    assert_eq!(covered, size);
    assert!(file.block_range(file.blocks.len() as u64).is_none());
}
