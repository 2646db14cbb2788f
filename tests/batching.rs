//! Dynamic batching: concurrent requests to a batched model are merged along the batch
//! dimension into fewer runs and each gets exactly what the same model unbatched gives; a full
//! queue refuses with `UNAVAILABLE` and the reason; a config that cannot batch is refused at
//! load.

use opreg_proto::inference as pb;
use opreg_tests::{onnx::*, *};
use std::path::Path;
use tonic::Code;

const F32: i32 = 1;

/// `y = Relu(x[N,3] @ W[3,2] + b)`: every output row depends on its input row only.
fn mlp() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Add", &["h", "b"], &["hb"]),
            node("Relu", &["hb"], &["y"]),
        ],
        vec![value("x", F32, &[-1, 3])],
        vec![value("y", F32, &[-1, 2])],
        vec![
            f32_initializer("w", &[3, 2], &[0.5, -1.0, 2.0, 0.25, -0.75, 1.5]),
            f32_initializer("b", &[2], &[0.1, 0.2]),
        ],
        17,
    )
}

/// `y = x[N,256]` pushed through `trips` rounds of `Tanh(h @ W)`: slow enough to keep one
/// instance busy while more requests arrive.
fn slow(trips: i64) -> Vec<u8> {
    let body = graph(
        vec![
            node("MatMul", &["h_in", "w"], &["m"]),
            node("Tanh", &["m"], &["h_out"]),
            node("Identity", &["cond_in"], &["cond_out"]),
        ],
        vec![
            value("i", 7, &[]),
            value("cond_in", 9, &[]),
            value("h_in", F32, &[-1, 256]),
        ],
        vec![value("cond_out", 9, &[]), value("h_out", F32, &[-1, 256])],
    );
    model(
        vec![node_with(
            "Loop",
            &["trips", "", "x"],
            &["y"],
            vec![attr_graph("body", body)],
        )],
        vec![value("x", F32, &[-1, 256])],
        vec![value("y", F32, &[-1, 256])],
        vec![
            f32_initializer("w", &[256, 256], &vec![0.01; 256 * 256]),
            i64_initializer("trips", &[], &[trips]),
        ],
        17,
    )
}

fn write_model(repo: &Path, name: &str, bytes: &[u8], config: &str) {
    let dir = repo.join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.onnx"), bytes).unwrap();
    if !config.is_empty() {
        std::fs::write(repo.join(name).join("config.toml"), config).unwrap();
    }
}

fn request(model: &str, cols: usize, rows: &[Vec<f32>]) -> pb::ModelInferRequest {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, cols as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&flat).into()],
        ..Default::default()
    }
}

async fn stats(d: &Daemon, model: &str) -> (u64, u64) {
    let s = d
        .inference()
        .await
        .model_statistics(pb::ModelStatisticsRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    let m = &s.model_stats[0];
    (m.inference_count, m.execution_count)
}

#[tokio::test]
async fn concurrent_requests_are_merged_and_answered_as_unbatched() {
    let repo = tempfile::tempdir().unwrap();
    write_model(repo.path(), "plain", &mlp(), "max_batch_size = 16\n");
    // A long delay, so the concurrent requests below surely meet in batches.
    write_model(
        repo.path(),
        "batched",
        &mlp(),
        "max_batch_size = 16\n[dynamic_batching]\nmax_queue_delay_us = 200000\n",
    );
    let (d, _plugins) = start_serving(repo.path(), &[]);
    // 12 requests of 1 to 3 rows each, all different.
    let requests: Vec<Vec<Vec<f32>>> = (0..12)
        .map(|r| {
            (0..1 + r % 3)
                .map(|k| {
                    (0..3)
                        .map(|c| (r * 7 + k * 3 + c) as f32 * 0.37 - 4.0)
                        .collect()
                })
                .collect()
        })
        .collect();
    let mut joins = Vec::new();
    for rows in requests.clone() {
        let mut c = d.inference().await;
        joins.push(tokio::spawn(async move {
            c.model_infer(request("batched", 3, &rows))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut plain = d.inference().await;
    for (rows, j) in requests.iter().zip(joins) {
        let got = j.await.unwrap().expect("batched infer");
        let want = plain
            .model_infer(request("plain", 3, rows))
            .await
            .expect("plain infer")
            .into_inner();
        assert_eq!(got.outputs[0].shape, want.outputs[0].shape);
        // Bit for bit: the same kernels on the same rows.
        assert_eq!(got.raw_output_contents, want.raw_output_contents);
    }
    let rows: u64 = requests.iter().map(|r| r.len() as u64).sum();
    let (inferences, executions) = stats(&d, "batched").await;
    assert_eq!(inferences, rows);
    assert!(
        executions < 12,
        "12 concurrent requests ran in {executions} executions: nothing was batched"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_with_the_reason() {
    let repo = tempfile::tempdir().unwrap();
    // One instance, batches of one row: requests queue behind the running one.
    write_model(
        repo.path(),
        "slow",
        &slow(400),
        "max_batch_size = 1\ninstance_count = 1\n[dynamic_batching]\nmax_queue_size = 2\nmax_queue_delay_us = 0\n",
    );
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let rows = vec![vec![0.5f32; 256]];
    let mut joins = Vec::new();
    for _ in 0..8 {
        let mut c = d.inference().await;
        let rows = rows.clone();
        joins.push(tokio::spawn(async move {
            c.model_infer(request("slow", 256, &rows)).await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for j in joins {
        match j.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                assert!(e.message().contains("max_queue_size"), "{}", e.message());
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 1,
        "8 requests against a queue of 2 behind one instance: none refused"
    );
    assert!(ok >= 2, "{ok} answered");
    // Once drained, it serves again.
    d.inference()
        .await
        .model_infer(request("slow", 256, &rows))
        .await
        .expect("serves after the burst");
}

#[tokio::test]
async fn batching_without_a_batch_dimension_is_refused_at_load() {
    let repo = tempfile::tempdir().unwrap();
    write_model(
        repo.path(),
        "nobatch",
        &mlp(),
        "[dynamic_batching]\nmax_queue_delay_us = 100\n",
    );
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let log = d.wait_log("model not loaded");
    assert!(log.contains("needs max_batch_size > 0"), "{log}");
}
