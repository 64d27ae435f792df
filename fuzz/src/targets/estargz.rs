//! eStargz blobs: the footer (`parse_footer`), the TOC member it points at
//! and the TOC JSON (`estargz::open`, over the input as the whole blob),
//! then every small regular file read through its chunks. What opens has
//! payload spans before the TOC, chunks that tile each file, and reads that
//! return exactly the bytes asked for.

use super::super::{blob_digest, check_toc, Mem};
use bytes::Bytes;
use futures::executor::block_on;
use ggfs::formats::estargz;

/// One input.
pub fn run(data: &[u8]) {
    if let Ok((off, size)) = estargz::parse_footer(data) {
        assert!(size == estargz::FOOTER_SIZE || size == estargz::LEGACY_FOOTER_SIZE);
        assert_eq!(
            estargz::parse_footer(&estargz::footer_bytes(off)).unwrap(),
            (off, 51)
        );
    }
    let src = Mem(Bytes::copy_from_slice(data));
    let Ok(toc) = block_on(estargz::open(&src, &blob_digest(), data.len() as u64, None)) else {
        return;
    };
    assert!(toc.toc_offset < data.len() as u64);
    // The TOC's own digest verifies it.
    let again = block_on(estargz::open(
        &src,
        &blob_digest(),
        data.len() as u64,
        Some(&toc.toc_digest),
    ))
    .expect("a TOC opens with its own digest");
    assert!(again.verified);
    assert_eq!(again.entries, toc.entries);
    check_toc(&toc, &src);
}
