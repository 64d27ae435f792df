//! The inode numbers the kernel holds, kept where a restarted daemon finds
//! them: a memfd the supervisor owns (supervise.rs). The kernel goes on
//! using the numbers it was given (cached dentries, open files), so a new
//! daemon on the same connection must give every number the same meaning.
//!
//! One line per number given out, written (one write(2), no fsync: the
//! memfd outlives the process) before the reply that hands it out:
//! - `K <key>`: namespace key; its inode is the next namespace number
//!   (2 at first: 1 is the root).
//! - `F <ino>`: that namespace inode was forgotten (its number stays used).
//! - `T <base> <end> <key>`: a rootfs tree (key: `Rootfs` or `WRootfs`)
//!   has inodes `base..end`.
//! - `U <base> <st_ino> <ino>`: in the writable tree at `base`, the upper
//!   file with inode `st_ino` is `ino`.
//!
//! Names forgotten and looked up again would grow the log for ever, so
//! now and then it is compacted: what holds now is appended as a snapshot,
//! `B`, then `N <ino> <key>` lines (a key at its number), the `T` and `U`
//! lines, then `E <next>` (the next namespace number), in one write; then
//! the pages before it are punched out. A snapshot cut short (no `E`) is
//! ignored, so a crash at any point replays to what the kernel holds.
//!
//! Read-only trees need nothing more: rebuilt from the same layers they
//! number their nodes alike.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Mutex;

use crate::namespace::fs::Key;

pub struct InoLog {
    file: Mutex<Written>,
}

/// The log file, and how many bytes of it came after the last snapshot.
struct Written {
    file: File,
    since: u64,
}

/// What an earlier daemon on this connection gave out.
#[derive(Default)]
pub struct Replayed {
    /// Namespace keys by inode (1, the root, is not among them).
    pub keys: BTreeMap<u64, Key>,
    /// The next namespace number to give out.
    pub next: u64,
    /// Trees by base: (end, key).
    pub trees: BTreeMap<u64, (u64, Key)>,
    /// Upper inodes of writable trees, by base: st_ino → ino.
    pub uppers: HashMap<u64, HashMap<u64, u64>>,
}

/// Compact once this much was written since the last snapshot and more
/// than the snapshot would hold.
const COMPACT_AFTER: u64 = 4 << 20;

impl InoLog {
    /// The log on `file`, and what it already holds.
    pub fn open(mut file: File) -> std::io::Result<(InoLog, Replayed)> {
        let text = read_data(&mut file)?;
        file.seek(SeekFrom::End(0))?;
        let (replayed, unended) = replay(&text);
        // What a crash cut short is closed, so that what follows counts: a
        // torn line ends with its newline, a snapshot without its end is
        // abandoned.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        if unended {
            file.write_all(b"A\n")?;
        }
        let since = text.len() as u64;
        let log = InoLog {
            file: Mutex::new(Written { file, since }),
        };
        Ok((log, replayed))
    }

    fn written(&self) -> std::sync::MutexGuard<'_, Written> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether enough was written since the last snapshot that one of
    /// `live` namespace keys would make the log smaller.
    pub fn wants_compacting(&self, live: usize) -> bool {
        let since = self.written().since;
        since > COMPACT_AFTER && since > live as u64 * 256
    }

    /// Append a snapshot of what holds now (namespace `keys`, the next
    /// number, and the tree and upper lines written so far), then free
    /// the pages before it.
    pub fn compact<'a>(
        &self,
        keys: impl Iterator<Item = (u64, &'a Key)>,
        next: u64,
    ) -> std::io::Result<()> {
        let mut w = self.written();
        let text = read_data(&mut w.file)?;
        let mut snap = String::from("B\n");
        for (ino, k) in keys {
            snap += &format!("N {ino} {}\n", json(k));
        }
        let mut seen = std::collections::HashSet::new();
        for l in text.lines() {
            if (l.starts_with("T ") || l.starts_with("U ")) && seen.insert(l) {
                snap += l;
                snap.push('\n');
            }
        }
        snap += &format!("E {next}\n");
        let start = w.file.seek(SeekFrom::End(0))?;
        if let Err(e) = w.file.write_all(snap.as_bytes()) {
            // Lines written after a snapshot cut short must still count.
            let _ = w.file.write_all(b"\nA\n");
            return Err(e);
        }
        w.since = 0;
        punch(&w.file, start)
    }

    fn line(&self, l: String) {
        let mut w = self.written();
        w.since += l.len() as u64;
        if let Err(e) = w.file.write_all(l.as_bytes()) {
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

/// The log from its first byte of data on: the pages a compaction punched
/// out are skipped (`SEEK_DATA`), and the zeros left of a partly punched
/// page dropped.
fn read_data(file: &mut File) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we own.
    let data = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    file.seek(SeekFrom::Start(data.max(0) as u64))?;
    let mut text = String::new();
    if data >= 0 {
        file.read_to_string(&mut text)?;
    }
    Ok(text.trim_start_matches('\0').to_string())
}

/// Free the log's pages before `end` (a memfd keeps its size).
fn punch(file: &File, end: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own.
    match unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, end as libc::off_t) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Parse a log: a line it cannot read (one cut short by a crash) is
/// passed over, a snapshot without its end (`E`) ignored; and whether the
/// log ends inside such a snapshot.
fn replay(text: &str) -> (Replayed, bool) {
    let mut r = Replayed {
        next: 2,
        ..Replayed::default()
    };
    let mut snapshot: Option<Replayed> = None;
    for l in text.lines() {
        let ok = match (l, snapshot.as_mut()) {
            ("B", _) => {
                snapshot = Some(Replayed::default());
                true
            }
            ("A", _) => {
                snapshot = None;
                true
            }
            (l, Some(s)) if l.starts_with("E ") => match num(l.get(2..)) {
                Some(next) => {
                    r = std::mem::take(s);
                    r.next = next;
                    snapshot = None;
                    true
                }
                None => false,
            },
            (l, Some(s)) => apply(s, l),
            (l, None) => apply(&mut r, l),
        };
        if !ok {
            tracing::warn!("inode log: passing over unreadable line {l:?}");
        }
    }
    (r, snapshot.is_some())
}

fn apply(r: &mut Replayed, l: &str) -> bool {
    let mut f = l.splitn(4, ' ');
    match f.next() {
        Some("K") => match serde_json::from_str(l.get(2..).unwrap_or("")) {
            Ok(k) => {
                r.keys.insert(r.next, k);
                r.next += 1;
            }
            Err(_) => return false,
        },
        Some("N") => {
            let mut f = l.splitn(3, ' ').skip(1);
            let (Some(i), Some(k)) = (num(f.next()), f.next()) else {
                return false;
            };
            match serde_json::from_str(k) {
                Ok(k) => r.keys.insert(i, k),
                Err(_) => return false,
            };
        }
        Some("F") => match num(f.next()) {
            Some(i) => drop(r.keys.remove(&i)),
            None => return false,
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
            BTreeMap::from([
                (3, Key::Tag("a".into(), "t".into())),
                (4, Key::Repo("a b\nc".into()))
            ])
        );
        assert_eq!(r.next, 5);
        assert_eq!(
            r.trees[&(1 << 40)],
            ((1 << 40) + 2048, Key::Rootfs("a".into(), d))
        );
        assert_eq!(r.uppers[&(1 << 40)][&77], (1 << 40) + 9);
    }

    fn repo(i: u64) -> Key {
        Key::Repo(format!("some/repository/name/{i}"))
    }

    #[test]
    fn a_compacted_log_replays_the_same_and_frees_its_pages() {
        let f = memfd();
        let (log, _) = InoLog::open(f.try_clone().unwrap()).unwrap();
        for i in 2..400 {
            log.key(&repo(i));
        }
        log.tree(1 << 40, (1 << 40) + 8, &repo(0));
        log.upper(1 << 40, 5, (1 << 40) + 7);
        for i in 2..399 {
            log.forgot(i);
        }
        let live = [(399, repo(399))];
        log.compact(live.iter().map(|(i, k)| (*i, k)), 400).unwrap();
        log.key(&repo(400));
        use std::os::fd::AsRawFd;
        let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert!(
            data >= 4096,
            "the pages before the snapshot are freed: {data}"
        );
        drop(log);
        let (log, r) = InoLog::open(f.try_clone().unwrap()).unwrap();
        assert_eq!(r.keys, BTreeMap::from([(399, repo(399)), (400, repo(400))]));
        assert_eq!(r.next, 401);
        assert_eq!(r.trees[&(1 << 40)], ((1 << 40) + 8, repo(0)));
        assert_eq!(r.uppers[&(1 << 40)][&5], (1 << 40) + 7);

        // A snapshot cut short (no E) is ignored, and what comes after it
        // still counts.
        let mut g = f.try_clone().unwrap();
        g.write_all(format!("B\nN 9 {}\n", json(&repo(9))).as_bytes())
            .unwrap();
        drop(log);
        let (log, r) = InoLog::open(f.try_clone().unwrap()).unwrap();
        assert!(!r.keys.contains_key(&9));
        log.key(&repo(401));
        drop(log);
        let (_, r) = InoLog::open(f).unwrap();
        assert_eq!(r.keys.get(&401), Some(&repo(401)));
        assert_eq!(r.next, 402);
    }
}
