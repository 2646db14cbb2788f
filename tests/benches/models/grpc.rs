//! The gRPC side of the model benchmarks: a release `opregd` (the workspace's operator and CPU
//! BLAS plugins) serving one model, driven by one client sending the same request back to
//! back, as a user of the KServe v2 API would call it.

use opreg_proto::inference as pb;
use opreg_tests::{start_serving, Daemon};
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// A daemon serving one model file as `name` (version 1), ready to infer.
pub struct Served {
    pub daemon: Daemon,
    pub name: String,
    _repo: tempfile::TempDir,
    _plugins: tempfile::TempDir,
}

/// Serves `model` (ONNX bytes) as `name` and waits until it is ready (at most two minutes:
/// ResNet-50 loads in well under a second).
pub async fn serve(name: &str, model: &[u8]) -> Result<Served, String> {
    let repo = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = repo.path().join(name).join("1");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("model.onnx"), model).map_err(|e| e.to_string())?;
    let (daemon, plugins) = start_serving(repo.path(), &[]);
    let mut c = daemon.inference().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = c
            .model_ready(pb::ModelReadyRequest {
                name: name.into(),
                version: String::new(),
            })
            .await
            .is_ok_and(|r| r.into_inner().ready);
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{name} did not become ready:\n{}", daemon.log()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Served {
        daemon,
        name: name.into(),
        _repo: repo,
        _plugins: plugins,
    })
}

/// Serves the model file at `path` (see [`serve`]).
pub async fn serve_file(name: &str, path: &Path) -> Result<Served, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serve(name, &bytes).await
}

/// The request `opreg bench` would make for this model: inputs from the declared shapes (a
/// symbolic first dimension is `batch`; `given` holds whole shapes as `NAME:D1xD2...`),
/// floats spread over [-1, 1), everything else zero.
pub async fn request(
    s: &Served,
    batch: usize,
    given: &[String],
) -> Result<pb::ModelInferRequest, String> {
    let meta = s
        .daemon
        .inference()
        .await
        .model_metadata(pb::ModelMetadataRequest {
            name: s.name.clone(),
            version: String::new(),
        })
        .await
        .map_err(|e| format!("metadata: {e}"))?
        .into_inner();
    let mut req = pb::ModelInferRequest {
        model_name: s.name.clone(),
        ..Default::default()
    };
    for input in meta.inputs {
        let prefix = format!("{}:", input.name);
        let shape: Vec<i64> = match given.iter().find_map(|g| g.strip_prefix(&prefix)) {
            Some(dims) => dims
                .split('x')
                .map(|d| d.parse().map_err(|e| format!("{dims}: {e}")))
                .collect::<Result<_, _>>()?,
            None => input
                .shape
                .iter()
                .enumerate()
                .map(|(k, &d)| match d {
                    d if d >= 0 => Ok(d),
                    _ if k == 0 => Ok(batch as i64),
                    _ => Err(format!("{}: give the shape of dimension {k}", input.name)),
                })
                .collect::<Result<_, _>>()?,
        };
        let count: usize = shape.iter().map(|&d| d as usize).product();
        let bytes = match input.datatype.as_str() {
            "FP32" => (0..count)
                .flat_map(|i| (((i * 7919) % 2000) as f32 / 1000.0 - 1.0).to_le_bytes())
                .collect(),
            "FP64" | "INT64" | "UINT64" => vec![0; count * 8],
            "INT32" | "UINT32" => vec![0; count * 4],
            "FP16" | "BF16" | "INT16" | "UINT16" => vec![0; count * 2],
            "INT8" | "UINT8" | "BOOL" => vec![0; count],
            other => return Err(format!("{}: datatype {other}", input.name)),
        };
        req.inputs.push(pb::model_infer_request::InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(bytes);
    }
    Ok(req)
}

/// Median and p90 (ms) of `req` sent back to back on one connection: 5 warm-up calls, then at
/// least 30 and until 2 s have passed (as `opreg bench` and the onnxruntime peer time).
pub async fn latency(s: &Served, req: &pb::ModelInferRequest) -> Result<(f64, f64), String> {
    let mut c = s.daemon.inference().await;
    for _ in 0..5 {
        c.model_infer(req.clone())
            .await
            .map_err(|e| format!("infer: {e}"))?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 30 || (start.elapsed().as_secs_f64() < 2.0 && times.len() < 10_000) {
        // The clone is the client's own cost of building a request, outside the timed call.
        let r = req.clone();
        let t = Instant::now();
        c.model_infer(r).await.map_err(|e| format!("infer: {e}"))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() * 9 / 10]))
}
