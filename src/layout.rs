//! layout: in progress.
