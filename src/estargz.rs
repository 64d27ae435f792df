//! estargz: in progress.
