//! Authorization: one policy for every RPC, applied as a layer in front of all services.
//!
//! Each method has an [`Access`] class by its path. Mutating calls (model load/unload, plugin
//! load/unload/swap, quantize, and any method not listed as read-only, so that a new mutating
//! RPC is protected by default) need the admin token when one is set; without one they are
//! accepted only when the daemon listens on loopback. Inference and read-only calls are open
//! unless `--require-token-for-inference`; health checks are always open (orchestrators
//! probe them without credentials).

use crate::config::Config;
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tonic::{
    codegen::http::{HeaderMap, Request, Response},
    Status,
};

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health: never needs a token.
    Open,
    /// Inference and reading state: needs the token only with `--require-token-for-inference`.
    Read,
    /// Changes what the daemon serves or runs: always needs authorization.
    Admin,
}

/// Methods that only read or infer. Anything else is [`Access::Admin`].
const READ_METHODS: &[&str] = &[
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/inference.GRPCInferenceService/ModelConfig",
    "/inference.GRPCInferenceService/ModelStatistics",
    "/inference.GRPCInferenceService/RepositoryIndex",
    "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
    "/inference.GRPCInferenceService/CudaSharedMemoryStatus",
    "/opreg.v1.Registry/ListPlugins",
    "/opreg.v1.Registry/ListKernels",
    "/opreg.v1.Registry/ListBackends",
    "/opreg.v1.Registry/ListQuantizers",
    "/opreg.v1.Registry/RunKernel",
    "/opreg.v1.Registry/ModelPlacement",
    "/opreg.v1.Registry/ModelAdaptation",
];

/// The access class of the method at `path` (`/package.Service/Method`).
pub fn access(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") {
        Access::Open
    } else if READ_METHODS.contains(&path)
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        Access::Read
    } else {
        Access::Admin
    }
}

/// The policy in force.
#[derive(Debug, Clone)]
pub struct Policy {
    token: Option<String>,
    loopback: bool,
    inference_needs_token: bool,
}

impl Policy {
    pub fn new(config: &Config) -> Self {
        Self::for_listener(config, config.listen)
    }

    /// The policy of a listener on `addr` (the gRPC one, or the REST one): without a token,
    /// management calls are open only on a loopback listener.
    pub fn for_listener(config: &Config, addr: std::net::SocketAddr) -> Self {
        Policy {
            token: config.admin_token.clone(),
            loopback: addr.ip().is_loopback(),
            inference_needs_token: config.require_token_for_inference,
        }
    }

    /// Whether a call with `headers` may use a method of class `access`.
    pub fn check(&self, access: Access, headers: &HeaderMap) -> Result<(), Status> {
        match access {
            Access::Open => return Ok(()),
            Access::Read if !self.inference_needs_token => return Ok(()),
            Access::Read | Access::Admin => {}
        }
        match &self.token {
            Some(token) => {
                let given = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match given {
                    Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(()),
                    _ => Err(Status::unauthenticated(
                        "this call needs 'authorization: Bearer <admin token>'",
                    )),
                }
            }
            None if self.loopback => Ok(()),
            None => Err(Status::permission_denied(
                "management calls are disabled: the daemon listens beyond loopback and has no admin token (--admin-token)",
            )),
        }
    }
}

/// Compares without an early exit, so response time does not reveal how much of the token
/// a guess got right. (Length is not secret: tokens are compared as given.)
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tower layer that applies [`Policy`] before any service sees a call.
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    pub fn new(policy: Policy) -> Self {
        AuthLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorized<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// A service behind the policy.
#[derive(Clone)]
pub struct Authorized<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> tower::Service<Request<B>> for Authorized<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.policy.check(access(req.uri().path()), req.headers()) {
            Ok(()) => {
                // The clone is not the service `poll_ready` readied: call the readied one.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(req))
            }
            Err(status) => {
                tracing::warn!(method = req.uri().path(), "refused: {}", status.message());
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        h
    }

    #[test]
    fn methods_are_classified_with_admin_as_the_default() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access("/inference.GRPCInferenceService/ModelInfer"),
            Access::Read
        );
        assert_eq!(
            access("/inference.GRPCInferenceService/RepositoryModelLoad"),
            Access::Admin
        );
        assert_eq!(
            access("/inference.GRPCInferenceService/RepositoryModelUnload"),
            Access::Admin
        );
        assert_eq!(access("/opreg.v1.Registry/LoadPlugin"), Access::Admin);
        assert_eq!(access("/opreg.v1.Registry/SwapPlugin"), Access::Admin);
        assert_eq!(access("/opreg.v1.Registry/RollbackPlugin"), Access::Admin);
        assert_eq!(access("/opreg.v1.Registry/SomeFutureCall"), Access::Admin);
    }

    #[test]
    fn token_loopback_and_inference_rules() {
        let open = Policy {
            token: None,
            loopback: true,
            inference_needs_token: false,
        };
        assert!(open.check(Access::Admin, &headers(None)).is_ok());
        let exposed = Policy {
            loopback: false,
            ..open.clone()
        };
        let e = exposed
            .check(Access::Admin, &headers(None))
            .expect_err("no token, not loopback");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(exposed.check(Access::Read, &headers(None)).is_ok());
        let guarded = Policy {
            token: Some("s3cret".into()),
            loopback: true,
            inference_needs_token: true,
        };
        assert!(guarded
            .check(Access::Admin, &headers(Some("s3cret")))
            .is_ok());
        let e = guarded
            .check(Access::Admin, &headers(Some("s3crex")))
            .expect_err("wrong");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(guarded.check(Access::Read, &headers(None)).is_err());
        assert!(guarded.check(Access::Open, &headers(None)).is_ok());
    }
}
