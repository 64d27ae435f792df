//! eStargz: lazily readable gzip layers (containerd/stargz-snapshotter
//! `docs/estargz.md`), and the TOC model shared with zstd:chunked.
//!
//! A blob ends with a footer that points at a gzip member holding the TOC
//! (`stargz.index.json`). The TOC lists every tar entry and, for regular
//! files, where each chunk's gzip member starts. So two Range GETs (footer,
//! TOC) give all metadata, and one more per chunk gives file bytes, each chunk
//! checked against its `chunkDigest` before it is returned.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::ops::Range;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, Result};
use crate::image::Source;

/// Size of the eStargz footer (an empty gzip member with an `SG` extra field).
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy (CRFS) stargz footer: the extra field without `SG`.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Layer annotation: sha256 of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation: size of the uncompressed tar.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Name of the TOC's tar entry.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Files before this entry are worth prefetching.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Present when nothing should be prefetched.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Chunks larger than this are not decoded into memory (stream them).
pub const MAX_CHUNK_IN_MEMORY: u64 = 256 * 1024 * 1024;
/// TOC JSON larger than this is refused rather than held in memory.
pub const MAX_TOC_SIZE: u64 = 512 * 1024 * 1024;

/// How chunk payloads are compressed: each chunk starts a gzip member
/// (eStargz) or a zstd frame (zstd:chunked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkCompression {
    /// gzip members (eStargz).
    Gzip,
    /// zstd frames (zstd:chunked).
    Zstd,
}

/// The kind of a TOC entry (`type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    /// A directory.
    Dir,
    /// A regular file (its first chunk).
    Reg,
    /// A symbolic link.
    Symlink,
    /// A hard link to `link_name`.
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// A later chunk of the preceding `Reg` entry.
    Chunk,
}

impl EntryType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "dir" => EntryType::Dir,
            "reg" => EntryType::Reg,
            "symlink" => EntryType::Symlink,
            "hardlink" => EntryType::Hardlink,
            "char" => EntryType::Char,
            "block" => EntryType::Block,
            "fifo" => EntryType::Fifo,
            "chunk" => EntryType::Chunk,
            _ => return None,
        })
    }
}

/// One TOC entry, validated. Absent JSON keys read as zero/empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocEntry {
    /// The tar path as written (`a/b`, `dir/`, `.`); see [`normalize_name`].
    pub name: String,
    /// What the entry is.
    pub kind: EntryType,
    /// Logical size of a regular file.
    pub size: u64,
    /// Modification time, seconds since the epoch (0 when absent).
    pub modtime: i64,
    /// Nanoseconds past `modtime`.
    pub modtime_nsec: u32,
    /// Symlink or hardlink target.
    pub link_name: String,
    /// Permission bits plus setuid/setgid/sticky; the file type is `kind`.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Device major number (`Char`, `Block`).
    pub dev_major: u32,
    /// Device minor number (`Char`, `Block`).
    pub dev_minor: u32,
    /// Extended attributes, values decoded from base64.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Digest of the whole file's content.
    pub digest: Option<Digest>,
    /// Where this chunk's gzip member / zstd frame starts in the blob.
    pub offset: u64,
    /// zstd:chunked (containers/storage): where the file's payload ends.
    pub end_offset: Option<u64>,
    /// Uncompressed offset of the chunk inside its member.
    pub inner_offset: u64,
    /// Offset of this chunk in the file.
    pub chunk_offset: u64,
    /// 0 means "to the end of the file".
    pub chunk_size: u64,
    /// Digest of this chunk's uncompressed bytes.
    pub chunk_digest: Option<Digest>,
    /// zstd:chunked `chunkType: "zeros"`: a hole with no payload.
    pub zeros: bool,
}

/// A chunk of a regular file, resolved: where its bytes are in the file and
/// in the blob, and the digest that vouches for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the TOC entry describing this chunk (`Reg` or `Chunk`).
    pub entry: usize,
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    /// Uncompressed length of the chunk.
    pub size: u64,
    /// Compressed span to fetch: `blob_offset..blob_end`.
    pub blob_offset: u64,
    /// End of the compressed span (exclusive).
    pub blob_end: u64,
    /// Bytes to skip in the decompressed span before the chunk starts.
    pub inner_offset: u64,
    /// `chunkDigest`, or the file's `digest` when the file is one chunk.
    pub digest: Option<Digest>,
    /// A hole: reads as zeros, nothing to fetch.
    pub zeros: bool,
}

impl Chunk {
    /// The bytes of the file this chunk holds.
    pub fn file_range(&self) -> Range<u64> {
        self.file_offset..self.file_offset + self.size
    }
}

/// A parsed, validated TOC of an eStargz or zstd:chunked blob.
#[derive(Clone, Debug)]
pub struct Toc {
    /// TOC format version (1).
    pub version: u32,
    /// The entries, in blob order.
    pub entries: Vec<TocEntry>,
    /// The blob this TOC describes (named in errors).
    pub blob: Digest,
    /// gzip (eStargz) or zstd (zstd:chunked).
    pub compression: ChunkCompression,
    /// Where the TOC starts in the blob: the end of the last payload.
    pub toc_offset: u64,
    /// sha256 of the uncompressed TOC JSON.
    pub toc_digest: Digest,
    /// Whether the TOC was checked against an annotation digest.
    pub verified: bool,
    chunks: Vec<Vec<Chunk>>,
    by_name: HashMap<String, usize>,
}

/// The path a TOC or tar name denotes, without `./`, leading or trailing `/`
/// (the root is `""`).
pub fn normalize_name(name: &str) -> &str {
    let mut n = name;
    loop {
        if let Some(rest) = n.strip_prefix("./") {
            n = rest;
        } else if let Some(rest) = n.strip_prefix('/') {
            n = rest;
        } else {
            break;
        }
    }
    let n = n.trim_end_matches('/');
    if n == "." {
        ""
    } else {
        n
    }
}

// ---------------------------------------------------------------------------
// Footer

/// Parse an eStargz footer from the last bytes of a blob (at least 51 bytes,
/// or exactly 47 for a small legacy blob). Returns the TOC member's offset and
/// the footer size that matched (51, or 47 for legacy stargz).
pub fn parse_footer(tail: &[u8]) -> Result<(u64, u64)> {
    let bad = |reason: String| Error::invalid("eStargz footer", reason);
    if tail.len() >= FOOTER_SIZE as usize {
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        if let Ok(off) = parse_footer_exact(f, true) {
            return Ok((off, FOOTER_SIZE));
        }
    }
    if tail.len() >= LEGACY_FOOTER_SIZE as usize {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if let Ok(off) = parse_footer_exact(f, false) {
            return Ok((off, LEGACY_FOOTER_SIZE));
        }
    }
    if tail.len() < LEGACY_FOOTER_SIZE as usize {
        return Err(bad(format!(
            "blob tail is {} bytes, shorter than any footer",
            tail.len()
        )));
    }
    // Report why the current-format footer was refused.
    let f = &tail[tail.len().saturating_sub(FOOTER_SIZE as usize)..];
    match parse_footer_exact(f, f.len() == FOOTER_SIZE as usize) {
        Err(e) => Err(e),
        Ok(_) => Err(bad("not an eStargz or stargz footer".into())),
    }
}

/// One footer layout: gzip header with FEXTRA, then `%016xSTARGZ`, either
/// inside an `SG` subfield (eStargz) or bare (legacy).
fn parse_footer_exact(f: &[u8], estargz: bool) -> Result<u64> {
    let bad = |reason: &str| Error::invalid("eStargz footer", reason);
    if f.len() < 12 || f[0..4] != [0x1f, 0x8b, 0x08, 0x04] {
        return Err(bad("does not start with a gzip header with an extra field"));
    }
    let xlen = u16::from_le_bytes([f[10], f[11]]) as usize;
    let extra = f
        .get(12..12 + xlen)
        .ok_or_else(|| bad("extra field runs past the end"))?;
    let payload = if estargz {
        if xlen != 26 || extra[0..2] != *b"SG" || u16::from_le_bytes([extra[2], extra[3]]) != 22 {
            return Err(bad("extra field is not a 22-byte SG subfield"));
        }
        &extra[4..]
    } else {
        if xlen != 22 {
            return Err(bad("legacy extra field is not 22 bytes"));
        }
        extra
    };
    if &payload[16..] != b"STARGZ" {
        return Err(bad("extra field does not end in STARGZ"));
    }
    let hex = std::str::from_utf8(&payload[..16]).map_err(|_| bad("TOC offset is not hex"))?;
    u64::from_str_radix(hex, 16).map_err(|_| bad("TOC offset is not hex"))
}

/// Build an eStargz footer pointing at `toc_offset` (for tests and writers).
pub fn footer_bytes(toc_offset: u64) -> [u8; FOOTER_SIZE as usize] {
    let mut f = [0u8; FOOTER_SIZE as usize];
    f[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f
}

// ---------------------------------------------------------------------------
// Opening a blob

/// Read an eStargz blob's TOC with two Range GETs (footer, then the TOC
/// member). When `toc_digest` (the `containerd.io/snapshot/stargz/toc.digest`
/// annotation) is given, the TOC JSON must hash to it.
pub async fn open(
    source: &dyn Source,
    digest: &Digest,
    blob_size: u64,
    toc_digest: Option<&Digest>,
) -> Result<Toc> {
    // The footer comes with as much of the blob's end as most TOCs fill
    // (theirs is ~0.6% of a layer): one round trip for both, usually.
    let tail_len = (blob_size / 128)
        .clamp(16 << 10, 2 << 20)
        .max(FOOTER_SIZE)
        .min(blob_size);
    let tail_start = blob_size - tail_len;
    let tail = source.blob_range(digest, tail_start, tail_len).await?;
    if tail.len() as u64 != tail_len {
        return Err(Error::invalid(
            format!("blob {digest}"),
            format!("asked for its last {tail_len} bytes, got {}", tail.len()),
        ));
    }
    let (toc_offset, footer_size) = parse_footer(&tail).map_err(|e| in_blob(e, digest))?;
    if toc_offset >= blob_size - footer_size {
        return Err(Error::invalid(
            format!("eStargz footer of blob {digest}"),
            format!("TOC offset {toc_offset} is past the payload ({blob_size} bytes)"),
        ));
    }
    let toc_len = blob_size - footer_size - toc_offset;
    if toc_len > MAX_TOC_SIZE {
        return Err(Error::TooLarge {
            what: format!("TOC of blob {digest}"),
            size: toc_len,
            limit: MAX_TOC_SIZE,
        });
    }
    let member = if toc_offset >= tail_start {
        let at = (toc_offset - tail_start) as usize;
        tail.slice(at..at + toc_len as usize)
    } else {
        let head = source
            .blob_range(digest, toc_offset, tail_start - toc_offset)
            .await?;
        [head, tail.slice(..(tail_len - footer_size) as usize)]
            .concat()
            .into()
    };
    let json = toc_json_from_member(&member).map_err(|e| in_blob(e, digest))?;
    Toc::from_json(
        &json,
        digest.clone(),
        ChunkCompression::Gzip,
        toc_offset,
        toc_digest,
    )
}

/// Add the blob's name to a footer/TOC error.
fn in_blob(e: Error, digest: &Digest) -> Error {
    match e {
        Error::Invalid { what, reason } => {
            Error::invalid(format!("{what} of blob {digest}"), reason)
        }
        other => other,
    }
}

/// Gunzip the TOC member and take `stargz.index.json` out of its tar.
fn toc_json_from_member(member: &[u8]) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::invalid("eStargz TOC", reason);
    let gz = flate2::read::MultiGzDecoder::new(member);
    let mut archive = tar::Archive::new(gz);
    let mut entries = archive.entries().map_err(|e| bad(e.to_string()))?;
    let mut entry = entries
        .next()
        .ok_or_else(|| bad("TOC member holds no tar entry".into()))?
        .map_err(|e| bad(format!("TOC member is not a tar: {e}")))?;
    let path = entry.path_bytes().into_owned();
    if path != TOC_TAR_NAME.as_bytes() {
        return Err(bad(format!(
            "TOC member holds {:?}, not {TOC_TAR_NAME}",
            String::from_utf8_lossy(&path)
        )));
    }
    let size = entry.size();
    if size > MAX_TOC_SIZE {
        return Err(Error::TooLarge {
            what: "eStargz TOC JSON".into(),
            size,
            limit: MAX_TOC_SIZE,
        });
    }
    let mut json = Vec::with_capacity(size.min(64 << 20) as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("reading TOC JSON: {e}")))?;
    Ok(json)
}

// ---------------------------------------------------------------------------
// TOC JSON

#[derive(Deserialize)]
struct RawToc<'a> {
    #[serde(default)]
    version: u32,
    #[serde(borrow)]
    entries: Vec<RawEntry<'a>>,
}

/// An entry as the JSON has it. The strings that are only looked at are
/// borrowed from the JSON (owned only when they hold escapes): a TOC has
/// thousands of entries, and its decode is on the path of a first read.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawEntry<'a> {
    name: String,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    size: u64,
    #[serde(borrow)]
    modtime: Cow<'a, str>,
    link_name: String,
    mode: u64,
    uid: u32,
    gid: u32,
    dev_major: u32,
    dev_minor: u32,
    xattrs: BTreeMap<String, String>,
    #[serde(borrow)]
    digest: Cow<'a, str>,
    offset: u64,
    end_offset: u64,
    inner_offset: u64,
    chunk_offset: u64,
    chunk_size: u64,
    #[serde(borrow)]
    chunk_digest: Cow<'a, str>,
    #[serde(borrow)]
    chunk_type: Cow<'a, str>,
}

/// The last modtime parsed: most entries of a layer share a few times.
type ModtimeMemo<'a> = Option<(Cow<'a, str>, (i64, u32))>;

impl<'a> RawEntry<'a> {
    fn validate(self, index: usize, memo: &mut ModtimeMemo<'a>) -> Result<TocEntry> {
        let what = || format!("TOC entry {index} ({:?})", self.name);
        let bad = |reason: String| Error::invalid(what(), reason);
        let kind = EntryType::parse(&self.kind)
            .ok_or_else(|| bad(format!("unknown type {:?}", self.kind)))?;
        let opt_digest = |s: &str, key: &str| -> Result<Option<Digest>> {
            if s.is_empty() {
                return Ok(None);
            }
            Digest::parse(s)
                .map(Some)
                .map_err(|e| bad(format!("{key}: {e}")))
        };
        let (modtime, modtime_nsec) = match memo {
            Some((s, t)) if *s == self.modtime => *t,
            _ => {
                let t = parse_modtime(&self.modtime).map_err(bad)?;
                *memo = Some((self.modtime.clone(), t));
                t
            }
        };
        let mut xattrs = BTreeMap::new();
        for (k, v) in &self.xattrs {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|e| bad(format!("xattr {k:?} is not base64: {e}")))?;
            xattrs.insert(k.clone(), bytes);
        }
        let zeros = match &*self.chunk_type {
            "" | "data" => false,
            "zeros" => true,
            other => return Err(bad(format!("unknown chunkType {other:?}"))),
        };
        Ok(TocEntry {
            digest: opt_digest(&self.digest, "digest")?,
            chunk_digest: opt_digest(&self.chunk_digest, "chunkDigest")?,
            name: self.name,
            kind,
            size: self.size,
            modtime,
            modtime_nsec,
            link_name: self.link_name,
            mode: (self.mode & 0o7777) as u32,
            uid: self.uid,
            gid: self.gid,
            dev_major: self.dev_major,
            dev_minor: self.dev_minor,
            xattrs,
            offset: self.offset,
            end_offset: (self.end_offset > 0).then_some(self.end_offset),
            inner_offset: self.inner_offset,
            chunk_offset: self.chunk_offset,
            chunk_size: self.chunk_size,
            zeros,
        })
    }
}

/// RFC 3339 to (seconds, nanoseconds); empty and Go's zero time mean 0.
fn parse_modtime(s: &str) -> std::result::Result<(i64, u32), String> {
    if s.is_empty() || s.starts_with("0001-01-01T00:00:00") {
        return Ok((0, 0));
    }
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("modtime {s:?} is not RFC 3339: {e}"))?;
    Ok((t.timestamp(), t.timestamp_subsec_nanos()))
}

impl Toc {
    /// Parse and validate TOC JSON. `toc_offset` is where the TOC starts in
    /// the blob (payload spans end there). When `expected` is given the JSON
    /// must hash to it.
    pub fn from_json(
        json: &[u8],
        blob: Digest,
        compression: ChunkCompression,
        toc_offset: u64,
        expected: Option<&Digest>,
    ) -> Result<Toc> {
        // The hash runs on the other core while the JSON is parsed; the
        // entries are used only once both are done.
        let (toc_digest, raw) = std::thread::scope(|s| {
            let hash = s.spawn(|| Digest::of(json));
            let raw = serde_json::from_slice::<RawToc>(json);
            (hash.join().unwrap_or_else(|_| Digest::of(json)), raw)
        });
        if let Some(expected) = expected.filter(|&e| *e != toc_digest) {
            return Err(Error::ContentMismatch {
                what: format!("TOC of blob {blob}"),
                expected: expected.clone(),
                actual: toc_digest,
            });
        }
        let raw = raw.map_err(|e| Error::invalid(format!("TOC of blob {blob}"), e.to_string()))?;
        let mut memo = None;
        let entries = raw
            .entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| e.validate(i, &mut memo))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| in_blob(e, &blob))?;
        let chunks = resolve_chunks(&entries, toc_offset).map_err(|e| in_blob(e, &blob))?;
        let mut by_name = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if e.kind != EntryType::Chunk {
                // Later entries win, as when a tar is extracted.
                by_name.insert(normalize_name(&e.name).to_string(), i);
            }
        }
        Ok(Toc {
            version: raw.version,
            entries,
            blob,
            compression,
            toc_offset,
            toc_digest,
            verified: expected.is_some(),
            chunks,
            by_name,
        })
    }

    /// The index of the entry at `path` (any of `a/b`, `./a/b`, `/a/b/`).
    pub fn lookup(&self, path: &str) -> Option<usize> {
        self.by_name.get(normalize_name(path)).copied()
    }

    /// Follow hardlinks to the entry that holds the content.
    pub fn resolve(&self, mut index: usize) -> Result<usize> {
        for _ in 0..32 {
            let e = self.entry(index)?;
            if e.kind != EntryType::Hardlink {
                return Ok(index);
            }
            index = self.lookup(&e.link_name).ok_or_else(|| {
                Error::invalid(
                    format!("hardlink {:?} in blob {}", e.name, self.blob),
                    format!("target {:?} is not in the TOC", e.link_name),
                )
            })?;
        }
        Err(Error::invalid(
            format!("entry {index} in blob {}", self.blob),
            "hardlink chain too long",
        ))
    }

    /// Entry `index`, or an error naming the blob when there is none.
    pub fn entry(&self, index: usize) -> Result<&TocEntry> {
        self.entries.get(index).ok_or_else(|| {
            Error::NotFound(format!("entry {index} of the TOC of blob {}", self.blob))
        })
    }

    /// The chunks of a regular file, in file order (empty for other entries
    /// and empty files).
    pub fn chunks(&self, entry: usize) -> &[Chunk] {
        self.chunks.get(entry).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The chunks covering `offset..offset+len` of a regular file.
    pub fn chunks_for_range(&self, entry: usize, offset: u64, len: u64) -> &[Chunk] {
        let all = self.chunks(entry);
        let end = offset.saturating_add(len);
        if len == 0 {
            return &[];
        }
        let first = all.partition_point(|c| c.file_offset + c.size <= offset);
        let last = all.partition_point(|c| c.file_offset < end);
        &all[first..last.max(first)]
    }

    /// Blob range holding the files worth prefetching (`[0, landmark)`), if
    /// the blob has a `.prefetch.landmark`.
    pub fn prefetch_range(&self) -> Option<Range<u64>> {
        let i = self.lookup(PREFETCH_LANDMARK)?;
        let off = self.entries[i].offset;
        (off > 0).then_some(0..off)
    }

    /// True when the blob says nothing should be prefetched.
    pub fn no_prefetch(&self) -> bool {
        self.lookup(NO_PREFETCH_LANDMARK).is_some()
    }

    /// Name of a chunk for error messages.
    fn describe(&self, chunk: &Chunk) -> String {
        let name = self
            .entries
            .get(chunk.entry)
            .map(|e| e.name.as_str())
            .unwrap_or("?");
        format!(
            "chunk {}..{} of {name:?} in blob {}",
            chunk.file_offset,
            chunk.file_offset + chunk.size,
            self.blob
        )
    }

    /// Decompress and verify one chunk from its compressed span (the bytes
    /// `chunk.blob_offset..chunk.blob_end` of the blob, or a prefix of them
    /// that holds the chunk). Chunks over [`MAX_CHUNK_IN_MEMORY`] are
    /// refused: stream those with [`decode_chunk_to`](Self::decode_chunk_to).
    pub fn decode_chunk(&self, chunk: &Chunk, span: &[u8]) -> Result<Bytes> {
        if chunk.size > MAX_CHUNK_IN_MEMORY {
            return Err(Error::TooLarge {
                what: self.describe(chunk),
                size: chunk.size,
                limit: MAX_CHUNK_IN_MEMORY,
            });
        }
        let mut out = Vec::with_capacity(chunk.size as usize);
        self.decode_chunk_to(chunk, span, &mut out)?;
        Ok(Bytes::from(out))
    }

    /// Decompress one chunk from a reader of its compressed span into `out`,
    /// hashing as it goes; fails (after writing) when the bytes do not match
    /// the chunk digest, so `out` must be discarded on error.
    pub fn decode_chunk_to(
        &self,
        chunk: &Chunk,
        span: impl Read,
        mut out: impl Write,
    ) -> Result<()> {
        let what = || self.describe(chunk);
        if chunk.zeros {
            return io::copy(&mut io::repeat(0).take(chunk.size), &mut out)
                .map(drop)
                .map_err(|e| Error::io(what(), e));
        }
        let expected = chunk.digest.as_ref().ok_or_else(|| {
            Error::invalid(what(), "no chunkDigest to verify it against (legacy TOC)")
        })?;
        let mut decoder: Box<dyn Read + '_> = match self.compression {
            ChunkCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(span)),
            ChunkCompression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(span)
                    .map_err(|e| Error::invalid(what(), format!("zstd: {e}")))?,
            ),
        };
        let bad = |e: io::Error| Error::invalid(what(), format!("decompressing: {e}"));
        let skipped = io::copy(
            &mut (&mut decoder).take(chunk.inner_offset),
            &mut io::sink(),
        )
        .map_err(bad)?;
        let mut hashing = HashingWriter::new(out);
        let copied = io::copy(&mut decoder.take(chunk.size), &mut hashing).map_err(bad)?;
        if skipped + copied < chunk.inner_offset + chunk.size {
            return Err(Error::invalid(
                what(),
                format!(
                    "its span decompresses to {} bytes, need {}",
                    skipped + copied,
                    chunk.inner_offset + chunk.size
                ),
            ));
        }
        let actual = hashing.hasher.finish();
        if actual != *expected {
            return Err(Error::ContentMismatch {
                what: what(),
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Fetch, decompress and verify one chunk.
    pub async fn read_chunk(&self, source: &dyn Source, chunk: &Chunk) -> Result<Bytes> {
        if chunk.zeros {
            return self.decode_chunk(chunk, &[]);
        }
        let span = source
            .blob_range(
                &self.blob,
                chunk.blob_offset,
                chunk.blob_end - chunk.blob_offset,
            )
            .await?;
        self.decode_chunk_off_thread(chunk, span).await
    }

    /// Large chunks are decompressed on the blocking pool when there is one.
    async fn decode_chunk_off_thread(&self, chunk: &Chunk, span: Bytes) -> Result<Bytes> {
        const INLINE: usize = 256 * 1024;
        if span.len() <= INLINE || tokio::runtime::Handle::try_current().is_err() {
            return self.decode_chunk(chunk, &span);
        }
        let (toc, chunk) = self.clone_for_decode(chunk);
        tokio::task::spawn_blocking(move || toc.decode_chunk(&chunk, &span))
            .await
            .map_err(|e| Error::invalid("chunk decoder task", e.to_string()))?
    }

    /// A minimal TOC (just the chunk's entry) and the chunk re-pointed at it,
    /// to move into a blocking task.
    fn clone_for_decode(&self, chunk: &Chunk) -> (Toc, Chunk) {
        let mut c = chunk.clone();
        let entries = match self.entries.get(chunk.entry) {
            Some(e) => {
                c.entry = 0;
                vec![e.clone()]
            }
            None => Vec::new(),
        };
        let toc = Toc {
            version: self.version,
            entries,
            blob: self.blob.clone(),
            compression: self.compression,
            toc_offset: self.toc_offset,
            toc_digest: self.toc_digest.clone(),
            verified: self.verified,
            chunks: Vec::new(),
            by_name: HashMap::new(),
        };
        (toc, c)
    }

    /// Read `len` bytes at `offset` of a regular file (hardlinks followed),
    /// fetching the chunks it spans in one Range GET. Short at end of file.
    pub async fn read(
        &self,
        source: &dyn Source,
        entry: usize,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let entry = self.resolve(entry)?;
        let size = self.entry(entry)?.size;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let chunks = self.chunks_for_range(entry, offset, end - offset);
        let data = chunks.iter().filter(|c| !c.zeros);
        let lo = data.clone().map(|c| c.blob_offset).min().unwrap_or(0);
        let hi = data.map(|c| c.blob_end).max().unwrap_or(0);
        let span = if hi > lo {
            source.blob_range(&self.blob, lo, hi - lo).await?
        } else {
            Bytes::new()
        };
        if span.len() as u64 != hi - lo {
            return Err(Error::invalid(
                format!("blob {} from {}", self.blob, source.name()),
                format!("asked for {} bytes at {lo}, got {}", hi - lo, span.len()),
            ));
        }
        let mut out = Vec::with_capacity((end - offset).min(MAX_CHUNK_IN_MEMORY) as usize);
        for c in chunks {
            let bytes = if c.zeros {
                self.decode_chunk(c, &[])?
            } else {
                let s = span.slice((c.blob_offset - lo) as usize..(c.blob_end - lo) as usize);
                self.decode_chunk_off_thread(c, s).await?
            };
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.size) - c.file_offset;
            out.extend_from_slice(&bytes[from as usize..to as usize]);
        }
        if out.len() as u64 != end - offset {
            return Err(Error::invalid(
                format!("{:?} in blob {}", self.entries[entry].name, self.blob),
                "its chunks do not cover the file",
            ));
        }
        Ok(out)
    }
}

/// Group chunk entries under their file, resolve sizes and compressed spans,
/// and check that each file's chunks tile it exactly.
fn resolve_chunks(entries: &[TocEntry], toc_offset: u64) -> Result<Vec<Vec<Chunk>>> {
    // Distinct payload starts: a span ends at the next one (or the TOC).
    let mut starts: Vec<u64> = entries
        .iter()
        .filter(|e| matches!(e.kind, EntryType::Reg | EntryType::Chunk) && !e.zeros)
        .filter(|e| e.offset > 0 || e.size > 0)
        .map(|e| e.offset)
        .collect();
    starts.push(toc_offset);
    starts.sort_unstable();
    starts.dedup();
    // containers/storage writes `endOffset` on a file's entry: the end of
    // its last chunk, so the next chunk's start may come first.
    let span_end = |e: &TocEntry| -> u64 {
        let i = starts.partition_point(|&s| s <= e.offset);
        let next = starts.get(i).copied().unwrap_or(toc_offset);
        e.end_offset.map_or(next, |end| end.min(next))
    };

    let mut all: Vec<Vec<Chunk>> = vec![Vec::new(); entries.len()];
    let mut file: Option<usize> = None;
    for (i, e) in entries.iter().enumerate() {
        let owner = match e.kind {
            EntryType::Reg => {
                file = Some(i);
                if e.size == 0 {
                    continue;
                }
                i
            }
            EntryType::Chunk => {
                let f = file.ok_or_else(|| {
                    Error::invalid(
                        format!("TOC entry {i}"),
                        "chunk entry with no file before it",
                    )
                })?;
                let fname = &entries[f].name;
                if !e.name.is_empty() && normalize_name(&e.name) != normalize_name(fname) {
                    return Err(Error::invalid(
                        format!("TOC entry {i} ({:?})", e.name),
                        format!("chunk follows file {fname:?}"),
                    ));
                }
                f
            }
            _ => {
                file = None;
                continue;
            }
        };
        let fsize = entries[owner].size;
        let size = match e.chunk_size {
            0 => fsize.saturating_sub(e.chunk_offset),
            n => n,
        };
        let end = span_end(e);
        if !e.zeros && (e.offset >= end || end > toc_offset) {
            return Err(Error::invalid(
                format!("TOC entry {i} ({:?})", entries[owner].name),
                format!(
                    "payload span {}..{end} is not before the TOC at {toc_offset}",
                    e.offset
                ),
            ));
        }
        all[owner].push(Chunk {
            entry: i,
            file_offset: e.chunk_offset,
            size,
            blob_offset: e.offset,
            blob_end: end,
            inner_offset: e.inner_offset,
            digest: e.chunk_digest.clone(),
            zeros: e.zeros,
        });
    }
    for (i, chunks) in all.iter_mut().enumerate() {
        if chunks.is_empty() {
            continue;
        }
        check_tiling(&entries[i], chunks)?;
        if chunks.len() == 1 && chunks[0].digest.is_none() {
            chunks[0].digest = entries[i].digest.clone();
        }
    }
    Ok(all)
}

/// A file's chunks must cover `0..size` in order without gaps or overlap.
fn check_tiling(file: &TocEntry, chunks: &mut [Chunk]) -> Result<()> {
    chunks.sort_by_key(|c| c.file_offset);
    let mut at = 0u64;
    for c in chunks.iter() {
        if c.file_offset != at || c.size == 0 {
            return Err(Error::invalid(
                format!("TOC entry {:?}", file.name),
                format!("chunk at {} does not continue at {at}", c.file_offset),
            ));
        }
        at = c.file_offset.checked_add(c.size).ok_or_else(|| {
            Error::invalid(format!("TOC entry {:?}", file.name), "chunk size overflows")
        })?;
    }
    if at != file.size {
        return Err(Error::invalid(
            format!("TOC entry {:?}", file.name),
            format!("chunks cover {at} bytes of a {}-byte file", file.size),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trip_and_real_bytes() {
        // The last 51 bytes of a blob made by ctr-remote here.
        let mut f = Vec::new();
        f.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 0x1a, 0x00]);
        f.extend_from_slice(b"SG\x16\x000000000000430abeSTARGZ");
        f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 51);
        assert_eq!(parse_footer(&f).unwrap(), (0x430abe, 51));
        assert_eq!(footer_bytes(0x430abe).to_vec(), f);
        // A longer tail works too.
        let mut tail = vec![7u8; 100];
        tail.extend_from_slice(&footer_bytes(12345));
        assert_eq!(parse_footer(&tail).unwrap(), (12345, 51));
        // The footer is a valid empty gzip member.
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&f[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn legacy_footer() {
        let mut f = Vec::new();
        f.extend_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 0x16, 0x00]);
        f.extend_from_slice(b"00000000000001f4STARGZ");
        f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 47);
        assert_eq!(parse_footer(&f).unwrap(), (500, 47));
        let mut tail = vec![0u8; 30];
        tail.extend_from_slice(&f);
        assert_eq!(parse_footer(&tail).unwrap(), (500, 47));
    }

    #[test]
    fn footer_garbage_is_a_clear_error() {
        for tail in [
            &b""[..],
            &b"\x1f\x8b"[..],
            &[0u8; 51][..],
            &[0xffu8; 200][..],
            &footer_bytes(1)[..50],
        ] {
            let err = parse_footer(tail).unwrap_err().to_string();
            assert!(err.contains("eStargz footer"), "{err}");
        }
        let mut f = footer_bytes(1);
        f[16] = b'g'; // not hex
        assert!(parse_footer(&f).unwrap_err().to_string().contains("hex"));
        let mut f = footer_bytes(1);
        f[33] = b'X'; // STARGZ -> STXRGZ
        assert!(parse_footer(&f).unwrap_err().to_string().contains("STARGZ"));
        let mut f = footer_bytes(1);
        f[10] = 200; // XLEN past the end
        assert!(parse_footer(&f).is_err());
    }

    fn blob() -> Digest {
        Digest::of(b"blob")
    }

    #[test]
    fn toc_model_and_chunks() {
        let json = br#"{"version":1,"entries":[
            {"name":"./a/","type":"dir","mode":16877,"modtime":"2024-01-02T03:04:05.5Z","uid":7},
            {"name":"a/f","type":"reg","size":10,"offset":100,"chunkSize":4,"mode":33261,
             "xattrs":{"user.x":"YmFy"},"chunkDigest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","NumLink":1},
            {"name":"a/f","type":"chunk","offset":150,"chunkOffset":4,"chunkSize":4},
            {"name":"a/f","type":"chunk","offset":180,"chunkOffset":8},
            {"name":"a/h","type":"hardlink","linkName":"a/f"},
            {"name":"e","type":"reg"},
            {"name":"dev","type":"char","devMajor":1,"devMinor":3,"mode":8630}
        ]}"#;
        let toc = Toc::from_json(json, blob(), ChunkCompression::Gzip, 300, None).unwrap();
        assert!(!toc.verified);
        let d = &toc.entries[0];
        assert_eq!(
            (d.kind, d.mode, d.uid, d.modtime, d.modtime_nsec),
            (EntryType::Dir, 0o755, 7, 1704164645, 500_000_000)
        );
        let f = toc.lookup("/a/f").unwrap();
        assert_eq!(toc.entries[f].mode, 0o755);
        assert_eq!(toc.entries[f].xattrs["user.x"], b"bar");
        assert_eq!(toc.lookup("a"), Some(0));
        assert_eq!(toc.resolve(toc.lookup("a/h").unwrap()).unwrap(), f);
        let c = toc.chunks(f);
        assert_eq!(c.len(), 3);
        assert_eq!((c[0].blob_offset, c[0].blob_end, c[0].size), (100, 150, 4));
        assert_eq!((c[2].blob_offset, c[2].blob_end, c[2].size), (180, 300, 2));
        assert_eq!(toc.chunks_for_range(f, 3, 2).len(), 2);
        assert_eq!(toc.chunks_for_range(f, 4, 4).len(), 1);
        assert_eq!(toc.chunks_for_range(f, 9, 100).len(), 1);
        assert!(toc.chunks_for_range(f, 5, 0).is_empty());
        assert!(toc.chunks(toc.lookup("e").unwrap()).is_empty());
        assert_eq!(toc.entries[6].mode, 0o666);
        assert_eq!(toc.entries[6].dev_minor, 3);
        assert!(toc.prefetch_range().is_none());
    }

    #[test]
    fn escaped_strings_and_shared_modtimes_parse() {
        // The borrowed fields take escapes too (owned then), and a modtime
        // the memo holds is not taken for the next entry's different one.
        let json = br#"{"entries":[
            {"name":"d\/e","type":"\u0064ir","modtime":"2024-01-02T03:04:05Z"},
            {"name":"d/f","type":"reg","modtime":"2024-01-02T03:04:05Z"},
            {"name":"d/g","type":"reg","modtime":"2024-01-02T03:04:0\u0036Z",
             "chunkType":"\u007aeros","size":4,"chunkSize":4}
        ]}"#;
        let toc = Toc::from_json(json, blob(), ChunkCompression::Gzip, 1, None).unwrap();
        assert_eq!(toc.entries[0].name, "d/e");
        assert_eq!(toc.entries[0].kind, EntryType::Dir);
        assert_eq!(toc.entries[0].modtime, 1_704_164_645);
        assert_eq!(toc.entries[1].modtime, 1_704_164_645);
        assert_eq!(toc.entries[2].modtime, 1_704_164_646);
        assert!(toc.entries[2].zeros);
    }

    #[test]
    fn toc_rejects_bad_input() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "TOC of blob"),
            (
                br#"{"entries":[{"name":"x","type":"weird"}]}"#,
                "unknown type",
            ),
            (
                br#"{"entries":[{"name":"x","type":"reg","size":5,"offset":10,"chunkSize":2}]}"#,
                "chunks cover 2",
            ),
            (
                br#"{"entries":[{"name":"x","type":"chunk","offset":10}]}"#,
                "no file before",
            ),
            (
                br#"{"entries":[{"name":"x","type":"reg","xattrs":{"a":"!!"}}]}"#,
                "base64",
            ),
            (
                br#"{"entries":[{"name":"x","type":"reg","digest":"md5:00"}]}"#,
                "digest",
            ),
            (
                br#"{"entries":[{"name":"x","type":"reg","size":5,"offset":900}]}"#,
                "not before the TOC",
            ),
        ];
        for (json, want) in cases {
            let err = Toc::from_json(json, blob(), ChunkCompression::Gzip, 300, None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let err = Toc::from_json(
            b"{}",
            blob(),
            ChunkCompression::Gzip,
            1,
            Some(&Digest::of(b"x")),
        )
        .unwrap_err();
        assert!(matches!(err, Error::ContentMismatch { .. }), "{err}");
    }

    use crate::image::testing::Mem;

    /// data member | TOC member (tar of stargz.index.json) | footer.
    fn small_blob(legacy: bool) -> (Vec<u8>, Digest) {
        use std::io::Write;
        let gz = |b: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(b).unwrap();
            e.finish().unwrap()
        };
        let mut blob = gz(b"hello stargz");
        let json = format!(
            r#"{{"version":1,"entries":[{{"name":"f","type":"reg","size":12,"offset":0,"digest":"{}"}}]}}"#,
            Digest::of(b"hello stargz")
        );
        let mut t = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, TOC_TAR_NAME, json.as_bytes())
            .unwrap();
        let toc_off = blob.len() as u64;
        blob.extend(gz(&t.into_inner().unwrap()));
        let footer = footer_bytes(toc_off);
        if legacy {
            blob.extend_from_slice(&footer[..10]);
            blob.extend_from_slice(&22u16.to_le_bytes());
            blob.extend_from_slice(&footer[16..38]);
            blob.extend_from_slice(&footer[38..]);
        } else {
            blob.extend_from_slice(&footer);
        }
        (blob, Digest::of(json.as_bytes()))
    }

    #[tokio::test]
    async fn open_reads_footer_toc_and_chunks() {
        for legacy in [false, true] {
            let (bytes, toc_digest) = small_blob(legacy);
            let src = Mem(Bytes::from(bytes));
            let size = src.0.len() as u64;
            let toc = open(&src, &blob(), size, Some(&toc_digest)).await.unwrap();
            assert!(toc.verified);
            let f = toc.lookup("f").unwrap();
            assert_eq!(toc.read(&src, f, 0, 100).await.unwrap(), b"hello stargz");
            assert_eq!(toc.read(&src, f, 6, 3).await.unwrap(), b"sta");
            // Cut short: the footer is gone, the error says so.
            let cut = Mem(src.0.slice(..src.0.len() - 20));
            let err = open(&cut, &blob(), size - 20, None).await.unwrap_err();
            assert!(err.to_string().contains("footer"), "{err}");
            // Too small to hold anything.
            let tiny = Mem(Bytes::from_static(b"abc"));
            assert!(open(&tiny, &blob(), 3, None).await.is_err());
        }
    }

    #[test]
    fn inner_offset_chunks_share_a_member() {
        use std::io::Write;
        // Two small files in one gzip member, told apart by innerOffset.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"first!second").unwrap();
        let member = gz.finish().unwrap();
        let json = format!(
            r#"{{"entries":[
            {{"name":"a","type":"reg","size":6,"offset":10,"chunkDigest":"{}"}},
            {{"name":"b","type":"reg","size":6,"offset":10,"innerOffset":6,"chunkDigest":"{}"}}]}}"#,
            Digest::of(b"first!"),
            Digest::of(b"second")
        );
        let end = 10 + member.len() as u64;
        let toc =
            Toc::from_json(json.as_bytes(), blob(), ChunkCompression::Gzip, end, None).unwrap();
        let (a, b) = (&toc.chunks(0)[0], &toc.chunks(1)[0]);
        assert_eq!((a.blob_offset, a.blob_end), (b.blob_offset, b.blob_end));
        assert_eq!(toc.decode_chunk(a, &member).unwrap(), &b"first!"[..]);
        assert_eq!(toc.decode_chunk(b, &member).unwrap(), &b"second"[..]);
    }

    #[test]
    fn decode_chunk_verifies() {
        use std::io::Write;
        let data = b"0123456789";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(data).unwrap();
        let member = gz.finish().unwrap();
        let json = format!(
            r#"{{"entries":[{{"name":"f","type":"reg","size":10,"offset":1,"digest":"{}"}}]}}"#,
            Digest::of(data)
        );
        let toc_off = 1 + member.len() as u64;
        let toc = Toc::from_json(
            json.as_bytes(),
            blob(),
            ChunkCompression::Gzip,
            toc_off,
            None,
        )
        .unwrap();
        let c = &toc.chunks(0)[0];
        assert_eq!(toc.decode_chunk(c, &member).unwrap(), &data[..]);
        let mut bad = member.clone();
        // Flip a payload byte: either gzip's CRC or our digest must object.
        bad[12] ^= 0x01;
        assert!(toc.decode_chunk(c, &bad).is_err());
        assert!(toc.decode_chunk(c, &member[..5]).is_err());
        // Streaming form, and a chunk too large to hold in memory.
        let mut out = Vec::new();
        toc.decode_chunk_to(c, &member[..], &mut out).unwrap();
        assert_eq!(out, data);
        let mut huge = c.clone();
        huge.size = MAX_CHUNK_IN_MEMORY + 1;
        let err = toc.decode_chunk(&huge, &member).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    }
}
