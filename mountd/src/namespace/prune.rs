//! Bounded memory in a long-running daemon: merged trees (and the layers
//! they read) not used for a while, or beyond [`Limits::trees`], are
//! dropped. Their inode numbers stay reserved (fs.rs `Inodes::pending`),
//! so a later request naming one rebuilds the tree (from the cache, as a
//! restarted daemon does) and the kernel's numbers keep their meaning: no
//! FORGET bookkeeping is needed to drop one safely.
//!
//! Never dropped: a writable tree with changes (its journal is the truth
//! until committed) and anything in use (an open handle, a request in
//! flight), told by reference counts taken under the locks that hand out
//! new references.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::namespace::fs::{Inner, Key};
use crate::upper::rootfs::RootFs;

/// How many merged trees a daemon keeps, and for how long unused.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub trees: usize,
    pub idle: Duration,
    /// How long a namespace inode the kernel has forgotten (or never held:
    /// a name only listed) is kept before it goes.
    pub names: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            trees: 16,
            idle: Duration::from_secs(300),
            names: Duration::from_secs(600),
        }
    }
}

/// Prune every second, for the life of the daemon; sweep forgotten names
/// as often as their idle time allows, at most every 10 s.
pub async fn run(fs: Arc<Inner>, limits: Limits) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let sweep_every = limits.names.as_secs().clamp(1, 10);
    let mut last = fs.ns.stats.built();
    let mut trimmed = last;
    for n in 1u64.. {
        tick.tick().await;
        let built = fs.ns.stats.built();
        let dropped = fs.prune(limits);
        if dropped > 0 {
            tracing::debug!("dropped {dropped} unused trees");
        }
        // After drops, and once builds stop: what a build's scratch freed
        // after the last trim would otherwise stay with the process.
        if dropped > 0 || (built == last && built != trimmed) {
            release_freed();
            trimmed = built;
        }
        last = built;
        if n % sweep_every == 0 {
            let forgotten = fs.lock().sweep(limits.names.as_secs());
            if forgotten > 0 {
                tracing::debug!("forgot {forgotten} namespace inodes");
            }
        }
    }
}

impl Inner {
    /// Drop the trees least recently used beyond `limits`: how many went.
    pub fn prune(&self, limits: Limits) -> usize {
        let now = crate::upper::rootfs::now_secs();
        let mut by_use: Vec<(u64, Arc<RootFs>)> = {
            let inodes = self.lock();
            inodes
                .trees
                .values()
                .map(|r| (r.used.load(Ordering::Relaxed), r.clone()))
                .collect()
        };
        by_use.sort_by_key(|(used, _)| *used);
        let mut over = by_use.len().saturating_sub(limits.trees);
        let mut dropped = 0;
        for (used, r) in by_use {
            let idle = now.saturating_sub(used) >= limits.idle.as_secs();
            if over == 0 && !idle {
                break;
            }
            if self.drop_tree(r) {
                dropped += 1;
                over = over.saturating_sub(1);
            }
        }
        if dropped > 0 {
            self.layers.drop_unused();
            self.ns.stats.trees_dropped(dropped);
        }
        dropped
    }

    /// Drop `r` unless something holds it or it has changes.
    fn drop_tree(&self, r: Arc<RootFs>) -> bool {
        let Some(key) = self.lock().tree_key(r.base) else {
            return false;
        };
        match key {
            Key::Rootfs(repo, d) => self
                .rootfs
                .forget_if(&(repo, d), |c| Arc::ptr_eq(c, &r) && self.unlist(&r, 0)),
            Key::WRootfs(repo, tag, base) => {
                if r.w.as_ref().is_some_and(|w| w.journal.materialized()) {
                    return false;
                }
                let k = (repo.clone(), tag.clone());
                self.wrootfs.forget_if(&(repo, tag, base), |c| {
                    if !Arc::ptr_eq(c, &r) {
                        return false;
                    }
                    let mut work = self.work.lock().unwrap_or_else(|p| p.into_inner());
                    let in_work = work.get(&k).is_some_and(|w| Arc::ptr_eq(w, &r));
                    if !self.unlist(&r, in_work as usize) {
                        return false;
                    }
                    if in_work {
                        work.remove(&k);
                    }
                    true
                })
            }
            _ => false,
        }
    }

    /// Take `r` out of the inode table if nothing holds it but its memo
    /// entry, the table, `more` other maps and our own hand. Called with
    /// the memo locked, so no new holder can appear meanwhile.
    fn unlist(&self, r: &Arc<RootFs>, more: usize) -> bool {
        let mut inodes = self.lock();
        if Arc::strong_count(r) > 3 + more {
            return false;
        }
        inodes.unlist(r.base);
        true
    }
}

/// Hand what a dropped tree freed back to the system: glibc keeps freed
/// heap memory for reuse, so without this the daemon's RSS grows in steps
/// with fragmentation, not with what it holds.
fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
