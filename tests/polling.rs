//! Repository polling (`--model-control-mode poll`): a model folder written into the
//! repository is loaded, a new version is served, a broken version leaves the ready ones
//! serving, a removed folder is unloaded; a file being written under a dot-name is never taken;
//! `none` refuses load calls.

use opreg_proto::inference as pb;
use opreg_tests::{onnx::*, *};
use std::{path::Path, time::Duration};
use tonic::Code;

const F32: i32 = 1;

/// `y = x[1,2] * k`.
fn scale(k: f32) -> Vec<u8> {
    model(
        vec![node("Mul", &["x", "k"], &["y"])],
        vec![value("x", F32, &[1, 2])],
        vec![value("y", F32, &[1, 2])],
        vec![f32_initializer("k", &[1], &[k])],
        17,
    )
}

fn write_version(repo: &Path, name: &str, version: u64, bytes: &[u8]) {
    let dir = repo.join(name).join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    // Written under a dot-name, then renamed: the poller never sees a partial file.
    let tmp = dir.join(".model.onnx.part");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join("model.onnx")).unwrap();
}

async fn ready(d: &Daemon, name: &str) -> bool {
    d.inference()
        .await
        .model_ready(pb::ModelReadyRequest {
            name: name.into(),
            version: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().ready)
}

/// Waits (up to 20 s) until `check` holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn infer(d: &Daemon, name: &str, version: &str) -> Result<Vec<f32>, tonic::Status> {
    let r = d
        .inference()
        .await
        .model_infer(pb::ModelInferRequest {
            model_name: name.into(),
            model_version: version.into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![f32_bytes(&[1.0, -2.0]).into()],
            ..Default::default()
        })
        .await?;
    Ok(f32_values(&r.into_inner().raw_output_contents[0]))
}

#[tokio::test]
async fn model_folders_are_loaded_reloaded_and_unloaded_as_they_change() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(
        repo.path(),
        &[
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "0.1",
        ],
    );
    assert!(!ready(&d, "scale").await);

    // A new folder.
    write_version(repo.path(), "scale", 1, &scale(2.0));
    eventually("the new model to load", || ready(&d, "scale")).await;
    assert_eq!(infer(&d, "scale", "").await.unwrap(), vec![2.0, -4.0]);

    // A new version: served as the newest.
    write_version(repo.path(), "scale", 2, &scale(3.0));
    eventually("version 2 to serve", || async {
        infer(&d, "scale", "")
            .await
            .is_ok_and(|y| y == vec![3.0, -6.0])
    })
    .await;

    // A broken version: the reload fails, the ready versions keep serving.
    write_version(repo.path(), "scale", 3, b"not a model");
    d.wait_log("poll: load failed");
    assert_eq!(infer(&d, "scale", "2").await.unwrap(), vec![3.0, -6.0]);
    assert_eq!(infer(&d, "scale", "1").await.unwrap(), vec![2.0, -4.0]);

    // A file being written under a dot-name is not taken.
    let v4 = repo.path().join("scale").join("4");
    std::fs::create_dir_all(&v4).unwrap();
    std::fs::remove_dir_all(repo.path().join("scale").join("3")).unwrap();
    let bytes = scale(5.0);
    std::fs::write(v4.join(".model.onnx.part"), &bytes[..bytes.len() / 2]).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        infer(&d, "scale", "4").await.is_err(),
        "a partial file was loaded"
    );
    std::fs::write(v4.join(".model.onnx.part"), &bytes).unwrap();
    std::fs::rename(v4.join(".model.onnx.part"), v4.join("model.onnx")).unwrap();
    eventually("version 4 to serve", || async {
        infer(&d, "scale", "4")
            .await
            .is_ok_and(|y| y == vec![5.0, -10.0])
    })
    .await;

    // The folder removed: unloaded.
    std::fs::remove_dir_all(repo.path().join("scale")).unwrap();
    eventually("the model to unload", || async {
        !ready(&d, "scale").await
    })
    .await;
    let e = infer(&d, "scale", "").await.unwrap_err();
    assert!(
        matches!(e.code(), Code::NotFound | Code::Unavailable),
        "{e:?}"
    );
}

#[tokio::test]
async fn mode_none_refuses_load_calls() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &["--model-control-mode", "none"]);
    let e = d
        .inference()
        .await
        .repository_model_load(load_request("scale", scale(1.0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("'none'"), "{}", e.message());
}
