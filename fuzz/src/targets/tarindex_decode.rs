//! The cached tar index's binary form (`LayerIndex::from_body`, the body
//! inside `from_bytes`'s checksummed envelope, and `from_bytes` itself on
//! the raw input). What decodes re-encodes and decodes to itself, with
//! every entry's data inside the layer and reads that stay in bounds.

use super::super::fetcher;
use ggfs::formats::tarindex::LayerIndex;

/// One input.
pub fn run(data: &[u8]) {
    let _ = LayerIndex::from_bytes(data);
    let Ok(index) = LayerIndex::from_body(data) else {
        return;
    };
    let bytes = index.to_bytes().expect("a decoded index encodes");
    assert_eq!(LayerIndex::from_bytes(&bytes).expect("and decodes"), index);
    for e in &index.entries {
        assert!(e.offset.saturating_add(e.size) <= index.uncompressed_size);
        let _ = e.data_range();
        let _ = e.path_lossy();
    }
    // A read through the decoded index over a blob of zeros fails or
    // returns at most what was asked.
    let zeros = vec![0u8; 4096];
    for e in index.entries.iter().take(4) {
        if let Ok(Some((_, len))) = index.fetch_range(e.offset, 512) {
            if len <= zeros.len() as u64 {
                if let Ok(b) = index.read_file(e, 0, 512, fetcher(&zeros)) {
                    assert!(b.len() <= 512);
                }
            }
        }
    }
}
