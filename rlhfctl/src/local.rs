//! Where the local cluster lives (its data dir) and the client token, which
//! `--token` / `RLHF_TOKEN` gives or the data dir's `admin.token` holds.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// The data directory when `--data-dir` and `$RLHF_DATA_DIR` are unset:
/// `$XDG_DATA_HOME/rlhfd`, else `~/.local/share/rlhfd`, else `./rlhfd-data`.
pub fn default_data_dir() -> PathBuf {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(x) = nonempty("XDG_DATA_HOME") {
        return x.join("rlhfd");
    }
    if let Some(h) = nonempty("HOME") {
        return h.join(".local/share/rlhfd");
    }
    PathBuf::from("rlhfd-data")
}

/// The CA given with `--tls-ca` (set once by `run`).
pub static TLS_CA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The CA that an `https://` coordinator's certificate must chain to:
/// `--tls-ca` or `RLHF_TLS_CA`.
pub fn tls_ca() -> Option<PathBuf> {
    TLS_CA.get().cloned().or_else(|| std::env::var_os("RLHF_TLS_CA").filter(|v| !v.is_empty()).map(PathBuf::from))
}

/// The token given with `--token` (set once by `run`).
pub static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The client token: `--token` / `RLHF_TOKEN`, else the file
/// `RLHF_TOKEN_FILE`, else the local cluster's `<data-dir>/admin.token`
/// (`RLHF_DATA_DIR` or the default data dir), else none.
pub fn client_token() -> Result<Option<String>> {
    if let Some(t) = TOKEN.get().cloned().or_else(|| std::env::var("RLHF_TOKEN").ok().filter(|t| !t.is_empty())) {
        return Ok(Some(t));
    }
    if let Some(f) = std::env::var_os("RLHF_TOKEN_FILE").filter(|f| !f.is_empty()) {
        let t = std::fs::read_to_string(&f).with_context(|| format!("RLHF_TOKEN_FILE {}", f.to_string_lossy()))?;
        return Ok(Some(t.trim().to_string()));
    }
    let dir = std::env::var_os("RLHF_DATA_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(default_data_dir);
    Ok(std::fs::read_to_string(dir.join("admin.token")).ok().map(|t| t.trim().to_string()))
}
