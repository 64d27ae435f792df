//! zstd_chunked: in progress.
