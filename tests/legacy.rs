//! Models written at legacy opsets (1–6) are upgraded at import and served: each model of
//! `tests/python/make_legacy_models.py` (Conv + legacy broadcast bias + BatchNormalization with
//! `is_test` + Gemm with `broadcast` + Dropout; opset-1 Reshape/Concat/Cast/consumed_inputs; a
//! legacy broadcast of a computed operand) runs over gRPC and matches the ONNX reference
//! evaluator on its hand-written opset-13 twin. A legacy model whose conversion the model does
//! not pin down is refused with the node named, and the daemon keeps serving.

use opreg_proto::inference as pb;
use opreg_tests::{onnx::*, *};

#[tokio::test]
async fn legacy_opset_models_are_upgraded_and_match_the_reference() {
    let gen = tempfile::tempdir().unwrap();
    let Some(cases) = reference::generate("make_legacy_models.py", gen.path()) else {
        return;
    };
    assert_eq!(cases.len(), 3, "{cases:?}");
    reference::check(gen.path(), &cases).await;
}

/// A float input of unknown rank.
fn unranked(name: &str) -> opreg_proto::onnx::ValueInfoProto {
    let mut v = value(name, 1, &[]);
    if let Some(opreg_proto::onnx::type_proto::Value::TensorType(t)) =
        v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape = None;
    }
    v
}

#[tokio::test]
async fn ambiguous_legacy_broadcast_is_refused_with_the_node_named() {
    const F32: i32 = 1;
    let ambiguous = model(
        vec![
            node("Relu", &["x"], &["r"]),
            node("Relu", &["b"], &["rb"]),
            node_with(
                "Add",
                &["r", "rb"],
                &["y"],
                vec![attr_int("broadcast", 1), attr_int("axis", 1)],
            ),
        ],
        // Neither operand's rank is declared.
        vec![unranked("x"), unranked("b")],
        vec![value("y", F32, &[-1])],
        vec![],
        6,
    );
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let mut client = d.inference().await;
    let err = client
        .repository_model_load(load_request("ambiguous", ambiguous))
        .await
        .expect_err("refused");
    assert!(
        err.message().contains("legacy broadcast") && err.message().contains("(Add)"),
        "{}",
        err.message()
    );
    // Still serving: the live check answers.
    client
        .server_live(pb::ServerLiveRequest {})
        .await
        .expect("live");
}
