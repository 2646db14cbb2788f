//! Sequences inside served graphs: the models of `tests/python/make_sequence_models.py`
//! (split/concat, construct/insert/erase/at/length, a sequence carried through Loop, sequences
//! out of If branches, SequenceMap, optionals full and empty) run over gRPC and match the ONNX reference evaluator. A position from
//! the wire out of range fails that request with the node named and the daemon keeps
//! serving; a model returning a sequence, or feeding one to a tensor kernel, is refused at
//! load with the reason.

use opreg_proto::{inference as pb, onnx as ox};
use opreg_tests::{onnx::*, *};
use tonic::Code;

const F32: i32 = 1;
const I64: i32 = 7;

#[tokio::test]
async fn sequence_models_match_the_reference() {
    let gen = tempfile::tempdir().unwrap();
    let Some(cases) = reference::generate("make_sequence_models.py", gen.path()) else {
        return;
    };
    assert_eq!(cases.len(), 6, "{cases:?}");
    reference::check(gen.path(), &cases).await;
}

/// A float sequence-typed graph value.
fn seq_value(name: &str) -> ox::ValueInfoProto {
    ox::ValueInfoProto {
        name: name.into(),
        r#type: Some(ox::TypeProto {
            value: Some(ox::type_proto::Value::SequenceType(Box::new(
                ox::type_proto::Sequence {
                    elem_type: value("e", F32, &[-1]).r#type.map(Box::new),
                },
            ))),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `y = SequenceAt(SequenceConstruct(x, x), p)`, `p` from the request.
fn at_model() -> Vec<u8> {
    model(
        vec![
            node("SequenceConstruct", &["x", "x"], &["s"]),
            node("SequenceAt", &["s", "p"], &["y"]),
        ],
        vec![value("x", F32, &[2]), value("p", I64, &[])],
        vec![value("y", F32, &[2])],
        vec![],
        17,
    )
}

fn at_request(p: i64) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "at".into(),
        inputs: vec![
            pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2],
                ..Default::default()
            },
            pb::model_infer_request::InferInputTensor {
                name: "p".into(),
                datatype: "INT64".into(),
                shape: vec![],
                ..Default::default()
            },
        ],
        raw_input_contents: vec![
            f32_bytes(&[1.5, -2.0]).into(),
            p.to_le_bytes().to_vec().into(),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_position_out_of_range_fails_the_request_not_the_daemon() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let mut client = d.inference().await;
    client
        .repository_model_load(load_request("at", at_model()))
        .await
        .expect("load");
    for p in [-2, 1] {
        let r = client.model_infer(at_request(p)).await.expect("in range");
        assert_eq!(
            f32_values(&r.into_inner().raw_output_contents[0]),
            vec![1.5, -2.0]
        );
    }
    for p in [2, -3, i64::MAX, i64::MIN] {
        let e = client
            .model_infer(at_request(p))
            .await
            .expect_err("out of range");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().contains("(SequenceAt)") && e.message().contains("out of range"),
            "{}",
            e.message()
        );
    }
    let r = client
        .model_infer(at_request(0))
        .await
        .expect("still serving");
    assert_eq!(
        f32_values(&r.into_inner().raw_output_contents[0]),
        vec![1.5, -2.0]
    );
}

#[tokio::test]
async fn sequences_cannot_leave_the_graph_or_reach_a_tensor_kernel() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let mut client = d.inference().await;
    // Declared as a sequence output: KServe cannot carry it.
    let declared = model(
        vec![node("SequenceConstruct", &["x"], &["s"])],
        vec![value("x", F32, &[2])],
        vec![seq_value("s")],
        vec![],
        17,
    );
    let e = client
        .repository_model_load(load_request("declared", declared))
        .await
        .expect_err("refused");
    assert!(
        e.message().contains("'s'") && e.message().contains("KServe"),
        "{}",
        e.message()
    );
    // Declared as a tensor, computed as a sequence.
    let computed = model(
        vec![node("SequenceConstruct", &["x"], &["s"])],
        vec![value("x", F32, &[2])],
        vec![value("s", F32, &[2])],
        vec![],
        17,
    );
    let e = client
        .repository_model_load(load_request("computed", computed))
        .await
        .expect_err("refused");
    assert!(
        e.message().contains("output 's' is a sequence"),
        "{}",
        e.message()
    );
    // A tensor kernel fed a sequence.
    let relu = model(
        vec![
            node("SequenceConstruct", &["x"], &["s"]),
            node("Relu", &["s"], &["y"]),
        ],
        vec![value("x", F32, &[2])],
        vec![value("y", F32, &[2])],
        vec![],
        17,
    );
    let e = client
        .repository_model_load(load_request("relu", relu))
        .await
        .expect_err("refused");
    assert!(
        e.message().contains("(Relu)") && e.message().contains("is a sequence"),
        "{}",
        e.message()
    );
    client
        .server_live(pb::ServerLiveRequest {})
        .await
        .expect("live");
}

/// An empty tensor with a huge extent split into one-element chunks: the chunk count comes
/// from data, so it is reserved fallibly and refused, and the daemon keeps serving.
#[tokio::test]
async fn splitting_a_huge_empty_extent_is_refused_not_an_abort() {
    let split = model(
        vec![
            node_with(
                "SplitToSequence",
                &["x"],
                &["s"],
                vec![attr_int("axis", 1), attr_int("keepdims", 0)],
            ),
            node("SequenceLength", &["s"], &["n"]),
        ],
        vec![value("x", F32, &[-1, -1])],
        vec![value("n", I64, &[])],
        vec![],
        17,
    );
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let mut client = d.inference().await;
    client
        .repository_model_load(load_request("split", split))
        .await
        .expect("load");
    let req = |cols: i64| pb::ModelInferRequest {
        model_name: "split".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![0, cols],
            ..Default::default()
        }],
        raw_input_contents: vec![Vec::new().into()],
        ..Default::default()
    };
    let e = client.model_infer(req(1 << 30)).await.expect_err("refused");
    assert!(
        e.message().contains("(SplitToSequence)") && e.message().contains("longer than"),
        "{}",
        e.message()
    );
    let r = client.model_infer(req(3)).await.expect("still serving");
    let n = i64::from_le_bytes(
        r.into_inner().raw_output_contents[0][..8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(n, 3);
}
