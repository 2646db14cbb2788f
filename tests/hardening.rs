//! Attacks from the wire and from models, each a regression test: the call gets a clear status
//! and the daemon keeps serving. (The attack run that found them is in the hardening issue.)

use opreg_proto::{inference as pb, opreg::v1 as reg};
use opreg_tests::{onnx::*, *};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};
use tonic::{Code, Request};

const F32: i32 = 1;
const STRING: i32 = 8;

/// `y = Relu(x[N,3] @ W[3,2])`: the healthy model each test checks the daemon with.
fn mlp() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Relu", &["h"], &["y"]),
        ],
        vec![value("x", F32, &[-1, 3])],
        vec![value("y", F32, &[-1, 2])],
        vec![f32_initializer("w", &[3, 2], &[1.0; 6])],
        17,
    )
}

fn input(name: &str, datatype: &str, shape: &[i64]) -> pb::model_infer_request::InferInputTensor {
    pb::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn mlp_request() -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![input("x", "FP32", &[1, 3])],
        raw_input_contents: vec![f32_bytes(&[1.0, 2.0, 3.0]).into()],
        ..Default::default()
    }
}

/// The daemon is alive and serves the healthy model within `within`.
async fn assert_serving(d: &mut Daemon, within: Duration) {
    assert!(d.alive(), "the daemon died; log:\n{}", d.log());
    let mut c = d.inference().await;
    let started = Instant::now();
    let mut req = Request::new(mlp_request());
    req.set_timeout(within);
    let r = c
        .model_infer(req)
        .await
        .unwrap_or_else(|e| panic!("healthy request failed after {:?}: {e}", started.elapsed()));
    assert_eq!(
        f32_values(&r.into_inner().raw_output_contents[0]),
        [6.0, 6.0]
    );
}

async fn load(d: &Daemon, name: &str, bytes: Vec<u8>) -> Result<(), tonic::Status> {
    d.inference()
        .await
        .repository_model_load(load_request(name, bytes))
        .await
        .map(|_| ())
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err("must be refused");
    // The attack table of the hardening note comes from these lines (--nocapture).
    let m = e.message();
    eprintln!(
        "ATTACK refused: {:?}: {}",
        e.code(),
        m.get(..m.floor_char_boundary(200)).unwrap_or(m)
    );
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(
        e.message().contains(needle),
        "{needle:?} not in {:?}",
        e.message()
    );
}

#[tokio::test]
async fn lying_declared_shapes_and_arities_are_refused_at_load_and_the_daemon_serves() {
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(repo.path(), &[]);
    load(&d, "mlp", mlp()).await.expect("healthy model");

    // MatMul whose input is declared rank 0: shape inference used to slice a[..ar-2].
    let rank0 = model(
        vec![node("MatMul", &["x", "w"], &["y"])],
        vec![value("x", F32, &[])],
        vec![value("y", F32, &[-1])],
        vec![f32_initializer("w", &[3, 2], &[1.0; 6])],
        17,
    );
    // Loads (the kernel checks ranks when it runs) or is refused; either way a status.
    if load(&d, "rank0", rank0).await.is_ok() {
        let req = pb::ModelInferRequest {
            model_name: "rank0".into(),
            inputs: vec![input("x", "FP32", &[])],
            raw_input_contents: vec![f32_bytes(&[1.0]).into()],
            ..Default::default()
        };
        let e = d
            .inference()
            .await
            .model_infer(req)
            .await
            .expect_err("rank 0");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }
    assert_serving(&mut d, Duration::from_secs(10)).await;

    // Conv whose W is declared [3] without kernel_shape: used to slice w[2..].
    let conv = model(
        vec![node("Conv", &["x", "w"], &["y"])],
        vec![value("x", F32, &[1, 1, 4, 4]), value("w", F32, &[3])],
        vec![value("y", F32, &[-1])],
        vec![],
        17,
    );
    let _ = load(&d, "conv_w3", conv).await;
    assert_serving(&mut d, Duration::from_secs(10)).await;

    // Loop carrying one value whose body returns only the condition.
    let body = graph(
        vec![node("Identity", &["c"], &["c_out"])],
        vec![
            value("i", 7, &[]),
            value("c", 9, &[]),
            value("x_in", F32, &[-1]),
        ],
        vec![value("c_out", 9, &[])],
    );
    let short_loop = model(
        vec![node_with(
            "Loop",
            &["m", "cond", "x"],
            &["y"],
            vec![attr_graph("body", body)],
        )],
        vec![value("x", F32, &[-1])],
        vec![value("y", F32, &[-1])],
        vec![
            i64_initializer("m", &[], &[3]),
            bool_initializer("cond", true),
        ],
        17,
    );
    expect_err(
        load(&d, "short_loop", short_loop).await,
        Code::InvalidArgument,
        "Loop carries 1 values, so its body must take 3 inputs and return at least 2",
    );

    // Scan with two states whose body returns one value.
    let body = graph(
        vec![node("Identity", &["s_in"], &["s_out"])],
        vec![
            value("s_in", F32, &[1]),
            value("t_in", F32, &[1]),
            value("x_in", F32, &[1]),
        ],
        vec![value("s_out", F32, &[1])],
    );
    let short_scan = model(
        vec![node_with(
            "Scan",
            &["s", "t", "x"],
            &["s_final", "t_final"],
            vec![attr_graph("body", body), attr_int("num_scan_inputs", 1)],
        )],
        vec![
            value("s", F32, &[1]),
            value("t", F32, &[1]),
            value("x", F32, &[4, 1]),
        ],
        vec![value("s_final", F32, &[1]), value("t_final", F32, &[1])],
        vec![],
        17,
    );
    expect_err(
        load(&d, "short_scan", short_scan).await,
        Code::InvalidArgument,
        "Scan has 2 state values, so its body must return at least 2 outputs; it returns 1",
    );
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn sizes_from_the_wire_fail_the_call_not_the_daemon() {
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(repo.path(), &[]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    let strings = model(
        vec![node("Identity", &["s"], &["t"])],
        vec![value("s", STRING, &[-1])],
        vec![value("t", STRING, &[-1])],
        vec![],
        17,
    );
    load(&d, "strings", strings).await.expect("string model");

    // BYTES of shape [2^34] with 4 bytes of contents.
    let req = pb::ModelInferRequest {
        model_name: "strings".into(),
        inputs: vec![input("s", "BYTES", &[1 << 34])],
        raw_input_contents: vec![vec![0, 0, 0, 0].into()],
        ..Default::default()
    };
    let r = d.inference().await.model_infer(req).await;
    assert!(
        matches!(&r, Err(e) if matches!(e.code(), Code::InvalidArgument | Code::ResourceExhausted)),
        "{r:?}"
    );

    // A zero-size tensor with a huge dimension: [0, 2^40, 1].
    let mut rk = d.registry().await;
    let rnn = reg::RunKernelRequest {
        op_type: "RNN".into(),
        opset: 22,
        attributes: vec![reg::Attribute {
            name: "hidden_size".into(),
            value: Some(reg::attribute::Value::I(1)),
        }],
        inputs: vec![
            reg::Tensor {
                name: "X".into(),
                datatype: "FP32".into(),
                shape: vec![0, 1 << 40, 1],
                raw: vec![],
            },
            reg::Tensor {
                name: "W".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1, 1],
                raw: f32_bytes(&[1.0]),
            },
            reg::Tensor {
                name: "R".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1, 1],
                raw: f32_bytes(&[1.0]),
            },
        ],
        num_outputs: 2,
        ..Default::default()
    };
    expect_err(rk.run_kernel(rnn).await, Code::InvalidArgument, "too large");

    // RunKernel asking for 2^32-1 outputs.
    let relu = reg::RunKernelRequest {
        op_type: "Relu".into(),
        opset: 14,
        inputs: vec![reg::Tensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            raw: f32_bytes(&[1.0]),
        }],
        num_outputs: u32::MAX,
        ..Default::default()
    };
    expect_err(
        rk.run_kernel(relu).await,
        Code::InvalidArgument,
        "num_outputs",
    );

    // An FP16 Conv padded by 2^18 on each side: a 2^36-element output.
    let half = |v: f32| {
        // 1.0 and 0.0 are exact in f16: 0x3C00 and 0x0000.
        if v == 1.0 {
            [0x00u8, 0x3C]
        } else {
            [0, 0]
        }
    };
    let conv = reg::RunKernelRequest {
        op_type: "Conv".into(),
        opset: 11,
        attributes: vec![reg::Attribute {
            name: "pads".into(),
            value: Some(reg::attribute::Value::Ints(reg::Ints {
                values: vec![0, 0, 1 << 18, 1 << 18],
            })),
        }],
        inputs: vec![
            reg::Tensor {
                name: "X".into(),
                datatype: "FP16".into(),
                shape: vec![1, 1, 3, 3],
                raw: (0..9).flat_map(|_| half(1.0)).collect(),
            },
            reg::Tensor {
                name: "W".into(),
                datatype: "FP16".into(),
                shape: vec![1, 1, 1, 1],
                raw: half(1.0).to_vec(),
            },
        ],
        num_outputs: 1,
        ..Default::default()
    };
    expect_err(rk.run_kernel(conv).await, Code::ResourceExhausted, "");
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

fn loop_request() -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "runaway".into(),
        inputs: vec![input("x", "FP32", &[1])],
        raw_input_contents: vec![f32_bytes(&[1.0]).into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_requests_stop_at_their_deadline_and_free_the_compute_pool() {
    let repo = tempfile::tempdir().expect("repo");
    // Two compute threads, as on the machine the attack ran on.
    let (mut d, _p) = start_serving(repo.path(), &["--threads", "2"]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    load(&d, "runaway", runaway_loop(1_000_000_000_000))
        .await
        .expect("loop model");

    // Two requests with a client deadline of 1 s take both compute threads...
    all_overdue(&d, loop_request, Duration::from_secs(1)).await;
    // ...and give them back: a healthy request and a model load go through at once.
    assert_serving(&mut d, Duration::from_secs(5)).await;
    load(&d, "mlp2", mlp()).await.expect("load after runaway");
    d.wait_log("memory released");
}

#[tokio::test]
async fn the_server_deadline_applies_without_a_client_deadline() {
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(repo.path(), &["--infer-timeout-s", "0.5"]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    load(&d, "runaway", runaway_loop(1_000_000_000_000))
        .await
        .expect("loop model");
    let started = Instant::now();
    let e = d
        .inference()
        .await
        .model_infer(loop_request())
        .await
        .expect_err("runaway");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_serving(&mut d, Duration::from_secs(5)).await;
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

#[tokio::test]
async fn model_management_needs_the_token_and_inference_optionally_too() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(
        repo.path(),
        &["--admin-token", "s3cret", "--require-token-for-inference"],
    );
    let mut c = d.inference().await;
    expect_err(
        c.repository_model_load(load_request("mlp", mlp())).await,
        Code::Unauthenticated,
        "Bearer",
    );
    expect_err(
        c.repository_model_load(bearer(load_request("mlp", mlp()), "wrong"))
            .await,
        Code::Unauthenticated,
        "Bearer",
    );
    c.repository_model_load(bearer(load_request("mlp", mlp()), "s3cret"))
        .await
        .expect("with the token");
    expect_err(
        c.model_infer(mlp_request()).await,
        Code::Unauthenticated,
        "",
    );
    let r = c
        .model_infer(bearer(mlp_request(), "s3cret"))
        .await
        .expect("infer with the token");
    assert_eq!(
        f32_values(&r.into_inner().raw_output_contents[0]),
        [6.0, 6.0]
    );
    let unload = pb::RepositoryModelUnloadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    };
    expect_err(
        c.repository_model_unload(unload.clone()).await,
        Code::Unauthenticated,
        "",
    );
    let mut r = d.registry().await;
    expect_err(
        r.load_plugin(reg::LoadPluginRequest {
            path: plugin("mock_good").display().to_string(),
        })
        .await,
        Code::Unauthenticated,
        "",
    );
    // Health stays open for orchestrators.
    let channel = tonic::transport::Channel::from_shared(d.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    let s = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check");
    assert_eq!(s.into_inner().status, 1);
    c.repository_model_unload(bearer(unload, "s3cret"))
        .await
        .expect("unload with the token");
}

#[tokio::test]
async fn without_a_token_a_wildcard_listener_refuses_management() {
    let repo = tempfile::tempdir().expect("repo");
    let plugins = plugin_dir(&[plugin("onnx_ops"), plugin("blas_cpu")]);
    let d = Daemon::start_with(Options {
        args: [
            "--plugin-dir",
            plugins.path().to_str().expect("utf8"),
            "--model-repo",
            repo.path().to_str().expect("utf8"),
        ]
        .map(String::from)
        .to_vec(),
        listen: Some("0.0.0.0:0".into()),
        ..Options::default()
    });
    expect_err(
        load(&d, "mlp", mlp()).await,
        Code::PermissionDenied,
        "no admin token",
    );
    let unload = pb::RepositoryModelUnloadRequest {
        model_name: "mlp".into(),
        ..Default::default()
    };
    expect_err(
        d.inference().await.repository_model_unload(unload).await,
        Code::PermissionDenied,
        "",
    );
    // Reading stays open.
    d.index().await;
    assert!(
        std::fs::read_dir(repo.path())
            .expect("repo")
            .next()
            .is_none(),
        "nothing may be written"
    );
}

#[tokio::test]
async fn failed_loads_and_huge_names_cost_bounded_memory() {
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(repo.path(), &["--max-failed-models", "4"]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    let before = d.rss_kib();
    // A 20 MiB name: refused up front, not remembered.
    let huge = "a".repeat(20 << 20);
    for _ in 0..5 {
        let e = load(&d, &huge, b"garbage".to_vec())
            .await
            .expect_err("name");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().len() < 1024, "echo is bounded");
    }
    // Garbage under many valid names: only the last 4 failures are kept.
    for i in 0..20 {
        load(&d, &format!("bad{i}"), vec![0xFF; 4096])
            .await
            .expect_err("garbage");
    }
    let index = d.index().await;
    let names: Vec<&str> = index.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["bad16", "bad17", "bad18", "bad19", "mlp"],
        "{names:?}"
    );
    assert!(index.iter().all(|m| m.reason.len() <= 2048));
    // Garbage under many version numbers of one model: only the newest few failures are
    // kept, and the ready version keeps serving.
    let mut c = d.inference().await;
    for v in 2..42 {
        let mut req = load_request("mlp", vec![0xFF; 64]);
        let file = req.parameters.remove("file:1/model.onnx").expect("file");
        req.parameters.insert(format!("file:{v}/model.onnx"), file);
        c.repository_model_load(req)
            .await
            .expect_err("garbage version");
    }
    let mlp_rows: Vec<(String, String)> = d
        .index()
        .await
        .into_iter()
        .filter(|m| m.name == "mlp")
        .map(|m| (m.version, m.state))
        .collect();
    assert_eq!(mlp_rows.len(), 9, "{mlp_rows:?}");
    assert_eq!(mlp_rows[0], ("1".to_string(), "READY".to_string()));
    assert!(mlp_rows[1..].iter().all(|(_, s)| s == "UNAVAILABLE"));
    assert_eq!(mlp_rows[8].0, "41", "the newest failures are the ones kept");
    let after = d.rss_kib();
    eprintln!("RSS before {before} KiB, after {after} KiB");
    assert!(after < before + 200 * 1024, "RSS {before} -> {after} KiB");
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_tiny_model_cannot_fold_or_compute_a_huge_constant() {
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(
        repo.path(),
        &[
            "--max-folded-bytes",
            "1048576",
            "--max-tensor-bytes",
            "67108864",
        ],
    );
    load(&d, "mlp", mlp()).await.expect("healthy model");
    let value_one = onnx_f32_scalar(1.0);
    // ConstantOfShape([256, 1024, 1024]) is 1 GiB of f32 from a model of a few hundred bytes.
    let bomb = model(
        vec![
            node_with(
                "ConstantOfShape",
                &["shape"],
                &["big"],
                vec![attr_tensor("value", value_one)],
            ),
            node("Add", &["x", "big"], &["y"]),
        ],
        vec![value("x", F32, &[1])],
        vec![value("y", F32, &[256, 1024, 1024])],
        vec![i64_initializer("shape", &[3], &[256, 1024, 1024])],
        17,
    );
    assert!(bomb.len() < 1024);
    let before = d.rss_kib();
    load(&d, "bomb", bomb).await.expect("loads, unfolded");
    let after = d.rss_kib();
    eprintln!("RSS before load {before} KiB, after {after} KiB");
    assert!(after < before + 100 * 1024, "RSS {before} -> {after} KiB");
    let p = d
        .registry()
        .await
        .model_placement(reg::ModelPlacementRequest {
            name: "bomb".into(),
            version: String::new(),
        })
        .await
        .expect("placement")
        .into_inner();
    let cos = p
        .nodes
        .iter()
        .find(|n| n.op_type == "ConstantOfShape")
        .expect("node");
    assert!(
        !cos.folded,
        "past the folding budget the node runs per request"
    );
    let req = pb::ModelInferRequest {
        model_name: "bomb".into(),
        inputs: vec![input("x", "FP32", &[1])],
        raw_input_contents: vec![f32_bytes(&[1.0]).into()],
        ..Default::default()
    };
    expect_err(
        d.inference().await.model_infer(req).await,
        Code::ResourceExhausted,
        "limit",
    );
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

fn onnx_f32_scalar(v: f32) -> opreg_proto::onnx::TensorProto {
    f32_initializer("value", &[1], &[v])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_of_one_model_serialize_and_disk_matches_what_serves() {
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &["--max-concurrent-loads", "8"]);
    let variant = |k: f32| {
        model(
            vec![node("Mul", &["x", "k"], &["y"])],
            vec![value("x", F32, &[1])],
            vec![value("y", F32, &[1])],
            vec![f32_initializer("k", &[1], &[k])],
            17,
        )
    };
    let loads: Vec<_> = (0..8)
        .map(|i| {
            let url = d.url();
            let bytes = variant(i as f32);
            tokio::spawn(async move {
                pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url)
                    .await
                    .expect("connect")
                    .repository_model_load(load_request("m", bytes))
                    .await
            })
        })
        .collect();
    for l in loads {
        l.await.expect("join").expect("every load succeeds");
    }
    let before = served_m(&d).await;
    let dir = repo.path().join("m/1");
    let files: Vec<String> = std::fs::read_dir(&dir)
        .expect("version folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, ["model.onnx"], "no temporary file is left");
    drop(d);
    let (d, _p2) = start_serving(repo.path(), &[]);
    let after = served_m(&d).await;
    assert_eq!(before, after, "what served is what is on disk");
}

async fn served_m(d: &Daemon) -> Vec<f32> {
    let req = pb::ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![input("x", "FP32", &[1])],
        raw_input_contents: vec![f32_bytes(&[1.0]).into()],
        ..Default::default()
    };
    let r = d.inference().await.model_infer(req).await.expect("infer");
    f32_values(&r.into_inner().raw_output_contents[0])
}

#[tokio::test]
async fn a_fifo_as_plugin_path_is_refused_at_once_and_nothing_waits_on_it() {
    let d = Daemon::start(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let fifo = dir.path().join("libopreg_fifo.so");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("cstr");
    // SAFETY: plain mkfifo(3) on a fresh path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let mut r = d.registry().await;
    let started = Instant::now();
    expect_err(
        r.load_plugin(reg::LoadPluginRequest {
            path: fifo.display().to_string(),
        })
        .await,
        Code::InvalidArgument,
        "not a regular file",
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    r.list_plugins(reg::ListPluginsRequest {})
        .await
        .expect("the registry answers");
}

#[tokio::test]
async fn smaller_findings_version_aliases_echoes_stale_temp_files_symlinked_data() {
    let repo = tempfile::tempdir().expect("repo");
    // A temporary file a kill left behind, and a model whose external data is a symbolic
    // link out of its folder.
    let stale = repo.path().join("m/1/.model.onnx.4242.0.tmp");
    std::fs::create_dir_all(stale.parent().expect("dir")).expect("mkdir");
    std::fs::write(&stale, b"half an upload").expect("write");
    let linked = repo.path().join("linked/1");
    std::fs::create_dir_all(&linked).expect("mkdir");
    std::os::unix::fs::symlink("/etc/hostname", linked.join("w.bin")).expect("symlink");
    let external = opreg_proto::onnx::TensorProto {
        name: "w".into(),
        dims: vec![1],
        data_type: F32,
        data_location: 1,
        external_data: vec![opreg_proto::onnx::StringStringEntryProto {
            key: "location".into(),
            value: "w.bin".into(),
        }],
        ..Default::default()
    };
    std::fs::write(
        linked.join("model.onnx"),
        model(
            vec![node("Add", &["x", "w"], &["y"])],
            vec![value("x", F32, &[1])],
            vec![value("y", F32, &[1])],
            vec![external],
            17,
        ),
    )
    .expect("write model");

    let (mut d, _p) = start_serving(repo.path(), &[]);
    assert!(!stale.exists(), "stale upload removed at start-up");
    let index = d.index().await;
    let linked_entry = index.iter().find(|m| m.name == "linked").expect("listed");
    assert!(
        linked_entry
            .reason
            .contains("leads outside the model folder"),
        "{}",
        linked_entry.reason
    );

    let mut params = HashMap::new();
    params.insert(
        "file:01/model.onnx".to_string(),
        pb::ModelRepositoryParameter {
            parameter_choice: Some(pb::model_repository_parameter::ParameterChoice::BytesParam(
                mlp(),
            )),
        },
    );
    expect_err(
        d.inference()
            .await
            .repository_model_load(pb::RepositoryModelLoadRequest {
                model_name: "mlp".into(),
                parameters: params,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "without leading zeros",
    );

    load(&d, "mlp", mlp()).await.expect("healthy model");
    let mut req = mlp_request();
    req.inputs[0].name = "z".repeat(1 << 20);
    let e = d
        .inference()
        .await
        .model_infer(req)
        .await
        .expect_err("unknown input");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().len() < 1024,
        "{} bytes echoed",
        e.message().len()
    );
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn small_requests_never_wait_on_nagle() {
    // With Nagle's algorithm on the server's socket a small response waits for the client's
    // delayed ACK, ~40 ms per call; a healthy call takes well under a millisecond. Only the
    // stall can break this bound.
    let repo = tempfile::tempdir().expect("repo");
    let (d, _p) = start_serving(repo.path(), &[]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    let mut c = d.inference().await;
    c.model_infer(mlp_request()).await.expect("warm-up");
    let started = Instant::now();
    for _ in 0..50 {
        c.model_infer(mlp_request()).await.expect("infer");
    }
    let elapsed = started.elapsed();
    eprintln!("ATTACK 50 sequential small calls took {elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(50 * 40 / 2),
        "50 small calls took {elapsed:?}: a Nagle stall is back (TCP_NODELAY)"
    );
}

/// A raw gRPC call to `ModelInfer` on its own connection whose request body is `body` and
/// stays open (no end of stream): the response to come, and the stream (keep it to keep the
/// call open).
async fn raw_call(
    d: &Daemon,
    body: &[u8],
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let tcp = tokio::net::TcpStream::connect(d.addr)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("HTTP/2 ready");
    let request = http::Request::post(format!(
        "http://{}/inference.GRPCInferenceService/ModelInfer",
        d.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("send");
    send.send_data(bytes::Bytes::copy_from_slice(body), false)
        .expect("data");
    (response, send)
}

/// A whole gRPC message of 1 MiB (counted against the receiving budget) whose bytes decode
/// to no request.
fn one_mib_message_of_garbage() -> Vec<u8> {
    let mut m = vec![0u8, 0, 0x10, 0, 0];
    m.resize(5 + (1 << 20), 0xff);
    m
}

/// [`raw_call`]'s status, answered within 10 s.
async fn raw_model_infer(d: &Daemon, body: &[u8]) -> tonic::Status {
    let (response, send) = raw_call(d, body).await;
    let within = Duration::from_secs(10);
    let response = tokio::time::timeout(within, response)
        .await
        .expect("an answer within 10 s")
        .expect("a response, not a dropped connection");
    let (head, mut rest) = response.into_parts();
    // A refusal before any message is trailers-only: the status is in the headers.
    let headers = if head.headers.contains_key("grpc-status") {
        head.headers
    } else {
        tokio::time::timeout(within, rest.trailers())
            .await
            .expect("trailers within 10 s")
            .expect("trailers")
            .expect("a grpc-status")
    };
    drop(send);
    let status = tonic::Status::from_header_map(&headers).expect("grpc-status");
    eprintln!("ATTACK refused: {:?}: {}", status.code(), status.message());
    status
}

#[tokio::test]
async fn declared_message_lengths_past_the_receiving_budget_are_refused_unreserved() {
    // tonic reserves a message's declared length when its 5-byte header arrives: here 2 MiB
    // that never come, against a budget of 1 MiB of messages being received.
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(repo.path(), &["--max-receiving-bytes", "1048576"]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    let s = raw_model_infer(&d, &[0, 0, 0x20, 0, 0]).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(
        s.message().contains("2097152 bytes") && s.message().contains("--max-receiving-bytes"),
        "{}",
        s.message()
    );
    // Framing the layer passes on to tonic: a compressed flag without a grpc-encoding, a
    // flag byte gRPC does not define: each a clear status.
    let s = raw_model_infer(&d, &[1, 0, 0, 0, 1, 0]).await;
    assert_eq!(s.code(), Code::Internal, "{}", s.message());
    let s = raw_model_infer(&d, &[7, 0, 0, 0, 0]).await;
    assert_eq!(s.code(), Code::Internal, "{}", s.message());
    // Messages within the budget still pass, and the refused one holds nothing.
    for _ in 0..3 {
        assert_serving(&mut d, Duration::from_secs(10)).await;
    }
    // A client that declares 1 MiB and sends nothing more holds the whole budget while its
    // stream is open: other large messages are refused meanwhile, small requests (not
    // counted) still pass.
    let (_stalled, _open) = raw_call(&d, &[0, 0, 0x10, 0, 0]).await;
    // The other: 1 MiB declared and sent (bytes that decode to no request): refused at its
    // header while the stalled one is counted, else failed as it decodes.
    let whole = one_mib_message_of_garbage();
    let started = Instant::now();
    loop {
        let s = raw_model_infer(&d, &whole).await;
        if s.code() == Code::ResourceExhausted && s.message().contains("1048576 held now") {
            break;
        }
        // (The daemon may not have read the stalled call's header yet.)
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the stalled message is not counted: {}",
            s.message()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_message_that_stops_arriving_gives_its_budget_back() {
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(
        repo.path(),
        &[
            "--max-receiving-bytes",
            "1048576",
            "--receive-idle-timeout-s",
            "1",
        ],
    );
    load(&d, "mlp", mlp()).await.expect("healthy model");
    // A header declaring the whole budget, then nothing: after a second without a byte the
    // call fails (its own answer, within raw_model_infer's 10 s)...
    let s = raw_model_infer(&d, &[0, 0, 0x10, 0, 0]).await;
    assert_eq!(s.code(), Code::DeadlineExceeded, "{}", s.message());
    assert!(
        s.message().contains("--receive-idle-timeout-s"),
        "{}",
        s.message()
    );
    // ...and its share is back: a whole 1 MiB message is admitted (and fails as it decodes:
    // its bytes are no request), not refused for the budget.
    let whole = one_mib_message_of_garbage();
    let s = raw_model_infer(&d, &whole).await;
    assert_ne!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_header_declaring_two_gib_cannot_abort_a_daemon_short_of_memory() {
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(repo.path(), &[]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    // The address space the daemon has now plus 1 GiB: no 2 GiB reservation can succeed, as
    // on a machine with strict overcommit or a container smaller than the message. tonic's
    // own reservation of a declared length aborts the process there.
    let vm_kib = d.status_kib("VmSize");
    let bytes = (vm_kib + (1 << 20)) * 1024;
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: plain system call on the daemon's pid with a valid rlimit.
    let r = unsafe {
        libc::prlimit(
            d.pid() as libc::pid_t,
            libc::RLIMIT_AS,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let s = raw_model_infer(&d, &[0, 0x7f, 0xff, 0xff, 0xff]).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(s.message().contains("cannot reserve"), "{}", s.message());
    assert_serving(&mut d, Duration::from_secs(10)).await;
}

/// `y = x * k`, padded with an unused 4 MiB initializer so that writing the file takes a
/// while (the kill must be able to land inside the write).
fn padded_model(k: f32) -> Vec<u8> {
    model(
        vec![node("Mul", &["x", "k"], &["y"])],
        vec![value("x", F32, &[1])],
        vec![value("y", F32, &[1])],
        vec![
            f32_initializer("k", &[1], &[k]),
            f32_initializer("pad", &[1 << 20], &vec![k; 1 << 20]),
        ],
        17,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_at_any_point_of_an_upload_leaves_the_old_version_or_the_new_one() {
    let repo = tempfile::tempdir().expect("repo");
    let file = repo.path().join("m/1/model.onnx");
    let (d, _p) = start_serving(repo.path(), &[]);
    load(&d, "m", padded_model(1.0))
        .await
        .expect("first version");
    drop(d);
    let mut on_disk = 1.0f32;
    // Random kill points, reproducible from the printed seed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("kill-point seed {seed}");
    for round in 2..8 {
        let (d, _p) = start_serving(repo.path(), &[]);
        assert_eq!(
            served_m(&d).await,
            [on_disk],
            "round {round}: served after restart"
        );
        let url = d.url();
        let upload = tokio::spawn(async move {
            pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url)
                .await
                .expect("connect")
                .repository_model_load(load_request("m", padded_model(round as f32)))
                .await
        });
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(seed % 400)).await;
        d.kill9();
        let _ = upload.await;
        // Old or new, byte for byte.
        let bytes = std::fs::read(&file).expect("the model file exists");
        if bytes == padded_model(round as f32) {
            on_disk = round as f32;
        } else {
            assert_eq!(bytes, padded_model(on_disk), "round {round}: a broken file");
        }
        eprintln!("round {round}: version on disk has k = {on_disk}");
    }
    let (d, _p) = start_serving(repo.path(), &[]);
    assert_eq!(served_m(&d).await, [on_disk]);
    let leftovers: Vec<_> = std::fs::read_dir(repo.path().join("m/1"))
        .expect("version folder")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["model.onnx"],
        "temporary files removed at start-up"
    );
}

/// Side of the MatMul that takes seconds in a debug build.
const N: usize = 3072;

fn big_request() -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "big".into(),
        inputs: vec![input("x", "FP32", &[N as i64, N as i64])],
        raw_input_contents: vec![f32_bytes(&vec![1.0; N * N]).into()],
        ..Default::default()
    }
}

/// Two concurrent calls of `make()` (one per compute thread), each on its own connection with
/// `timeout`: both must end as overdue.
async fn all_overdue(d: &Daemon, make: fn() -> pb::ModelInferRequest, timeout: Duration) {
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let url = d.url();
            tokio::spawn(async move {
                let mut c =
                    pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url)
                        .await
                        .expect("connect")
                        .max_decoding_message_size(usize::MAX);
                let mut req = Request::new(make());
                req.set_timeout(timeout);
                c.model_infer(req).await
            })
        })
        .collect();
    for call in calls {
        let e = call.await.expect("join").expect_err("past its deadline");
        assert!(
            matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_long_kernel_call_is_cut_at_the_deadline_between_its_chunks() {
    // A 3072^3 MatMul takes a second or more (the BLAS is optimized in test builds too:
    // `[profile.dev.package.opreg-plugin-blas-cpu]`), two of them at once more; the host stops
    // handing out its parallel chunks once the deadline passes, so both compute threads come
    // back at once instead of after the whole product.
    let repo = tempfile::tempdir().expect("repo");
    let (mut d, _p) = start_serving(repo.path(), &["--threads", "2"]);
    load(&d, "mlp", mlp()).await.expect("healthy model");
    let big = model(
        vec![node("MatMul", &["x", "w"], &["y"])],
        vec![value("x", F32, &[N as i64, N as i64])],
        vec![value("y", F32, &[N as i64, N as i64])],
        vec![f32_initializer(
            "w",
            &[N as i64, N as i64],
            &vec![0.5; N * N],
        )],
        17,
    );
    load(&d, "big", big).await.expect("big model");
    all_overdue(&d, big_request, Duration::from_millis(300)).await;
    assert_serving(&mut d, Duration::from_secs(4)).await;
    d.wait_log("memory released");
}
