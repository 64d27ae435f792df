//! zran checkpoint decoding (`GzipIndex::from_body`, and `from_bytes` on
//! the raw input), then a random read through the decoded checkpoints over
//! the rest of the input as the compressed stream: inflate restarted at an
//! arbitrary bit offset with an arbitrary window must fail cleanly or return
//! exactly the bytes asked for, fetching exactly what `fetch_range` said.
//!
//! Input: body length (u16 LE), body, read offset (u32 LE), read length
//! (u16 LE), compressed stream.

use super::super::{fetcher, take_u64};
use ggfs::formats::zran::GzipIndex;

/// One input.
pub fn run(data: &[u8]) {
    let _ = GzipIndex::from_bytes(data);
    let mut rest = data;
    let n = (take_u64(&mut rest, 2) as usize).min(rest.len());
    let (body, mut rest) = rest.split_at(n);
    let Ok(index) = GzipIndex::from_body(body) else {
        return;
    };
    let bytes = index.to_bytes().expect("a decoded index encodes");
    assert_eq!(GzipIndex::from_bytes(&bytes).expect("and decodes"), index);
    let offset = take_u64(&mut rest, 4);
    let len = take_u64(&mut rest, 2) as usize;
    let stream = rest;
    let planned = index.fetch_range(offset, len);
    let mut fetch = fetcher(stream);
    let mut asked = None;
    let got = index.read_at(offset, len, |off, n| {
        asked = Some((off, n));
        fetch(off, n)
    });
    match planned {
        Ok(p) => assert_eq!(asked, p),
        Err(_) => assert!(got.is_err()),
    }
    if let Ok(b) = got {
        let end = offset
            .saturating_add(len as u64)
            .min(index.uncompressed_size);
        assert_eq!(b.len() as u64, end.saturating_sub(offset));
    }
}
