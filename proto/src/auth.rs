//! Bearer tokens on gRPC calls: the client side ([`Bearer`], an interceptor
//! that adds `authorization: Bearer <token>`) and the parsing both sides share.

use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::job_service_client::JobServiceClient;
use crate::worker_service_client::WorkerServiceClient;

/// Adds the token (if any) to every request.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// A token is printable ASCII without spaces.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token is one word of printable ASCII".into());
        }
        MetadataValue::try_from(format!("Bearer {token}")).map(|v| Self(Some(v))).map_err(|e| e.to_string())
    }

    /// No token (the server answers Unauthenticated).
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type JobClient = JobServiceClient<InterceptedService<Channel, Bearer>>;
pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer_token(meta: &MetadataMap) -> Option<&str> {
    let v = meta.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_round_trips() {
        let mut b = Bearer::new("abc123").unwrap();
        let req = b.call(Request::new(())).unwrap();
        assert_eq!(bearer_token(req.metadata()), Some("abc123"));
        assert!(Bearer::new("two words").is_err() && Bearer::new("").is_err());
        let req = Bearer::none().call(Request::new(())).unwrap();
        assert_eq!(bearer_token(req.metadata()), None);
    }
}
