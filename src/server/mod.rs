//! Embedded OCI distribution registry (axum): in progress.
