//! A mount outlives its daemon: `kill -9` of the process serving a mount
//! (a crash, an OOM kill) makes its supervisor start another on the same
//! /dev/fuse connection. Readers see a delay, never ENOTCONN: open files
//! read and write on, inode numbers keep their meaning, a request in
//! flight when the daemon died is answered by the next one, changes reach
//! the registry. A daemon that keeps dying is given up on, and the next
//! `ggfs mount` there clears the dead mount.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mount::{is_mounted, within, Mount};
use common::CountingProxy;
use common::Distribution;

fn registry_with_image() -> Distribution {
    let reg = Distribution::start();
    let layout = common::tempdir();
    let l = layout.path().join("l");
    common::umoci_image(&l, "latest");
    common::push_oci_layout(&l, "latest", &reg.reference("rs/app:v1"));
    reg
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

/// Every regular file below `dir` with its bytes, sorted by path.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_killed_daemon_is_replaced_and_open_files_inodes_and_changes_carry_on() {
    let reg = registry_with_image();
    let m = Mount::start(reg.addr(), &["--commit-delay", "manual"]);
    let rootfs = m.path("rs/app/v1/rootfs");
    let by_digest = std::fs::read_to_string(m.path("rs/app/v1/digest")).unwrap();
    let ro = m.path(&format!("rs/app/{}/rootfs", by_digest.trim()));
    let before = contents(&rootfs);
    assert!(before.len() >= 3, "fixture files: {before:?}");
    assert_eq!(contents(&ro), before);
    let (name, bytes) = before.iter().max_by_key(|(_, b)| b.len()).unwrap().clone();

    // Open files of both kinds, half read; a new file, half written.
    let mut reader = File::open(rootfs.join(&name)).unwrap();
    let mut ro_reader = File::open(ro.join(&name)).unwrap();
    let half = bytes.len() / 2;
    let mut head = vec![0; half];
    reader.read_exact(&mut head).unwrap();
    ro_reader.read_exact(&mut vec![0; half]).unwrap();
    std::fs::create_dir_all(rootfs.join("new/dir")).unwrap();
    let mut writer = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(rootfs.join("new/dir/file"))
        .unwrap();
    writer.write_all(b"written before; ").unwrap();
    let inos: Vec<(String, u64)> = ["", "new", "new/dir", "new/dir/file", &name]
        .iter()
        .map(|p| (p.to_string(), ino(&rootfs.join(p))))
        .chain([(format!("ro/{name}"), ino(&ro.join(&name)))])
        .collect();

    // A tag file being edited: its bytes live in the daemon's memory.
    let mut edit = OpenOptions::new()
        .write(true)
        .open(m.path("rs/app/v1/manifest.json"))
        .unwrap();
    edit.write_all(b" ").unwrap();

    let first = m.pid();
    let second = m.kill_worker();
    assert_ne!(first, second);

    // The open files go on where they were.
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!(
        [head, rest].concat(),
        bytes,
        "{name} read across the restart"
    );
    let mut rest = Vec::new();
    ro_reader.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, bytes[half..], "read-only {name} across the restart");
    writer.write_all(b"and after").unwrap();
    drop(writer);
    assert_eq!(
        std::fs::read(rootfs.join("new/dir/file")).unwrap(),
        b"written before; and after"
    );
    // The edit is lost, and says so; the tag stays.
    let e = edit.write_all(b"{}").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(edit);
    let now = std::fs::read_to_string(m.path("rs/app/v1/digest")).unwrap();
    assert_eq!(now, by_digest);
    // Every inode number the kernel had still names the same file.
    for (p, i) in &inos {
        let path = match p.strip_prefix("ro/") {
            Some(p) => ro.join(p),
            None => rootfs.join(p),
        };
        assert_eq!(ino(&path), *i, "inode of {p:?}");
    }
    // A rename after the restart, then a second restart.
    std::fs::rename(rootfs.join("new/dir/file"), rootfs.join("new/moved")).unwrap();
    let moved = ino(&rootfs.join("new/moved"));
    m.kill_worker();
    assert_eq!(ino(&rootfs.join("new/moved")), moved);
    assert_eq!(
        std::fs::read(rootfs.join("new/moved")).unwrap(),
        b"written before; and after"
    );
    let log = m.log();
    assert_eq!(
        log.matches("starting another on the same connection")
            .count(),
        2,
        "{log}"
    );

    drop((reader, ro_reader));
    // What was written reaches the registry.
    common::ggfs(&["commit", m.path("rs/app/v1").to_str().unwrap()]);
    m.unmount().unwrap();
    assert!(!m.pid_alive(), "supervisor and daemons gone after unmount");
    let again = Mount::start(reg.addr(), &[]);
    let got = std::fs::read(again.path("rs/app/v1/rootfs/new/moved")).unwrap();
    assert_eq!(got, b"written before; and after");
}

#[test]
fn a_request_in_flight_when_the_daemon_dies_is_answered_by_the_next() {
    let reg = registry_with_image();
    let proxy = CountingProxy::start(reg.addr());
    let m = Mount::start(proxy.addr(), &[]);
    let want = std::fs::read(common::fixture_rootfs().join("small.txt")).unwrap();
    let p = m.path("rs/app/v1/rootfs/small.txt");
    // The catalog the mount asked for at start is in before the freeze:
    // otherwise the read waits on it, and no request of its own goes out.
    assert!(m.path("rs/app").is_dir());
    reg.pause();
    let before = proxy.request_count();
    let reader = std::thread::spawn(move || std::fs::read(p));
    // The read is with the daemon, which waits on the frozen registry.
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.request_count() == before {
        assert!(Instant::now() < deadline, "no request reached the registry");
        std::thread::sleep(Duration::from_millis(20));
    }
    m.kill_worker();
    reg.resume();
    let got = within(60, "the read the dead daemon had taken", move || {
        reader.join().unwrap()
    });
    assert_eq!(got.unwrap(), want);
}

#[test]
fn a_daemon_that_keeps_dying_is_given_up_and_the_next_mount_clears_it() {
    let reg = registry_with_image();
    let dir = common::tempdir();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let m = Mount::start_at(reg.addr(), &[], &mp, None);
    for _ in 0..5 {
        m.kill_worker();
    }
    common::mount::kill(m.pid(), "KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.pid_alive() {
        assert!(
            Instant::now() < deadline,
            "supervisor still running after 6 deaths"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(m.log().contains("giving up"), "{}", m.log());
    let e = std::fs::read_dir(&mp).unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "{e}"
    );
    std::mem::forget(m);
    let again = Mount::start_at(reg.addr(), &[], &mp, None);
    assert!(again.path("rs/app/v1/rootfs/small.txt").exists());
    again.unmount().unwrap();
    assert!(!is_mounted(&mp));
}
