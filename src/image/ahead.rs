//! Layers opened a few ahead of a reader that takes them in order.
//!
//! Over a WAN each blob's GET waits a round trip for its first byte. An
//! export or a tarball reads layers one after another; opened `depth`
//! ahead, those waits overlap the reading of the layers before. An opened
//! body that is not read yet holds no more than what the sockets buffer
//! (and no `jobs` slot), and a body the server drops meanwhile resumes by
//! Range like any other.

use std::collections::VecDeque;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::{ByteStream, Layer};
use crate::error::{Error, Result};

/// Layers, each opened up to `depth` ahead of the one asked for.
pub struct Ahead {
    layers: Vec<Layer>,
    depth: usize,
    /// Opened (or opening) layers by index, in order.
    opened: VecDeque<(usize, JoinHandle<Result<ByteStream>>)>,
    /// The next index to open.
    next: usize,
    handle: Handle,
}

impl Ahead {
    /// Call within a tokio runtime.
    pub fn new(layers: Vec<Layer>, depth: usize) -> Ahead {
        Ahead {
            layers,
            depth,
            opened: VecDeque::new(),
            next: 0,
            handle: Handle::current(),
        }
    }

    /// Layer `i` itself.
    pub fn layer(&self, i: usize) -> &Layer {
        &self.layers[i]
    }

    /// Layer `i`'s compressed bytes, verified as they stream, and the next
    /// `depth` layers set opening. A layer asked for again (a second pass)
    /// is opened anew. Call from a blocking thread.
    pub fn open(&mut self, i: usize) -> Result<ByteStream> {
        while self.opened.front().is_some_and(|(j, _)| *j < i) {
            if let Some((_, h)) = self.opened.pop_front() {
                h.abort();
            }
        }
        self.next = self.next.max(i);
        while self.next < self.layers.len() && self.next <= i + self.depth {
            let layer = self.layers[self.next].clone();
            let h = self.handle.spawn(async move { layer.compressed().await });
            self.opened.push_back((self.next, h));
            self.next += 1;
        }
        match self.opened.front() {
            Some((j, _)) if *j == i => {
                let (_, h) = self.opened.pop_front().expect("front");
                let what = format!("opening layer {}", self.layers[i].digest);
                self.handle
                    .block_on(h)
                    .map_err(|e| Error::invalid(what, e.to_string()))?
            }
            _ => self.handle.block_on(self.layers[i].compressed()),
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        for (_, h) in self.opened.drain(..) {
            h.abort();
        }
    }
}
