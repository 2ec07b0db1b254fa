//! Helpers for end-to-end tests: locate the built binaries and the fixtures.

use std::path::PathBuf;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Path of a binary built in the same target dir as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-bin> -> target/<profile>/<name>
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target profile dir");
    profile_dir.join(name)
}

/// The worker's checked-in fixtures.
pub fn fixtures() -> PathBuf {
    workspace_root().join("worker/tests/fixtures")
}
