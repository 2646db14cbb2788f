//! `inference.GRPCInferenceService` (KServe v2) through the real daemon: from tonic and from
//! Python's tritonclient.

use opreg_proto::inference as pb;
use opreg_tests::*;
use tonic::Code;

#[tokio::test]
async fn server_live_ready_and_metadata() {
    let d = Daemon::start(&[]);
    let mut c = d.inference().await;
    assert!(
        c.server_live(pb::ServerLiveRequest {})
            .await
            .expect("live")
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .expect("ready")
            .into_inner()
            .ready
    );
    let m = c
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(m.name, "opreg");
    assert_eq!(m.version, env!("CARGO_PKG_VERSION"));
    let err = c
        .model_infer(pb::ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        })
        .await
        .expect_err("no such model");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("unknown model 'm'"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let d = Daemon::start(&[]);
    let channel = tonic::transport::Endpoint::from_shared(d.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.next().await.expect("one response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "inference.GRPCInferenceService",
        "opreg.v1.Registry",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[test]
fn tritonclient_talks_to_the_daemon() {
    let d = Daemon::start(&[]);
    let Some(line) = run_python("tritonclient_server.py", &[&d.addr.to_string()]) else {
        return;
    };
    for want in [
        "\"live\": true",
        "\"ready\": true",
        "\"name\": \"opreg\"",
        &format!("\"version\": \"{}\"", env!("CARGO_PKG_VERSION")),
        "\"model_metadata_error\": \"StatusCode.NOT_FOUND\"",
    ] {
        assert!(line.contains(want), "{want} not in {line}");
    }
}

#[test]
fn tritonclient_uploads_a_model_and_matches_onnxruntime() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let Some(line) = run_python("tritonclient_model.py", &[&d.addr.to_string()]) else {
        return;
    };
    assert!(line.contains("\"ready\": true"), "{line}");
    assert!(line.contains("\"shape\": [5, 4]"), "{line}");
    assert!(line.contains("\"input_shape\": [\"-1\", \"8\"]"), "{line}");
    let diff: f64 = line
        .split("\"max_abs_diff\": ")
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|s| s.trim().parse().ok())
        .expect("max_abs_diff");
    assert!(diff < 1e-5, "opreg and onnxruntime differ by {diff}");
    assert!(repo.path().join("mlp/1/model.onnx").is_file());
}
