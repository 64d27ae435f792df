//! The fuzz targets' bodies, one module per target: `run(data)` takes one
//! input and panics on a broken invariant. `src/bin/<target>.rs` wraps each
//! for AFL++; the workspace's `tests/fuzz_replay.rs` compiles the same
//! modules (by `#[path]`) and replays the corpora and mutations of them
//! through `run`, so they are exercised by every `cargo test` too. Helpers
//! are reached as `super::super::…`, which is this crate's root here and
//! the replay test's copy of `lib.rs` there.

pub mod auth;
pub mod estargz;
pub mod layerindex;
pub mod manifest;
pub mod reference;
pub mod server_routes;
pub mod tarindex_build;
pub mod tarindex_decode;
pub mod zran;
pub mod zstd_chunked;

/// A target's body: one input, a panic when an invariant breaks.
pub type Body = fn(&[u8]);

/// Every target: its name (the corpus directory) and its body.
pub const ALL: &[(&str, Body)] = &[
    ("auth", auth::run),
    ("estargz", estargz::run),
    ("layerindex", layerindex::run),
    ("manifest", manifest::run),
    ("reference", reference::run),
    ("server_routes", server_routes::run),
    ("tarindex_build", tarindex_build::run),
    ("tarindex_decode", tarindex_decode::run),
    ("zran", zran::run),
    ("zstd_chunked", zstd_chunked::run),
];
