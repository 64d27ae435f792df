//! `flatten`: an image's layers squashed into one, as `crane flatten` does.
//!
//! The merged tree is what [`crate::image::export`] writes (whiteouts applied, upper
//! layers winning); it streams through a bounded in-memory pipe straight
//! into a layer writer, so only the compressed result touches the disk. The
//! config keeps everything but the layer list: `rootfs.diff_ids` is the one
//! new DiffID, and history keeps its entries, marked `empty_layer`, followed
//! by one for the flattened layer.

use std::io::{self, BufWriter, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::image::compose::{self, Composed, Part};
use crate::image::manifest::Compression;
use crate::image::newlayer::{self, LocalLayer};
use crate::image::Image;

/// Chunks in flight between the export and the layer writer.
const PIPE_CHUNKS: usize = 4;
const CHUNK: usize = 256 * 1024;

/// `image` flattened into one layer compressed with `compression`; the new
/// history entry says `created_by`.
pub async fn flatten(
    image: &Image,
    compression: Compression,
    created_by: &str,
) -> Result<Composed> {
    let layer = merged_layer(image, compression).await?;
    let (mut config, manifest) = compose::editable(image)?;
    let count = image.manifest.layers().len();
    let history = match config.get_mut("history").and_then(Value::as_array_mut) {
        Some(h) => std::mem::take(h),
        None => Vec::new(),
    };
    let mut history: Vec<Value> = history
        .into_iter()
        .map(|mut entry| {
            if let Some(e) = entry.as_object_mut() {
                e.insert("empty_layer".into(), json!(true));
            }
            entry
        })
        .collect();
    history.push(json!({
        "created": crate::image::mutate::now_rfc3339(),
        "created_by": created_by,
        "comment": format!("flattened {count} layers of {}", image.digest()),
    }));
    config["history"] = json!(history);
    config["rootfs"] = json!({ "type": "layers", "diff_ids": [layer.diff_id] });
    let mt = image.raw.media_type.clone();
    let parts = vec![Part::local(layer, &mt)];
    compose::compose(&mt, manifest, compose::config_bytes(&config), parts)
}

/// The merged tree of `image` as one layer in a temporary file.
async fn merged_layer(image: &Image, compression: Compression) -> Result<LocalLayer> {
    let mut layers = image.layers()?;
    layers.reverse(); // top first, as flatten_layers wants them
    let what = format!("flattening image {}", image.digest());
    let (tx, rx) = sync_channel(PIPE_CHUNKS);
    let count = layers.len();
    let mut ahead = crate::image::ahead::Ahead::new(layers, crate::image::export::AHEAD);
    let export = tokio::task::spawn_blocking(move || {
        let open = |i: usize| crate::image::export::open_ahead(&mut ahead, i);
        let out = BufWriter::with_capacity(CHUNK, PipeWriter(tx));
        let out = crate::image::export::flatten_layers(count, open, out)?;
        out.into_inner()
            .map_err(|e| Error::io("writing the flattened layer", e.into_error()))?;
        Ok::<_, Error>(())
    });
    let build = tokio::task::spawn_blocking(move || {
        let reader = PipeReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        };
        newlayer::layer_from_reader(reader, compression)
    });
    let (exported, built) = tokio::join!(export, build);
    let panicked = |e: tokio::task::JoinError| Error::invalid(&what, e.to_string());
    let (exported, built) = (exported.map_err(panicked)?, built.map_err(panicked)?);
    // A failed writer closes the pipe early (the export then fails on a
    // broken pipe): its error is the one that matters. A failed export
    // leaves a truncated tar the writer took for whole: the export's error.
    let layer = built?;
    exported?;
    Ok(layer)
}

/// The writing end of a bounded pipe between two blocking threads.
struct PipeWriter(SyncSender<Vec<u8>>);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the layer writer stopped"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reading end: end of file once the writer is dropped.
struct PipeReader {
    rx: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::mutate;

    #[tokio::test(flavor = "multi_thread")]
    async fn two_layers_become_one_with_history_kept() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("f"), "one").unwrap();
        std::fs::write(a.join("gone"), "x").unwrap();
        std::fs::write(b.join("f"), "two").unwrap();
        std::fs::write(b.join(".wh.gone"), "").unwrap();
        let la = newlayer::layer_from_dir(&a, Compression::Gzip).unwrap();
        let lb = newlayer::layer_from_dir(&b, Compression::Gzip).unwrap();
        let base = mutate::empty(&"linux/amd64".parse().unwrap()).unwrap();
        let img = mutate::append(&base, vec![la, lb]).unwrap();

        let flat = flatten(&img, Compression::Gzip, "ggfs flatten")
            .await
            .unwrap();
        let cfg: Value = serde_json::from_slice(&flat.image.config).unwrap();
        let layers = flat.image.layers().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(
            cfg["rootfs"]["diff_ids"],
            json!([layers[0].diff_id.as_ref().unwrap()])
        );
        let h = cfg["history"].as_array().unwrap();
        assert_eq!(h.len(), 3);
        assert!(h[..2].iter().all(|e| e["empty_layer"] == true));
        assert!(h[2].get("empty_layer").is_none());

        let l = layers[0].clone();
        let names = tokio::task::spawn_blocking(move || {
            let mut ar = tar::Archive::new(crate::image::export::layer_reader(&l).unwrap());
            let mut out = Vec::new();
            for e in ar.entries().unwrap() {
                let mut e = e.unwrap();
                let mut s = String::new();
                e.read_to_string(&mut s).unwrap();
                out.push((e.path().unwrap().to_string_lossy().into_owned(), s));
            }
            out
        })
        .await
        .unwrap();
        assert_eq!(names, [("f".to_string(), "two".to_string())]);
    }
}
