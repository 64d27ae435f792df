//! Flatten an image's layers into one tar of the final filesystem, as
//! `crane export` does, with the OCI whiteout rules.
//!
//! Layers are read once each, top (last) to bottom: the first entry seen for
//! a path is the one that wins, so it is emitted and lower entries for the
//! same path are skipped. Whiteouts (`.wh.<name>`) and opaque markers
//! (`.wh..wh..opq`) seen in a layer hide matching content of the layers below
//! it, never of their own layer. Memory grows with the number of paths, not
//! with bytes.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::error::{from_io, Error, Result};
use crate::image::Image;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// An entry for this path was emitted (or deleted): lower ones are skipped.
const PRESENT: u8 = 1;
/// Everything below this path in lower layers is hidden (a whiteout, an
/// opaque directory, or a non-directory replacing a directory).
const HIDES_BELOW: u8 = 2;

/// Write the flattened filesystem of `image` as a tar to `out`, returning
/// `out` when done. Layer blobs are verified against their digests as they
/// stream; a bad layer fails the export with a digest error.
pub async fn flatten<W: Write + Send + 'static>(image: &Image, out: W) -> Result<W> {
    let layers = image.layers()?;
    let what = format!("exporting image {}", image.digest());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let readers = layers.iter().rev().map(|l| {
            let r = handle.block_on(l.uncompressed_reader())?;
            Ok((l.digest.to_string(), r))
        });
        flatten_readers(readers, out)
    })
    .await
    .map_err(|e| Error::invalid(what, e.to_string()))?
}

/// The blocking core: `layers` yields (name, uncompressed tar) from the TOP
/// layer down; each is opened only when the one above is done.
pub fn flatten_readers<W, I>(layers: I, out: W) -> Result<W>
where
    W: Write,
    I: IntoIterator<Item = Result<(String, Box<dyn Read + Send>)>>,
{
    let mut builder = tar::Builder::new(out);
    let mut marks: HashMap<PathBuf, u8> = HashMap::new();
    for layer in layers {
        let (name, reader) = layer?;
        let pending = flatten_layer(&mut builder, &marks, reader)
            .map_err(|e| from_io(format!("reading layer {name}"), e))?;
        for (path, flags) in pending {
            *marks.entry(path).or_default() |= flags;
        }
    }
    builder
        .into_inner()
        .map_err(|e| Error::io("writing the exported tar", e))
}

/// Emit one layer's visible entries; return the marks it adds for the layers
/// below (applied only after the layer, so a layer never hides its own files).
fn flatten_layer<W: Write>(
    out: &mut tar::Builder<W>,
    marks: &HashMap<PathBuf, u8>,
    reader: Box<dyn Read + Send>,
) -> io::Result<Vec<(PathBuf, u8)>> {
    let mut archive = tar::Archive::new(reader);
    let mut pending = Vec::new();
    // Non-directories emitted from this layer: valid hardlink targets.
    let mut emitted_here: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(path) = normalize(&entry.path()?) else {
            continue; // the root itself, or an unsafe path
        };
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        if file_name == OPAQUE_MARKER {
            pending.push((
                path.parent().unwrap_or(Path::new("")).to_path_buf(),
                HIDES_BELOW,
            ));
            continue;
        }
        if let Some(target) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            pending.push((path.with_file_name(target), PRESENT | HIDES_BELOW));
            continue;
        }
        if shadowed(marks, &path) {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_hard_link() {
            let target = entry.link_name()?.as_deref().and_then(normalize);
            if !target.is_some_and(|t| emitted_here.contains(&t)) {
                // Its target was deleted or replaced above: there is no
                // earlier entry in our output with this inode's content.
                tracing::debug!("dropping hardlink {} with a hidden target", path.display());
                continue;
            }
        }
        copy_entry(out, &mut entry, &path)?;
        if kind.is_dir() {
            pending.push((path, PRESENT));
        } else {
            emitted_here.insert(path.clone());
            pending.push((path, PRESENT | HIDES_BELOW));
        }
    }
    Ok(pending)
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
    let mut h = entry.header().clone();
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
        let readers = layers.into_iter().rev().map(|l| {
            let r: Box<dyn Read + Send> = Box::new(io::Cursor::new(l));
            Ok(("l".to_string(), r))
        });
        let out = flatten_readers(readers, Vec::new()).unwrap();
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
        let want = pairs(&[
            ("a", ""),
            ("a/keep", "k"),
            ("o", ""),
            ("o/new", "new"),
            ("x", "now a file"),
            ("f", "v2"),
        ]);
        // hl: its target h was deleted above, so the link is dropped.
        assert_eq!(got, want);
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
