//! The tar index built in one pass over arbitrary layer bytes
//! (`tarindex::index_layer_with_span`): plain tar, tar+gzip (with zran
//! checkpoints every few KiB) and tar+zstd (frame starts). The first byte
//! picks the compression and checkpoint span; the rest is the blob. What
//! indexes encodes and decodes to itself, and every small file read by
//! random access from the blob is the bytes the streaming pass saw.

use super::super::fetcher;
use ggfs::formats::tarindex::{self, LayerIndex, TarKind};
use ggfs::image::manifest::Compression;

/// One input.
pub fn run(data: &[u8]) {
    let Some((&sel, blob)) = data.split_first() else {
        return;
    };
    let compression = match sel % 3 {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let span = 512 * (1 + u64::from(sel / 3 % 16));
    let mut tar = Vec::new();
    let mut seen = 0usize;
    let Ok(index) =
        tarindex::index_layer_with_span(blob, compression, span, &mut tar, |_| seen += 1)
    else {
        return;
    };
    assert_eq!(seen, index.entries.len());
    assert_eq!(index.compression, compression);
    assert_eq!(index.uncompressed_size, tar.len() as u64);
    assert!(index.compressed_size <= blob.len() as u64);
    if compression == Compression::None {
        assert_eq!(tar, blob[..tar.len()]);
    }
    let bytes = index.to_bytes().expect("an index encodes");
    assert_eq!(LayerIndex::from_bytes(&bytes).expect("and decodes"), index);
    for e in &index.entries {
        let r = e.data_range();
        assert!(r.end <= index.uncompressed_size, "{e:?}");
        if e.kind != TarKind::File || e.size > 1 << 20 {
            continue;
        }
        let want = &tar[r.start as usize..r.end as usize];
        let got = index
            .read_file(e, 0, e.size as usize, fetcher(blob))
            .expect("a file of an indexed blob reads");
        assert_eq!(got, want, "{:?}", e.path_lossy());
        let mid = e.size / 2;
        let got = index
            .read_file(e, mid, e.size as usize, fetcher(blob))
            .expect("its second half reads");
        assert_eq!(got, want[mid as usize..], "{:?}", e.path_lossy());
        if let Some((off, len)) = index.fetch_range(e.offset, e.size as usize).unwrap() {
            assert!(off.saturating_add(len) <= blob.len() as u64);
        }
    }
}
