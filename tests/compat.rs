//! The ABI compatibility promise: a plugin built against the frozen copy of the 1.0 SDK
//! (`sdk/compat/opreg-sdk-1.0`, never edited) loads into this daemon and computes, whatever
//! the live SDK became since. (A plugin claiming a newer minor is refused, and 100 load /
//! unload rounds of different plugins are stable: `tests/plugins.rs`.)

use opreg_proto::{inference as pb, onnx, opreg::v1 as reg};
use opreg_tests::{onnx::*, *};
use prost::Message;

const W: [f32; 6] = [0.5, -1.0, 2.0, 0.25, -0.5, 1.5];
const B: [f32; 2] = [0.25, -3.0];

fn attr_f(name: &str, v: f32) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: 1,
        f: v,
        ..Default::default()
    }
}

fn attr_s(name: &str, v: &str) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: 3,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// `y = relu(2 * x[N,3] @ W + B)` and `s = sum(y)`, by the compat plugin's kernels.
fn dense_model() -> Vec<u8> {
    let bytes = model(
        vec![
            onnx::NodeProto {
                domain: "compat.v1".into(),
                ..node_with(
                    "Dense",
                    &["x", "w", "b"],
                    &["y"],
                    vec![attr_f("alpha", 2.0), attr_s("activation", "relu")],
                )
            },
            onnx::NodeProto {
                domain: "compat.v1".into(),
                ..node("Checksum", &["y"], &["s"])
            },
        ],
        vec![value("x", 1, &[-1, 3])],
        vec![value("y", 1, &[-1, 2]), value("s", 1, &[])],
        vec![
            f32_initializer("w", &[3, 2], &W),
            f32_initializer("b", &[2], &B),
        ],
        17,
    );
    let mut m = onnx::ModelProto::decode(bytes.as_slice()).expect("decode");
    m.opset_import.push(onnx::OperatorSetIdProto {
        domain: "compat.v1".into(),
        version: 1,
    });
    m.encode_to_vec()
}

fn expected(x: &[f32]) -> Vec<f32> {
    let mut y = Vec::new();
    for row in x.chunks(3) {
        for j in 0..2 {
            let v: f32 = (0..3).map(|k| row[k] * W[k * 2 + j]).sum();
            y.push((2.0 * v + B[j]).max(0.0));
        }
    }
    y
}

#[tokio::test]
async fn a_plugin_built_against_the_frozen_1_0_sdk_loads_and_computes() {
    let plugins = plugin_dir(&[plugin("onnx_ops"), plugin("blas_cpu"), compat_plugin()]);
    let d = Daemon::start(&["--plugin-dir", plugins.path().to_str().expect("utf8")]);
    let mut r = d.registry().await;
    let listed = r
        .list_plugins(reg::ListPluginsRequest {})
        .await
        .expect("plugins")
        .into_inner();
    let compat = listed
        .plugins
        .iter()
        .find(|p| p.name == "compat-v1")
        .unwrap_or_else(|| panic!("compat-v1 not loaded; log:\n{}", d.log()));
    assert_eq!((compat.abi_version.as_str(), compat.kernels), ("1.0", 2));
    let quantizers = r
        .list_quantizers(reg::ListQuantizersRequest {})
        .await
        .expect("quantizers")
        .into_inner();
    let q = quantizers
        .quantizers
        .iter()
        .find(|q| q.name == "compat-minmax")
        .expect("the 1.0 quantizer is listed");
    assert_eq!(q.observes, "min-max");

    let mut c = d.inference().await;
    c.repository_model_load(load_request("dense", dense_model()))
        .await
        .expect("load a model using the 1.0 kernels");
    let x = [1.0, -2.0, 3.0, 0.5, 0.25, -4.0];
    let resp = c
        .model_infer(pb::ModelInferRequest {
            model_name: "dense".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2, 3],
                ..Default::default()
            }],
            raw_input_contents: vec![f32_bytes(&x).into()],
            ..Default::default()
        })
        .await
        .expect("infer")
        .into_inner();
    let want = expected(&x);
    let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
    let y = names.iter().position(|&n| n == "y").expect("y");
    let s = names.iter().position(|&n| n == "s").expect("s");
    assert_eq!(f32_values(&resp.raw_output_contents[y]), want);
    assert_eq!(
        f32_values(&resp.raw_output_contents[s]),
        vec![want.iter().sum::<f32>()]
    );
}
