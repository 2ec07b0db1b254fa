//! Who may call the coordinator. Clients and workers present bearer tokens:
//! the admin token and the worker token live in the data dir (`admin.token`,
//! `worker.token`, created on first start with mode 0600), and
//! `--client-tokens FILE` (TOML, `name = "token"` lines) names more clients.
//! A call without a known token is Unauthenticated, on loopback too. The
//! client's name rides in the request's extensions: jobs record who
//! submitted them, and only that client or the admin may cancel one.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use rlhf_proto::auth::bearer_token;
use tonic::{Request, Status};

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const WORKER_TOKEN_FILE: &str = "worker.token";

/// A client the coordinator knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub admin: bool,
}

impl Identity {
    /// Whether this client may act on a job submitted by `owner`.
    pub fn may_act_on(&self, owner: &str) -> bool {
        self.admin || self.name == owner
    }
}

pub struct Tokens {
    admin: String,
    worker: String,
    clients: BTreeMap<String, String>,
}

/// Reads `path`, or creates it (mode 0600) with a fresh token. Written
/// to a temp file and renamed into place, so a client or worker polling
/// for it never reads it half-written. (The data dir's lock keeps other
/// coordinators out.)
fn token_file(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("{}: empty token file", path.display()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => anyhow::bail!("{}: {e}", path.display()),
        Err(_) => {}
    }
    let token = rlhf_common::ids::random_hex(32)?;
    let tmp = path.with_extension("token.tmp");
    let _ = std::fs::remove_file(&tmp); // left by a crash mid-write
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(token)
}

/// Equal strings, in time that depends only on their lengths.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// The data dir's tokens (made on first start) and the named clients of
    /// `clients_file`.
    pub fn load(data_dir: &Path, clients_file: Option<&Path>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| anyhow::anyhow!("{}: {e}", data_dir.display()))?;
        let admin = token_file(&data_dir.join(ADMIN_TOKEN_FILE))?;
        let worker = token_file(&data_dir.join(WORKER_TOKEN_FILE))?;
        let mut clients = BTreeMap::new();
        if let Some(p) = clients_file {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let table: BTreeMap<String, String> =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            for (name, token) in table {
                if name == "admin" || token.len() < 16 {
                    anyhow::bail!(
                        "{}: client {name:?}: not \"admin\", and a token of 16 characters or more",
                        p.display()
                    );
                }
                clients.insert(name, token);
            }
        }
        Ok(Self { admin, worker, clients })
    }

    pub fn client(&self, token: &str) -> Option<Identity> {
        if same(token, &self.admin) {
            return Some(Identity { name: "admin".into(), admin: true });
        }
        self.clients.iter().find(|(_, t)| same(token, t)).map(|(n, _)| Identity { name: n.clone(), admin: false })
    }

    pub fn is_worker(&self, token: &str) -> bool {
        same(token, &self.worker)
    }
}

/// Interceptor for client services: a known client token, whose identity
/// is put in the request's extensions.
pub fn clients(tokens: Arc<Tokens>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let id = bearer_token(req.metadata())
            .and_then(|t| tokens.client(t))
            .ok_or_else(|| Status::unauthenticated("a client token is required: authorization: Bearer <token> (rlhfctl --token or RLHF_TOKEN; the admin token is <data-dir>/admin.token)"))?;
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

/// Interceptor for the worker service: the worker token.
pub fn workers(tokens: Arc<Tokens>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        if bearer_token(req.metadata()).is_some_and(|t| tokens.is_worker(t)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "a worker token is required (rlhf-worker --token-file <data-dir>/worker.token)",
            ))
        }
    }
}

/// The caller of a client request (set by [`clients`]).
pub fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    req.extensions().get::<Identity>().cloned().ok_or_else(|| Status::unauthenticated("no client identity"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_made_once_private_and_matched_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let clients = dir.path().join("clients.toml");
        std::fs::write(&clients, "alice = \"0123456789abcdef0123\"\n").unwrap();
        let t = Tokens::load(dir.path(), Some(&clients)).unwrap();
        let again = Tokens::load(dir.path(), None).unwrap();
        assert_eq!((t.admin.len(), &t.admin, &t.worker), (64, &again.admin, &again.worker));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(t.client(&t.admin), Some(Identity { name: "admin".into(), admin: true }));
        let alice = t.client("0123456789abcdef0123").unwrap();
        assert!(!alice.admin && alice.may_act_on("alice") && !alice.may_act_on("bob"));
        assert!(t.client(&t.worker).is_none() && !t.is_worker(&t.admin) && t.is_worker(&t.worker));
        assert!(t.client(&t.admin[..63]).is_none());
        std::fs::write(&clients, "admin = \"0123456789abcdef0123\"\n").unwrap();
        assert!(Tokens::load(dir.path(), Some(&clients)).is_err());
    }
}
