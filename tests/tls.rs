//! gRPC over TLS and mutual TLS: a generated CA, tonic clients and Python's tritonclient.

use opreg_proto::inference::{
    self as pb, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use opreg_tests::{onnx::*, *};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// `y = Relu(x[N,3] @ ones[3,2])`.
fn mlp() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Relu", &["h"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 3])],
        vec![value("y", 1, &[-1, 2])],
        vec![f32_initializer("w", &[3, 2], &[1.0; 6])],
        17,
    )
}

fn start(pki: &TestPki, repo: &std::path::Path, mutual: bool) -> (Daemon, tempfile::TempDir) {
    let path = |n: &str| pki.path(n).display().to_string();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let mut args = vec!["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    if mutual {
        args.extend(["--tls-client-ca", ca.as_str()]);
    }
    start_serving(repo, &args)
}

async fn client(
    d: &Daemon,
    pki: &TestPki,
    identity: bool,
) -> Result<GrpcInferenceServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.pem")))
        .domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(
            pki.read("client.pem"),
            pki.read("client.key"),
        ));
    }
    let channel = Channel::from_shared(format!("https://{}", d.addr))
        .expect("url")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

async fn live(c: &mut GrpcInferenceServiceClient<Channel>) -> Result<bool, tonic::Status> {
    Ok(c.server_live(pb::ServerLiveRequest {})
        .await?
        .into_inner()
        .live)
}

#[tokio::test]
async fn tls_serves_tls_clients_and_refuses_plaintext() {
    let pki = TestPki::new();
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start(&pki, repo.path(), false);
    let mut c = client(&d, &pki, false).await.expect("TLS connect");
    assert!(live(&mut c).await.expect("live over TLS"));
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load over TLS");
    // A plaintext client gets no answer from a TLS listener.
    let plain = GrpcInferenceServiceClient::connect(d.url()).await;
    if let Ok(mut p) = plain {
        assert!(live(&mut p).await.is_err(), "plaintext must not be served");
    }
    tritonclient(&d, &pki, false, true);
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = TestPki::new();
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start(&pki, repo.path(), true);
    let mut c = client(&d, &pki, true).await.expect("mTLS connect");
    assert!(live(&mut c).await.expect("live over mTLS"));
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load over mTLS");
    // Without a client certificate the handshake (or the first call) fails.
    match client(&d, &pki, false).await {
        Err(_) => {}
        Ok(mut anonymous) => assert!(
            live(&mut anonymous).await.is_err(),
            "a client without a certificate must be refused"
        ),
    }
    tritonclient(&d, &pki, true, true);
    tritonclient(&d, &pki, false, false);
}

/// Runs tritonclient over TLS; `identity`: present the client certificate; `ok`: expect the
/// inference to succeed.
fn tritonclient(d: &Daemon, pki: &TestPki, identity: bool, ok: bool) {
    let url = format!("localhost:{}", d.addr.port());
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&url, &ca];
    if identity {
        args.extend([&cert as &dyn AsRef<std::ffi::OsStr>, &key]);
    }
    let Some(line) = run_python("tritonclient_tls.py", &args) else {
        return;
    };
    if ok {
        assert!(line.contains("\"live\": true"), "{line}");
        assert!(line.contains("\"y\": [[6.0, 6.0]]"), "{line}");
    } else {
        assert!(line.contains("\"error\""), "{line}");
        assert!(!line.contains("\"y\""), "{line}");
    }
}
