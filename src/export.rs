//! export: in progress.
