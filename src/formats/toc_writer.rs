//! Writing layers with a TOC: eStargz (gzip members) and zstd:chunked (zstd
//! frames), from an uncompressed tar.
//!
//! The input tar (the deterministic stream [`crate::image::mutate`] writes, or any
//! tar) is indexed entry by entry, then cut into compression units: a new
//! unit starts at each regular file's payload and every `chunk_size` bytes
//! inside it; tar headers (and the padding of the payload before them) go in
//! the unit of the preceding payload, as ctr-remote does. Units are
//! compressed in parallel and written in order; then the TOC and the footer:
//!
//! - eStargz: `stargz.index.json` as the last tar entry (with the tar end
//!   blocks) in its own gzip member, then the 51-byte footer.
//! - zstd:chunked: the tar end blocks in a frame of their own, the
//!   zstd-compressed TOC JSON in a skippable frame, then ctr-remote's 48-byte
//!   footer (skippable frame: offset, compressed and uncompressed length,
//!   type 1, `GnUlInUx`).
//!
//! Prefetch landmarks: `.no.prefetch.landmark` first by default; with
//! prefetch files, those (after their parent directories) come first, then
//! `.prefetch.landmark`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use base64::Engine as _;
use serde::Serialize;

use crate::digest::{Digest, Hasher, HashingWriter};
use crate::error::{Error, Result};
use crate::formats::estargz::{
    footer_bytes, normalize_name, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME, UNCOMPRESSED_SIZE_ANNOTATION,
};
use crate::formats::zstd_chunked::{
    GITHUB_MANIFEST_CHECKSUM_ANNOTATION, GITHUB_MANIFEST_POSITION_ANNOTATION,
    MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION,
};

/// Default chunk size, as ctr-remote's: 4 MiB of uncompressed file data.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// The content of a landmark file.
const LANDMARK_CONTENT: u8 = 0x0f;

/// Which lazily readable format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TocFormat {
    /// eStargz: gzip members with a TOC in the last.
    Estargz,
    /// zstd:chunked: zstd frames with a TOC in a skippable frame.
    ZstdChunked,
}

/// How to write a TOC layer.
#[derive(Clone, Debug)]
pub struct TocOptions {
    /// The format written.
    pub format: TocFormat,
    /// Largest uncompressed chunk of a file (0: the default).
    pub chunk_size: u64,
    /// Files (layer paths) to put first, before `.prefetch.landmark`.
    pub prefetch: Vec<String>,
    /// Prefetch files the layer does not hold are skipped, not an error
    /// (an image's prefetch list spread over its layers).
    pub prefetch_if_present: bool,
    /// Compression level (gzip 0-9, zstd 1-22); `None`: gzip 6, zstd 3.
    pub level: Option<i32>,
    /// Compressing threads (0: all cores).
    pub threads: usize,
}

impl TocOptions {
    /// `format` with the default chunk size, level and threads, and no prefetch list.
    pub fn new(format: TocFormat) -> Self {
        TocOptions {
            format,
            chunk_size: 0,
            prefetch: Vec::new(),
            prefetch_if_present: false,
            level: None,
            threads: 0,
        }
    }
}

/// A written TOC layer: the blob in `tmp`, its digests and annotations.
pub struct Written {
    /// The blob (removed when dropped).
    pub tmp: tempfile::TempPath,
    /// Digest of the blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Descriptor annotations: the TOC digest and, for zstd:chunked, its position.
    pub annotations: BTreeMap<String, String>,
    /// The prefetch files put first (all of them unless
    /// `prefetch_if_present`).
    pub prefetched: Vec<String>,
}

/// One TOC entry as written (the keys ctr-remote writes; zero values left out).
#[derive(Serialize, Default, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct OutEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    modtime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero32")]
    mode: u32,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(skip_serializing_if = "is_zero32")]
    dev_major: u32,
    #[serde(skip_serializing_if = "is_zero32")]
    dev_minor: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero32(v: &u32) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct OutToc<'a> {
    version: u32,
    entries: &'a [OutEntry],
}

/// A tar entry of the input: its raw bytes `start..end` (extension headers,
/// header, payload and padding) and its TOC entry.
struct InEntry {
    start: u64,
    /// Where the payload starts.
    data: u64,
    end: u64,
    toc: OutEntry,
}

/// Bytes of one compression unit.
#[derive(Clone, Debug)]
enum Piece {
    /// `len` bytes at `offset` of the input tar.
    Src(u64, u64),
    Inline(Vec<u8>),
}

#[derive(Default)]
struct Unit {
    pieces: Vec<Piece>,
    /// The TOC entry whose chunk starts this unit, and the chunk's length.
    chunk: Option<(usize, u64)>,
    /// For a chunk of a file of several chunks: the file's TOC entry.
    file: Option<usize>,
}

impl Unit {
    fn push(&mut self, p: Piece) {
        if let (Some(Piece::Src(o, l)), Piece::Src(o2, l2)) = (self.pieces.last_mut(), &p) {
            if *o + *l == *o2 {
                *l += l2;
                return;
            }
        }
        if !matches!(p, Piece::Src(_, 0)) {
            self.pieces.push(p);
        }
    }
    fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.chunk.is_none()
    }
}

fn rfc3339(secs: u64) -> String {
    match chrono::DateTime::from_timestamp(secs.min(i64::MAX as u64) as i64, 0) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        None => String::new(),
    }
}

/// Index the entries of the uncompressed tar at `path`.
fn index_tar(path: &Path) -> Result<Vec<InEntry>> {
    let ctx = |e: io::Error| Error::io(format!("reading tar {}", path.display()), e);
    let file = File::open(path).map_err(ctx)?;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(16 << 10, file));
    let mut out = Vec::new();
    let mut start = 0u64;
    // Seeking over payloads: only headers are read.
    for entry in archive.entries_with_seek().map_err(ctx)? {
        let mut entry = entry.map_err(ctx)?;
        let h = entry.header().clone();
        let data = entry.raw_file_position();
        let size = entry.size();
        let end = data + size.div_ceil(512) * 512;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let mut xattrs = BTreeMap::new();
        if let Some(exts) = entry.pax_extensions().map_err(ctx)? {
            for ext in exts {
                let ext = ext.map_err(ctx)?;
                if let Some(k) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.insert(
                        k.to_string(),
                        base64::engine::general_purpose::STANDARD.encode(ext.value_bytes()),
                    );
                }
            }
        }
        use tar::EntryType as T;
        let kind = match h.entry_type() {
            T::Regular | T::Continuous => "reg",
            T::Directory => "dir",
            T::Symlink => "symlink",
            T::Link => "hardlink",
            T::Char => "char",
            T::Block => "block",
            T::Fifo => "fifo",
            // Kept in the tar, not in the TOC.
            T::XGlobalHeader => "",
            other => {
                return Err(Error::invalid(
                    format!("tar entry {name:?}"),
                    format!("entry type {other:?} cannot go in a TOC"),
                ))
            }
        };
        let link_name = match kind {
            "hardlink" => normalize_name(&link).to_string(),
            "symlink" => link,
            _ => String::new(),
        };
        let dev = matches!(kind, "char" | "block");
        let toc = OutEntry {
            name: normalize_name(&name).to_string(),
            kind,
            size: if kind == "reg" { size } else { 0 },
            modtime: rfc3339(h.mtime().unwrap_or(0)),
            link_name,
            mode: h.mode().unwrap_or(0) & 0o7777,
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            dev_major: if dev {
                h.device_major().ok().flatten().unwrap_or(0)
            } else {
                0
            },
            dev_minor: if dev {
                h.device_minor().ok().flatten().unwrap_or(0)
            } else {
                0
            },
            xattrs,
            ..OutEntry::default()
        };
        out.push(InEntry {
            start,
            data,
            end,
            toc,
        });
        start = end;
    }
    Ok(out)
}

/// A small regular file's tar bytes: header, then payload with padding.
fn inline_file(name: &str, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("short name");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    h.set_cksum();
    let mut body = data.to_vec();
    body.resize(data.len().div_ceil(512) * 512, 0);
    (h.as_bytes().to_vec(), body)
}

/// The order entries are written in: prefetch files (after their parents
/// and, for hardlinks, their targets) first, then the rest.
fn order(entries: &[InEntry], prefetch: &[String]) -> Result<Vec<usize>> {
    if prefetch.is_empty() {
        return Ok((0..entries.len()).collect());
    }
    let by_name: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.toc.name.as_str(), i))
        .collect();
    let mut done = HashSet::new();
    let mut out = Vec::new();
    fn add(
        i: usize,
        entries: &[InEntry],
        by_name: &HashMap<&str, usize>,
        done: &mut HashSet<usize>,
        out: &mut Vec<usize>,
    ) {
        if done.contains(&i) {
            return;
        }
        let name = &entries[i].toc.name;
        let mut parent = Path::new(name.as_str()).parent();
        let mut parents = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            if let Some(&j) = p.to_str().and_then(|p| by_name.get(p)) {
                parents.push(j);
            }
            parent = p.parent();
        }
        for j in parents.into_iter().rev() {
            if done.insert(j) {
                out.push(j);
            }
        }
        if entries[i].toc.kind == "hardlink" {
            if let Some(&t) = by_name.get(entries[i].toc.link_name.as_str()) {
                if t != i {
                    add(t, entries, by_name, done, out);
                }
            }
        }
        if done.insert(i) {
            out.push(i);
        }
    }
    for p in prefetch {
        let i = *by_name.get(normalize_name(p)).ok_or_else(|| {
            Error::NotFound(format!("prefetch file {p:?} in the layer being written"))
        })?;
        add(i, entries, &by_name, &mut done, &mut out);
    }
    for i in 0..entries.len() {
        if done.insert(i) {
            out.push(i);
        }
    }
    Ok(out)
}

/// Write the tar at `tar_path` as an eStargz or zstd:chunked blob in a new
/// temporary file.
pub fn write(tar_path: &Path, opts: &TocOptions) -> Result<Written> {
    let chunk_size = match opts.chunk_size {
        0 => DEFAULT_CHUNK_SIZE,
        n => n,
    };
    let entries = index_tar(tar_path)?;
    let prefetch: Vec<String> = if opts.prefetch_if_present {
        let names: HashSet<&str> = entries.iter().map(|e| e.toc.name.as_str()).collect();
        let held = |p: &&String| names.contains(normalize_name(p));
        opts.prefetch.iter().filter(held).cloned().collect()
    } else {
        opts.prefetch.clone()
    };
    let order = order(&entries, &prefetch)?;
    let landmark = if prefetch.is_empty() {
        NO_PREFETCH_LANDMARK
    } else {
        PREFETCH_LANDMARK
    };
    let landmark_at = if prefetch.is_empty() {
        0
    } else {
        // After the prefetch files and the entries they pulled in.
        let set: HashSet<&str> = prefetch.iter().map(|p| normalize_name(p)).collect();
        order
            .iter()
            .rposition(|&i| set.contains(entries[i].toc.name.as_str()))
            .map_or(0, |p| p + 1)
    };

    // Plan the units and the TOC entries (offsets filled in once written).
    let mut toc: Vec<OutEntry> = Vec::with_capacity(entries.len() + 1);
    let mut units: Vec<Unit> = Vec::new();
    let mut cur = Unit::default();
    let mut landmark_done = false;
    let put_landmark = |toc: &mut Vec<OutEntry>, units: &mut Vec<Unit>, cur: &mut Unit| {
        let (head, body) = inline_file(landmark, &[LANDMARK_CONTENT]);
        let d = Digest::of(&[LANDMARK_CONTENT]).to_string();
        cur.push(Piece::Inline(head));
        units.push(std::mem::take(cur));
        cur.pieces.push(Piece::Inline(body));
        cur.chunk = Some((toc.len(), 1));
        toc.push(OutEntry {
            name: landmark.to_string(),
            kind: "reg",
            size: 1,
            mode: 0o644,
            digest: d.clone(),
            chunk_digest: d,
            ..OutEntry::default()
        });
    };
    for (pos, &i) in order.iter().enumerate() {
        if pos == landmark_at && !landmark_done {
            put_landmark(&mut toc, &mut units, &mut cur);
            landmark_done = true;
        }
        let e = &entries[i];
        if e.toc.kind != "reg" || e.toc.size == 0 {
            cur.push(Piece::Src(e.start, e.end - e.start));
            if !e.toc.kind.is_empty() {
                toc.push(e.toc.clone());
            }
            continue;
        }
        cur.push(Piece::Src(e.start, e.data - e.start));
        let size = e.toc.size;
        let file = (size > chunk_size).then_some(toc.len());
        let mut off = 0;
        while off < size {
            let len = chunk_size.min(size - off);
            let last = off + len == size;
            if !cur.is_empty() {
                units.push(std::mem::take(&mut cur));
            }
            let mut t = if off == 0 {
                e.toc.clone()
            } else {
                OutEntry {
                    name: e.toc.name.clone(),
                    kind: "chunk",
                    ..OutEntry::default()
                }
            };
            t.chunk_offset = off;
            if !last {
                t.chunk_size = len;
            }
            cur.chunk = Some((toc.len(), len));
            cur.file = file;
            cur.push(Piece::Src(e.data + off, len));
            if last {
                cur.push(Piece::Src(e.data + size, e.end - e.data - size));
            }
            toc.push(t);
            off += len;
        }
    }
    if !landmark_done {
        put_landmark(&mut toc, &mut units, &mut cur);
    }
    if opts.format == TocFormat::ZstdChunked {
        // The tar end blocks, in a frame after the last payload.
        if !cur.is_empty() {
            units.push(std::mem::take(&mut cur));
        }
        cur.pieces.push(Piece::Inline(vec![0; 1024]));
    }
    if !cur.is_empty() {
        units.push(cur);
    }

    let src = File::open(tar_path).map_err(|e| Error::io(tar_path.display().to_string(), e))?;
    let ctx = |e| Error::io("creating a temporary layer file", e);
    let (file, tmp) = tempfile::NamedTempFile::new().map_err(ctx)?.into_parts();
    let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let done = compress_units(&src, &units, opts, &mut out)?;
    let werr = |e| Error::io(format!("writing layer {}", tmp.display()), e);

    // Offsets, chunk digests and whole-file digests into the TOC.
    for (u, d) in units.iter().zip(done.units) {
        let Some((t, _)) = u.chunk else { continue };
        toc[t].offset = d.offset;
        if opts.format == TocFormat::ZstdChunked {
            toc[t].end_offset = d.offset + d.compressed_len;
        }
        let cd = d.chunk_digest.expect("chunk units have a digest");
        toc[t].chunk_digest = cd.to_string();
        if u.file.is_none() {
            toc[t].digest = cd.to_string();
        }
    }
    for (t, digest) in done.file_digests {
        toc[t].digest = digest.to_string();
    }
    let mut diff = done.diff;
    let json = serde_json::to_vec(&OutToc {
        version: 1,
        entries: &toc,
    })
    .map_err(|e| Error::invalid("eStargz TOC", e.to_string()))?;
    let toc_digest = Digest::of(&json);
    let mut annotations = BTreeMap::new();
    let toc_offset = out.hasher.len();
    match opts.format {
        TocFormat::Estargz => {
            let (head, body) = inline_file(TOC_TAR_NAME, &json);
            let mut raw = head;
            raw.extend_from_slice(&body);
            raw.extend_from_slice(&[0; 1024]);
            diff.update(&raw);
            let level = opts.level.unwrap_or(6).clamp(0, 9) as u32;
            out.write_all(&gzip(&raw, level).map_err(werr)?)
                .and_then(|_| out.write_all(&footer_bytes(toc_offset)))
                .map_err(werr)?;
        }
        TocFormat::ZstdChunked => {
            let compressed = zstd::bulk::compress(&json, opts.level.unwrap_or(3)).map_err(werr)?;
            let mut frame = SKIPPABLE_MAGIC.to_vec();
            frame.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            frame.extend_from_slice(&compressed);
            let pos = toc_offset + 8;
            let mut footer = SKIPPABLE_MAGIC.to_vec();
            footer.extend_from_slice(&40u32.to_le_bytes());
            for v in [pos, compressed.len() as u64, json.len() as u64, 1] {
                footer.extend_from_slice(&v.to_le_bytes());
            }
            footer.extend_from_slice(b"GnUlInUx");
            out.write_all(&frame)
                .and_then(|_| out.write_all(&footer))
                .map_err(werr)?;
            let position = format!("{pos}:{}:{}:1", compressed.len(), json.len());
            let checksum = Digest::of(&compressed).to_string();
            for k in [
                MANIFEST_POSITION_ANNOTATION,
                GITHUB_MANIFEST_POSITION_ANNOTATION,
            ] {
                annotations.insert(k.to_string(), position.clone());
            }
            for k in [
                MANIFEST_CHECKSUM_ANNOTATION,
                GITHUB_MANIFEST_CHECKSUM_ANNOTATION,
            ] {
                annotations.insert(k.to_string(), checksum.clone());
            }
        }
    }
    out.flush().map_err(werr)?;
    annotations.insert(TOC_DIGEST_ANNOTATION.to_string(), toc_digest.to_string());
    annotations.insert(
        UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
        diff.len().to_string(),
    );
    let size = out.hasher.len();
    let digest = out.hasher.finish();
    Ok(Written {
        tmp,
        digest,
        diff_id: diff.finish(),
        size,
        annotations,
        prefetched: prefetch,
    })
}

const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];

fn gzip(raw: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 2 + 64),
        flate2::Compression::new(level),
    );
    e.write_all(raw)?;
    e.finish()
}

/// A unit's bytes (uncompressed, compressed) and its chunk's digest.
type Compressed = (Vec<u8>, Vec<u8>, Option<Digest>);

struct UnitDone {
    offset: u64,
    compressed_len: u64,
    chunk_digest: Option<Digest>,
}

struct AllDone {
    units: Vec<UnitDone>,
    /// Digests of files of more than one chunk, by TOC entry.
    file_digests: Vec<(usize, Digest)>,
    /// The uncompressed stream so far.
    diff: Hasher,
}

/// Compress `units` on worker threads and write them in order to `out`.
fn compress_units(
    src: &File,
    units: &[Unit],
    opts: &TocOptions,
    out: &mut HashingWriter<BufWriter<File>>,
) -> Result<AllDone> {
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    // Units compressed but not yet written, at most (memory bound).
    let window = threads * 3;
    let next = AtomicUsize::new(0);
    let written = (Mutex::new(0usize), Condvar::new());
    let failed = std::sync::atomic::AtomicBool::new(false);
    let format = opts.format;
    let level = opts.level;
    type Job = io::Result<Compressed>;
    let (tx, rx) = mpsc::channel::<(usize, Job)>();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, written, failed) = (&next, &written, &failed);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= units.len() || failed.load(Ordering::SeqCst) {
                    break;
                }
                {
                    let (lock, cv) = written;
                    let mut w = lock.lock().expect("lock");
                    while i >= *w + window && !failed.load(Ordering::SeqCst) {
                        w = cv.wait(w).expect("lock");
                    }
                }
                let job = compress_unit(src, &units[i], format, level);
                if tx.send((i, job)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, Compressed> = BTreeMap::new();
        let mut done = AllDone {
            units: Vec::with_capacity(units.len()),
            file_digests: Vec::new(),
            diff: Hasher::new(),
        };
        let mut file: Option<(usize, Hasher)> = None;
        let fail = |e: io::Error| {
            failed.store(true, Ordering::SeqCst);
            written.1.notify_all();
            Error::io("compressing layer", e)
        };
        for (i, job) in rx {
            pending.insert(i, job.map_err(fail)?);
            while let Some((raw, comp, cd)) = pending.remove(&done.units.len()) {
                let u = &units[done.units.len()];
                done.diff.update(&raw);
                if let (Some(f), Some((_, len))) = (u.file, u.chunk) {
                    // Chunks of one file are consecutive units.
                    if file.as_ref().is_some_and(|(ft, _)| *ft != f) {
                        let (ft, h) = file.take().expect("checked");
                        done.file_digests.push((ft, h.finish()));
                    }
                    file.get_or_insert_with(|| (f, Hasher::new()))
                        .1
                        .update(&raw[..len as usize]);
                } else if let Some((ft, h)) = file.take() {
                    done.file_digests.push((ft, h.finish()));
                }
                done.units.push(UnitDone {
                    offset: out.hasher.len(),
                    compressed_len: comp.len() as u64,
                    chunk_digest: cd,
                });
                out.write_all(&comp).map_err(fail)?;
                let (lock, cv) = &written;
                *lock.lock().expect("lock") = done.units.len();
                cv.notify_all();
            }
        }
        if let Some((ft, h)) = file.take() {
            done.file_digests.push((ft, h.finish()));
        }
        if done.units.len() != units.len() {
            return Err(Error::invalid(
                "layer writer",
                "a compressing thread stopped",
            ));
        }
        Ok(done)
    })
}

/// Read, hash and compress one unit: (uncompressed, compressed, chunk digest).
fn compress_unit(
    src: &File,
    u: &Unit,
    format: TocFormat,
    level: Option<i32>,
) -> io::Result<Compressed> {
    let len: u64 = u
        .pieces
        .iter()
        .map(|p| match p {
            Piece::Src(_, l) => *l,
            Piece::Inline(b) => b.len() as u64,
        })
        .sum();
    let mut raw = vec![0u8; len as usize];
    let mut at = 0usize;
    for p in &u.pieces {
        match p {
            Piece::Src(o, l) => {
                src.read_exact_at(&mut raw[at..at + *l as usize], *o)?;
                at += *l as usize;
            }
            Piece::Inline(b) => {
                raw[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
        }
    }
    let cd = u.chunk.map(|(_, l)| Digest::of(&raw[..l as usize]));
    let comp = match format {
        TocFormat::Estargz => gzip(&raw, level.unwrap_or(6).clamp(0, 9) as u32)?,
        TocFormat::ZstdChunked => zstd::bulk::compress(&raw, level.unwrap_or(3))?,
    };
    Ok((raw, comp, cd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::estargz::{self, EntryType, Toc};
    use crate::image::manifest::Compression;
    use bytes::Bytes;
    use std::collections::HashMap;
    use std::io::Read;

    use crate::image::testing::Mem;

    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.extend_from_slice(&seed.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn tree() -> (tempfile::TempDir, Vec<(&'static str, Vec<u8>)>) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let files = vec![
            ("a/small", b"hello".to_vec()),
            ("a/big", noise(10_000, 3)),
            ("a/exact", noise(3000, 4)),
            ("b/empty", Vec::new()),
            ("z", b"last".to_vec()),
        ];
        for (p, data) in &files {
            std::fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            std::fs::write(r.join(p), data).unwrap();
        }
        std::fs::hard_link(r.join("a/big"), r.join("b/link")).unwrap();
        std::os::unix::fs::symlink("../a/small", r.join("b/sym")).unwrap();
        std::fs::write(r.join("b/.wh.gone"), "").unwrap();
        (d, files)
    }

    async fn open(w: &Written, format: TocFormat) -> (Toc, Bytes) {
        let blob = Bytes::from(std::fs::read(&w.tmp).unwrap());
        assert_eq!(Digest::of(&blob), w.digest);
        assert_eq!(blob.len() as u64, w.size);
        let ann: HashMap<String, String> = w.annotations.clone().into_iter().collect();
        let toc_digest = Digest::parse(&ann[TOC_DIGEST_ANNOTATION]).unwrap();
        let src = Mem(blob.clone());
        let toc = match format {
            TocFormat::Estargz => estargz::open(&src, &w.digest, w.size, Some(&toc_digest))
                .await
                .unwrap(),
            TocFormat::ZstdChunked => {
                // By annotation, then by footer alone.
                let t = crate::formats::zstd_chunked::open(&src, &w.digest, w.size, Some(&ann))
                    .await
                    .unwrap();
                crate::formats::zstd_chunked::open(&src, &w.digest, w.size, None)
                    .await
                    .unwrap();
                t
            }
        };
        assert!(toc.verified);
        (toc, blob)
    }

    async fn round_trip(format: TocFormat, prefetch: &[&str]) -> Toc {
        let (d, files) = tree();
        let tar = crate::image::newlayer::layer_from_dir(d.path(), Compression::None).unwrap();
        let mut o = TocOptions::new(format);
        o.chunk_size = 1000;
        o.prefetch = prefetch.iter().map(|s| s.to_string()).collect();
        let w = write(tar.path(), &o).unwrap();
        let (toc, blob) = open(&w, format).await;
        for (p, data) in &files {
            let i = toc.lookup(p).unwrap_or_else(|| panic!("{p} not in TOC"));
            let got = toc.read(&Mem(blob.clone()), i, 0, 1 << 20).await.unwrap();
            assert_eq!(&got, data, "{p}");
            // Every chunk alone, verified, from its own span.
            for c in toc.chunks(i) {
                let span = &blob[c.blob_offset as usize..c.blob_end as usize];
                let b = toc.decode_chunk(c, span).unwrap();
                assert_eq!(
                    &b[..],
                    &data[c.file_range().start as usize..][..c.size as usize]
                );
            }
            if data.len() > 1000 {
                assert_eq!(toc.chunks(i).len(), data.len().div_ceil(1000), "{p}");
                assert_eq!(
                    toc.entries[i].digest.as_ref().unwrap(),
                    &Digest::of(data),
                    "{p}"
                );
            }
        }
        let link = toc.lookup("b/link").unwrap();
        assert_eq!(toc.entries[link].kind, EntryType::Hardlink);
        let got = toc.read(&Mem(blob.clone()), link, 9990, 100).await.unwrap();
        assert_eq!(got, files[1].1[9990..]);
        // The whole blob is a plain tar.gz / tar.zst with the same entries:
        // DiffID and uncompressed size match.
        let mut raw = Vec::new();
        match format {
            TocFormat::Estargz => {
                flate2::read::MultiGzDecoder::new(&blob[..])
                    .read_to_end(&mut raw)
                    .unwrap();
            }
            TocFormat::ZstdChunked => {
                zstd::stream::read::Decoder::new(&blob[..])
                    .unwrap()
                    .read_to_end(&mut raw)
                    .unwrap();
            }
        }
        assert_eq!(Digest::of(&raw), w.diff_id);
        let mut names = Vec::new();
        for e in tar::Archive::new(&raw[..]).entries().unwrap() {
            let mut e = e.unwrap();
            names.push(e.path().unwrap().to_string_lossy().into_owned());
            if let Some(i) = toc.lookup(names.last().unwrap()) {
                if toc.entries[i].kind == EntryType::Reg {
                    let mut b = Vec::new();
                    e.read_to_end(&mut b).unwrap();
                    assert_eq!(b.len() as u64, toc.entries[i].size);
                }
            }
        }
        let plain_names = {
            let f = File::open(tar.path()).unwrap();
            let mut a = tar::Archive::new(f);
            a.entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        let landmark = if prefetch.is_empty() {
            NO_PREFETCH_LANDMARK
        } else {
            PREFETCH_LANDMARK
        };
        let mut want: Vec<String> = plain_names.clone();
        want.push(landmark.into());
        if format == TocFormat::Estargz {
            want.push(TOC_TAR_NAME.into());
        }
        let mut sorted = names.clone();
        sorted.sort();
        want.sort();
        assert_eq!(sorted, want);
        if prefetch.is_empty() {
            assert_eq!(names[0], NO_PREFETCH_LANDMARK);
            assert_eq!(&names[1..plain_names.len() + 1], &plain_names[..]);
            assert!(toc.no_prefetch());
        } else {
            let at = names.iter().position(|n| n == PREFETCH_LANDMARK).unwrap();
            for p in prefetch {
                assert!(names[..at].iter().any(|n| n == p), "{p} before landmark");
            }
            let range = toc.prefetch_range().unwrap();
            assert!(range.end > 0);
        }
        drop(d);
        toc
    }

    #[tokio::test]
    async fn estargz_round_trip() {
        round_trip(TocFormat::Estargz, &[]).await;
        let toc = round_trip(TocFormat::Estargz, &["z", "b/link"]).await;
        // The prefetched hardlink pulled its target and parents in first.
        let names: Vec<&str> = toc.entries.iter().map(|e| e.name.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("a") < pos("a/big") && pos("a/big") < pos("b/link"));
        assert!(pos("b/link") < pos(PREFETCH_LANDMARK));
        assert!(pos(PREFETCH_LANDMARK) < pos("a/small"));
    }

    #[tokio::test]
    async fn zstd_chunked_round_trip() {
        round_trip(TocFormat::ZstdChunked, &[]).await;
        round_trip(TocFormat::ZstdChunked, &["a/small"]).await;
    }

    #[test]
    fn diff_id_and_size_annotation() {
        let (d, _) = tree();
        let tar = crate::image::newlayer::layer_from_dir(d.path(), Compression::None).unwrap();
        for f in [TocFormat::Estargz, TocFormat::ZstdChunked] {
            let w = write(tar.path(), &TocOptions::new(f)).unwrap();
            let blob = std::fs::read(&w.tmp).unwrap();
            let mut raw = Vec::new();
            match f {
                TocFormat::Estargz => flate2::read::MultiGzDecoder::new(&blob[..])
                    .read_to_end(&mut raw)
                    .unwrap(),
                TocFormat::ZstdChunked => zstd::stream::read::Decoder::new(&blob[..])
                    .unwrap()
                    .read_to_end(&mut raw)
                    .unwrap(),
            };
            assert_eq!(Digest::of(&raw), w.diff_id, "{f:?}");
            assert_eq!(
                w.annotations[UNCOMPRESSED_SIZE_ANNOTATION],
                raw.len().to_string()
            );
            // Reproducible.
            let w2 = write(tar.path(), &TocOptions::new(f)).unwrap();
            assert_eq!(w.digest, w2.digest);
        }
    }
}
