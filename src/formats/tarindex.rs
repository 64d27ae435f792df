//! Index a layer in one streaming pass: every tar entry's metadata and the
//! offset of its data in the uncompressed stream, plus (for gzip) zran
//! checkpoints so any byte range can later be read from the compressed blob
//! without inflating it from the start.
//!
//! zstd layers: a plain zstd stream cannot be restarted mid-frame, so no
//! checkpoints are made inside frames; instead the boundaries of zstd frames
//! (one frame per file in zstd:chunked, often just one for the whole layer)
//! are recorded every ~4 MiB, and reads decompress from the nearest frame
//! start, which for a single-frame layer is the start of the blob.
//!
//! The tar itself is parsed by the `tar` crate; what is ours is the index
//! around it (data offsets, checkpoints, frame starts, a compact versioned
//! encoding that is fuzzed), since no crate indexes a compressed layer for
//! reads by byte range.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};

use bytes::Bytes;

use crate::error::{from_io, Error, Result};
use crate::formats::zran::{self, Dec, Enc, GzipIndex, GzipIndexBuilder};
use crate::image::manifest::Compression;

const MAGIC: &[u8; 8] = b"GGFSLIDX";
const VERSION: u32 = 1;
/// Decompressed bytes are handed to the tar parser in reads this large, so
/// inflate runs on big buffers rather than 512-byte headers.
const PIPE_BUF: usize = 256 * 1024;

/// What a tar entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TarKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; target in `link_name`.
    Symlink,
    /// Target in `link_name`.
    Hardlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// Present in the tar but not served (GNU sparse files, unknown types):
    /// the reason says why.
    Unsupported(String),
}

/// One tar entry, with PAX/GNU extensions applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// The path as stored (long names resolved; may start with `./`).
    /// Bytes, since tar names need not be UTF-8.
    pub path: Vec<u8>,
    /// What the entry is.
    pub kind: TarKind,
    /// Permission bits plus setuid/setgid/sticky.
    pub mode: u32,
    /// Owner user id.
    pub uid: u64,
    /// Owner group id.
    pub gid: u64,
    /// Seconds since the epoch, and the fraction a PAX mtime may carry.
    pub mtime: i64,
    /// Nanoseconds past `mtime`.
    pub mtime_nsec: u32,
    /// Data size (0 for everything but regular files).
    pub size: u64,
    /// Symlink or hardlink target.
    pub link_name: Option<Vec<u8>>,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// From PAX `SCHILY.xattr.*` records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Offset of the data in the uncompressed stream: the file's bytes are
    /// `uncompressed[offset..offset + size]`.
    pub offset: u64,
}

impl TarEntry {
    /// The path for humans (lossy when not UTF-8).
    pub fn path_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.path)
    }

    /// The uncompressed byte range holding the file's data.
    pub fn data_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.size
    }
}

/// A zstd frame start: a place decompression can begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameStart {
    /// Offset of the frame in the compressed blob.
    pub compressed: u64,
    /// Offset of its first byte in the uncompressed tar.
    pub uncompressed: u64,
}

/// Everything needed to serve a layer's files by random access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndex {
    /// How the layer is compressed.
    pub compression: Compression,
    /// The tar entries, in stream order.
    pub entries: Vec<TarEntry>,
    /// Size of the layer blob.
    pub compressed_size: u64,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// Checkpoints, for gzip layers.
    pub gzip: Option<GzipIndex>,
    /// Frame starts, for zstd layers (always includes offset 0).
    pub zstd_frames: Vec<FrameStart>,
}

/// Index a layer from its compressed bytes in one pass. `on_entry` is called
/// for each entry as soon as its data has streamed past, so a caller can
/// serve early files before the stream ends.
pub fn index_layer(
    compressed: impl Read,
    compression: Compression,
    on_entry: impl FnMut(&TarEntry),
) -> Result<LayerIndex> {
    index_layer_tee(compressed, compression, io::sink(), on_entry)
}

/// Like [`index_layer`], also writing the uncompressed tar to `tee` (to keep
/// a local copy while indexing).
pub fn index_layer_tee(
    compressed: impl Read,
    compression: Compression,
    tee: impl Write,
    on_entry: impl FnMut(&TarEntry),
) -> Result<LayerIndex> {
    index_layer_with_span(compressed, compression, zran::DEFAULT_SPAN, tee, on_entry)
}

/// [`index_layer_tee`] with a chosen checkpoint spacing (uncompressed bytes).
pub fn index_layer_with_span(
    compressed: impl Read,
    compression: Compression,
    span: u64,
    tee: impl Write,
    on_entry: impl FnMut(&TarEntry),
) -> Result<LayerIndex> {
    let mut counted = Counter::new(compressed);
    match compression {
        Compression::Gzip => {
            let mut gz = GzipIndexBuilder::with_span(&mut counted, span)?;
            let (entries, size) = index_tar(&mut gz, tee, on_entry)?;
            let gzip = gz.finish()?;
            Ok(LayerIndex {
                compression,
                entries,
                compressed_size: gzip.compressed_size,
                uncompressed_size: size,
                gzip: Some(gzip),
                zstd_frames: Vec::new(),
            })
        }
        Compression::Zstd => {
            let mut zs = ZstdFrames::new(&mut counted, span)?;
            let (entries, size) = index_tar(&mut zs, tee, on_entry)?;
            let frames = zs.frames;
            Ok(LayerIndex {
                compression,
                entries,
                compressed_size: counted.count,
                uncompressed_size: size,
                gzip: None,
                zstd_frames: frames,
            })
        }
        Compression::None => {
            let (entries, size) = index_tar(&mut counted, tee, on_entry)?;
            Ok(LayerIndex {
                compression,
                entries,
                compressed_size: size,
                uncompressed_size: size,
                gzip: None,
                zstd_frames: Vec::new(),
            })
        }
    }
}

/// Parse the tar from `tar` (drained to its end), returning the entries and
/// the uncompressed size.
fn index_tar(
    tar: impl Read,
    tee: impl Write,
    mut on_entry: impl FnMut(&TarEntry),
) -> Result<(Vec<TarEntry>, u64)> {
    let tee = Tee {
        inner: tar,
        tee,
        count: 0,
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(PIPE_BUF, tee));
    let mut out = Vec::new();
    let iter = archive.entries().map_err(|e| from_io("layer tar", e))?;
    for entry in iter {
        let mut entry =
            entry.map_err(|e| from_io(format!("layer tar after {} entries", out.len()), e))?;
        let Some(te) = describe(&mut entry)? else {
            continue;
        };
        if !matches!(te.kind, TarKind::Unsupported(_)) {
            // Stream the data through now, so on_entry means "data seen".
            io::copy(&mut entry, &mut io::sink())
                .map_err(|e| from_io(format!("layer tar entry {:?}", te.path_lossy()), e))?;
        }
        on_entry(&te);
        out.push(te);
    }
    // Read to the end: the tar's zero blocks, padding, and (for compressed
    // layers) the rest of the stream so the index covers all of it.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| from_io("layer tar end", e))?;
    let mut tee = rest.into_inner();
    tee.tee.flush().map_err(|e| Error::io("layer tee", e))?;
    Ok((out, tee.count))
}

/// Build a [`TarEntry`] from the tar crate's view, applying PAX records.
/// `None` for headers that describe no file (PAX global headers).
fn describe<R: Read>(entry: &mut tar::Entry<R>) -> Result<Option<TarEntry>> {
    let header = entry.header().clone();
    let path = entry.path_bytes().into_owned();
    let what = || format!("tar entry {:?}", String::from_utf8_lossy(&path));
    let et = header.entry_type();
    if et.is_pax_global_extensions() {
        return Ok(None);
    }
    let mut kind = match et {
        tar::EntryType::Regular | tar::EntryType::Continuous => TarKind::File,
        tar::EntryType::Directory => TarKind::Dir,
        tar::EntryType::Symlink => TarKind::Symlink,
        tar::EntryType::Link => TarKind::Hardlink,
        tar::EntryType::Char => TarKind::Char,
        tar::EntryType::Block => TarKind::Block,
        tar::EntryType::Fifo => TarKind::Fifo,
        tar::EntryType::GNUSparse => TarKind::Unsupported("GNU sparse file".into()),
        other => TarKind::Unsupported(format!("tar entry type {:?}", other.as_byte() as char)),
    };
    // An empty numeric field reads as 0, as other tar readers do.
    let num = |r: io::Result<u64>, raw: &[u8], field: &str| match r {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(Error::invalid(what(), format!("bad {field}: {e}"))),
    };
    let old = header.as_old();
    let mut mtime = num(header.mtime(), &old.mtime, "mtime")? as i64;
    let mut mtime_nsec = 0;
    let mut xattrs = BTreeMap::new();
    let uid = num(header.uid(), &old.uid, "uid")?;
    let gid = num(header.gid(), &old.gid, "gid")?;
    if let Some(pax) = entry
        .pax_extensions()
        .map_err(|e| Error::invalid(what(), format!("bad PAX header: {e}")))?
    {
        for ext in pax {
            let ext = ext.map_err(|e| Error::invalid(what(), format!("bad PAX record: {e}")))?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
            } else if key == "mtime" {
                let v = ext
                    .value()
                    .map_err(|_| Error::invalid(what(), "PAX mtime is not text"))?;
                (mtime, mtime_nsec) = parse_pax_time(v)
                    .ok_or_else(|| Error::invalid(what(), format!("bad PAX mtime {v:?}")))?;
            } else if key.starts_with("GNU.sparse.") {
                kind = TarKind::Unsupported("PAX (GNU) sparse file".into());
            }
        }
    }
    let dev = |r: io::Result<Option<u32>>| r.ok().flatten().unwrap_or(0);
    let is_dev = matches!(kind, TarKind::Char | TarKind::Block);
    Ok(Some(TarEntry {
        link_name: entry.link_name_bytes().map(|l| l.into_owned()),
        size: if kind == TarKind::File {
            entry.size()
        } else {
            0
        },
        offset: entry.raw_file_position(),
        mode: num(header.mode().map(u64::from), &old.mode, "mode")? as u32 & 0o7777,
        uid,
        gid,
        mtime,
        mtime_nsec,
        dev_major: if is_dev {
            dev(header.device_major())
        } else {
            0
        },
        dev_minor: if is_dev {
            dev(header.device_minor())
        } else {
            0
        },
        xattrs,
        kind,
        path,
    }))
}

/// PAX times: `[-]seconds[.fraction]`.
fn parse_pax_time(v: &str) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    // Digits only: a second sign (`--9223372036854775808` parses as
    // i64::MIN) would overflow the negation below.
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits = frac
        .as_bytes()
        .iter()
        .take(9)
        .map(|b| b - b'0')
        .collect::<Vec<_>>();
    digits.resize(9, 0);
    let nsec = digits.iter().fold(0u32, |n, &d| n * 10 + d as u32);
    Some(match (neg, nsec) {
        (false, _) => (secs, nsec),
        (true, 0) => (-secs, 0),
        (true, n) => (-secs - 1, 1_000_000_000 - n),
    })
}

/// Counts bytes read through it.
struct Counter<R> {
    inner: R,
    count: u64,
}

impl<R> Counter<R> {
    fn new(inner: R) -> Self {
        Counter { inner, count: 0 }
    }
}

impl<R: Read> Read for Counter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Copies what is read to a writer, and counts it.
struct Tee<R, W> {
    inner: R,
    tee: W,
    count: u64,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tee.write_all(&buf[..n])?;
        self.count += n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// zstd with frame boundaries

/// A zstd decoder that records frame starts at least `span` apart.
struct ZstdFrames<R> {
    inner: R,
    dctx: zstd::zstd_safe::DCtx<'static>,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    total_in: u64,
    total_out: u64,
    span: u64,
    frames: Vec<FrameStart>,
    /// At a frame boundary (start of stream or just after a frame).
    at_boundary: bool,
}

impl<R: Read> ZstdFrames<R> {
    fn new(inner: R, span: u64) -> Result<Self> {
        let mut dctx = zstd::zstd_safe::DCtx::create();
        // Layers may use long windows (zstd --long): allow up to 2 GiB.
        dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(31))
            .map_err(|code| {
                Error::invalid("zstd decoder", zstd::zstd_safe::get_error_name(code))
            })?;
        Ok(ZstdFrames {
            inner,
            dctx,
            buf: vec![0u8; 128 * 1024].into_boxed_slice(),
            pos: 0,
            filled: 0,
            total_in: 0,
            total_out: 0,
            span: span.max(1),
            frames: Vec::new(),
            at_boundary: true,
        })
    }

    fn consumed(&self) -> u64 {
        self.total_in - (self.filled - self.pos) as u64
    }
}

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos == self.filled {
                self.pos = 0;
                self.filled = self.inner.read(&mut self.buf)?;
                self.total_in += self.filled as u64;
                if self.filled == 0 {
                    if self.at_boundary {
                        return Ok(0);
                    }
                    return Err(bad_zstd(self.consumed(), "zstd stream cut short"));
                }
            }
            if self.at_boundary {
                let last = self.frames.last().map(|f| f.uncompressed);
                if last.is_none_or(|l| self.total_out - l >= self.span) {
                    self.frames.push(FrameStart {
                        compressed: self.consumed(),
                        uncompressed: self.total_out,
                    });
                }
            }
            let mut input = zstd::zstd_safe::InBuffer::around(&self.buf[self.pos..self.filled]);
            let mut output = zstd::zstd_safe::OutBuffer::around(&mut *out);
            let hint = self
                .dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| bad_zstd(self.consumed(), zstd::zstd_safe::get_error_name(code)))?;
            let (used, made) = (input.pos(), output.pos());
            self.pos += used;
            self.total_out += made as u64;
            if used > 0 || made > 0 {
                self.at_boundary = hint == 0;
            }
            if made > 0 {
                return Ok(made);
            }
        }
    }
}

fn bad_zstd(at: u64, reason: &str) -> io::Error {
    Error::invalid(format!("zstd stream at compressed offset {at}"), reason).into()
}

// ---------------------------------------------------------------------------
// Reads and serialization

impl LayerIndex {
    /// Read `len` uncompressed bytes at `offset` (short at the end), with
    /// `fetch(offset, len)` returning bytes of the compressed blob. gzip:
    /// from the nearest checkpoint; zstd: from the nearest frame start;
    /// uncompressed: directly.
    pub fn read_at(
        &self,
        offset: u64,
        len: usize,
        mut fetch: impl FnMut(u64, u64) -> Result<Bytes>,
    ) -> Result<Bytes> {
        let end = offset
            .saturating_add(len as u64)
            .min(self.uncompressed_size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        match (self.compression, &self.gzip) {
            (Compression::Gzip, Some(gz)) => gz.read_at(offset, len, fetch),
            (Compression::Gzip, None) => Err(no_checkpoints()),
            (Compression::None, _) => fetch(offset, end - offset),
            (Compression::Zstd, _) => self.zstd_read(offset, end, fetch),
        }
    }

    /// The compressed `(offset, len)` that [`read_at`](Self::read_at) will
    /// fetch for this request (`None` when there is nothing to read), so an
    /// async caller can fetch it first and hand it over.
    pub fn fetch_range(&self, offset: u64, len: usize) -> Result<Option<(u64, u64)>> {
        let end = offset
            .saturating_add(len as u64)
            .min(self.uncompressed_size);
        if offset >= end {
            return Ok(None);
        }
        Ok(Some(match (self.compression, &self.gzip) {
            (Compression::Gzip, Some(gz)) => return gz.fetch_range(offset, len),
            (Compression::Gzip, None) => return Err(no_checkpoints()),
            (Compression::None, _) => (offset, end - offset),
            (Compression::Zstd, _) => {
                let (start, stop) = self.zstd_span(offset, end);
                (start.compressed, stop - start.compressed)
            }
        }))
    }

    /// The frame to start from and the compressed offset to fetch up to.
    fn zstd_span(&self, offset: u64, end: u64) -> (FrameStart, u64) {
        let i = self
            .zstd_frames
            .partition_point(|f| f.uncompressed <= offset);
        let start = i
            .checked_sub(1)
            .map(|i| self.zstd_frames[i])
            .unwrap_or(FrameStart {
                compressed: 0,
                uncompressed: 0,
            });
        let j = self.zstd_frames.partition_point(|f| f.uncompressed < end);
        let stop = self
            .zstd_frames
            .get(j)
            .map(|f| f.compressed)
            .unwrap_or(self.compressed_size);
        (start, stop)
    }

    /// A file's bytes (or part of them).
    pub fn read_file(
        &self,
        entry: &TarEntry,
        offset: u64,
        len: usize,
        fetch: impl FnMut(u64, u64) -> Result<Bytes>,
    ) -> Result<Bytes> {
        if offset >= entry.size {
            return Ok(Bytes::new());
        }
        let len = (len as u64).min(entry.size - offset) as usize;
        self.read_at(entry.offset + offset, len, fetch)
    }

    fn zstd_read(
        &self,
        offset: u64,
        end: u64,
        mut fetch: impl FnMut(u64, u64) -> Result<Bytes>,
    ) -> Result<Bytes> {
        let (start, stop) = self.zstd_span(offset, end);
        let data = fetch(start.compressed, stop - start.compressed)?;
        self.zstd_read_from(offset, (end - offset) as usize, &data[..])
    }

    /// [`read_at`](Self::read_at) of a zstd layer from `src`, the compressed
    /// bytes from the start of [`fetch_range`](Self::fetch_range) on,
    /// streamed: memory stays at the decoder's window however long the
    /// frame (a single-frame layer is read from its start).
    pub fn zstd_read_from(&self, offset: u64, len: usize, src: impl Read) -> Result<Bytes> {
        let end = offset
            .saturating_add(len as u64)
            .min(self.uncompressed_size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let (start, _) = self.zstd_span(offset, end);
        let bad = |reason: String| {
            Error::invalid(
                format!("zstd layer at compressed offset {}", start.compressed),
                reason,
            )
        };
        let mut dec = zstd::stream::read::Decoder::new(src).map_err(|e| bad(e.to_string()))?;
        let skip = offset - start.uncompressed;
        io::copy(&mut (&mut dec).take(skip), &mut io::sink()).map_err(|e| bad(e.to_string()))?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        dec.take(end - offset)
            .read_to_end(&mut out)
            .map_err(|e| bad(e.to_string()))?;
        if out.len() as u64 != end - offset {
            return Err(bad(
                "compressed span ended early (does the index match the blob?)".into(),
            ));
        }
        Ok(Bytes::from(out))
    }

    /// Compact binary form for the disk cache, versioned and checksummed.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut e = Enc::default();
        e.u8(match self.compression {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
        });
        e.u64(self.compressed_size);
        e.u64(self.uncompressed_size);
        e.u64(self.entries.len() as u64);
        for t in &self.entries {
            encode_entry(&mut e, t);
        }
        e.u64(self.zstd_frames.len() as u64);
        for f in &self.zstd_frames {
            e.u64(f.compressed);
            e.u64(f.uncompressed);
        }
        match &self.gzip {
            Some(gz) => {
                e.u8(1);
                gz.encode(&mut e);
            }
            None => e.u8(0),
        }
        zran::seal(MAGIC, VERSION, &e.0)
    }

    /// Decode what [`LayerIndex::to_bytes`] wrote; bad input is an error, not a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let body = zran::unseal(MAGIC, VERSION, bytes, "layer index")?;
        Self::from_body(&body)
    }

    /// Decode the body [`from_bytes`](Self::from_bytes) finds inside the
    /// checksummed, compressed envelope. For the fuzz targets (`fuzz/`),
    /// which cannot forge the envelope's sha256.
    #[doc(hidden)]
    pub fn from_body(body: &[u8]) -> Result<Self> {
        let mut d = Dec::new(body, "layer index");
        let compression = match d.u8()? {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Zstd,
            _ => return Err(d.bad("unknown compression")),
        };
        let compressed_size = d.u64()?;
        let uncompressed_size = d.u64()?;
        let n = d.len(60)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let t = decode_entry(&mut d)?;
            if t.offset.saturating_add(t.size) > uncompressed_size {
                return Err(d.bad("entry data past the end of the layer"));
            }
            entries.push(t);
        }
        let n = d.len(16)?;
        let mut zstd_frames = Vec::with_capacity(n);
        for _ in 0..n {
            let f = FrameStart {
                compressed: d.u64()?,
                uncompressed: d.u64()?,
            };
            let ordered = zstd_frames.last().is_none_or(|p: &FrameStart| {
                p.compressed < f.compressed && p.uncompressed < f.uncompressed
            });
            if !ordered || f.compressed > compressed_size || f.uncompressed > uncompressed_size {
                return Err(d.bad("zstd frame out of order or out of range"));
            }
            zstd_frames.push(f);
        }
        let gzip = match d.u8()? {
            0 => None,
            1 => Some(GzipIndex::decode(&mut d)?),
            _ => return Err(d.bad("bad gzip flag")),
        };
        d.finish()?;
        Ok(LayerIndex {
            compression,
            entries,
            compressed_size,
            uncompressed_size,
            gzip,
            zstd_frames,
        })
    }
}

fn no_checkpoints() -> Error {
    Error::invalid("layer index", "gzip layer without checkpoints")
}

fn encode_entry(e: &mut Enc, t: &TarEntry) {
    e.bytes(&t.path);
    let (tag, reason) = match &t.kind {
        TarKind::File => (0, ""),
        TarKind::Dir => (1, ""),
        TarKind::Symlink => (2, ""),
        TarKind::Hardlink => (3, ""),
        TarKind::Char => (4, ""),
        TarKind::Block => (5, ""),
        TarKind::Fifo => (6, ""),
        TarKind::Unsupported(r) => (7, r.as_str()),
    };
    e.u8(tag);
    e.bytes(reason.as_bytes());
    e.u32(t.mode);
    e.u64(t.uid);
    e.u64(t.gid);
    e.i64(t.mtime);
    e.u32(t.mtime_nsec);
    e.u64(t.size);
    match &t.link_name {
        Some(l) => {
            e.u8(1);
            e.bytes(l);
        }
        None => e.u8(0),
    }
    e.u32(t.dev_major);
    e.u32(t.dev_minor);
    e.u64(t.xattrs.len() as u64);
    for (k, v) in &t.xattrs {
        e.bytes(k.as_bytes());
        e.bytes(v);
    }
    e.u64(t.offset);
}

fn decode_entry(d: &mut Dec) -> Result<TarEntry> {
    let path = d.bytes()?.to_vec();
    let tag = d.u8()?;
    let reason = String::from_utf8_lossy(d.bytes()?).into_owned();
    let kind = match tag {
        0 => TarKind::File,
        1 => TarKind::Dir,
        2 => TarKind::Symlink,
        3 => TarKind::Hardlink,
        4 => TarKind::Char,
        5 => TarKind::Block,
        6 => TarKind::Fifo,
        7 => TarKind::Unsupported(reason),
        _ => return Err(d.bad("unknown entry kind")),
    };
    let mode = d.u32()?;
    let uid = d.u64()?;
    let gid = d.u64()?;
    let mtime = d.i64()?;
    let mtime_nsec = d.u32()?;
    let size = d.u64()?;
    let link_name = match d.u8()? {
        0 => None,
        1 => Some(d.bytes()?.to_vec()),
        _ => return Err(d.bad("bad link flag")),
    };
    let dev_major = d.u32()?;
    let dev_minor = d.u32()?;
    let n = d.len(16)?;
    let mut xattrs = BTreeMap::new();
    for _ in 0..n {
        let k = std::str::from_utf8(d.bytes()?)
            .map_err(|_| d.bad("xattr name not UTF-8"))?
            .to_string();
        xattrs.insert(k, d.bytes()?.to_vec());
    }
    let offset = d.u64()?;
    Ok(TarEntry {
        path,
        kind,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        size,
        link_name,
        dev_major,
        dev_minor,
        xattrs,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with long names, PAX overrides and xattrs, every entry type.
    fn sample_tar() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut b = tar::Builder::new(Vec::new());
        let mut files = Vec::new();
        let long = format!("dir/{}/file.txt", "x".repeat(150));
        for (i, name) in ["a.txt", "dir/b.bin", long.as_str()].iter().enumerate() {
            let data: Vec<u8> = (0..(1000 * (i + 1) * (i + 1)))
                .map(|j| (j * 7 + i) as u8)
                .collect();
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            h.set_mtime(1_600_000_000);
            h.set_uid(1000);
            b.append_data(&mut h, name, &data[..]).unwrap();
            files.push((name.to_string(), data));
        }
        // PAX: mtime with fraction, uid override, xattr.
        let pax: [(&str, &[u8]); 3] = [
            ("mtime", b"1700000000.25"),
            ("uid", b"4000000000"),
            ("SCHILY.xattr.user.k", b"v\x00w"),
        ];
        b.append_pax_extensions(pax).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "pax.txt", &b"hello"[..]).unwrap();
        files.push(("pax.txt".into(), b"hello".to_vec()));
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "sym", "a.txt").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "hard", "a.txt").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(0);
        b.append_data(&mut h, "null", &b""[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o1777);
        h.set_size(0);
        b.append_data(&mut h, "tmp/", &b""[..]).unwrap();
        (b.into_inner().unwrap(), files)
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn check(idx: &LayerIndex, blob: &[u8], tar: &[u8], files: &[(String, Vec<u8>)]) {
        for (name, data) in files {
            let t = idx
                .entries
                .iter()
                .find(|t| t.path == name.as_bytes())
                .unwrap();
            assert_eq!(
                &tar[t.data_range().start as usize..t.data_range().end as usize],
                &data[..]
            );
            let f =
                |o: u64, l: u64| Ok(Bytes::copy_from_slice(&blob[o as usize..(o + l) as usize]));
            assert_eq!(
                &idx.read_file(t, 0, 1 << 30, f).unwrap()[..],
                &data[..],
                "{name}"
            );
            if data.len() > 10 {
                assert_eq!(&idx.read_file(t, 3, 5, f).unwrap()[..], &data[3..8]);
            }
        }
    }

    #[test]
    fn entries_and_offsets_all_compressions() {
        let (tar, files) = sample_tar();
        let gz = gzip(&tar);
        let zs = zstd::bulk::compress(&tar, 3).unwrap();
        for (blob, c) in [
            (&tar, Compression::None),
            (&gz, Compression::Gzip),
            (&zs, Compression::Zstd),
        ] {
            let mut seen = Vec::new();
            let mut copy = Vec::new();
            let idx =
                index_layer_with_span(&blob[..], c, 4096, &mut copy, |t| seen.push(t.path.clone()))
                    .unwrap();
            assert_eq!(copy, tar);
            assert_eq!(idx.uncompressed_size, tar.len() as u64);
            assert_eq!(idx.compressed_size, blob.len() as u64);
            assert_eq!(seen.len(), idx.entries.len());
            check(&idx, blob, &tar, &files);
            let back = LayerIndex::from_bytes(&idx.to_bytes().unwrap()).unwrap();
            assert_eq!(back, idx);
        }
        let idx = index_layer(&tar[..], Compression::None, |_| {}).unwrap();
        let by = |p: &str| idx.entries.iter().find(|t| t.path == p.as_bytes()).unwrap();
        let a = by("a.txt");
        assert_eq!(
            (a.mode, a.uid, a.mtime, a.kind.clone()),
            (0o4755, 1000, 1_600_000_000, TarKind::File)
        );
        let p = by("pax.txt");
        assert_eq!(
            (p.mtime, p.mtime_nsec, p.uid),
            (1_700_000_000, 250_000_000, 4_000_000_000)
        );
        assert_eq!(p.xattrs["user.k"], b"v\x00w");
        assert_eq!(by("sym").link_name.as_deref(), Some(&b"a.txt"[..]));
        assert_eq!(by("hard").kind, TarKind::Hardlink);
        let n = by("null");
        assert_eq!(
            (n.kind.clone(), n.dev_major, n.dev_minor),
            (TarKind::Char, 1, 3)
        );
        assert_eq!(by("tmp/").mode, 0o1777);
        assert!(idx.entries.iter().any(|t| t.path.len() > 150));
    }

    #[test]
    fn zstd_multi_frame_reads_start_at_frames() {
        let (tar, files) = sample_tar();
        let mut zs = Vec::new();
        for part in tar.chunks(3000) {
            zs.extend(zstd::bulk::compress(part, 1).unwrap());
        }
        let idx =
            index_layer_with_span(&zs[..], Compression::Zstd, 2000, io::sink(), |_| {}).unwrap();
        assert!(idx.zstd_frames.len() > 3, "{:?}", idx.zstd_frames);
        check(&idx, &zs, &tar, &files);
        // A read near the end fetches from a late frame, not from 0.
        let mut from = u64::MAX;
        idx.read_at(tar.len() as u64 - 100, 50, |o, l| {
            from = o;
            Ok(Bytes::copy_from_slice(&zs[o as usize..(o + l) as usize]))
        })
        .unwrap();
        assert!(from > 0);
    }

    #[test]
    fn sparse_is_unsupported_and_bad_input_errors() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(0);
        h.as_gnu_mut().unwrap().set_real_size(0);
        h.set_path("sparse").unwrap();
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(&[0u8; 1024]);
        let idx = index_layer(&tar[..], Compression::None, |_| {}).unwrap();
        assert!(matches!(&idx.entries[0].kind, TarKind::Unsupported(r) if r.contains("sparse")));

        let (tar, _) = sample_tar();
        let gz = gzip(&tar);
        assert!(index_layer(&gz[..gz.len() / 2], Compression::Gzip, |_| {}).is_err());
        let mut bad = tar.clone();
        bad[100] ^= 0xff; // header checksum
        assert!(index_layer(&bad[..], Compression::None, |_| {}).is_err());
        let bytes = index_layer(&tar[..], Compression::None, |_| {})
            .unwrap()
            .to_bytes()
            .unwrap();
        assert!(LayerIndex::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn garbage_bodies_are_errors_not_panics() {
        let (tar, _) = sample_tar();
        let gz = gzip(&tar);
        let idx =
            index_layer_with_span(&gz[..], Compression::Gzip, 4096, io::sink(), |_| {}).unwrap();
        let good = idx.to_bytes().unwrap();
        let raw = zran::unseal(MAGIC, VERSION, &good, "t").unwrap();
        // Every truncation of a valid body, and bodies of noise, re-sealed
        // so they pass the checksum and reach the decoder.
        for cut in (0..raw.len()).step_by(7) {
            let sealed = zran::seal(MAGIC, VERSION, &raw[..cut]).unwrap();
            assert!(LayerIndex::from_bytes(&sealed).is_err(), "cut {cut}");
        }
        let mut x = 1u64;
        for len in [1usize, 8, 64, 500, 5000] {
            let noise: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8 % 4
                })
                .collect();
            let sealed = zran::seal(MAGIC, VERSION, &noise).unwrap();
            assert!(LayerIndex::from_bytes(&sealed).is_err());
        }
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time("1.0000000019"), Some((1, 1)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.x"), None);
        assert_eq!(
            parse_pax_time("-9223372036854775807.5"),
            Some((i64::MIN, 500_000_000))
        );
        for bad in [
            "--9223372036854775808",
            "--9223372036854775808.5",
            "--1",
            "+1",
            "-+1",
            "-",
        ] {
            assert_eq!(parse_pax_time(bad), None, "{bad}");
        }
    }

    /// A PAX mtime with two signs made the negation overflow: a panic in a
    /// debug build, a wrapped time in release. Now the entry is refused.
    #[test]
    fn pax_time_with_two_signs_is_refused() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("mtime", &b"--9223372036854775808"[..])])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let err = index_layer(&tar[..], Compression::None, |_| {}).unwrap_err();
        assert!(err.to_string().contains("bad PAX mtime"), "{err}");
    }
}
