//! tarindex: in progress.
