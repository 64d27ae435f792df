//! The inode numbers the kernel holds, kept where a restarted daemon finds
//! them: a memfd the supervisor owns (supervise.rs). The kernel goes on
//! using the numbers it was given (cached dentries, open files), so a new
//! daemon on the same connection must give every number the same meaning.
//!
//! One line per number given out, written (one write(2), no fsync: the
//! memfd outlives the process) before the reply that hands it out:
//! - `K <key>`: namespace key; its inode is 2 + the count of K lines before.
//! - `F <ino>`: that namespace inode was forgotten (its number stays used).
//! - `T <base> <end> <key>`: a rootfs tree (key: `Rootfs` or `WRootfs`)
//!   has inodes `base..end`.
//! - `U <base> <st_ino> <ino>`: in the writable tree at `base`, the upper
//!   file with inode `st_ino` is `ino`.
//!
//! Read-only trees need nothing more: rebuilt from the same layers they
//! number their nodes alike.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Mutex;

use crate::namespace::fs::Key;

pub struct InoLog {
    file: Mutex<File>,
}

/// What an earlier daemon on this connection gave out.
#[derive(Default)]
pub struct Replayed {
    /// Namespace keys in inode order, from inode 2 (1 is the root);
    /// `None` where forgotten.
    pub keys: Vec<Option<Key>>,
    /// Trees by base: (end, key).
    pub trees: BTreeMap<u64, (u64, Key)>,
    /// Upper inodes of writable trees, by base: st_ino → ino.
    pub uppers: HashMap<u64, HashMap<u64, u64>>,
}

impl InoLog {
    /// The log on `file`, and what it already holds.
    pub fn open(mut file: File) -> std::io::Result<(InoLog, Replayed)> {
        let mut text = String::new();
        file.seek(SeekFrom::Start(0))?;
        file.read_to_string(&mut text)?;
        file.seek(SeekFrom::End(0))?;
        let replayed = replay(&text);
        let log = InoLog {
            file: Mutex::new(file),
        };
        Ok((log, replayed))
    }

    fn line(&self, l: String) {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(l.as_bytes()) {
            // A restart would then answer ESTALE for this inode: nothing
            // worse, and nothing to stop serving for.
            tracing::warn!("inode log: {e}");
        }
    }

    pub fn key(&self, k: &Key) {
        self.line(format!("K {}\n", json(k)));
    }

    pub fn forgot(&self, ino: u64) {
        self.line(format!("F {ino}\n"));
    }

    pub fn tree(&self, base: u64, end: u64, k: &Key) {
        self.line(format!("T {base} {end} {}\n", json(k)));
    }

    pub fn upper(&self, base: u64, st_ino: u64, ino: u64) {
        self.line(format!("U {base} {st_ino} {ino}\n"));
    }
}

fn json(k: &Key) -> String {
    serde_json::to_string(k).expect("a key serializes")
}

/// Parse a log; a line it cannot read (one cut short by a crash) ends it.
fn replay(text: &str) -> Replayed {
    let mut r = Replayed::default();
    for l in text.lines() {
        if !apply(&mut r, l) {
            tracing::warn!("inode log: stopping at unreadable line {l:?}");
            break;
        }
    }
    r
}

fn apply(r: &mut Replayed, l: &str) -> bool {
    let mut f = l.splitn(4, ' ');
    match f.next() {
        Some("K") => match serde_json::from_str(l.get(2..).unwrap_or("")) {
            Ok(k) => r.keys.push(Some(k)),
            Err(_) => return false,
        },
        Some("F") => match num(f.next()).and_then(|i| i.checked_sub(2)) {
            Some(i) if (i as usize) < r.keys.len() => r.keys[i as usize] = None,
            _ => return false,
        },
        Some("T") => {
            let (Some(b), Some(e), Some(k)) = (num(f.next()), num(f.next()), f.next()) else {
                return false;
            };
            match serde_json::from_str(k) {
                Ok(k) => r.trees.insert(b, (e, k)),
                Err(_) => return false,
            };
        }
        Some("U") => {
            let (Some(b), Some(s), Some(i)) = (num(f.next()), num(f.next()), num(f.next())) else {
                return false;
            };
            r.uppers.entry(b).or_default().insert(s, i);
        }
        _ => return false,
    }
    true
}

fn num(s: Option<&str>) -> Option<u64> {
    s?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd() -> File {
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn what_is_written_replays_and_a_torn_line_ends_it() {
        let f = memfd();
        let (log, r) = InoLog::open(f.try_clone().unwrap()).unwrap();
        assert!(r.keys.is_empty());
        let d: ggfs::Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        log.key(&Key::Repo("a b\nc".into()));
        log.tree(
            1 << 40,
            (1 << 40) + 2048,
            &Key::Rootfs("a".into(), d.clone()),
        );
        log.upper(1 << 40, 77, (1 << 40) + 9);
        log.key(&Key::Tag("a".into(), "t".into()));
        // Forgotten, then named again: a new number, the old one unused.
        log.forgot(2);
        log.key(&Key::Repo("a b\nc".into()));
        drop(log);
        let mut g = f.try_clone().unwrap();
        g.write_all(b"K {\"Tag\":[\"x\"").unwrap();
        let (_, r) = InoLog::open(f).unwrap();
        assert_eq!(
            r.keys,
            vec![
                None,
                Some(Key::Tag("a".into(), "t".into())),
                Some(Key::Repo("a b\nc".into()))
            ]
        );
        assert_eq!(
            r.trees[&(1 << 40)],
            ((1 << 40) + 2048, Key::Rootfs("a".into(), d))
        );
        assert_eq!(r.uppers[&(1 << 40)][&77], (1 << 40) + 9);
    }
}
