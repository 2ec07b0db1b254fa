//! Opening a channel to the coordinator: `http://` plain, `https://` with
//! TLS (rustls), trusting the CA in `tls_ca` (else the system's roots).

use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// An endpoint for `url`; an `https` URL gets TLS, with `tls_ca` as the
/// trusted root when given.
pub fn endpoint(url: &str, tls_ca: Option<&Path>) -> Result<Endpoint, String> {
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| format!("coordinator URL {url:?}: {e}"))?;
    if !url.starts_with("https://") {
        if tls_ca.is_some() {
            return Err(format!("a TLS CA was given but the coordinator URL {url:?} is not https://"));
        }
        return Ok(ep);
    }
    let mut tls = ClientTlsConfig::new().with_enabled_roots();
    if let Some(ca) = tls_ca {
        let pem = std::fs::read(ca).map_err(|e| format!("TLS CA {}: {e}", ca.display()))?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    ep.tls_config(tls).map_err(|e| format!("TLS for {url}: {e}"))
}

/// Connects to `url` (see [`endpoint`]).
pub async fn connect(url: &str, tls_ca: Option<&Path>) -> Result<Channel, String> {
    let ep = endpoint(url, tls_ca)?;
    ep.connect().await.map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    })
}
