//! The fuzz targets (`targets`, one module each, wrapped for AFL++ by
//! `src/bin/<target>.rs`) and the helpers they share.

use bytes::Bytes;
use futures::executor::block_on;
use ggfs::formats::estargz::{EntryType, Toc};
use ggfs::image::{ByteStream, Source};
use ggfs::{Digest, Error, RawManifest, Result};

pub mod targets;

/// One blob held in memory, read by range (as a registry answers Range
/// requests: short at the end, empty past it).
pub struct Mem(pub Bytes);

#[async_trait::async_trait]
impl Source for Mem {
    fn name(&self) -> String {
        "fuzz".into()
    }
    async fn manifest(&self, r: &str) -> Result<RawManifest> {
        Err(Error::NotFound(r.into()))
    }
    async fn blob(&self, _: &Digest) -> Result<ByteStream> {
        Err(Error::NotFound("stream".into()))
    }
    async fn blob_range(&self, _: &Digest, off: u64, len: u64) -> Result<Bytes> {
        let end = off.saturating_add(len).min(self.0.len() as u64);
        Ok(self.0.slice(off.min(end) as usize..end as usize))
    }
    async fn blob_size(&self, _: &Digest) -> Result<u64> {
        Ok(self.0.len() as u64)
    }
}

/// A `fetch(offset, len)` over `blob` for the random-access readers: exactly
/// those bytes, or an error when they are not all there.
pub fn fetcher(blob: &[u8]) -> impl FnMut(u64, u64) -> Result<Bytes> + '_ {
    move |off, len| {
        let end = off.checked_add(len).filter(|&e| e <= blob.len() as u64);
        match end {
            Some(end) => Ok(Bytes::copy_from_slice(&blob[off as usize..end as usize])),
            None => Err(Error::invalid(
                "fuzz blob",
                format!("{off}+{len} is past its end"),
            )),
        }
    }
}

/// A little-endian integer from the front of `data`, advancing it (0 when
/// too short, so every input decodes to something).
pub fn take_u64(data: &mut &[u8], n: usize) -> u64 {
    let n = n.min(8).min(data.len());
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    u64::from_le_bytes(b)
}

/// The blob digest the targets name their input by (not its real digest:
/// hashing every input would only slow the fuzzer).
pub fn blob_digest() -> Digest {
    Digest::parse("sha256:0000000000000000000000000000000000000000000000000000000000000000")
        .expect("valid digest")
}

/// Files larger than this are not read (a TOC may claim terabytes of zeros).
const MAX_READ: u64 = 1 << 20;

/// What every opened TOC (eStargz or zstd:chunked) must satisfy, and
/// every small regular file read through it.
pub fn check_toc(toc: &Toc, src: &Mem) {
    for (i, e) in toc.entries.iter().enumerate() {
        let chunks = toc.chunks(i);
        if e.kind == EntryType::Reg && e.size > 0 {
            assert_eq!(chunks.iter().map(|c| c.size).sum::<u64>(), e.size);
        }
        for c in chunks {
            assert!(c.zeros || (c.blob_offset < c.blob_end && c.blob_end <= toc.toc_offset));
            let r = c.file_range();
            assert!(r.end <= e.size);
        }
        if let Some(j) = toc.lookup(&e.name) {
            assert!(j < toc.entries.len());
        }
        let Ok(f) = toc.resolve(i) else { continue };
        let size = toc.entries[f].size;
        if toc.entries[f].kind != EntryType::Reg || size > MAX_READ {
            continue;
        }
        if let Ok(bytes) = block_on(toc.read(src, i, 0, size)) {
            assert_eq!(bytes.len() as u64, size);
            // A read from the middle is the same bytes.
            let mid = size / 2;
            if let Ok(part) = block_on(toc.read(src, i, mid, size)) {
                assert_eq!(part, bytes[mid as usize..]);
            }
        }
        let _ = toc.chunks_for_range(i, size / 3, size);
    }
    let _ = (toc.prefetch_range(), toc.no_prefetch());
}
