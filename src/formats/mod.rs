//! Layer formats and their indexes: what makes a layer readable at random,
//! a file or a byte range at a time, without downloading it whole.
//!
//! - [`estargz`] and [`zstd_chunked`]: layers that carry their own table of
//!   contents (TOC), read lazily; [`toc_writer`] writes them.
//! - [`zran`], [`tarindex`] and [`layerindex`]: for plain tar, tar+gzip and
//!   tar+zstd layers, an index built in one streaming pass (tar entries,
//!   gzip checkpoints, zstd frame starts, block digests) that gives the same
//!   random access.

pub mod estargz;
pub mod layerindex;
pub mod tarindex;
pub mod toc_writer;
pub mod zran;
pub mod zstd_chunked;
