//! Progress bars on stderr when it is a terminal, silence otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use ggfs::copy::{BlobOutcome, Progress, Quiet};
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
        self.bars
            .lock()
            .expect("progress lock")
            .insert(digest.clone(), bar);
    }

    fn advance(&self, digest: &Digest, bytes: u64) {
        if let Some(bar) = self.bars.lock().expect("progress lock").get(digest) {
            bar.inc(bytes);
        }
    }

    fn finish(&self, digest: &Digest, outcome: BlobOutcome) {
        let bar = self.bars.lock().expect("progress lock").remove(digest);
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
