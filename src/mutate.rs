//! mutate: in progress.
