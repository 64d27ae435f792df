//! New layers: from a directory, a tar file or a reader, in any layer
//! format (tar, gzip, zstd, eStargz, zstd:chunked), written to a temporary
//! file with digest and DiffID computed as it is written. Used by
//! `mutate::append`, the CLI's `append`/`mutate`, and the mount's commit.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, Result};
use crate::formats::toc_writer::{TocFormat, TocOptions};
use crate::image::manifest::{media, Compression};

/// A layer built locally: its compressed blob in a temporary file (removed
/// when the last handle goes), with digest and DiffID computed while writing.
#[derive(Clone, Debug)]
pub struct LocalLayer {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Compressed size.
    pub size: u64,
    /// How the blob is compressed.
    pub compression: Compression,
    /// Layer descriptor annotations (eStargz / zstd:chunked TOC digests).
    pub annotations: BTreeMap<String, String>,
    pub(crate) file: Arc<tempfile::TempPath>,
}

impl LocalLayer {
    /// The compressed blob on disk.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The media type this layer gets in a manifest of `manifest_media_type`.
    pub fn media_type(&self, manifest_media_type: &str) -> &'static str {
        let docker = manifest_media_type == media::DOCKER_MANIFEST;
        self.compression.layer_media_type(docker)
    }
}

enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    fn new(c: Compression, w: W) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Encoder::None(w),
            // GzEncoder's header has mtime 0: output is reproducible.
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::default(),
            )),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, 3)?),
        })
    }
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

type TarSink = HashingWriter<Encoder<HashingWriter<BufWriter<SparseFile>>>>;

/// A file written front to back whose all-zero pieces (within 4 KiB
/// blocks) are skipped, not written: an uncompressed tar of a sparse file (the step before an
/// eStargz or zstd:chunked layer) stays sparse on disk instead of taking
/// gigabytes of zeros.
struct SparseFile {
    file: File,
    pos: u64,
}

const SPARSE_BLOCK: usize = 4096;

impl Write for SparseFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        // Runs of data between holes go out in one write each.
        let (mut run, mut i) = (0, 0);
        while i < buf.len() {
            let to_edge = SPARSE_BLOCK - ((self.pos + i as u64) % SPARSE_BLOCK as u64) as usize;
            let end = (i + to_edge).min(buf.len());
            let piece = &buf[i..end];
            // Zeros need no writing (even part of a block: what is not
            // written reads as zeros).
            if piece.iter().all(|&b| b == 0) {
                if run < i {
                    self.file
                        .write_all_at(&buf[run..i], self.pos + run as u64)?;
                }
                run = end;
            }
            i = end;
        }
        if run < buf.len() {
            self.file.write_all_at(&buf[run..], self.pos + run as u64)?;
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    /// Holes at the end need the length set.
    fn flush(&mut self) -> io::Result<()> {
        if self.file.metadata()?.len() < self.pos {
            self.file.set_len(self.pos)?;
        }
        Ok(())
    }
}

/// A temporary file being filled with a compressed tar, hashing both sides.
struct LayerWriter {
    tmp: tempfile::TempPath,
    sink: TarSink,
    compression: Compression,
}

impl LayerWriter {
    fn new(compression: Compression) -> Result<Self> {
        let ctx = |e| Error::io("creating a temporary layer file", e);
        let (file, tmp) = tempfile::NamedTempFile::new().map_err(ctx)?.into_parts();
        let file = SparseFile { file, pos: 0 };
        let outer = HashingWriter::new(BufWriter::with_capacity(256 * 1024, file));
        let sink = HashingWriter::new(Encoder::new(compression, outer).map_err(ctx)?);
        Ok(Self {
            tmp,
            sink,
            compression,
        })
    }

    fn finish(
        sink: TarSink,
        tmp: tempfile::TempPath,
        compression: Compression,
    ) -> Result<LocalLayer> {
        let ctx = |e| Error::io(format!("writing layer {}", tmp.display()), e);
        let diff_id = sink.hasher.finish();
        let mut outer = sink.inner.finish().map_err(ctx)?;
        outer.flush().map_err(ctx)?;
        let size = outer.hasher.len();
        Ok(LocalLayer {
            digest: outer.hasher.finish(),
            diff_id,
            size,
            compression,
            annotations: BTreeMap::new(),
            file: Arc::new(tmp),
        })
    }
}

/// The formats a layer can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerFormat {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
    /// gzip members per chunk, with a TOC (lazily readable).
    Estargz,
    /// zstd frames per chunk, with a TOC (lazily readable).
    ZstdChunked,
}

impl LayerFormat {
    /// The plain compression, or the TOC format.
    fn split(self) -> std::result::Result<Compression, TocFormat> {
        match self {
            LayerFormat::None => Ok(Compression::None),
            LayerFormat::Gzip => Ok(Compression::Gzip),
            LayerFormat::Zstd => Ok(Compression::Zstd),
            LayerFormat::Estargz => Err(TocFormat::Estargz),
            LayerFormat::ZstdChunked => Err(TocFormat::ZstdChunked),
        }
    }
}

impl From<Compression> for LayerFormat {
    fn from(c: Compression) -> Self {
        match c {
            Compression::None => LayerFormat::None,
            Compression::Gzip => LayerFormat::Gzip,
            Compression::Zstd => LayerFormat::Zstd,
        }
    }
}

impl std::str::FromStr for LayerFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" | "uncompressed" => LayerFormat::None,
            "gzip" => LayerFormat::Gzip,
            "zstd" => LayerFormat::Zstd,
            "estargz" => LayerFormat::Estargz,
            "zstd:chunked" | "zstdchunked" => LayerFormat::ZstdChunked,
            other => {
                return Err(Error::invalid(
                    format!("layer format {other:?}"),
                    "want gzip, zstd, estargz, zstd:chunked or none",
                ))
            }
        })
    }
}

/// How to write a layer: its format and, for eStargz and zstd:chunked, the
/// chunk size and the files to prefetch.
#[derive(Clone, Debug)]
pub struct LayerOptions {
    /// The format written.
    pub format: LayerFormat,
    /// Largest uncompressed chunk (0: 4 MiB).
    pub chunk_size: u64,
    /// Layer paths put first, before a `.prefetch.landmark`.
    pub prefetch: Vec<String>,
}

impl LayerOptions {
    /// `format` with the default chunk size and no prefetch list.
    pub fn new(format: LayerFormat) -> Self {
        LayerOptions {
            format,
            chunk_size: 0,
            prefetch: Vec::new(),
        }
    }
}

/// Re-encode an uncompressed tar layer as eStargz or zstd:chunked.
fn toc_layer(tar: &LocalLayer, format: TocFormat, opts: &LayerOptions) -> Result<LocalLayer> {
    let mut o = TocOptions::new(format);
    o.chunk_size = opts.chunk_size;
    o.prefetch = opts.prefetch.clone();
    Ok(toc_layer_with(tar, &o)?.0)
}

/// Re-encode an uncompressed tar layer as `o` says, with the prefetch files
/// it put first.
pub fn toc_layer_with(tar: &LocalLayer, o: &TocOptions) -> Result<(LocalLayer, Vec<String>)> {
    let w = crate::formats::toc_writer::write(tar.path(), o)?;
    let layer = LocalLayer {
        digest: w.digest,
        diff_id: w.diff_id,
        size: w.size,
        compression: match o.format {
            TocFormat::Estargz => Compression::Gzip,
            TocFormat::ZstdChunked => Compression::Zstd,
        },
        annotations: w.annotations,
        file: Arc::new(w.tmp),
    };
    Ok((layer, w.prefetched))
}

/// [`layer_from_dir_with`] in any [`LayerFormat`].
pub fn layer_from_dir_as(
    dir: impl AsRef<Path>,
    opts: &LayerOptions,
    hooks: &dyn DirHooks,
) -> Result<LocalLayer> {
    match opts.format.split() {
        Ok(c) => layer_from_dir_with(dir, c, hooks),
        Err(t) => toc_layer(
            &layer_from_dir_with(dir, Compression::None, hooks)?,
            t,
            opts,
        ),
    }
}

/// [`layer_from_tar`] in any [`LayerFormat`].
pub fn layer_from_tar_as(path: impl AsRef<Path>, opts: &LayerOptions) -> Result<LocalLayer> {
    match opts.format.split() {
        Ok(c) => layer_from_tar(path, c),
        Err(t) => toc_layer(&layer_from_tar(path, Compression::None)?, t, opts),
    }
}

/// Build a layer from a tar stream (compressed or not: it is sniffed and
/// decompressed first), recompressed with `compression`.
pub fn layer_from_reader(
    reader: impl Read + Send + 'static,
    compression: Compression,
) -> Result<LocalLayer> {
    let mut reader = io::BufReader::new(reader);
    let head = io::BufRead::fill_buf(&mut reader)
        .map_err(|e| Error::io("reading layer tar", e))?
        .to_vec();
    let mut input = crate::image::decompress(Compression::sniff(&head), Box::new(reader))?;
    let mut w = LayerWriter::new(compression)?;
    io::copy(&mut input, &mut w.sink).map_err(|e| Error::io("reading layer tar", e))?;
    LayerWriter::finish(w.sink, w.tmp, w.compression)
}

/// Build a layer from a tar file (plain, gzip or zstd).
pub fn layer_from_tar(path: impl AsRef<Path>, compression: Compression) -> Result<LocalLayer> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    layer_from_reader(file, compression)
        .map_err(|e| Error::invalid(format!("layer tar {}", path.display()), e.to_string()))
}

/// Build a reproducible layer from a directory: entries sorted by name,
/// parents before children, mode/uid/gid/mtime and xattrs preserved,
/// hardlinks detected by inode, devices and fifos kept, sockets skipped.
/// Deletions are representable the way overlayfs records them: a 0/0
/// character device becomes a `.wh.<name>` whiteout and a directory with the
/// `trusted.overlay.opaque` (or `user.overlay.opaque`) xattr set to `y` gets
/// a `.wh..wh..opq` marker; files already named `.wh.*` pass through as is.
pub fn layer_from_dir(dir: impl AsRef<Path>, compression: Compression) -> Result<LocalLayer> {
    layer_from_dir_with(dir, compression, &PlainDir)
}

/// Shapes a layer built from a directory: leave entries out, drop xattrs,
/// or take a regular file's bytes from elsewhere (a writable mount's upper
/// directory keeps unchanged bytes in the layer below).
pub trait DirHooks: Sync {
    /// Leave this entry (and, for a directory, everything below it) out.
    fn skip(&self, _rel: &Path) -> bool {
        false
    }
    /// Whether the xattr `name` goes into the layer.
    fn keep_xattr(&self, _name: &str) -> bool {
        true
    }
    /// The bytes of the regular file at `full` when they are not its own;
    /// exactly its size is read.
    fn data(&self, _full: &Path) -> io::Result<Option<Box<dyn Read + '_>>> {
        Ok(None)
    }
}

/// A directory taken as it is.
pub struct PlainDir;
impl DirHooks for PlainDir {}

/// [`layer_from_dir`] with [`DirHooks`].
pub fn layer_from_dir_with(
    dir: impl AsRef<Path>,
    compression: Compression,
    hooks: &dyn DirHooks,
) -> Result<LocalLayer> {
    let dir = dir.as_ref();
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(dir.display().to_string(), "not a directory"));
    }
    let w = LayerWriter::new(compression)?;
    let (tmp, compression) = (w.tmp, w.compression);
    let mut builder = tar::Builder::new(w.sink);
    let mut walk = DirWalk {
        root: dir,
        links: HashMap::new(),
        hooks,
    };
    walk.append_children(&mut builder, Path::new(""))?;
    let sink = builder
        .into_inner()
        .map_err(|e| Error::io(format!("writing layer of {}", dir.display()), e))?;
    LayerWriter::finish(sink, tmp, compression)
}

struct DirWalk<'a> {
    root: &'a Path,
    /// (dev, inode) of multiply-linked files already written → their name.
    links: HashMap<(u64, u64), PathBuf>,
    hooks: &'a dyn DirHooks,
}

impl DirWalk<'_> {
    fn append_children<W: Write>(&mut self, b: &mut tar::Builder<W>, rel: &Path) -> Result<()> {
        let dir = self.root.join(rel);
        let ctx = |e| Error::io(dir.display().to_string(), e);
        let mut names: Vec<OsString> = std::fs::read_dir(&dir)
            .map_err(ctx)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(ctx)?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            if self.hooks.skip(&rel) {
                continue;
            }
            let full = self.root.join(&rel);
            let meta = std::fs::symlink_metadata(&full)
                .map_err(|e| Error::io(full.display().to_string(), e))?;
            self.append_entry(b, &full, &rel, &meta)
                .map_err(|e| Error::io(format!("adding {} to layer", full.display()), e))?;
            if meta.is_dir() {
                self.append_children(b, &rel)?;
            }
        }
        Ok(())
    }

    fn append_entry<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        full: &Path,
        rel: &Path,
        meta: &std::fs::Metadata,
    ) -> io::Result<()> {
        let mut h = base_header(meta);
        let ft = meta.file_type();
        let mut xattrs = read_xattrs(full)?;
        xattrs.retain(|(k, _)| self.hooks.keep_xattr(k));
        if ft.is_char_device() && meta.rdev() == 0 {
            // overlayfs whiteout: the OCI form is an empty `.wh.<name>` file.
            let name = rel.file_name().unwrap_or_default().to_string_lossy();
            let wh = rel.with_file_name(format!(".wh.{name}"));
            h.set_entry_type(tar::EntryType::Regular);
            return b.append_data(&mut h, wh, io::empty());
        }
        append_pax_xattrs(b, &xattrs)?;
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, rel, io::empty())?;
            if is_opaque(&xattrs) {
                let mut oh = base_header(meta);
                oh.set_entry_type(tar::EntryType::Regular);
                oh.set_mode(0o644);
                b.append_data(&mut oh, rel.join(".wh..wh..opq"), io::empty())?;
            }
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, rel, std::fs::read_link(full)?)?;
        } else if ft.is_file() {
            self.append_file(b, h, full, rel, meta)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            h.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            if !ft.is_fifo() {
                let (major, minor) = dev_numbers(meta.rdev());
                h.set_device_major(major)?;
                h.set_device_minor(minor)?;
            }
            b.append_data(&mut h, rel, io::empty())?;
        } else {
            tracing::warn!("skipping socket {}", full.display());
        }
        Ok(())
    }

    fn append_file<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        mut h: tar::Header,
        full: &Path,
        rel: &Path,
        meta: &std::fs::Metadata,
    ) -> io::Result<()> {
        if meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                h.set_entry_type(tar::EntryType::Link);
                return b.append_link(&mut h, rel, first);
            }
            self.links.insert(key, rel.to_path_buf());
        }
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(meta.len());
        // Guard against the file changing size under us: tar needs the
        // declared size exactly.
        let data: Box<dyn Read> = match self.hooks.data(full)? {
            Some(d) => d,
            None => Box::new(File::open(full)?),
        };
        b.append_data(&mut h, rel, &mut data.take(meta.len()))
    }
}

fn base_header(meta: &std::fs::Metadata) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(meta.uid() as u64);
    h.set_gid(meta.gid() as u64);
    h.set_mtime(meta.mtime().max(0) as u64);
    h.set_size(0);
    h
}

/// Linux's dev_t encoding (glibc's major()/minor()).
fn dev_numbers(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn read_xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(key) = name.to_str().map(str::to_string) else {
            continue;
        };
        if let Some(v) = xattr::get(path, &name)? {
            out.push((key, v));
        }
    }
    out.sort();
    Ok(out)
}

fn is_opaque(xattrs: &[(String, Vec<u8>)]) -> bool {
    xattrs.iter().any(|(k, v)| {
        (k == "trusted.overlay.opaque" || k == "user.overlay.opaque") && v.as_slice() == b"y"
    })
}

/// Emit xattrs as `SCHILY.xattr.*` PAX records, leaving out overlayfs's own
/// bookkeeping (represented as whiteouts instead).
fn append_pax_xattrs<W: Write>(
    b: &mut tar::Builder<W>,
    xattrs: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let records: Vec<(String, &[u8])> = xattrs
        .iter()
        .filter(|(k, _)| !k.starts_with("trusted.overlay.") && !k.starts_with("user.overlay."))
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
        .collect();
    if records.is_empty() {
        return Ok(());
    }
    b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(layer: &LocalLayer) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let f = File::open(layer.path()).unwrap();
        let r = crate::image::decompress(layer.compression, Box::new(f)).unwrap();
        let mut a = tar::Archive::new(r);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                let t = e.header().entry_type();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (p, t, link.map(String::into_bytes).unwrap_or(data))
            })
            .collect()
    }

    #[test]
    fn uncompressed_tar_of_a_sparse_file_stays_sparse() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let f = File::create(d.path().join("big")).unwrap();
        f.set_len(256 << 20).unwrap();
        f.write_all_at(b"middle", 100 << 20).unwrap();
        f.write_all_at(b"end", (256 << 20) - 3).unwrap();
        let layer = layer_from_dir(d.path(), Compression::None).unwrap();
        let on_disk = std::fs::metadata(layer.path()).unwrap().blocks() * 512;
        assert!(on_disk < 1 << 20, "{on_disk} bytes on disk");
        let bytes = std::fs::read(layer.path()).unwrap();
        assert_eq!(bytes.len() as u64, layer.size);
        assert_eq!(Digest::of(&bytes), layer.digest);
        let big = entries(&layer)
            .into_iter()
            .find(|e| e.0 == "big")
            .unwrap()
            .2;
        assert_eq!(big.len(), 256 << 20);
        assert_eq!(&big[100 << 20..(100 << 20) + 6], b"middle");
        assert_eq!(&big[big.len() - 3..], b"end");
    }

    #[test]
    fn dir_layer_is_sorted_reproducible_and_hashes_match() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("b/sub")).unwrap();
        std::fs::write(r.join("b/sub/f"), "x").unwrap();
        std::fs::write(r.join("a"), "hello").unwrap();
        std::fs::hard_link(r.join("a"), r.join("c")).unwrap();
        std::os::unix::fs::symlink("a", r.join("d")).unwrap();
        std::fs::write(r.join(".wh.gone"), "").unwrap();

        let l1 = layer_from_dir(r, Compression::Gzip).unwrap();
        let l2 = layer_from_dir(r, Compression::Gzip).unwrap();
        assert_eq!(l1.digest, l2.digest, "reproducible");
        let bytes = std::fs::read(l1.path()).unwrap();
        assert_eq!(Digest::of(&bytes), l1.digest);
        assert_eq!(bytes.len() as u64, l1.size);
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(Digest::of(&plain), l1.diff_id);

        let names = entries(&l1);
        let paths: Vec<&str> = names.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(paths, [".wh.gone", "a", "b", "b/sub", "b/sub/f", "c", "d"]);
        assert_eq!(names[5].1, tar::EntryType::Link);
        assert_eq!(names[5].2, b"a");
        assert_eq!(names[6].1, tar::EntryType::Symlink);
        assert_eq!(names[1].2, b"hello");

        let z = layer_from_dir(r, Compression::Zstd).unwrap();
        assert_eq!(z.diff_id, l1.diff_id, "same tar, other compression");
    }
}
