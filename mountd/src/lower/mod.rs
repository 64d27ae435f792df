//! The lower side of the mount: an image's layers, read lazily and every
//! byte verified. Plain layers by their tar index and blocks (`layer`),
//! eStargz and zstd:chunked ones by their TOC and chunks (`lazy`), the rest
//! of a layer fetched in the background (`fetch`), the merged tree of an
//! image's layers (`tree`), the disk cache they share (`cache`), and FUSE
//! passthrough of cached big files (`passthrough`: the kernel side;
//! `backing`: which opens go that way, and the copies they read).

pub mod backing;
pub mod cache;
pub mod fetch;
pub mod layer;
pub mod lazy;
pub mod passthrough;
pub mod tree;
