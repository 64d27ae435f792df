//! tarball: in progress.
