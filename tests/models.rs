//! Models through the real daemon: submit over gRPC, infer, bad input, repository life cycle.

use opreg_proto::{inference as pb, onnx, opreg::v1 as reg};
use opreg_tests::{onnx::*, *};
use tonic::Code;

const W: [f32; 6] = [0.5, -1.0, 2.0, 0.25, -0.5, 1.5];

/// `y = Relu(x[N,3] @ W[3,2])`.
fn mlp() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Relu", &["h"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 3])],
        vec![value("y", 1, &[-1, 2])],
        vec![f32_initializer("w", &[3, 2], &W)],
        17,
    )
}

fn expected(x: &[f32]) -> Vec<f32> {
    let mut y = Vec::new();
    for row in x.chunks(3) {
        for j in 0..2 {
            let v: f32 = (0..3).map(|k| row[k] * W[k * 2 + j]).sum();
            y.push(v.max(0.0));
        }
    }
    y
}

fn input(name: &str, datatype: &str, shape: &[i64]) -> pb::model_infer_request::InferInputTensor {
    pb::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn infer_request(model: &str, x: &[f32]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![input("x", "FP32", &[(x.len() / 3) as i64, 3])],
        raw_input_contents: vec![f32_bytes(x).into()],
        ..Default::default()
    }
}

/// `(op_type, device, plugin)` of every node of `model`, from the placement query.
async fn placement(d: &Daemon, model: &str) -> (u64, Vec<(String, String, String)>) {
    let p = d
        .registry()
        .await
        .model_placement(reg::ModelPlacementRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .expect("placement")
        .into_inner();
    let nodes = p
        .nodes
        .into_iter()
        .map(|n| (n.op_type, n.device, n.plugin))
        .collect();
    (p.generation, nodes)
}

#[tokio::test]
async fn submitted_model_infers_and_is_served_again_after_restart() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    assert!(
        repo.path().join("mlp/1/model.onnx").is_file(),
        "written to the repository"
    );
    assert!(
        c.model_ready(pb::ModelReadyRequest {
            name: "mlp".into(),
            version: String::new()
        })
        .await
        .expect("ready")
        .into_inner()
        .ready
    );

    let meta = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .expect("meta")
        .into_inner();
    assert_eq!(meta.versions, vec!["1".to_string()]);
    assert_eq!(
        (
            meta.inputs[0].name.as_str(),
            meta.inputs[0].datatype.as_str(),
            meta.inputs[0].shape.clone()
        ),
        ("x", "FP32", vec![-1, 3])
    );
    assert_eq!(
        (meta.outputs[0].name.as_str(), meta.outputs[0].shape.clone()),
        ("y", vec![-1, 2])
    );
    let config = c
        .model_config(pb::ModelConfigRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .expect("config")
        .into_inner()
        .config
        .expect("config");
    assert_eq!(
        (config.input[0].data_type, config.input[0].dims.clone()),
        (pb::DataType::TypeFp32 as i32, vec![-1, 3])
    );

    let x = [1.0, 2.0, 3.0, -1.0, 0.5, 4.0];
    let r = c
        .model_infer(infer_request("mlp", &x))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(
        (
            r.outputs[0].name.as_str(),
            r.outputs[0].datatype.as_str(),
            r.outputs[0].shape.clone()
        ),
        ("y", "FP32", vec![2, 2])
    );
    assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x));

    // Typed contents in, raw contents out.
    let mut typed = infer_request("mlp", &x[..3]);
    typed.raw_input_contents.clear();
    typed.inputs[0].shape = vec![1, 3];
    typed.inputs[0].contents = Some(pb::InferTensorContents {
        fp32_contents: x[..3].to_vec(),
        ..Default::default()
    });
    let r = c
        .model_infer(typed)
        .await
        .expect("typed infer")
        .into_inner();
    assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x[..3]));

    let stats = c
        .model_statistics(pb::ModelStatisticsRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    let s = &stats.model_stats[0];
    assert_eq!((s.inference_count, s.execution_count), (2, 2));
    assert_eq!(
        s.inference_stats
            .as_ref()
            .and_then(|i| i.success.as_ref())
            .map(|d| d.count),
        Some(2)
    );
    let ext = c
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .expect("server meta")
        .into_inner()
        .extensions;
    assert!(ext.contains(&"statistics".to_string()), "{ext:?}");

    assert_eq!(
        placement(&d, "mlp").await.1,
        vec![
            ("MatMul".into(), "cpu".into(), "onnx-ops".into()),
            ("Relu".into(), "cpu".into(), "onnx-ops".into())
        ]
    );

    drop(c);
    drop(d);
    let (d, _p2) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    let index = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .expect("index")
        .into_inner();
    assert_eq!(index.models.len(), 1);
    assert_eq!(
        (
            index.models[0].name.as_str(),
            index.models[0].version.as_str(),
            index.models[0].state.as_str()
        ),
        ("mlp", "1", "READY")
    );
    let r = c
        .model_infer(infer_request("mlp", &x))
        .await
        .expect("infer after restart")
        .into_inner();
    assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x));
}

#[tokio::test]
async fn bad_inference_input_is_invalid_argument_naming_the_tensor() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    let good = infer_request("mlp", &[1.0, 2.0, 3.0]);
    let mut cases: Vec<(&str, pb::ModelInferRequest, &str)> = Vec::new();
    let mut r = good.clone();
    r.inputs[0].name = "z".into();
    cases.push(("unknown input", r, "unknown input 'z'"));
    let mut r = good.clone();
    r.inputs[0].datatype = "FP64".into();
    r.raw_input_contents = vec![vec![0; 24].into()];
    cases.push(("wrong dtype", r, "input 'x' has datatype FP64"));
    let mut r = good.clone();
    r.inputs[0].shape = vec![3];
    cases.push(("wrong rank", r, "input 'x' has shape [3]"));
    let mut r = good.clone();
    r.inputs[0].shape = vec![1, 4];
    r.raw_input_contents = vec![f32_bytes(&[0.0; 4]).into()];
    cases.push(("wrong dim", r, "input 'x' has shape [1, 4]"));
    let mut r = good.clone();
    r.raw_input_contents = vec![vec![0; 11].into()];
    cases.push((
        "short raw",
        r,
        "tensor 'x': FP32 of shape [1, 3] needs 12 bytes, got 11",
    ));
    let mut r = good.clone();
    r.inputs.clear();
    r.raw_input_contents.clear();
    cases.push(("missing", r, "missing input 'x'"));
    let mut r = good.clone();
    r.outputs
        .push(pb::model_infer_request::InferRequestedOutputTensor {
            name: "nope".into(),
            ..Default::default()
        });
    cases.push(("unknown output", r, "unknown output 'nope'"));
    for (what, req, msg) in cases {
        let err = c.model_infer(req).await.expect_err(what);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
        assert!(err.message().contains(msg), "{what}: {}", err.message());
    }
    let err = c
        .model_infer(infer_request("nope", &[1.0, 2.0, 3.0]))
        .await
        .expect_err("unknown model");
    assert_eq!(err.code(), Code::NotFound);
    // Still serving.
    let r = c
        .model_infer(good)
        .await
        .expect("good request")
        .into_inner();
    assert_eq!(
        f32_values(&r.raw_output_contents[0]),
        expected(&[1.0, 2.0, 3.0])
    );
    let stats = c
        .model_statistics(pb::ModelStatisticsRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    let fails = stats.model_stats[0]
        .inference_stats
        .as_ref()
        .and_then(|i| i.fail.as_ref())
        .map(|d| d.count);
    assert_eq!(fails, Some(7));
}

#[tokio::test]
async fn garbage_or_truncated_models_are_refused_and_nothing_is_written() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    let full = mlp();
    for (name, bytes) in [
        ("garbage", b"definitely not protobuf \xff\xff\xff".to_vec()),
        ("truncated", full[..full.len() / 2].to_vec()),
    ] {
        let err = c
            .repository_model_load(load_request(name, bytes))
            .await
            .expect_err(name);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message().contains(name),
            "names the model: {}",
            err.message()
        );
        assert!(!repo.path().join(name).exists(), "{name}: nothing written");
        assert!(
            !c.model_ready(pb::ModelReadyRequest {
                name: name.into(),
                version: String::new()
            })
            .await
            .expect("ready")
            .into_inner()
            .ready
        );
    }
    c.repository_model_load(load_request("mlp", full))
        .await
        .expect("a good model still loads");
}

#[tokio::test]
async fn a_node_no_plugin_runs_fails_the_load_with_its_name_op_opset_and_types() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    let mut n = node("FancyOp", &["x"], &["y"]);
    n.name = "fancy_1".into();
    let bytes = model(
        vec![n],
        vec![value("x", 1, &[2])],
        vec![value("y", 1, &[2])],
        vec![],
        17,
    );
    let err = c
        .repository_model_load(load_request("fancy", bytes))
        .await
        .expect_err("no kernel");
    assert_eq!(err.code(), Code::Unimplemented, "{}", err.message());
    for want in [
        "'fancy_1' (FancyOp)",
        "ai.onnx::FancyOp",
        "opset 17",
        "FP32",
    ] {
        assert!(
            err.message().contains(want),
            "{want} missing: {}",
            err.message()
        );
    }
    assert!(!repo.path().join("fancy").exists());
    let index = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .expect("index")
        .into_inner();
    let fancy = index
        .models
        .iter()
        .find(|m| m.name == "fancy")
        .expect("listed");
    assert_eq!(fancy.state, "UNAVAILABLE");
    assert!(fancy.reason.contains("FancyOp"));
    // The other model keeps serving.
    c.model_infer(infer_request("mlp", &[1.0, 2.0, 3.0]))
        .await
        .expect("mlp still serves");
}

#[tokio::test]
async fn stream_infer_answers_in_order_with_errors_in_band() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    let mut bad = infer_request("mlp", &[1.0, 2.0, 3.0]);
    bad.inputs[0].name = "z".into();
    let reqs = vec![
        infer_request("mlp", &[1.0, 2.0, 3.0]),
        bad,
        infer_request("mlp", &[-3.0, 1.0, 0.0]),
    ];
    let mut stream = c
        .model_stream_infer(tokio_stream::iter(reqs))
        .await
        .expect("stream")
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = stream.message().await.expect("message") {
        got.push(r);
    }
    assert_eq!(got.len(), 3);
    assert_eq!(
        f32_values(
            &got[0]
                .infer_response
                .as_ref()
                .expect("ok")
                .raw_output_contents[0]
        ),
        expected(&[1.0, 2.0, 3.0])
    );
    assert!(
        got[1].error_message.contains("unknown input 'z'"),
        "{}",
        got[1].error_message
    );
    assert_eq!(
        f32_values(
            &got[2]
                .infer_response
                .as_ref()
                .expect("ok")
                .raw_output_contents[0]
        ),
        expected(&[-3.0, 1.0, 0.0])
    );
}

#[tokio::test]
async fn unloaded_model_stops_serving_but_stays_in_the_repository() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    c.repository_model_unload(pb::RepositoryModelUnloadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    })
    .await
    .expect("unload");
    assert!(
        !c.model_ready(pb::ModelReadyRequest {
            name: "mlp".into(),
            version: String::new()
        })
        .await
        .expect("ready")
        .into_inner()
        .ready
    );
    let err = c
        .model_infer(infer_request("mlp", &[1.0, 2.0, 3.0]))
        .await
        .expect_err("unloaded");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(repo.path().join("mlp/1/model.onnx").is_file());
    // Load again from the repository (no files in the request).
    c.repository_model_load(pb::RepositoryModelLoadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    })
    .await
    .expect("reload from disk");
    c.model_infer(infer_request("mlp", &[1.0, 2.0, 3.0]))
        .await
        .expect("serves again");
}

#[tokio::test]
async fn placement_follows_the_backend_preference_and_falls_back_to_the_cpu() {
    let repo = tempfile::tempdir().expect("repo");
    std::fs::create_dir_all(repo.path().join("mlp/1")).expect("mkdir");
    std::fs::write(repo.path().join("mlp/1/model.onnx"), mlp()).expect("model");
    std::fs::write(
        repo.path().join("mlp/config.toml"),
        "backends = [\"mock\", \"cpu\"]\n",
    )
    .expect("config");
    let plugins = plugin_dir(&[
        plugin("onnx_ops"),
        plugin("blas_cpu"),
        plugin("mock_device"),
    ]);
    let d = Daemon::start(&[
        "--plugin-dir",
        plugins.path().to_str().expect("utf8"),
        "--model-repo",
        repo.path().to_str().expect("utf8"),
    ]);
    let (_, got) = placement(&d, "mlp").await;
    // The mock device has Relu but no MatMul: MatMul falls back to the CPU.
    assert_eq!(
        got,
        vec![
            ("MatMul".into(), "cpu".into(), "onnx-ops".into()),
            ("Relu".into(), "mock".into(), "mock-device".into())
        ]
    );
    let x = [1.0, -2.0, 3.0];
    let r = d
        .inference()
        .await
        .model_infer(infer_request("mlp", &x))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x));
}

#[tokio::test]
async fn a_bad_model_config_is_reported_and_the_rest_serves() {
    let repo = tempfile::tempdir().expect("repo");
    for name in ["good", "bad"] {
        std::fs::create_dir_all(repo.path().join(format!("{name}/1"))).expect("mkdir");
        std::fs::write(repo.path().join(format!("{name}/1/model.onnx")), mlp()).expect("model");
    }
    std::fs::write(
        repo.path().join("bad/config.toml"),
        "backends = [\"tpu\"]\n",
    )
    .expect("config");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    let index = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .expect("index")
        .into_inner();
    let bad = index
        .models
        .iter()
        .find(|m| m.name == "bad")
        .expect("bad listed");
    assert_eq!(bad.state, "UNAVAILABLE");
    assert!(
        bad.reason.contains("unknown backend 'tpu'"),
        "{}",
        bad.reason
    );
    c.model_infer(infer_request("good", &[1.0, 2.0, 3.0]))
        .await
        .expect("good serves");
}

#[tokio::test]
async fn the_cli_submits_a_model_infers_and_shows_placement() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let file = repo.path().join("upload.onnx");
    std::fs::write(&file, mlp()).expect("write");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(artifacts().join("opreg"))
            .arg("--addr")
            .arg(d.url())
            .args(args)
            .output()
            .expect("run opreg");
        assert!(
            out.status.success(),
            "opreg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(cli(&["load-model", "mlp", file.to_str().expect("utf8")]).contains("loaded mlp"));
    let out = cli(&["infer", "mlp", "--input", "x=FP32:1x3:1,2,3"]);
    let want = expected(&[1.0, 2.0, 3.0]);
    assert_eq!(
        out.trim(),
        format!("y FP32 [1x2]: {}, {}", want[0], want[1])
    );
    let placement = cli(&["placement", "mlp"]);
    assert!(placement.contains("MatMul\tcpu\tonnx-ops"), "{placement}");
    assert!(cli(&["models"]).contains("mlp\t1\tREADY"));
    assert!(cli(&["plugins"]).contains("onnx-ops"));
    // A bad request exits non-zero with the server's message.
    let out = std::process::Command::new(artifacts().join("opreg"))
        .arg("--addr")
        .arg(d.url())
        .args(["infer", "mlp", "--input", "z=FP32:1x3:1,2,3"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown input 'z'"));
}

/// The demo model `scripts/serve` starts with loads and computes what its weights say.
#[tokio::test]
async fn the_demo_model_serves() {
    use prost::Message;
    let repo = tempfile::tempdir().expect("repo");
    let demo = workspace().join("examples/models/demo");
    std::fs::create_dir_all(repo.path().join("demo/1")).expect("mkdir");
    std::fs::copy(
        demo.join("1/model.onnx"),
        repo.path().join("demo/1/model.onnx"),
    )
    .expect("copy model");
    std::fs::copy(
        demo.join("config.toml"),
        repo.path().join("demo/config.toml"),
    )
    .expect("copy config");
    let (d, _p) = start_serving(repo.path(), &[]);

    // The reference: the same MLP computed here from the model's own initializers.
    let bytes = std::fs::read(demo.join("1/model.onnx")).expect("read");
    let graph = opreg_proto::onnx::ModelProto::decode(bytes.as_slice())
        .expect("decode")
        .graph
        .expect("graph");
    let init = |n: &str| -> Vec<f32> {
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == n)
            .expect("initializer");
        if t.raw_data.is_empty() {
            t.float_data.clone()
        } else {
            f32_values(&t.raw_data)
        }
    };
    let (w1, b1, w2, b2) = (init("w1"), init("b1"), init("w2"), init("b2"));
    let x = [5.1f32, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3];
    let mut want = Vec::new();
    for row in x.chunks(4) {
        let h: Vec<f32> = (0..16)
            .map(|j| ((0..4).map(|k| row[k] * w1[k * 16 + j]).sum::<f32>() + b1[j]).max(0.0))
            .collect();
        let logits: Vec<f32> = (0..3)
            .map(|j| (0..16).map(|k| h[k] * w2[k * 3 + j]).sum::<f32>() + b2[j])
            .collect();
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let s: f32 = e.iter().sum();
        want.extend(e.iter().map(|v| v / s));
    }
    let req = pb::ModelInferRequest {
        model_name: "demo".into(),
        inputs: vec![input("x", "FP32", &[2, 4])],
        raw_input_contents: vec![f32_bytes(&x).into()],
        ..Default::default()
    };
    let r = d
        .inference()
        .await
        .model_infer(req)
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(r.outputs[0].shape, vec![2, 3]);
    let got = f32_values(&r.raw_output_contents[0]);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

/// Hot swap: the operator library is replaced ten times while requests are in flight; none
/// fails, and the retired libraries are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swapping_the_operator_plugin_under_load_fails_no_request() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, plugins) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut c = d.inference().await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 20 {
                let x = [w as f32, i as f32 * 0.5, -1.0];
                match c.model_infer(infer_request("mlp", &x)).await {
                    Ok(r) if f32_values(&r.get_ref().raw_output_contents[0]) == expected(&x) => {
                        ok += 1
                    }
                    Ok(r) => failed.push(format!(
                        "wrong result {:?}",
                        f32_values(&r.get_ref().raw_output_contents[0])
                    )),
                    Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                }
                i += 1;
            }
            (ok, failed)
        }));
    }
    let mut reg = d.registry().await;
    let path = plugins
        .path()
        .join("libopreg_onnx_ops.so")
        .display()
        .to_string();
    let mut last = 0;
    for _ in 0..10 {
        let r = reg
            .load_plugin(reg::LoadPluginRequest { path: path.clone() })
            .await
            .expect("swap")
            .into_inner();
        assert!(r.generation > last);
        last = r.generation;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ok, failed) = w.await.expect("worker");
        assert!(
            failed.is_empty(),
            "failed requests during hot swap: {failed:?}"
        );
        total += ok;
    }
    assert!(total >= 80, "{total} requests");
    // The next request binds the newest generation.
    c.model_infer(infer_request("mlp", &[1.0, 2.0, 3.0]))
        .await
        .expect("after the swaps");
    assert_eq!(
        placement(&d, "mlp").await.0,
        last,
        "the plan was re-bound to the newest generation"
    );
    d.wait_log("plan re-bound to new plugins");
    d.wait_log("plugin library released and unmapped");
}

/// An output declared without a shape gets the one shape inference finds, symbolic batch
/// included.
#[tokio::test]
async fn undeclared_output_shapes_are_inferred() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut y = value("y", 1, &[]);
    if let Some(opreg_proto::onnx::type_proto::Value::TensorType(t)) =
        y.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape = None;
    }
    let bytes = model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Relu", &["h"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 3])],
        vec![y],
        vec![f32_initializer("w", &[3, 2], &W)],
        17,
    );
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", bytes))
        .await
        .expect("load");
    let meta = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .expect("meta")
        .into_inner();
    assert_eq!(meta.outputs[0].shape, vec![-1, 2]);
}

/// `(version, state, reason)` of every index entry of `model`.
async fn states(d: &Daemon, model: &str) -> Vec<(String, String, String)> {
    d.index()
        .await
        .into_iter()
        .filter(|m| m.name == model)
        .map(|m| (m.version, m.state, m.reason))
        .collect()
}

#[tokio::test]
async fn each_version_has_its_own_state_through_load_failure_and_unload() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("v1");
    // Version 2 is garbage: it is unavailable with its reason, version 1 keeps serving.
    let mut bad = load_request("mlp", b"not onnx".to_vec());
    let file = bad.parameters.remove("file:1/model.onnx").expect("file");
    bad.parameters.insert("file:2/model.onnx".into(), file);
    c.repository_model_load(bad)
        .await
        .expect_err("v2 is garbage");
    let s = states(&d, "mlp").await;
    assert_eq!((s[0].0.as_str(), s[0].1.as_str()), ("1", "READY"), "{s:?}");
    assert_eq!(
        (s[1].0.as_str(), s[1].1.as_str()),
        ("2", "UNAVAILABLE"),
        "{s:?}"
    );
    assert!(s[1].2.contains("not a valid ONNX model"), "{s:?}");
    c.model_infer(infer_request("mlp", &[1.0, 2.0, 3.0]))
        .await
        .expect("v1 serves");

    // A request running when its model is unloaded finishes on it: UNLOADING meanwhile.
    c.repository_model_load(load_request("runaway", runaway_loop(1_000_000_000_000)))
        .await
        .expect("loop model");
    let mut slow = d.inference().await;
    let running = tokio::spawn(async move {
        let mut req = tonic::Request::new(pb::ModelInferRequest {
            model_name: "runaway".into(),
            inputs: vec![input("x", "FP32", &[1])],
            raw_input_contents: vec![f32_bytes(&[1.0]).into()],
            ..Default::default()
        });
        req.set_timeout(std::time::Duration::from_secs(3));
        slow.model_infer(req).await
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    c.repository_model_unload(pb::RepositoryModelUnloadRequest {
        model_name: "runaway".into(),
        ..Default::default()
    })
    .await
    .expect("unload");
    let s = states(&d, "runaway").await;
    assert_eq!(s[0].1, "UNLOADING", "{s:?}");
    let done = running.await.expect("task");
    // Past its deadline: the server says so, or the client gives up first.
    let code = done.expect_err("deadline").code();
    assert!(
        matches!(code, Code::DeadlineExceeded | Code::Cancelled),
        "{code:?}"
    );
    // The daemon cancels the run at its next node boundary and drops the version (the job
    // returns just after it logs that): poll for the end of UNLOADING.
    d.wait_log("memory released");
    let mut s = states(&d, "runaway").await;
    for _ in 0..50 {
        if s[0].1 != "UNLOADING" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        s = states(&d, "runaway").await;
    }
    assert_eq!(
        (s[0].1.as_str(), s[0].2.as_str()),
        ("UNAVAILABLE", "unloaded"),
        "{s:?}"
    );
}

/// `y = act(Conv1x1(x[1, 2, 2, 2], W[3, 2, 1, 1], B))` with `act` one node after the Conv.
fn conv_act(act: onnx::NodeProto, extra: Vec<onnx::TensorProto>) -> Vec<u8> {
    let mut inits = vec![
        f32_initializer("w", &[3, 2, 1, 1], &[1.0, -1.0, 0.5, 2.0, -3.0, 0.25]),
        f32_initializer("b", &[3], &[0.5, -0.5, 1.0]),
    ];
    inits.extend(extra);
    model(
        vec![node("Conv", &["x", "w", "b"], &["c"]), act],
        vec![value("x", 1, &[1, 2, 2, 2])],
        vec![value("y", 1, &[1, 3, 2, 2])],
        inits,
        17,
    )
}

fn conv_act_expected(x: &[f32], act: impl Fn(f32) -> f32) -> Vec<f32> {
    let w = [1.0, -1.0, 0.5, 2.0, -3.0, 0.25];
    let b = [0.5, -0.5, 1.0];
    let mut y = Vec::new();
    for oc in 0..3 {
        for p in 0..4 {
            y.push(act(w[oc * 2] * x[p] + w[oc * 2 + 1] * x[4 + p] + b[oc]));
        }
    }
    y
}

#[tokio::test]
async fn conv_and_its_activation_run_as_one_fused_kernel() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    let x = [1.0, -2.0, 3.0, -4.0, 0.5, 1.5, -2.5, 3.5];
    type Case = (&'static str, Vec<u8>, fn(f32) -> f32);
    let cases: [Case; 2] = [
        (
            "relu",
            conv_act(node("Relu", &["c"], &["y"]), vec![]),
            |v: f32| v.max(0.0),
        ),
        (
            "clip",
            conv_act(
                node("Clip", &["c", "lo", "hi"], &["y"]),
                vec![
                    f32_initializer("lo", &[], &[-1.0]),
                    f32_initializer("hi", &[], &[2.0]),
                ],
            ),
            |v: f32| v.clamp(-1.0, 2.0),
        ),
    ];
    for (name, bytes, act) in cases {
        c.repository_model_load(load_request(name, bytes))
            .await
            .expect("load");
        let (_, nodes) = placement(&d, name).await;
        assert_eq!(
            nodes,
            vec![(
                "FusedConv".to_string(),
                "cpu".to_string(),
                "onnx-ops".to_string()
            )],
            "{name}"
        );
        let r = c
            .model_infer(pb::ModelInferRequest {
                model_name: name.into(),
                inputs: vec![input("x", "FP32", &[1, 2, 2, 2])],
                raw_input_contents: vec![f32_bytes(&x).into()],
                ..Default::default()
            })
            .await
            .expect("infer")
            .into_inner();
        assert_eq!(
            f32_values(&r.raw_output_contents[0]),
            conv_act_expected(&x, act),
            "{name}"
        );
    }
}

#[tokio::test]
async fn matmul_and_its_bias_add_run_as_one_fused_kernel() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    // y = (x[N,3] @ W[3,2]) + b, with the Add's operands in both orders.
    for (name, add) in [
        ("bias_right", node("Add", &["h", "b"], &["y"])),
        ("bias_left", node("Add", &["b", "h"], &["y"])),
    ] {
        let bytes = model(
            vec![node("MatMul", &["x", "w"], &["h"]), add],
            vec![value("x", 1, &[-1, 3])],
            vec![value("y", 1, &[-1, 2])],
            vec![
                f32_initializer("w", &[3, 2], &W),
                f32_initializer("b", &[2], &[0.25, -4.0]),
            ],
            17,
        );
        c.repository_model_load(load_request(name, bytes))
            .await
            .expect("load");
        let (_, nodes) = placement(&d, name).await;
        assert_eq!(
            nodes,
            vec![(
                "FusedMatMul".to_string(),
                "cpu".to_string(),
                "onnx-ops".to_string()
            )],
            "{name}"
        );
        let x = [1.0, -2.0, 3.0, 0.5, 0.5, -1.0];
        let r = c
            .model_infer(infer_request(name, &x))
            .await
            .expect("infer")
            .into_inner();
        let want: Vec<f32> = x
            .chunks(3)
            .flat_map(|row| {
                (0..2).map(move |j| {
                    (0..3).map(|k| row[k] * W[k * 2 + j]).sum::<f32>() + [0.25, -4.0][j]
                })
            })
            .collect();
        assert_eq!(f32_values(&r.raw_output_contents[0]), want, "{name}");
    }
}

/// GELU as exporters write it (Div or Mul by 1/√2, Erf, Add 1, two Muls) in two of its forms:
/// after a dense layer it goes into the FusedMatMul's epilogue, on its own it becomes one
/// `opreg::Gelu`; either way the values are the erf-GELU's.
#[tokio::test]
async fn gelu_as_exported_runs_fused_into_the_dense_layer_or_alone() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    let bytes = model(
        vec![
            node("MatMul", &["x", "w"], &["h0"]),
            node("Add", &["h0", "b"], &["h"]),
            // torch's form: Mul(Mul(h, 1 + erf(h / √2)), 0.5).
            node("Div", &["h", "sqrt2"], &["d1"]),
            node("Erf", &["d1"], &["e1"]),
            node("Add", &["e1", "one"], &["a1"]),
            node("Mul", &["h", "a1"], &["m1"]),
            node("Mul", &["m1", "half"], &["g"]),
            // Hugging Face's: Mul(Mul(g, 0.5), 1 + erf(g * 1/√2)).
            node("Mul", &["g", "half"], &["p2"]),
            node("Mul", &["inv_sqrt2", "g"], &["d2"]),
            node("Erf", &["d2"], &["e2"]),
            node("Add", &["one", "e2"], &["a2"]),
            node("Mul", &["p2", "a2"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 3])],
        vec![value("y", 1, &[-1, 2])],
        vec![
            f32_initializer("w", &[3, 2], &W),
            f32_initializer("b", &[2], &[0.25, -4.0]),
            f32_initializer("sqrt2", &[], &[std::f32::consts::SQRT_2]),
            f32_initializer("inv_sqrt2", &[], &[std::f32::consts::FRAC_1_SQRT_2]),
            f32_initializer("one", &[], &[1.0]),
            f32_initializer("half", &[], &[0.5]),
        ],
        17,
    );
    c.repository_model_load(load_request("gelu", bytes))
        .await
        .expect("load");
    let (_, nodes) = placement(&d, "gelu").await;
    let ops: Vec<&str> = nodes.iter().map(|(op, _, _)| op.as_str()).collect();
    assert_eq!(ops, ["FusedMatMul", "Gelu"], "{nodes:?}");
    let x = [1.0, -2.0, 3.0, 0.5, 0.5, -1.0, -3.0, 0.0, 0.75];
    let r = c
        .model_infer(infer_request("gelu", &x))
        .await
        .expect("infer")
        .into_inner();
    let gelu = |v: f64| 0.5 * v * (1.0 + opreg_sdk::numeric::erf64(v / std::f64::consts::SQRT_2));
    let got = f32_values(&r.raw_output_contents[0]);
    assert_eq!(got.len(), 6);
    for (i, row) in x.chunks(3).enumerate() {
        for j in 0..2 {
            let h = (0..3)
                .map(|k| f64::from(row[k]) * f64::from(W[k * 2 + j]))
                .sum::<f64>()
                + [0.25, -4.0][j];
            let want = gelu(gelu(h));
            let v = f64::from(got[i * 2 + j]);
            assert!(
                (v - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "row {i} column {j}: {v} vs {want}"
            );
        }
    }
}

/// A bidirectional LSTM whose W is a constant (packed once at load as the input projection's
/// right operand) answers as the same LSTM with W fed in each request (packed per call), on a
/// sequence of 5 steps, 2 batches, 24 inputs and 20 hidden units (uneven against every vector
/// width and tile size).
#[tokio::test]
async fn an_lstm_with_constant_weights_answers_as_with_weights_fed_in() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    let (seq, batch, inp, hid) = (5usize, 2usize, 24usize, 20usize);
    let wave = |n: usize, seed: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 / 50.0 - 1.0) * scale)
            .collect()
    };
    let (w, r, b) = (
        wave(2 * 4 * hid * inp, 1, 0.3),
        wave(2 * 4 * hid * hid, 2, 0.3),
        wave(2 * 8 * hid, 3, 0.5),
    );
    let x = wave(seq * batch * inp, 4, 1.0);
    let lstm = node_with(
        "LSTM",
        &["x", "w", "r", "b"],
        &["y"],
        vec![
            attr_int("hidden_size", hid as i64),
            attr_string("direction", "bidirectional"),
        ],
    );
    let dims = |v: &[usize]| v.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let y_dims = dims(&[seq, 2, batch, hid]);
    let x_value = value("x", 1, &dims(&[seq, batch, inp]));
    let w_dims = dims(&[2, 4 * hid, inp]);
    let constants = |with_w: bool| {
        let mut v = vec![
            f32_initializer("r", &dims(&[2, 4 * hid, hid]), &r),
            f32_initializer("b", &dims(&[2, 8 * hid]), &b),
        ];
        if with_w {
            v.push(f32_initializer("w", &w_dims, &w));
        }
        v
    };
    let packed = model(
        vec![lstm.clone()],
        vec![x_value.clone()],
        vec![value("y", 1, &y_dims)],
        constants(true),
        14,
    );
    let fed = model(
        vec![lstm],
        vec![x_value, value("w", 1, &w_dims)],
        vec![value("y", 1, &y_dims)],
        constants(false),
        14,
    );
    let mut outputs = Vec::new();
    for (name, bytes, feed_w) in [("lstm_packed", packed, false), ("lstm_fed", fed, true)] {
        c.repository_model_load(load_request(name, bytes))
            .await
            .expect("load");
        let mut inputs = vec![input("x", "FP32", &dims(&[seq, batch, inp]))];
        let mut raw = vec![f32_bytes(&x)];
        if feed_w {
            inputs.push(input("w", "FP32", &w_dims));
            raw.push(f32_bytes(&w));
        }
        let r = c
            .model_infer(pb::ModelInferRequest {
                model_name: name.into(),
                inputs,
                raw_input_contents: raw.into_iter().map(Into::into).collect(),
                ..Default::default()
            })
            .await
            .expect("infer")
            .into_inner();
        outputs.push(f32_values(&r.raw_output_contents[0]));
    }
    assert_eq!(outputs[0].len(), seq * 2 * batch * hid);
    // Not all zero or saturated: the recurrence did something.
    assert!(outputs[0].iter().any(|v| v.abs() > 0.05 && v.abs() < 0.95));
    for (i, (a, b)) in outputs[0].iter().zip(&outputs[1]).enumerate() {
        assert!((a - b).abs() <= 1e-5, "element {i}: {a} vs {b}");
    }
}

/// A ResNet-style join over a small image with more channels than pixels: the main path's
/// Conv and the shortcut's Conv (both with weights packed at load, computed pixels by
/// channels) meet in an Add and a Relu, which fuse into the main Conv.
#[tokio::test]
async fn a_residual_join_runs_as_one_fused_conv() {
    let (c_in, m, pixels) = (4usize, 8usize, 4usize);
    // Halves and small integers: every sum is exact in f32, in any order.
    let w1: Vec<f32> = (0..m * c_in).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
    let w2: Vec<f32> = (0..m * c_in).map(|i| (i % 5) as f32 - 2.0).collect();
    let b1: Vec<f32> = (0..m).map(|i| i as f32 * 0.25 - 1.0).collect();
    let x: Vec<f32> = (0..c_in * pixels)
        .map(|i| (i % 9) as f32 * 0.5 - 2.0)
        .collect();
    let bytes = model(
        vec![
            node("Conv", &["x", "w1", "b1"], &["main"]),
            node("Conv", &["x", "w2"], &["short"]),
            node("Add", &["main", "short"], &["sum"]),
            node("Relu", &["sum"], &["y"]),
        ],
        vec![value("x", 1, &[1, c_in as i64, 2, 2])],
        vec![value("y", 1, &[1, m as i64, 2, 2])],
        vec![
            f32_initializer("w1", &[m as i64, c_in as i64, 1, 1], &w1),
            f32_initializer("w2", &[m as i64, c_in as i64, 1, 1], &w2),
            f32_initializer("b1", &[m as i64], &b1),
        ],
        17,
    );
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("join", bytes))
        .await
        .expect("load");
    let (_, nodes) = placement(&d, "join").await;
    let ops: Vec<&str> = nodes.iter().map(|n| n.0.as_str()).collect();
    assert_eq!(ops, ["Conv", "FusedConv"], "{nodes:?}");
    let r = c
        .model_infer(pb::ModelInferRequest {
            model_name: "join".into(),
            inputs: vec![input("x", "FP32", &[1, c_in as i64, 2, 2])],
            raw_input_contents: vec![f32_bytes(&x).into()],
            ..Default::default()
        })
        .await
        .expect("infer")
        .into_inner();
    let mut want = Vec::new();
    for oc in 0..m {
        for p in 0..pixels {
            let dot = |w: &[f32]| {
                (0..c_in)
                    .map(|ic| w[oc * c_in + ic] * x[ic * pixels + p])
                    .sum::<f32>()
            };
            want.push((dot(&w1) + b1[oc] + dot(&w2)).max(0.0));
        }
    }
    assert_eq!(f32_values(&r.raw_output_contents[0]), want);
}

/// Whether this CPU has the vector units the onnx-ops plugin's channels-last kernels need
/// (AVX-512 F/BW/VL, or AVX2 with FMA).
fn channels_last_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    return (std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl"))
        || (std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"));
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A daemon serving one model from a fresh repository (keep it alive while used).
struct Served {
    daemon: Daemon,
    _plugins: tempfile::TempDir,
    _repo: tempfile::TempDir,
    /// The kernels' op types in plan order.
    ops: Vec<String>,
}

impl Served {
    /// Starts a daemon and loads `bytes` as model `name`.
    async fn model(name: &str, bytes: Vec<u8>) -> Served {
        let repo = tempfile::tempdir().expect("repo");
        let (daemon, plugins) = start_serving(repo.path(), &[]);
        daemon
            .inference()
            .await
            .repository_model_load(load_request(name, bytes))
            .await
            .expect("load");
        let (_, nodes) = placement(&daemon, name).await;
        Served {
            daemon,
            _plugins: plugins,
            _repo: repo,
            ops: nodes.into_iter().map(|n| n.0).collect(),
        }
    }

    /// Model `name`'s first output for the f32 input `x` of `shape`, with its shape.
    async fn infer_x(&self, name: &str, shape: &[i64], x: &[f32]) -> (Vec<i64>, Vec<f32>) {
        let r = self
            .daemon
            .inference()
            .await
            .model_infer(pb::ModelInferRequest {
                model_name: name.into(),
                inputs: vec![input("x", "FP32", shape)],
                raw_input_contents: vec![f32_bytes(x).into()],
                ..Default::default()
            })
            .await
            .expect("infer")
            .into_inner();
        (
            r.outputs[0].shape.clone(),
            f32_values(&r.raw_output_contents[0]),
        )
    }
}

/// A MobileNetV2 block (1x1 expand + ReLU6, depthwise 3x3 + ReLU, 1x1 project + the residual
/// Add): the values inside the block run channels-last (the pass `nhwc-conv`, on CPUs with
/// AVX-512 or AVX2), and the answer is the NCHW one; a narrow block (its projection multiplies W X^T) and a wide one
/// (X W^T stored column-major).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mobilenet_block_runs_channels_last_inside() {
    for c in [3, 40] {
        mobilenet_block(c).await;
    }
}

async fn mobilenet_block(c: usize) {
    let (n, h, w, m) = (2usize, 5usize, 19usize, 20usize);
    // Halves, quarters and small integers: every sum is exact in f32, in any order.
    let x: Vec<f32> = (0..n * c * h * w)
        .map(|i| (i % 9) as f32 * 0.5 - 2.0)
        .collect();
    let we: Vec<f32> = (0..m * c).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
    let be: Vec<f32> = (0..m).map(|i| (i % 5) as f32 * 0.5).collect();
    let wd: Vec<f32> = (0..m * 9).map(|i| (i % 11) as f32 * 0.25 - 1.25).collect();
    let bd: Vec<f32> = (0..m).map(|i| (i % 3) as f32 - 1.0).collect();
    let wp: Vec<f32> = (0..c * m).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
    let bp: Vec<f32> = (0..c).map(|i| i as f32).collect();
    let shape = [n as i64, c as i64, h as i64, w as i64];
    let bytes = model(
        vec![
            node("Conv", &["x", "we", "be"], &["e"]),
            node("Clip", &["e", "lo", "hi"], &["ce"]),
            node_with(
                "Conv",
                &["ce", "wd", "bd"],
                &["d"],
                vec![
                    attr_int("group", m as i64),
                    attr_ints("pads", &[1, 1, 1, 1]),
                ],
            ),
            node("Relu", &["d"], &["rd"]),
            node("Conv", &["rd", "wp", "bp"], &["p"]),
            node("Add", &["p", "x"], &["y"]),
        ],
        vec![value("x", 1, &shape)],
        vec![value("y", 1, &shape)],
        vec![
            f32_initializer("we", &[m as i64, c as i64, 1, 1], &we),
            f32_initializer("be", &[m as i64], &be),
            f32_initializer("lo", &[], &[0.0]),
            f32_initializer("hi", &[], &[6.0]),
            f32_initializer("wd", &[m as i64, 1, 3, 3], &wd),
            f32_initializer("bd", &[m as i64], &bd),
            f32_initializer("wp", &[c as i64, m as i64, 1, 1], &wp),
            f32_initializer("bp", &[c as i64], &bp),
        ],
        17,
    );
    let served = Served::model("block", bytes).await;
    // The plugin offers the channels-last kernel only on CPUs with AVX-512 or AVX2 (where
    // its own kernels run); elsewhere the block stays NCHW, with the same answer.
    let fused = if channels_last_kernels() {
        "FusedConvNhwc"
    } else {
        "FusedConv"
    };
    assert_eq!(served.ops, [fused; 3]);
    let (_, got) = served.infer_x("block", &shape, &x).await;
    // The same block in plain loops, NCHW.
    let p = h * w;
    let mut want = vec![0f32; n * c * p];
    for b in 0..n {
        let xb = &x[b * c * p..][..c * p];
        let e: Vec<f32> = (0..m * p)
            .map(|i| {
                let (oc, px) = (i / p, i % p);
                let s: f32 = (0..c).map(|ic| we[oc * c + ic] * xb[ic * p + px]).sum();
                (s + be[oc]).clamp(0.0, 6.0)
            })
            .collect();
        let dw: Vec<f32> = (0..m * p)
            .map(|i| {
                let (ch, y, xx) = (i / p, (i % p) / w, i % w);
                let mut s = bd[ch];
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = ((y + ky) as isize - 1, (xx + kx) as isize - 1);
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            s += wd[ch * 9 + ky * 3 + kx]
                                * e[ch * p + iy as usize * w + ix as usize];
                        }
                    }
                }
                s.max(0.0)
            })
            .collect();
        for oc in 0..c {
            for px in 0..p {
                let s: f32 = (0..m).map(|ic| wp[oc * m + ic] * dw[ic * p + px]).sum();
                want[(b * c + oc) * p + px] = s + bp[oc] + xb[oc * p + px];
            }
        }
    }
    assert_eq!(got, want);
}

/// A first layer, its ReLU and the MaxPool reading it (SqueezeNet's stem: 3x3 stride 2, then
/// a 3x3 stride-2 ceil-mode pool) run as one `opreg::FusedConvMaxPool` (pass `conv-pool`)
/// whose output shape is inferred through both windows and whose values are those of the
/// three operators, computed here by direct loops.
#[tokio::test]
async fn a_first_layer_and_its_max_pool_run_as_one_fused_kernel() {
    let (c_in, h, w, m) = (3usize, 9usize, 70usize, 8usize);
    let (oh, ow) = ((h - 3) / 2 + 1, (w - 3) / 2 + 1);
    // Ceil mode: a last window starting inside the row may reach past it.
    let (ph, pw) = ((oh - 3).div_ceil(2) + 1, (ow - 3).div_ceil(2) + 1);
    let x: Vec<f32> = (0..c_in * h * w)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let wt: Vec<f32> = (0..m * c_in * 9)
        .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
        .collect();
    let b: Vec<f32> = (0..m).map(|o| o as f32 * 0.25 - 1.0).collect();
    let bytes = model(
        vec![
            node_with(
                "Conv",
                &["x", "w", "b"],
                &["c"],
                vec![attr_ints("strides", &[2, 2])],
            ),
            node("Relu", &["c"], &["r"]),
            node_with(
                "MaxPool",
                &["r"],
                &["y"],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[2, 2]),
                    attr_int("ceil_mode", 1),
                ],
            ),
        ],
        vec![value("x", 1, &[1, c_in as i64, h as i64, w as i64])],
        // The output's shape left to inference.
        vec![value("y", 1, &[])],
        vec![
            f32_initializer("w", &[m as i64, c_in as i64, 3, 3], &wt),
            f32_initializer("b", &[m as i64], &b),
        ],
        17,
    );
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("stem", bytes))
        .await
        .expect("load");
    let (_, nodes) = placement(&d, "stem").await;
    assert_eq!(
        nodes,
        vec![(
            "FusedConvMaxPool".to_string(),
            "cpu".to_string(),
            "onnx-ops".to_string()
        )]
    );
    let r = c
        .model_infer(pb::ModelInferRequest {
            model_name: "stem".into(),
            inputs: vec![input("x", "FP32", &[1, c_in as i64, h as i64, w as i64])],
            raw_input_contents: vec![f32_bytes(&x).into()],
            ..Default::default()
        })
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(r.outputs[0].shape, [1, m as i64, ph as i64, pw as i64]);
    // The convolution with its bias and ReLU, in the operators' order of sums.
    let conv = |o: usize, y: usize, xx: usize| {
        let mut s = 0.0f32;
        for ic in 0..c_in {
            for ky in 0..3 {
                for kx in 0..3 {
                    s += wt[((o * c_in + ic) * 3 + ky) * 3 + kx]
                        * x[(ic * h + 2 * y + ky) * w + 2 * xx + kx];
                }
            }
        }
        (s + b[o]).max(0.0)
    };
    let mut want = Vec::new();
    for o in 0..m {
        for py in 0..ph {
            for px in 0..pw {
                let mut best = f32::NEG_INFINITY;
                for y in (2 * py..2 * py + 3).filter(|&y| y < oh) {
                    for xx in (2 * px..2 * px + 3).filter(|&xx| xx < ow) {
                        best = best.max(conv(o, y, xx));
                    }
                }
                want.push(best);
            }
        }
    }
    let got = f32_values(&r.raw_output_contents[0]);
    assert_eq!(got.len(), want.len());
    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
        assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "{i}: {g} vs {e}");
    }
}

/// A Fire module between two layers (SqueezeNet's body: squeeze 1x1 + ReLU, expand 1x1 and
/// 3x3 + ReLU, their channel Concat, a ceil-mode MaxPool, the next layer): on CPUs with the
/// channels-last kernels everything after the first layer runs channels-last (pass
/// `nhwc-conv`: the Concat along axis 3, the pool `opreg::MaxPoolNhwc`), and the answer is
/// the NCHW one, computed here by direct loops in exact arithmetic (halves and quarters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_module_runs_channels_last_through_its_concat() {
    let (n, c, h, w) = (2usize, 3usize, 10usize, 13usize);
    let (sq, e1, e3, out) = (4usize, 5usize, 6usize, 2usize);
    let cat = e1 + e3;
    let vals = |len: usize, seed: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7 + seed) % 9) as f32 * scale - 4.0 * scale)
            .collect()
    };
    let x = vals(n * c * h * w, 1, 0.5);
    let (wq, bq) = (vals(sq * c, 2, 0.25), vals(sq, 3, 0.5));
    let (w1, b1) = (vals(e1 * sq, 4, 0.25), vals(e1, 5, 0.5));
    let (w3, b3) = (vals(e3 * sq * 9, 6, 0.25), vals(e3, 7, 0.5));
    let (wn, bn) = (vals(out * cat * 9, 8, 0.25), vals(out, 0, 0.5));
    let pads = || attr_ints("pads", &[1, 1, 1, 1]);
    let shape = [n as i64, c as i64, h as i64, w as i64];
    let bytes = model(
        vec![
            node("Conv", &["x", "wq", "bq"], &["s"]),
            node("Relu", &["s"], &["rs"]),
            node("Conv", &["rs", "w1", "b1"], &["a"]),
            node("Relu", &["a"], &["ra"]),
            node_with("Conv", &["rs", "w3", "b3"], &["b"], vec![pads()]),
            node("Relu", &["b"], &["rb"]),
            node_with("Concat", &["ra", "rb"], &["cat"], vec![attr_int("axis", 1)]),
            node_with(
                "MaxPool",
                &["cat"],
                &["p"],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[2, 2]),
                    attr_int("ceil_mode", 1),
                ],
            ),
            node_with("Conv", &["p", "wn", "bn"], &["y"], vec![pads()]),
        ],
        vec![value("x", 1, &shape)],
        vec![value("y", 1, &[])],
        vec![
            f32_initializer("wq", &[sq as i64, c as i64, 1, 1], &wq),
            f32_initializer("bq", &[sq as i64], &bq),
            f32_initializer("w1", &[e1 as i64, sq as i64, 1, 1], &w1),
            f32_initializer("b1", &[e1 as i64], &b1),
            f32_initializer("w3", &[e3 as i64, sq as i64, 3, 3], &w3),
            f32_initializer("b3", &[e3 as i64], &b3),
            f32_initializer("wn", &[out as i64, cat as i64, 3, 3], &wn),
            f32_initializer("bn", &[out as i64], &bn),
        ],
        17,
    );
    let served = Served::model("fire", bytes).await;
    let ops = &served.ops;
    if channels_last_kernels() {
        let conv = "FusedConvNhwc";
        assert_eq!(ops, &[conv, conv, conv, "Concat", "MaxPoolNhwc", conv]);
    } else {
        let has = |op: &str| ops.iter().any(|o| o == op);
        assert!(has("Concat") && has("MaxPool"), "{ops:?}");
    }
    let (got_shape, got) = served.infer_x("fire", &shape, &x).await;
    // The same layers in plain loops, NCHW: a `k x k` convolution (padding `k / 2`) + ReLU.
    let conv = |x: &[f32], ci: usize, (h, w): (usize, usize), wt: &[f32], b: &[f32], k: usize| {
        let co = b.len();
        let mut y = vec![0f32; co * h * w];
        for o in 0..co {
            for yy in 0..h {
                for xx in 0..w {
                    let mut s = b[o];
                    for i in 0..ci {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (yy + ky, xx + kx);
                                let (iy, ix) = (iy.wrapping_sub(k / 2), ix.wrapping_sub(k / 2));
                                if iy < h && ix < w {
                                    s += wt[((o * ci + i) * k + ky) * k + kx]
                                        * x[(i * h + iy) * w + ix];
                                }
                            }
                        }
                    }
                    y[(o * h + yy) * w + xx] = s;
                }
            }
        }
        y
    };
    let relu = |v: Vec<f32>| v.into_iter().map(|v| v.max(0.0)).collect::<Vec<_>>();
    let (ph, pw) = ((h - 3).div_ceil(2) + 1, (w - 3).div_ceil(2) + 1);
    let mut want = Vec::new();
    for img in 0..n {
        let xb = &x[img * c * h * w..][..c * h * w];
        let s = relu(conv(xb, c, (h, w), &wq, &bq, 1));
        let mut cat_v = relu(conv(&s, sq, (h, w), &w1, &b1, 1));
        cat_v.extend(relu(conv(&s, sq, (h, w), &w3, &b3, 3)));
        let mut pooled = vec![f32::NEG_INFINITY; cat * ph * pw];
        for ch in 0..cat {
            for py in 0..ph {
                for px in 0..pw {
                    for y in (2 * py..2 * py + 3).filter(|&y| y < h) {
                        for xx in (2 * px..2 * px + 3).filter(|&xx| xx < w) {
                            let v = cat_v[(ch * h + y) * w + xx];
                            let best = &mut pooled[(ch * ph + py) * pw + px];
                            *best = best.max(v);
                        }
                    }
                }
            }
        }
        want.extend(conv(&pooled, cat, (ph, pw), &wn, &bn, 3));
    }
    assert_eq!(got_shape, [n as i64, out as i64, ph as i64, pw as i64]);
    assert_eq!(got, want);
}
