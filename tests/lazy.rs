//! The random-access layer readers against real blobs: eStargz and
//! zstd:chunked made by ctr-remote (via containerd, pushed to a real
//! distribution registry and read back with Range GETs), and plain gzip /
//! zstd layers made by umoci and ctr-remote, checked against the source tree.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use ggfs::error::Error;
use ggfs::formats::estargz::{self, EntryType, Toc};
use ggfs::formats::tarindex::{self, LayerIndex, TarKind};
use ggfs::formats::zran::{GzipIndex, GzipIndexBuilder};
use ggfs::formats::zstd_chunked;
use ggfs::image::manifest::{Compression, RawManifest};
use ggfs::image::{ByteStream, Source};
use ggfs::registry::auth::Keychain;
use ggfs::registry::{Client, ClientOptions, RegistryRepo};
use ggfs::{Digest, Repository};

use common::{
    estargz_image, fixture_rootfs, push_oci_layout, run, tempdir, umoci_image_from,
    zstdchunked_image, Distribution,
};

/// A registry holding `src:latest`: the fixture tree plus a 6 MB
/// compressible text file (so deflate uses Huffman blocks with bit offsets,
/// and eStargz splits it into several chunks).
struct Fixture {
    reg: Distribution,
    tree: PathBuf,
    /// OCI layout holding `latest` = the tree as one gzip layer (umoci).
    layout: PathBuf,
    layer: (Digest, u64),
    _dirs: Vec<tempfile::TempDir>,
}

fn fixture() -> Fixture {
    let reg = Distribution::start();
    let dir = tempdir();
    let tree = dir.path().join("tree");
    run(std::process::Command::new("cp")
        .arg("-a")
        .arg(fixture_rootfs())
        .arg(&tree));
    fs::create_dir_all(tree.join("text")).unwrap();
    fs::write(tree.join("text/words.txt"), words(6_000_000, 42)).unwrap();
    let layout = tempdir();
    let oci = layout.path().join("oci");
    umoci_image_from(&oci, "latest", &tree);
    push_oci_layout(&oci, "latest", &reg.reference("src:latest"));
    let oci = oci.clone();
    let m: serde_json::Value = rt().block_on(async {
        let raw = repo(&reg, "src").manifest("latest").await.unwrap();
        serde_json::from_slice(&raw.bytes).unwrap()
    });
    let layer = layer_of(&m).0;
    Fixture {
        reg,
        tree,
        layout: oci,
        layer,
        _dirs: vec![dir, layout],
    }
}

/// Deterministic text from a 4000-word vocabulary.
fn words(n: usize, mut seed: u64) -> Vec<u8> {
    let vocab: Vec<String> = (0..4000)
        .map(|i| {
            format!(
                "{}{}",
                ["lorem", "ipsum", "dolor", "sit", "amet"][i % 5],
                i * 37 % 1009
            )
        })
        .collect();
    let mut out = Vec::with_capacity(n + 32);
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(vocab[(seed % 4000) as usize].as_bytes());
        out.push(if seed.is_multiple_of(11) { b'\n' } else { b' ' });
    }
    out.truncate(n);
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn repo(reg: &Distribution, name: &str) -> RegistryRepo {
    let client = Client::builder(ClientOptions::default())
        .keychain(Keychain::anonymous())
        .build()
        .unwrap();
    client.repo(&Repository::new(reg.addr(), name).unwrap())
}

/// (digest, size) and annotations of the first layer of a manifest.
fn layer_of(m: &serde_json::Value) -> ((Digest, u64), HashMap<String, String>) {
    let l = &m["layers"][0];
    let digest = Digest::parse(l["digest"].as_str().unwrap()).unwrap();
    let ann = serde_json::from_value(l["annotations"].clone()).unwrap_or_default();
    ((digest, l["size"].as_u64().unwrap()), ann)
}

/// Counts the bytes a source serves through Range GETs.
struct Counting<S> {
    inner: S,
    ranged: AtomicU64,
}

#[async_trait]
impl<S: Source> Source for Counting<S> {
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn manifest(&self, reference: &str) -> ggfs::Result<RawManifest> {
        self.inner.manifest(reference).await
    }
    async fn blob(&self, digest: &Digest) -> ggfs::Result<ByteStream> {
        self.inner.blob(digest).await
    }
    async fn blob_range(&self, digest: &Digest, offset: u64, len: u64) -> ggfs::Result<Bytes> {
        let b = self.inner.blob_range(digest, offset, len).await?;
        assert_eq!(
            b.len() as u64,
            len,
            "short range from {}",
            self.inner.name()
        );
        self.ranged.fetch_add(len, Ordering::SeqCst);
        Ok(b)
    }
    async fn blob_size(&self, digest: &Digest) -> ggfs::Result<u64> {
        self.inner.blob_size(digest).await
    }
}

/// A blob held in memory (to serve a tampered copy of a real blob).
struct MemBlob(Bytes);

#[async_trait]
impl Source for MemBlob {
    fn name(&self) -> String {
        "memory".into()
    }
    async fn manifest(&self, reference: &str) -> ggfs::Result<RawManifest> {
        Err(Error::NotFound(reference.into()))
    }
    async fn blob(&self, _: &Digest) -> ggfs::Result<ByteStream> {
        Ok(Box::pin(futures::stream::iter([Ok(self.0.clone())])))
    }
    async fn blob_range(&self, _: &Digest, offset: u64, len: u64) -> ggfs::Result<Bytes> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.0.len() as u64);
        let end = end.ok_or_else(|| Error::invalid("range", "past the end"))?;
        Ok(self.0.slice(offset as usize..end as usize))
    }
    async fn blob_size(&self, _: &Digest) -> ggfs::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

/// Every TOC entry matches the tree (type, mode, owner, links, devices,
/// xattrs), every regular file's content read chunk by chunk equals the
/// file, and every file of the tree is in the TOC.
async fn check_toc_against_tree(toc: &Toc, source: &dyn Source, tree: &Path) {
    let mut multi_chunk = 0;
    for (i, e) in toc.entries.iter().enumerate() {
        if e.kind == EntryType::Chunk {
            continue;
        }
        let name = estargz::normalize_name(&e.name);
        if name.starts_with(".no.prefetch") || name.starts_with(".prefetch") {
            continue;
        }
        let path = tree.join(name);
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|err| panic!("{name:?}: {err}"));
        let ft = meta.file_type();
        if e.kind != EntryType::Symlink {
            assert_eq!(e.mode, meta.mode() & 0o7777, "mode of {name:?}");
        }
        assert_eq!(
            (e.uid, e.gid),
            (meta.uid(), meta.gid()),
            "owner of {name:?}"
        );
        match e.kind {
            EntryType::Dir => assert!(ft.is_dir(), "{name:?}"),
            EntryType::Symlink => {
                assert_eq!(
                    Path::new(&e.link_name),
                    fs::read_link(&path).unwrap(),
                    "{name:?}"
                )
            }
            EntryType::Char | EntryType::Block => {
                assert!(ft.is_char_device() || ft.is_block_device(), "{name:?}");
                let rdev = meta.rdev();
                let (major, minor) = (
                    ((rdev >> 8) & 0xfff) as u32,
                    ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32,
                );
                assert_eq!((e.dev_major, e.dev_minor), (major, minor), "{name:?}");
            }
            EntryType::Fifo => assert!(ft.is_fifo(), "{name:?}"),
            EntryType::Reg | EntryType::Hardlink => {
                let want = fs::read(&path).unwrap();
                let idx = toc.resolve(i).unwrap();
                let f = &toc.entries[idx];
                assert_eq!(f.size, want.len() as u64, "size of {name:?}");
                let chunks = toc.chunks(idx);
                if chunks.len() > 1 {
                    multi_chunk += 1;
                }
                for c in chunks {
                    let got = toc.read_chunk(source, c).await.unwrap();
                    assert!(
                        got[..] == want[c.file_range().start as usize..c.file_range().end as usize],
                        "chunk {c:?} of {name:?}"
                    );
                }
                let whole = toc.read(source, i, 0, u64::MAX).await.unwrap();
                assert!(whole == want, "content of {name:?}");
                if want.len() > 100 {
                    let part = toc.read(source, i, 37, 50).await.unwrap();
                    assert_eq!(part, &want[37..87], "part of {name:?}");
                }
            }
            EntryType::Chunk => unreachable!(),
        }
        if name == "xattr/file" {
            assert_eq!(
                e.xattrs.get("user.ggfs").map(Vec::as_slice),
                Some(&b"hello"[..])
            );
            assert_eq!(
                e.xattrs.get("user.bin").map(Vec::as_slice),
                Some(&[0u8, 0xff][..])
            );
        }
    }
    assert!(multi_chunk >= 2, "expected big files in several chunks");
    // Every regular file in the tree is in the TOC.
    for rel in walk(tree) {
        let idx = toc
            .lookup(&rel)
            .unwrap_or_else(|| panic!("{rel:?} missing from the TOC"));
        assert!(
            matches!(toc.entries[idx].kind, EntryType::Reg | EntryType::Hardlink),
            "{rel:?}"
        );
    }
}

/// Relative paths of the regular files under `root`.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push(rel);
            }
        }
    }
    assert!(out.len() > 10);
    out
}

/// The index and blob offset of a file's chunk in the middle of the file.
fn middle_chunk(toc: &Toc, name: &str) -> (usize, u64) {
    let i = toc.resolve(toc.lookup(name).unwrap()).unwrap();
    let c = &toc.chunks(i)[0];
    (i, c.blob_offset + (c.blob_end - c.blob_offset) / 2)
}

#[test]
fn estargz_from_ctr_remote_reads_every_file_and_detects_tampering() {
    let fx = fixture();
    let m = estargz_image(&fx.reg, "src:latest", "esgz:latest");
    let ((digest, size), ann) = layer_of(&m);
    let toc_digest = Digest::parse(&ann[estargz::TOC_DIGEST_ANNOTATION]).unwrap();
    rt().block_on(async {
        let src = Counting {
            inner: repo(&fx.reg, "esgz"),
            ranged: AtomicU64::new(0),
        };
        let toc = estargz::open(&src, &digest, size, Some(&toc_digest))
            .await
            .unwrap();
        assert!(toc.verified);
        assert!(toc.no_prefetch() && toc.prefetch_range().is_none());
        // Footer + TOC + one small file: a sliver of the layer.
        let os = toc.lookup("etc/os-release").unwrap();
        let data = toc.read(&src, os, 0, 4096).await.unwrap();
        assert_eq!(data, fs::read(fx.tree.join("etc/os-release")).unwrap());
        let fetched = src.ranged.load(Ordering::SeqCst);
        assert!(
            fetched * 20 < size,
            "fetched {fetched} of {size} bytes for one small file"
        );

        check_toc_against_tree(&toc, &src, &fx.tree).await;

        // A wrong annotation digest is refused.
        let err = estargz::open(&src, &digest, size, Some(&Digest::of(b"x")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ContentMismatch { .. }), "{err}");

        // Flip one byte inside a chunk of incompressible data (a stored
        // deflate block): inflate succeeds, the chunk digest must not.
        let mut blob = fs::read(fx.reg.blob_path(digest.as_str())).unwrap();
        let (i, at) = middle_chunk(&toc, "data/random-1m");
        blob[at as usize] ^= 0x20;
        let mem = MemBlob(Bytes::from(blob));
        let toc2 = estargz::open(&mem, &digest, size, Some(&toc_digest))
            .await
            .unwrap();
        let err = toc2.read_chunk(&mem, &toc2.chunks(i)[0]).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::ContentMismatch { .. }), "{msg}");
        assert!(
            msg.contains("data/random-1m") && msg.contains(digest.as_str()),
            "{msg}"
        );
        assert!(toc2.read(&mem, i, 0, 10).await.is_err());
        // Other files are still served.
        let ok = toc2.lookup("small.txt").unwrap();
        assert_eq!(toc2.read(&mem, ok, 0, 100).await.unwrap(), b"hello ggfs\n");
    });
}

#[test]
fn zstdchunked_from_ctr_remote_reads_every_file_and_detects_tampering() {
    let fx = fixture();
    let m = zstdchunked_image(&fx.reg, "src:latest", "zc:latest");
    let ((digest, size), ann) = layer_of(&m);
    rt().block_on(async {
        let src = repo(&fx.reg, "zc");
        // With annotations: position, manifest checksum and TOC digest.
        let toc = zstd_chunked::open(&src, &digest, size, Some(&ann))
            .await
            .unwrap();
        assert!(toc.verified);
        check_toc_against_tree(&toc, &src, &fx.tree).await;
        // Without: the footer leads to the same TOC.
        let bare = zstd_chunked::open(&src, &digest, size, None).await.unwrap();
        assert_eq!(bare.entries, toc.entries);
        assert_eq!(bare.toc_digest, toc.toc_digest);

        let mut bad = ann.clone();
        bad.insert(
            zstd_chunked::MANIFEST_CHECKSUM_ANNOTATION.into(),
            Digest::of(b"x").to_string(),
        );
        let err = zstd_chunked::open(&src, &digest, size, Some(&bad))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ContentMismatch { .. }), "{err}");

        // A flipped byte in a chunk: refused (by the chunk digest, or by
        // zstd's own frame checksum), and the error names the file.
        let blob = fs::read(fx.reg.blob_path(digest.as_str())).unwrap();
        let (i, at) = middle_chunk(&toc, "data/random-1m");
        let mut tampered = blob.clone();
        tampered[at as usize] ^= 0x20;
        let mem = MemBlob(Bytes::from(tampered));
        let err = toc.read_chunk(&mem, &toc.chunks(i)[0]).await.unwrap_err();
        assert!(err.to_string().contains("data/random-1m"), "{err}");

        // The same blob as a plain zstd layer: the tar index finds one frame
        // per file and reads from the nearest frame.
        let idx = tarindex::index_layer(&blob[..], Compression::Zstd, |_| {}).unwrap();
        assert!(
            idx.zstd_frames.len() > 2,
            "{} frames",
            idx.zstd_frames.len()
        );
        check_tar_index(&idx, &blob, &fx.tree);
    });
}

#[test]
fn zstdchunked_from_containers_image_with_rolling_chunks() {
    // The other writer: containers/image (skopeo), content-defined chunks
    // and per-file `endOffset`s, verified by the manifest checksum alone.
    let fx = fixture();
    // Recompress into a fresh layout (a push straight to the registry
    // would reuse the gzip blob it already holds), then push that.
    let out = tempdir();
    let zc_layout = out.path().join("oci");
    run(std::process::Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-compress",
        "--dest-compress-format",
        "zstd:chunked",
        &format!("oci:{}:latest", fx.layout.display()),
        &format!("oci:{}:zc", zc_layout.display()),
    ]));
    push_oci_layout(&zc_layout, "zc", &fx.reg.reference("skc:latest"));
    rt().block_on(async {
        let src = repo(&fx.reg, "skc");
        let raw = src.manifest("latest").await.unwrap();
        let m: serde_json::Value = serde_json::from_slice(&raw.bytes).unwrap();
        let ((digest, size), ann) = layer_of(&m);
        assert!(
            ann.keys()
                .any(|k| k.ends_with("zstd-chunked.manifest-checksum")),
            "{ann:?}"
        );
        let toc = zstd_chunked::open(&src, &digest, size, Some(&ann))
            .await
            .unwrap();
        assert!(toc.verified);
        assert!(toc.entries.iter().any(|e| e.end_offset.is_some()));
        check_toc_against_tree(&toc, &src, &fx.tree).await;
        let bare = zstd_chunked::open(&src, &digest, size, None).await.unwrap();
        assert_eq!(bare.entries, toc.entries);
    });
}

/// Every regular file of a layer index reads back (through the compressed
/// blob) as the file in the tree.
fn check_tar_index(idx: &LayerIndex, blob: &[u8], tree: &Path) {
    let mut files = 0;
    for t in &idx.entries {
        let name = estargz::normalize_name(std::str::from_utf8(&t.path).unwrap());
        if t.kind != TarKind::File
            || name.starts_with(".no.prefetch")
            || name == "stargz.index.json"
        {
            continue;
        }
        let want = fs::read(tree.join(name)).unwrap();
        let got = idx
            .read_file(t, 0, usize::MAX, |o, l| {
                Ok(Bytes::copy_from_slice(&blob[o as usize..(o + l) as usize]))
            })
            .unwrap();
        assert!(got[..] == want[..], "{name:?}");
        files += 1;
    }
    assert!(files > 10, "only {files} files");
}

/// Decompress a whole (multi-member) gzip blob.
fn gunzip(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Random reads through a zran index equal the decompressed bytes, and each
/// fetches at most the compressed span between two checkpoints around it.
fn check_zran(blob: &[u8], span: u64) {
    let plain = gunzip(blob);
    let mut b = GzipIndexBuilder::with_span(blob, span).unwrap();
    let mut streamed = Vec::new();
    b.read_to_end(&mut streamed).unwrap();
    assert!(streamed == plain, "streamed output differs");
    let idx = b.finish().unwrap();
    assert_eq!(idx.compressed_size, blob.len() as u64);
    assert_eq!(idx.uncompressed_size, plain.len() as u64);
    assert!(
        idx.points.len() as u64 >= plain.len() as u64 / span - 1,
        "{} points",
        idx.points.len()
    );
    // Checkpoints in the middle of a byte (after a Huffman-coded block)
    // must be among those exercised.
    assert!(
        idx.points.iter().any(|p| p.bits > 0),
        "no mid-byte checkpoint: {:?}",
        idx.points
            .iter()
            .map(|p| (p.compressed, p.uncompressed, p.bits))
            .collect::<Vec<_>>()
    );

    let bytes = idx.to_bytes().unwrap();
    assert!(bytes.len() < idx.points.len() * 33 * 1024 + 1024);
    let idx = GzipIndex::from_bytes(&bytes).unwrap();
    // Largest compressed distance between neighbouring checkpoints (or end).
    let mut bounds: Vec<u64> = idx.points.iter().map(|p| p.compressed).collect();
    bounds.push(idx.compressed_size);
    let max_gap = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap();

    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..40 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let off = seed % plain.len() as u64;
        let len = (seed >> 40) as usize % 70_000;
        let mut fetched = 0;
        let got = idx
            .read_at(off, len, |o, l| {
                fetched += l;
                Ok(Bytes::copy_from_slice(&blob[o as usize..(o + l) as usize]))
            })
            .unwrap();
        let end = (off as usize + len).min(plain.len());
        assert!(got[..] == plain[off as usize..end], "read {off}+{len}");
        // A read within one checkpoint interval fetches one gap (+1 byte for
        // the partial byte), never the whole blob.
        let crosses = idx
            .points
            .iter()
            .any(|p| p.uncompressed > off && p.uncompressed < off + len as u64);
        if !crosses {
            assert!(fetched <= max_gap + 1, "fetched {fetched} > {max_gap}");
        }
        assert!(
            fetched < blob.len() as u64 / 2,
            "fetched {fetched} of {}",
            blob.len()
        );
    }
}

#[test]
fn zran_random_reads_over_real_gzip_layers() {
    let fx = fixture();
    // umoci's layer: one gzip member.
    let single = fs::read(fx.reg.blob_path(fx.layer.0.as_str())).unwrap();
    assert!(single.len() > 5_000_000);
    // umoci (pgzip) flushes every 1 MiB: an odd span lands checkpoints
    // between those byte-aligned flush points.
    check_zran(&single, 1_000_003);
    // eStargz: a real multi-member gzip stream.
    let m = estargz_image(&fx.reg, "src:latest", "esgz:latest");
    let ((digest, _), _) = layer_of(&m);
    let multi = fs::read(fx.reg.blob_path(digest.as_str())).unwrap();
    check_zran(&multi, 1_000_003);
}

#[test]
fn tar_index_of_a_real_layer_in_one_pass() {
    let fx = fixture();
    let blob = fs::read(fx.reg.blob_path(fx.layer.0.as_str())).unwrap();
    let plain = gunzip(&blob);
    let mut seen = Vec::new();
    let idx =
        tarindex::index_layer(&blob[..], Compression::Gzip, |t| seen.push(t.clone())).unwrap();
    assert_eq!(seen, idx.entries, "on_entry sees every entry, in order");
    assert_eq!(idx.uncompressed_size, plain.len() as u64);
    assert!(idx.gzip.as_ref().unwrap().points.len() > 1);

    let by = |p: &str| {
        idx.entries
            .iter()
            .find(|t| estargz::normalize_name(&t.path_lossy()) == p)
            .unwrap_or_else(|| panic!("{p} not indexed"))
    };
    // Offsets into the uncompressed tar give the files' bytes.
    for rel in walk(&fx.tree) {
        let t = by(&rel);
        if t.kind == TarKind::Hardlink {
            continue;
        }
        let r = t.data_range();
        assert!(
            plain[r.start as usize..r.end as usize] == fs::read(fx.tree.join(&rel)).unwrap()[..],
            "{rel}"
        );
    }
    assert_eq!(by("usr/bin/suid").mode, 0o4755);
    assert_eq!(by("tmp").mode, 0o1777);
    assert_eq!((by("owned/dir").uid, by("owned/dir").gid), (1234, 5678));
    assert_eq!(by("mtime/old").mtime, 1_000_000_000);
    assert_eq!(
        by("links/rel").link_name.as_deref(),
        Some(&b"../etc/os-release"[..])
    );
    let dev = by("dev/block");
    assert_eq!(
        (dev.kind.clone(), dev.dev_major, dev.dev_minor),
        (TarKind::Block, 7, 0)
    );
    assert_eq!(by("dev/fifo").kind, TarKind::Fifo);
    let x = by("xattr/file");
    assert_eq!(
        x.xattrs.get("user.ggfs").map(Vec::as_slice),
        Some(&b"hello"[..])
    );
    assert!(by("usr/bin/cap").xattrs.contains_key("security.capability"));
    let hard = ["hard/a", "hard/b", "hard/c"].map(by);
    assert_eq!(
        hard.iter().filter(|t| t.kind == TarKind::Hardlink).count(),
        2
    );
    assert!(idx.entries.iter().any(|t| t.path.len() > 100), "long names");
    assert!(idx
        .entries
        .iter()
        .any(|t| t.path_lossy().contains("ファイル")));

    // Round trip through the cache format, then read files from the blob.
    let back = LayerIndex::from_bytes(&idx.to_bytes().unwrap()).unwrap();
    assert_eq!(back, idx);
    check_tar_index(&back, &blob, &fx.tree);
    let mut corrupt = idx.to_bytes().unwrap();
    let n = corrupt.len();
    corrupt[n / 2] ^= 1;
    assert!(LayerIndex::from_bytes(&corrupt).is_err());
}
