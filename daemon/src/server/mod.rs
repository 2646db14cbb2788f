//! The gRPC surface: a thin layer over the registry and executor.

pub mod auth;
pub mod batch;
pub mod http;
pub mod infer;
mod inference;
mod profile;
pub mod quantize;
pub mod receive;
mod registry;
mod status;
pub mod tensor;

use crate::app::App;
use anyhow::Context;
use opreg_proto::{
    inference::grpc_inference_service_server::GrpcInferenceServiceServer,
    opreg::v1::registry_server::RegistryServer,
};
use std::{future::Future, sync::Arc};
use tokio::net::TcpListener;
use tonic::transport::{
    server::{ServerTlsConfig, TcpIncoming},
    Certificate, Identity,
};
use tonic_health::ServingStatus;

/// Largest gRPC message accepted or sent. tonic's 4 MiB default is far too small for tensors
/// and model uploads; clients (tritonclient) send up to 2 GiB.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024 * 1024 - 1;

/// Largest HTTP/2 frame a client may send (the protocol's range is 16 KiB to 16 MiB - 1).
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// How long shutdown waits for in-flight calls and open connections.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(opreg_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let inference = GrpcInferenceServiceServer::new(inference::InferenceApi { app: app.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let registry = RegistryServer::new(registry::RegistryApi { app: app.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    // Health follows readiness: SERVING once start-up loading is done (it is, by the time the
    // listener exists), NOT_SERVING as soon as shutdown begins.
    let status = if app.is_ready() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_serving::<GrpcInferenceServiceServer<inference::InferenceApi>>()
        .await;
    health
        .set_serving::<RegistryServer<registry::RegistryApi>>()
        .await;

    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = {
        let app = app.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            let _ = draining_tx.send(());
            app.set_ready(false);
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_not_serving::<GrpcInferenceServiceServer<inference::InferenceApi>>()
                .await;
            tracing::info!("shutting down: draining in-flight calls");
        }
    };

    // Tensors arrive in large messages: with HTTP/2's default 16 KiB frames a 600 KB image is
    // ~40 frames, each parsed and woken on separately; a larger frame limit lets the client send it
    // in one.
    let mut builder = tonic::transport::Server::builder().max_frame_size(Some(MAX_FRAME_BYTES));
    if let Some(tls) = &app.config.tls {
        builder = builder
            .tls_config(tls_config(tls)?)
            .context("configuring TLS")?;
    }
    // Nagle's algorithm holding a small response until the client's delayed ACK costs ~40 ms
    // per call: every accepted stream sets TCP_NODELAY.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = builder
        .layer(auth::AuthLayer::new(auth::Policy::new(&app.config)))
        // Inside the policy: a refused caller's body is never read.
        .layer(receive::ReceiveLayer::new(app.receiving.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inference)
        .add_service(registry)
        .serve_with_incoming_shutdown(incoming, drain);
    // Graceful shutdown waits for clients to close their connections; a client that never
    // does must not keep the daemon alive.
    let deadline = async {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r?,
        _ = deadline => tracing::warn!("clients still connected after {DRAIN_TIMEOUT:?}: closing"),
    }
    Ok(())
}

/// The listener's TLS settings: its identity and, for mutual TLS, the CA clients must present
/// a certificate of.
fn tls_config(tls: &crate::config::Tls) -> anyhow::Result<ServerTlsConfig> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).with_context(|| format!("reading the TLS {what} {}", p.display()))
    };
    let identity = Identity::from_pem(read(&tls.cert, "certificate")?, read(&tls.key, "key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(config)
}
