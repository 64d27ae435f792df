//! zran: in progress.
