//! The memory model through the real daemon, on the mock device (a separate, scrambled memory
//! space: a value read where it was not copied to computes garbage, so these tests cannot pass
//! by accident): copies inserted exactly where values cross, counted and shown; pooled device
//! memory returned before the plugin unloads; broken providers fail requests, not the daemon.

use opreg_proto::{inference as pb, opreg::v1 as reg};
use opreg_tests::{onnx::*, *};
use tonic::Code;

const W1: [f32; 6] = [0.5, -1.0, 2.0, 0.25, -0.5, 1.5];
const W2: [f32; 4] = [1.0, -2.0, 0.5, 3.0];

/// `y = Reshape(Relu(x[N,3] @ W1[3,2]), [-1, 2]) @ W2[2,2]`: Relu (and a Reshape whose shape
/// input the mock kernel wants on the host) between two MatMuls.
fn sandwich() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w1"], &["h"]),
            node("Relu", &["h"], &["r"]),
            node("Reshape", &["r", "shape"], &["s"]),
            node("MatMul", &["s", "w2"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 3])],
        vec![value("y", 1, &[-1, 2])],
        vec![
            f32_initializer("w1", &[3, 2], &W1),
            f32_initializer("w2", &[2, 2], &W2),
            i64_initializer("shape", &[2], &[-1, 2]),
        ],
        17,
    )
}

fn expected(x: &[f32]) -> Vec<f32> {
    let mut y = Vec::new();
    for row in x.chunks(3) {
        let r: Vec<f32> = (0..2)
            .map(|j| (0..3).map(|k| row[k] * W1[k * 2 + j]).sum::<f32>().max(0.0))
            .collect();
        for j in 0..2 {
            y.push((0..2).map(|k| r[k] * W2[k * 2 + j]).sum());
        }
    }
    y
}

fn request(model: &str, x: &[f32]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![(x.len() / 3) as i64, 3],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(x).into()],
        ..Default::default()
    }
}

/// A repository with `sandwich` preferring the mock device and `cpu-only` on the CPU, and a
/// daemon with the operator, BLAS and mock-device plugins; `mock_config` is the mock-device
/// plugin's configuration.
fn start(mock_config: &str) -> (Daemon, Vec<tempfile::TempDir>) {
    let repo = tempfile::tempdir().expect("repo");
    for (name, backends) in [
        ("sandwich", "[\"mock\", \"cpu\"]"),
        ("cpu-only", "[\"cpu\"]"),
    ] {
        std::fs::create_dir_all(repo.path().join(format!("{name}/1"))).expect("mkdir");
        std::fs::write(repo.path().join(format!("{name}/1/model.onnx")), sandwich())
            .expect("model");
        std::fs::write(
            repo.path().join(format!("{name}/config.toml")),
            format!("backends = {backends}\n"),
        )
        .expect("config");
    }
    let plugins = plugin_dir(&[
        plugin("onnx_ops"),
        plugin("blas_cpu"),
        plugin("mock_device"),
    ]);
    let cfg = tempfile::tempdir().expect("cfg");
    let cfg_file = cfg.path().join("opreg.toml");
    std::fs::write(
        &cfg_file,
        format!("[plugin_config.mock-device]\n{mock_config}\n"),
    )
    .expect("write config");
    let d = Daemon::start(&[
        "--plugin-dir",
        plugins.path().to_str().expect("utf8"),
        "--model-repo",
        repo.path().to_str().expect("utf8"),
        "--config",
        cfg_file.to_str().expect("utf8"),
    ]);
    (d, vec![repo, plugins, cfg])
}

async fn placement(d: &Daemon, model: &str) -> reg::ModelPlacementResponse {
    d.registry()
        .await
        .model_placement(reg::ModelPlacementRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .expect("placement")
        .into_inner()
}

async fn device_copies(d: &Daemon, model: &str) -> (u64, u64) {
    let s = d
        .inference()
        .await
        .model_statistics(pb::ModelStatisticsRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner();
    let m = &s.model_stats[0];
    (m.device_copies, m.device_copy_bytes)
}

#[tokio::test]
async fn mock_kernels_between_two_cpu_matmuls_copy_exactly_twice() {
    let (d, _dirs) = start("");
    let p = placement(&d, "sandwich").await;
    let nodes: Vec<(String, String)> = p
        .nodes
        .iter()
        .map(|n| (n.op_type.clone(), n.device.clone()))
        .collect();
    assert_eq!(
        nodes,
        [
            ("MatMul", "cpu"),
            ("Relu", "mock"),
            ("Reshape", "mock"),
            ("MatMul", "cpu")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let copies: Vec<(String, String, String)> = p
        .copies
        .iter()
        .map(|c| (c.value.clone(), c.from.clone(), c.to.clone()))
        .collect();
    assert_eq!(
        copies,
        // The shape input stays on the host, as the mock Reshape declared it.
        [("h", "host", "mock"), ("s", "mock", "host")].map(|(a, b, c)| (
            a.to_string(),
            b.to_string(),
            c.to_string()
        ))
    );
    // The command-line client lists them after the nodes.
    let cli = std::process::Command::new(artifacts().join("opreg"))
        .args(["--addr", &d.url(), "placement", "sandwich"])
        .output()
        .expect("run opreg");
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(text.contains("copy\th\thost -> mock"), "{text}");
    assert!(text.contains("copy\ts\tmock -> host"), "{text}");
    // The right answer: had any step read mock memory as host memory (or the other way
    // round), the scramble would have made it garbage.
    let mut c = d.inference().await;
    let x = [1.0, -2.0, 3.0, -0.5, 0.25, 4.0];
    for round in 1..=3u64 {
        let r = c
            .model_infer(request("sandwich", &x))
            .await
            .expect("infer")
            .into_inner();
        assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x));
        // Two rows of two f32 each way.
        assert_eq!(
            device_copies(&d, "sandwich").await,
            (2 * round, 2 * round * 16)
        );
    }
    // The same model on the CPU only: no copies at all.
    assert!(placement(&d, "cpu-only").await.copies.is_empty());
    let r = c
        .model_infer(request("cpu-only", &x))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x));
    assert_eq!(device_copies(&d, "cpu-only").await, (0, 0));
}

#[tokio::test]
async fn a_failing_device_allocator_fails_the_request_and_the_daemon_serves_on() {
    let (d, _dirs) = start("fail_alloc_after = 1");
    let mut c = d.inference().await;
    let x = [1.0, -2.0, 3.0];
    let err = c
        .model_infer(request("sandwich", &x))
        .await
        .expect_err("no device memory");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    for needle in ["mock", "mock-device", "fail_alloc_after"] {
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    let r = c
        .model_infer(request("cpu-only", &x))
        .await
        .expect("the CPU model still serves")
        .into_inner();
    assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x));
}

#[tokio::test]
async fn a_provider_failing_its_self_test_is_refused_and_its_models_fall_back_to_the_cpu() {
    let (d, _dirs) = start("fail_alloc_after = 0");
    d.wait_log("device provider for 'mock' failed its self-test");
    let p = placement(&d, "sandwich").await;
    assert!(p.nodes.iter().all(|n| n.device == "cpu"), "{:?}", p.nodes);
    assert!(p.copies.is_empty());
    let x = [1.0, -2.0, 3.0];
    let r = d
        .inference()
        .await
        .model_infer(request("sandwich", &x))
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(f32_values(&r.raw_output_contents[0]), expected(&x));
}

#[tokio::test]
async fn an_allocator_returning_null_is_refused_by_name() {
    let (d, _dirs) = start("null_alloc_after = 1");
    let mut c = d.inference().await;
    let x = [1.0, -2.0, 3.0];
    let err = c
        .model_infer(request("sandwich", &x))
        .await
        .expect_err("null device memory");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("null") && err.message().contains("mock"),
        "{}",
        err.message()
    );
    c.model_infer(request("cpu-only", &x))
        .await
        .expect("the CPU model still serves");
}

#[tokio::test]
async fn pooled_device_memory_is_returned_before_the_plugin_unloads() {
    let report_dir = tempfile::tempdir().expect("tempdir");
    let report = report_dir.path().join("outstanding");
    let (d, _dirs) = start(&format!("leak_report = {:?}", report.display().to_string()));
    let mut c = d.inference().await;
    let x = [1.0, -2.0, 3.0];
    for _ in 0..5 {
        c.model_infer(request("sandwich", &x)).await.expect("infer");
    }
    let mut r = d.registry().await;
    // The model's plan holds the plugin: unload the model first, then the plugin.
    c.repository_model_unload(pb::RepositoryModelUnloadRequest {
        model_name: "sandwich".into(),
        ..Default::default()
    })
    .await
    .expect("unload model");
    r.unload_plugin(reg::UnloadPluginRequest {
        name: "mock-device".into(),
    })
    .await
    .expect("unload plugin");
    // Plans hold the registry generation they were bound to: the CPU model's re-binds to the
    // new generation on its next request, which lets the old one (and the plugin) go.
    c.model_infer(request("cpu-only", &x))
        .await
        .expect("cpu model serves");
    d.wait_log("plugin library released and unmapped");
    assert_eq!(
        std::fs::read_to_string(&report).expect("shutdown wrote the report"),
        "0",
        "device memory still allocated when the plugin shut down"
    );
}

#[test]
fn a_copy_no_provider_can_make_is_refused_by_name() {
    // In-process: the mock provider offers mock:0 and mock:1 but copies only within one
    // device (as a GPU provider without peer access would).
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = [("mock-device".to_string(), "devices = 2\n".to_string())].into();
    let registry = opregd::registry::Registry::new(dir.path().join("stage"), configs);
    for (p, r) in registry.load_all(&[plugin("mock_device")]) {
        if let Err(e) = r {
            panic!("{}: {e}", p.display());
        }
    }
    let snapshot = registry.snapshot();
    let second = opreg_sdk::Device {
        kind: opreg_sdk::DeviceKind::MOCK,
        ordinal: 1,
    };
    let (a, b) = (
        snapshot.device(opreg_sdk::Device::MOCK).expect("mock:0"),
        snapshot.device(second).expect("mock:1"),
    );
    assert!(a.same_provider(&b));
    let (src, dst) = (
        a.alloc_pooled(64).expect("alloc on mock:0"),
        b.alloc_pooled(64).expect("alloc on mock:1"),
    );
    use opreg_sdk::host::DeviceBuffer;
    let err = a.copy(dst.mem(), src.mem(), 64).expect_err("no peer copy");
    assert_eq!(err.code, opreg_sdk::ErrorCode::Unimplemented, "{err:?}");
    for needle in ["mock-device", "mock -> mock:1"] {
        assert!(err.message.contains(needle), "{needle}: {}", err.message);
    }
}

#[tokio::test]
async fn the_profiler_reports_every_step_with_its_kernel_device_and_bytes() {
    let (d, _dirs) = start("");
    let p = d
        .registry()
        .await
        .profile_model(reg::ProfileModelRequest {
            name: "sandwich".into(),
            runs: 3,
            batch: 2,
            ..Default::default()
        })
        .await
        .expect("profile")
        .into_inner();
    assert_eq!(p.runs, 3);
    let steps: Vec<(&str, &str, u64, u64)> = p
        .steps
        .iter()
        .map(|s| {
            (
                s.kernel.as_str(),
                s.device.as_str(),
                s.calls,
                s.output_bytes,
            )
        })
        .collect();
    // x is [2, 3] (batch 2): every value after the first MatMul is 2 x 2 f32 = 16 bytes.
    assert_eq!(steps.len(), 6, "{steps:?}");
    assert_eq!(steps[1], ("copy", "mock", 3, 16));
    assert_eq!(steps[4], ("copy", "mock", 3, 16));
    assert!(
        steps[2].0.starts_with("ai.onnx::Relu") && steps[2].1 == "mock",
        "{steps:?}"
    );
    assert!(
        steps[0].0.starts_with("ai.onnx::MatMul") && steps[0].1 == "cpu",
        "{steps:?}"
    );
    assert!(p.steps.iter().all(|s| s.calls == 3));
    // The command-line view of the same.
    let out = std::process::Command::new(artifacts().join("opreg"))
        .args(["--addr", &d.url(), "profile", "sandwich", "--runs", "2"])
        .output()
        .expect("run opreg");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sandwich version 1: 2 runs"), "{text}");
    assert!(text.contains("\tmock\tcopy\tcopy h host->mock"), "{text}");
}

/// `x[N,3] @ W1` then a Relu named `relu_name` (the mock device declines `decline*` and
/// refuses `refuse*`).
fn named_relu(relu_name: &str) -> Vec<u8> {
    let mut relu = node("Relu", &["h"], &["y"]);
    relu.name = relu_name.into();
    model(
        vec![node("MatMul", &["x", "w1"], &["h"]), relu],
        vec![value("x", 1, &[-1, 3])],
        vec![value("y", 1, &[-1, 2])],
        vec![f32_initializer("w1", &[3, 2], &W1)],
        17,
    )
}

#[tokio::test]
async fn a_node_a_device_kernel_declines_moves_to_the_cpu_and_a_refusal_fails_the_load() {
    let (d, dirs) = start("");
    let repo = dirs[0].path();
    for name in ["declined", "refused"] {
        std::fs::create_dir_all(repo.join(format!("{name}/1"))).expect("mkdir");
        std::fs::write(
            repo.join(format!("{name}/1/model.onnx")),
            named_relu(if name == "declined" {
                "decline_me"
            } else {
                "refuse_me"
            }),
        )
        .expect("model");
        std::fs::write(
            repo.join(format!("{name}/config.toml")),
            "backends = [\"mock\", \"cpu\"]\n",
        )
        .expect("config");
    }
    let mut c = d.inference().await;
    let load = |name: &str| pb::RepositoryModelLoadRequest {
        model_name: name.into(),
        ..Default::default()
    };
    c.repository_model_load(load("declined"))
        .await
        .expect("a declined node loads on the CPU");
    let p = placement(&d, "declined").await;
    let nodes: Vec<(&str, &str)> = p
        .nodes
        .iter()
        .map(|n| (n.op_type.as_str(), n.device.as_str()))
        .collect();
    assert_eq!(nodes, [("MatMul", "cpu"), ("Relu", "cpu")]);
    assert!(p.copies.is_empty(), "{:?}", p.copies);
    let x = [1.0, -2.0, 3.0];
    let r = c
        .model_infer(request("declined", &x))
        .await
        .expect("infer")
        .into_inner();
    let want: Vec<f32> = (0..2)
        .map(|j| (0..3).map(|k| x[k] * W1[k * 2 + j]).sum::<f32>().max(0.0))
        .collect();
    assert_eq!(f32_values(&r.raw_output_contents[0]), want);
    // Any other refusal is the model's error, named, not a silent fallback.
    let err = c
        .repository_model_load(load("refused"))
        .await
        .expect_err("refused");
    assert!(
        err.message().contains("refuses this Relu"),
        "{}",
        err.message()
    );
}
