//! auth: in progress.
