//! Flatten an image's layers into one tar of the final filesystem, as
//! `crane export` does, with the OCI whiteout rules.
//!
//! Layers are read once each, top (last) to bottom: the first entry seen for
//! a path is the one that wins, so it is emitted and lower entries for the
//! same path are skipped. Whiteouts (`.wh.<name>`) and opaque markers
//! (`.wh..wh..opq`) seen in a layer hide matching content of the layers below
//! it, never of their own layer. Memory grows with the number of paths, not
//! with bytes.
//!
//! A hardlink whose target an upper layer deleted or replaced still holds
//! the old content (as after `umoci unpack` or on overlayfs), so it is
//! emitted as a regular file carrying that content, found by reading its
//! layer a second time (only such layers are).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::error::{from_io, Error, Result};
use crate::image::ahead::Ahead;
use crate::image::{decompress, ByteStream, Image, Layer};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// An entry for this path was emitted (or deleted): lower ones are skipped.
const PRESENT: u8 = 1;
/// Everything below this path in lower layers is hidden (a whiteout, an
/// opaque directory, or a non-directory replacing a directory).
const HIDES_BELOW: u8 = 2;
/// An upper layer put something below this path: it is a directory, and a
/// lower layer's non-directory here (a symlink above the upper's files) is
/// skipped.
const IS_PARENT: u8 = 4;

/// Write the flattened filesystem of `image` as a tar to `out`, returning
/// `out` when done. Layer blobs are verified against their digests as they
/// stream; a bad layer fails the export with a digest error.
pub async fn flatten<W: Write + Send + 'static>(image: &Image, out: W) -> Result<W> {
    let mut layers = image.layers()?;
    layers.reverse(); // top first
    let what = format!("exporting image {}", image.digest());
    let count = layers.len();
    let mut ahead = Ahead::new(layers, AHEAD);
    tokio::task::spawn_blocking(move || flatten_layers(count, |i| open_ahead(&mut ahead, i), out))
        .await
        .map_err(|e| Error::invalid(what, e.to_string()))?
}

/// A reader of a layer's uncompressed tar, its compressed bytes verified as
/// they stream. Call it from a blocking thread of a tokio runtime (as in
/// `spawn_blocking`): the decoder reads as soon as it is made, and the
/// bridge from the async source blocks on the runtime.
pub fn layer_reader(layer: &Layer) -> Result<Box<dyn Read + Send>> {
    let handle = tokio::runtime::Handle::current();
    let stream = handle.block_on(layer.compressed())?;
    stream_reader(layer, stream)
}

/// Layers opened ahead of the one being read (see [`Ahead`]).
pub const AHEAD: usize = 3;

/// Layer `i` of `ahead` as `flatten_layers` wants it: (name for errors,
/// uncompressed tar). From a blocking thread, as [`layer_reader`].
pub fn open_ahead(ahead: &mut Ahead, i: usize) -> Result<(String, Box<dyn Read + Send>)> {
    let stream = ahead.open(i)?;
    let layer = ahead.layer(i);
    Ok((layer.digest.to_string(), stream_reader(layer, stream)?))
}

/// A reader of `layer`'s uncompressed tar from its compressed `stream`.
fn stream_reader(layer: &Layer, stream: ByteStream) -> Result<Box<dyn Read + Send>> {
    let handle = tokio::runtime::Handle::current();
    let bridge = tokio_util::io::SyncIoBridge::new_with_handle(
        tokio_util::io::StreamReader::new(stream),
        handle,
    );
    decompress(layer.compression()?, Box::new(bridge))
}

/// The blocking core over `count` layers; `open(i)` gives layer `i` (0 = the
/// top layer) as (name for errors, uncompressed tar). Each layer is read
/// once, except that a layer is read a second time when it holds hardlinks
/// whose target an upper layer deleted or replaced (the link keeps the old
/// content, which must then be fetched again).
pub fn flatten_layers<W: Write>(
    count: usize,
    mut open: impl FnMut(usize) -> Result<(String, Box<dyn Read + Send>)>,
    out: W,
) -> Result<W> {
    let mut builder = tar::Builder::new(out);
    let mut marks: HashMap<PathBuf, u8> = HashMap::new();
    for i in 0..count {
        let (name, reader) = open(i)?;
        let ctx = |e| from_io(format!("reading layer {name}"), e);
        let scan = flatten_layer(&mut builder, &marks, reader).map_err(ctx)?;
        if !scan.orphans.is_empty() {
            let (_, reader) = open(i)?;
            emit_orphans(&mut builder, reader, scan.orphans).map_err(ctx)?;
        }
        for (path, flags) in scan.pending {
            *marks.entry(path).or_default() |= flags;
        }
    }
    builder
        .into_inner()
        .map_err(|e| Error::io("writing the exported tar", e))
}

/// What one pass over a layer leaves to do.
struct LayerScan {
    /// Marks for the layers below, applied only after this layer so that a
    /// layer never hides its own files.
    pending: Vec<(PathBuf, u8)>,
    /// Visible hardlinks whose target entry was hidden: target → link names.
    orphans: HashMap<PathBuf, Vec<PathBuf>>,
}

/// Emit one layer's visible entries.
fn flatten_layer<W: Write>(
    out: &mut tar::Builder<W>,
    marks: &HashMap<PathBuf, u8>,
    reader: Box<dyn Read + Send>,
) -> io::Result<LayerScan> {
    let mut archive = tar::Archive::new(reader);
    let mut scan = LayerScan {
        pending: Vec::new(),
        orphans: HashMap::new(),
    };
    // Non-directories emitted from this layer: valid hardlink targets.
    let mut emitted_here: HashSet<PathBuf> = HashSet::new();
    // Ancestors of what this layer emitted, marked IS_PARENT already.
    let mut parents_here: HashSet<PathBuf> = HashSet::new();
    // Orphan link name → the hidden file it shares an inode with.
    let mut orphan_root: HashMap<PathBuf, PathBuf> = HashMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(path) = normalize(&entry.path()?) else {
            continue; // the root itself, or an unsafe path
        };
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        if file_name == OPAQUE_MARKER {
            let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
            scan.pending.push((dir, HIDES_BELOW));
            continue;
        }
        if let Some(target) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            let target = path.with_file_name(target);
            scan.pending.push((target, PRESENT | HIDES_BELOW));
            continue;
        }
        if shadowed(marks, &path) {
            continue;
        }
        let kind = entry.header().entry_type();
        // Never a member beneath a symlink (or file) of this layer: a
        // consumer's tar would follow the link off the image.
        if let Some(p) = path.ancestors().skip(1).find(|a| emitted_here.contains(*a)) {
            tracing::warn!(
                "dropping {}: it lies beneath {}, a non-directory of the same layer",
                path.display(),
                p.display()
            );
            continue;
        }
        if !kind.is_dir() && marks.get(&path).is_some_and(|m| m & IS_PARENT != 0) {
            continue; // an upper layer's files are below: a directory
        }
        if kind.is_hard_link() {
            let Some(target) = entry.link_name()?.as_deref().and_then(normalize) else {
                continue;
            };
            if !emitted_here.contains(&target) {
                let root = orphan_root.get(&target).cloned().unwrap_or(target);
                scan.orphans
                    .entry(root.clone())
                    .or_default()
                    .push(path.clone());
                orphan_root.insert(path.clone(), root);
                scan.pending.push((path, PRESENT | HIDES_BELOW));
                continue;
            }
        }
        copy_entry(out, &mut entry, &path)?;
        for a in path.ancestors().skip(1) {
            if a.as_os_str().is_empty() || !parents_here.insert(a.to_path_buf()) {
                break;
            }
            scan.pending.push((a.to_path_buf(), IS_PARENT));
        }
        if kind.is_dir() {
            scan.pending.push((path, PRESENT));
        } else {
            emitted_here.insert(path.clone());
            scan.pending.push((path, PRESENT | HIDES_BELOW));
        }
    }
    drain(archive)?;
    Ok(scan)
}

/// Read a layer to its very end: the digest check (and gzip's CRC) happen
/// there, after the tar's end-of-archive blocks, so stopping early would let
/// a corrupted layer pass unnoticed.
fn drain<R: Read>(archive: tar::Archive<R>) -> io::Result<()> {
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(())
}

/// Second pass for hardlinks whose target was hidden: the first link name
/// gets the target's content and metadata, the others link to it.
fn emit_orphans<W: Write>(
    out: &mut tar::Builder<W>,
    reader: Box<dyn Read + Send>,
    mut orphans: HashMap<PathBuf, Vec<PathBuf>>,
) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        if orphans.is_empty() {
            break;
        }
        let mut entry = entry?;
        let Some(path) = normalize(&entry.path()?) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let links = orphans.remove(&path).unwrap_or_default();
        let Some((first, rest)) = links.split_first() else {
            continue;
        };
        copy_entry(out, &mut entry, first)?;
        for link in rest {
            let mut h = fresh_header(entry.header())?;
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            out.append_link(&mut h, link, first)?;
        }
    }
    drain(archive)?;
    for (target, links) in orphans {
        tracing::warn!(
            "dropping hardlinks {links:?}: their target {} is not in the layer",
            target.display()
        );
    }
    Ok(())
}

/// Is `path` hidden by an upper layer: the path itself taken, or an
/// ancestor whited out, opaque, or replaced by a non-directory?
fn shadowed(marks: &HashMap<PathBuf, u8>, path: &Path) -> bool {
    if marks.get(path).is_some_and(|m| m & PRESENT != 0) {
        return true;
    }
    // The root ("") can be opaque too: `.wh..wh..opq` at the top.
    path.ancestors()
        .skip(1)
        .any(|a| marks.get(a).is_some_and(|m| m & HIDES_BELOW != 0))
}

/// `./a/b/` → `a/b`; `None` for the root and for paths escaping it.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Copy an entry with its metadata and PAX records (xattrs, precise times),
/// under its normalised name.
fn copy_entry<W: Write, R: Read>(
    out: &mut tar::Builder<W>,
    entry: &mut tar::Entry<R>,
    path: &Path,
) -> io::Result<()> {
    // Names are rewritten below (GNU long names when needed); other records stay.
    let pax: Vec<(String, Vec<u8>)> = match entry.pax_extensions()? {
        Some(exts) => exts
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.key().ok()?.to_string(), e.value_bytes().to_vec())))
            .filter(|(k, _)| !matches!(k.as_str(), "path" | "linkpath" | "size"))
            .collect(),
        None => Vec::new(),
    };
    if !pax.is_empty() {
        out.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    let mut h = fresh_header(entry.header())?;
    let kind = h.entry_type();
    if kind.is_hard_link() || kind.is_symlink() {
        let target = entry
            .link_name()?
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let target = match (kind.is_hard_link(), normalize(&target)) {
            (true, Some(t)) => t, // same form as the names we emit
            _ => target,
        };
        h.set_size(0);
        return out.append_link(&mut h, path, target);
    }
    if kind.is_gnu_sparse() {
        h.set_entry_type(tar::EntryType::Regular); // the reader fills the holes
    }
    h.set_size(entry.size());
    out.append_data(&mut h, path, entry)
}

/// A GNU header with the entry's metadata but no name fields: a copied
/// ustar header would keep its `prefix` field under the new name.
fn fresh_header(src: &tar::Header) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(src.entry_type());
    // Empty numeric fields occur in the wild; extractors read them as 0.
    h.set_mode(src.mode().unwrap_or(0o644));
    h.set_uid(src.uid().unwrap_or(0));
    h.set_gid(src.gid().unwrap_or(0));
    h.set_mtime(src.mtime().unwrap_or(0));
    h.set_size(0);
    if let Some(gnu) = h.as_gnu_mut() {
        // Owner names as raw bytes (not always UTF-8), cut to the field.
        for (field, name) in [
            (&mut gnu.uname, src.username_bytes()),
            (&mut gnu.gname, src.groupname_bytes()),
        ] {
            let name = name.unwrap_or_default();
            let n = name.len().min(field.len());
            field[..n].copy_from_slice(&name[..n]);
        }
    }
    let kind = src.entry_type();
    let is_dev = matches!(kind, tar::EntryType::Char | tar::EntryType::Block);
    if is_dev {
        if let (Ok(Some(major)), Ok(Some(minor))) = (src.device_major(), src.device_minor()) {
            h.set_device_major(major)?;
            h.set_device_minor(minor)?;
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Build an uncompressed layer tar from (path, kind, data/target).
    fn layer(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for &(path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(0);
            match kind {
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
                'l' => {
                    h.set_entry_type(tar::EntryType::Link);
                    b.append_link(&mut h, path, data).unwrap();
                }
                's' => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, path, data).unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn flatten_bottom_up(layers: Vec<Vec<u8>>) -> Vec<(String, String)> {
        let n = layers.len();
        let open = |i: usize| {
            let r: Box<dyn Read + Send> = Box::new(io::Cursor::new(layers[n - 1 - i].clone()));
            Ok((format!("layer {i}"), r))
        };
        let out = flatten_layers(n, open, Vec::new()).unwrap();
        let mut a = tar::Archive::new(&out[..]);
        let mut got = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let mut s = String::new();
            match e.link_name().unwrap() {
                Some(l) => s = format!("-> {}", l.display()),
                None => {
                    e.read_to_string(&mut s).unwrap();
                }
            }
            got.push((p, s));
        }
        got.sort();
        got
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = v
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn whiteouts_opaque_and_replacement() {
        let l1 = layer(&[
            ("a", 'd', ""),
            ("a/keep", 'f', "k"),
            ("a/gone", 'f', "g"),
            ("o", 'd', ""),
            ("o/old", 'f', "old"),
            ("x", 'd', ""),
            ("x/under", 'f', "u"),
            ("f", 'f', "v1"),
            ("h", 'f', "hh"),
            ("hl", 'l', "h"),
            ("hl2", 'l', "hl"),
        ]);
        let l2 = layer(&[
            ("./a/.wh.gone", 'f', ""),
            ("o", 'd', ""),
            ("o/.wh..wh..opq", 'f', ""),
            ("o/new", 'f', "new"),
            ("x", 'f', "now a file"),
            ("f", 'f', "v2"),
            (".wh.h", 'f', ""),
        ]);
        let got = flatten_bottom_up(vec![l1, l2]);
        let mut want = pairs(&[
            ("a", ""),
            ("a/keep", "k"),
            ("o", ""),
            ("o/new", "new"),
            ("x", "now a file"),
            ("f", "v2"),
        ]);
        // hl keeps the content of h, which was deleted above.
        want.push(("hl".to_string(), "hh".to_string()));
        want.push(("hl2".to_string(), "-> hl".to_string()));
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn no_member_beneath_a_symlink() {
        // Same layer: the entry beneath the link is dropped.
        let l1 = layer(&[("link", 's', "/etc"), ("link/passwd", 'f', "x")]);
        let got = flatten_bottom_up(vec![l1.clone()]);
        assert_eq!(got, pairs(&[("link", "-> /etc")]));
        // An upper layer's files below a lower symlink: the path is a
        // directory, the symlink goes.
        let l2 = layer(&[("link/passwd", 'f', "y")]);
        let got = flatten_bottom_up(vec![l1, l2]);
        assert_eq!(got, pairs(&[("link/passwd", "y")]));
    }

    #[test]
    fn same_layer_entries_are_not_hidden_and_links_kept() {
        let l1 = layer(&[("d", 'd', ""), ("d/x", 'f', "1")]);
        let l2 = layer(&[
            ("d", 'd', ""),
            ("d/.wh..wh..opq", 'f', ""),
            ("d/y", 'f', "2"),
            ("d/z", 'l', "d/y"),
            ("s", 's', "d/y"),
        ]);
        let got = flatten_bottom_up(vec![l1, l2]);
        let want = pairs(&[("d", ""), ("d/y", "2"), ("d/z", "-> d/y"), ("s", "-> d/y")]);
        assert_eq!(got, want);
    }

    #[test]
    fn whiteout_then_recreate_across_layers() {
        let l1 = layer(&[("d", 'd', ""), ("d/a", 'f', "a")]);
        let l2 = layer(&[(".wh.d", 'f', "")]);
        let l3 = layer(&[("d", 'd', ""), ("d/b", 'f', "b")]);
        let got = flatten_bottom_up(vec![l1, l2, l3]);
        assert_eq!(got, pairs(&[("d", ""), ("d/b", "b")]));
    }
}
