//! copy: in progress.
