//! Progress bars on stderr when it is a terminal, silence otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use ggfs::image::copy::{BlobOutcome, Progress, Quiet};
use ggfs::Digest;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// A progress reporter: bars per blob on a terminal, nothing otherwise.
pub fn reporter() -> Arc<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Arc::new(Bars::default())
    } else {
        Arc::new(Quiet)
    }
}

#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl Bars {
    /// The bars by blob; a panic elsewhere while holding the lock leaves
    /// nothing here worth refusing to draw over.
    fn bars(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, ProgressBar>> {
        self.bars.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Progress for Bars {
    fn start(&self, digest: &Digest, size: u64) {
        let bar = self.multi.add(ProgressBar::new(size));
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(digest.short().to_string());
        self.bars().insert(digest.clone(), bar);
    }

    fn advance(&self, digest: &Digest, bytes: u64) {
        if let Some(bar) = self.bars().get(digest) {
            bar.inc(bytes);
        }
    }

    fn finish(&self, digest: &Digest, outcome: BlobOutcome) {
        let bar = self.bars().remove(digest);
        let msg = match outcome {
            BlobOutcome::Present => "exists",
            BlobOutcome::Mounted => "mounted",
            BlobOutcome::Uploaded => "done",
        };
        match bar {
            Some(bar) => bar.finish_with_message(msg),
            None => {
                let _ = self.multi.println(format!("{} {msg}", digest.short()));
            }
        }
    }
}

/// Wrap a writer so a spinner shows the bytes written (on a terminal only).
pub fn writer<W: std::io::Write>(inner: W, what: &str) -> CountingWriter<W> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        let style = ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    CountingWriter { inner, bar }
}

pub struct CountingWriter<W> {
    inner: W,
    bar: Option<ProgressBar>,
}

impl<W: std::io::Write> std::io::Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Drop for CountingWriter<W> {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
