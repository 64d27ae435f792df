//! Writes the seed corpora in fuzz/corpus/<target>/ from real inputs: blobs
//! made by ggfs's own writers (eStargz and zstd:chunked by
//! `ggfs::formats::toc_writer`, tar indexes, zran checkpoints and layer-index files
//! by the builders the mount uses), WWW-Authenticate headers as registries
//! send them, and small real manifests. Run from fuzz/:
//!
//!     cargo afl build --release --example seeds && target/release/examples/seeds

use std::fs;
use std::io::Write;
use std::path::Path;

use ggfs::formats::layerindex::LayerIndexFile;
use ggfs::formats::tarindex;
use ggfs::formats::toc_writer::{self, TocFormat, TocOptions};
use ggfs::formats::zran::GzipIndexBuilder;
use ggfs::image::manifest::Compression;
use ggfs::Digest;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

/// A small layer: a directory, files (one over several chunks), a symlink,
/// a hardlink, a PAX xattr and mtime.
fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(1_700_000_000);
    b.append_data(&mut dir, "etc/", &[][..]).unwrap();
    let files: [(&str, Vec<u8>); 3] = [
        ("etc/hostname", b"ggfs\n".to_vec()),
        (
            "etc/os-release",
            b"NAME=\"Fuzz Linux\"\nID=fuzz\nVERSION_ID=1\n".repeat(6),
        ),
        ("bin/empty", Vec::new()),
    ];
    for (name, data) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let mut pax = tar::Header::new_ustar();
    pax.set_mode(0o755);
    pax.set_size(3);
    b.append_pax_extensions([
        ("SCHILY.xattr.user.fuzz", &b"yes"[..]),
        ("mtime", &b"1700000000.5"[..]),
    ])
    .unwrap();
    b.append_data(&mut pax, "bin/sh", &b"#!\n"[..]).unwrap();
    let mut l = tar::Header::new_ustar();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    l.set_mode(0o777);
    b.append_link(&mut l, "bin/bash", "sh").unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    b.append_link(&mut h, "etc/hostname.bak", "etc/hostname")
        .unwrap();
    b.into_inner().unwrap()
}

/// gzip in deflate blocks of `block` bytes (a flush ends each), so that
/// checkpoints can fall between them.
fn gzip_blocks(data: &[u8], block: usize) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for piece in data.chunks(block) {
        e.write_all(piece).unwrap();
        e.flush().unwrap();
    }
    e.finish().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The body inside ggfs's sealed index files: `magic | version | raw length
/// | sha256 | zstd(body)`.
fn unseal(sealed: &[u8]) -> Vec<u8> {
    let raw = u64::from_le_bytes(sealed[12..20].try_into().unwrap());
    zstd::bulk::decompress(&sealed[52..], raw as usize).unwrap()
}

fn toc_blob(format: TocFormat, tar: &Path, chunk: u64, prefetch: &[&str]) -> toc_writer::Written {
    let mut opts = TocOptions::new(format);
    opts.chunk_size = chunk;
    opts.threads = 1;
    opts.prefetch = prefetch.iter().map(|s| s.to_string()).collect();
    toc_writer::write(tar, &opts).unwrap()
}

fn main() {
    let tar = sample_tar();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    fs::write(tmp.path(), &tar).unwrap();

    // eStargz and zstd:chunked, by the project's writer.
    for (i, (chunk, prefetch)) in [(0u64, &[][..]), (64, &["etc/os-release"][..])]
        .iter()
        .enumerate()
    {
        let w = toc_blob(TocFormat::Estargz, tmp.path(), *chunk, prefetch);
        put(
            "estargz",
            &format!("writer-{i}"),
            &fs::read(&w.tmp).unwrap(),
        );
        let w = toc_blob(TocFormat::ZstdChunked, tmp.path(), *chunk, prefetch);
        let blob = fs::read(&w.tmp).unwrap();
        put("zstd_chunked", &format!("writer-{i}"), &blob);
        let pos = w
            .annotations
            .iter()
            .find(|(k, _)| k.ends_with("manifest-position"))
            .map(|(_, v)| v.clone())
            .expect("the writer annotates the position");
        let mut annotated = format!("@{pos}\n").into_bytes();
        annotated.extend_from_slice(&blob);
        put("zstd_chunked", &format!("annotated-{i}"), &annotated);
    }

    // Plain layers for the one-pass index, and the indexes they give.
    let gz = gzip(&tar);
    let zst = zstd::bulk::compress(&tar, 3).unwrap();
    for (sel, name, blob, compression) in [
        (0u8, "tar", &tar, Compression::None),
        (1, "tar-gzip", &gz, Compression::Gzip),
        (2, "tar-zstd", &zst, Compression::Zstd),
    ] {
        let mut input = vec![sel];
        input.extend_from_slice(blob);
        put("tarindex_build", name, &input);
        let index =
            tarindex::index_layer_with_span(&blob[..], compression, 512, std::io::sink(), |_| {})
                .unwrap();
        put("tarindex_decode", name, &unseal(&index.to_bytes().unwrap()));

        // A layer-index file: the body up to its last field, then the tar
        // index that field seals.
        let digest = Digest::of(blob);
        let file = LayerIndexFile::build(
            &blob[..],
            compression,
            &digest,
            blob.len() as u64,
            std::io::sink(),
        )
        .unwrap();
        let body = unseal(&file.to_bytes().unwrap());
        let sealed = file.index.to_bytes().unwrap();
        let head = &body[..body.len() - 8 - sealed.len()];
        let mut input = vec![sel | 4];
        input.extend_from_slice(&(head.len() as u16).to_le_bytes());
        input.extend_from_slice(head);
        input.extend_from_slice(&unseal(&sealed));
        put("layerindex", name, &input);
    }

    // zran checkpoints over a gzip stream, then a read through them.
    let text: Vec<u8> = (0..800u32)
        .flat_map(|i| format!("{i} ").into_bytes())
        .collect();
    for (name, stream) in [
        ("one-member", gzip_blocks(&text, 512)),
        ("two-members", {
            let mut s = gzip_blocks(&text[..1500], 512);
            s.extend(gzip_blocks(&text[1500..], 512));
            s
        }),
    ] {
        let mut b = GzipIndexBuilder::with_span(&stream[..], 768).unwrap();
        // Small reads, so inflate stops often enough for a point each span.
        let mut buf = [0u8; 256];
        while std::io::Read::read(&mut b, &mut buf).unwrap() > 0 {}
        let index = b.finish().unwrap();
        assert!(
            index.points.len() > 2,
            "{name}: {} points",
            index.points.len()
        );
        let body = unseal(&index.to_bytes().unwrap());
        let mut input = (body.len() as u16).to_le_bytes().to_vec();
        input.extend_from_slice(&body);
        input.extend_from_slice(&(text.len() as u32 / 2).to_le_bytes());
        input.extend_from_slice(&300u16.to_le_bytes());
        input.extend_from_slice(&stream);
        put("zran", name, &input);
    }

    // WWW-Authenticate, as registries send it.
    for (name, h) in [
        (
            "docker-hub",
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        ),
        (
            "ghcr",
            r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:owner/image:pull""#,
        ),
        ("distribution-basic", r#"Basic realm="Registry Realm""#),
        (
            "error",
            r#"Bearer realm="https://r.example/token",service="r.example",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        ),
        (
            "several",
            "Negotiate YIIBzgYGKwYBBQUCoIIBwjCC==, Basic realm=\"x \\\"y\\\"\", charset=UTF-8",
        ),
    ] {
        put("auth", name, h.as_bytes());
    }

    // References.
    for (i, r) in [
        "alpine",
        "docker.io/library/ubuntu:22.04",
        "localhost:5000/team/app:v1.2.3@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "ghcr.io/owner/image@sha512:ee26b0dd4af7e749aa1a8ee3c10ae9923f618980772e473f8819a5d4940e0db27ac185f8a0e1d5f84f88bc887fd67b143732c304cc5fa9ad8e6f57f50028a8ff",
        "[::1]:5000/x__y/z-w.v:tag_1",
        "Registry.Example:443/a",
    ]
    .iter()
    .enumerate()
    {
        put("reference", &format!("ref-{i}"), r.as_bytes());
    }

    // Request paths the embedded registry answers.
    for (i, p) in [
        "/v2/",
        "/v2/_catalog",
        "/v2/library/alpine/tags/list",
        "/v2/a/b/manifests/sha256%3A9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "/v2/a/blobs/uploads/",
        "/v2/a/blobs/uploads/3f1c6d2e-uuid",
        "/v2/team/app/referrers/sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ]
    .iter()
    .enumerate()
    {
        put("server_routes", &format!("path-{i}"), p.as_bytes());
    }

    // Manifests, an index and a config: the selector byte picks the
    // Content-Type (0: none, sniffed) or, odd sixes, the config parser.
    let cfg = include_bytes!("seeds/config.json");
    let mut input = vec![6u8];
    input.extend_from_slice(cfg);
    put("manifest", "config", &input);
    for (sel, name, json) in [
        (
            0u8,
            "oci-manifest",
            &include_bytes!("seeds/oci-manifest.json")[..],
        ),
        (
            3,
            "docker-manifest",
            &include_bytes!("seeds/docker-manifest.json")[..],
        ),
        (2, "oci-index", &include_bytes!("seeds/oci-index.json")[..]),
        (0, "artifact", &include_bytes!("seeds/artifact.json")[..]),
    ] {
        let mut input = vec![sel];
        input.extend_from_slice(json);
        put("manifest", name, &input);
    }
}
