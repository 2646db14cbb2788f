//! `ModelInfer`: check a request against the model, run it, build the response.

use super::tensor;
use crate::{app::App, graph::Dim, repo::ServedModel};
use opreg_proto::inference as pb;
use opreg_sdk::host::HostTensor;
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};
use tonic::Status;

/// Runs one inference request.
pub async fn infer(
    app: &Arc<App>,
    req: pb::ModelInferRequest,
) -> Result<pb::ModelInferResponse, Status> {
    let model = app.repo.get(&req.model_name, &req.model_version)?;
    let started = Instant::now();
    let result = run(app, &model, req).await;
    let ns = started.elapsed().as_nanos() as u64;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    model.record(|s| match &result {
        Ok((_, timing)) => {
            s.success.0 += 1;
            s.success.1 += ns;
            s.inference_count += timing.batch;
            s.execution_count += 1;
            s.last_inference_ms = now_ms;
            s.compute_input.0 += 1;
            s.compute_input.1 += timing.input_ns;
            s.compute_infer.0 += 1;
            s.compute_infer.1 += timing.infer_ns;
            s.compute_output.0 += 1;
            s.compute_output.1 += timing.output_ns;
        }
        Err(_) => {
            s.fail.0 += 1;
            s.fail.1 += ns;
        }
    });
    result.map(|(r, _)| r)
}

struct Timing {
    batch: u64,
    input_ns: u64,
    infer_ns: u64,
    output_ns: u64,
}

async fn run(
    app: &Arc<App>,
    model: &Arc<ServedModel>,
    req: pb::ModelInferRequest,
) -> Result<(pb::ModelInferResponse, Timing), Status> {
    let t0 = Instant::now();
    let feeds = decode_inputs(model, &req)?;
    let batch = if model.settings.max_batch_size > 0 {
        feeds
            .values()
            .next()
            .and_then(|t| t.shape().first().copied())
            .unwrap_or(1) as u64
    } else {
        1
    };
    let wanted: Vec<String> = if req.outputs.is_empty() {
        model.model.outputs.iter().map(|o| o.name.clone()).collect()
    } else {
        req.outputs
            .iter()
            .map(|o| {
                if model.model.outputs.iter().any(|m| m.name == o.name) {
                    Ok(o.name.clone())
                } else {
                    Err(Status::invalid_argument(format!(
                        "unknown output '{}' requested from model '{}'",
                        o.name, model.name
                    )))
                }
            })
            .collect::<Result<_, _>>()?
    };
    let input_ns = t0.elapsed().as_nanos() as u64;

    let t1 = Instant::now();
    let snapshot = app.registry.snapshot();
    let m = model.clone();
    let outputs = app
        .compute
        .run(move || -> Result<_, Status> {
            let plan = m.plan(&snapshot)?;
            let feeds = feeds.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
            Ok(crate::graph::run(&plan, feeds)?)
        })
        .await
        .map_err(Status::from)??;
    let infer_ns = t1.elapsed().as_nanos() as u64;

    let t2 = Instant::now();
    let by_name: HashMap<&str, &Arc<HostTensor>> =
        outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut resp = pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id: req.id,
        ..Default::default()
    };
    for name in wanted {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| Status::internal(format!("output '{name}' missing from the run")))?;
        resp.outputs
            .push(pb::model_infer_response::InferOutputTensor {
                name,
                datatype: t.dtype().kserve_name().into(),
                shape: t.shape().iter().map(|&d| d as i64).collect(),
                ..Default::default()
            });
        // tritonclient reads outputs only from raw_output_contents, by position.
        resp.raw_output_contents.push(tensor::to_raw(t));
    }
    let output_ns = t2.elapsed().as_nanos() as u64;
    Ok((
        resp,
        Timing {
            batch,
            input_ns,
            infer_ns,
            output_ns,
        },
    ))
}

/// Checks each input against the model's declaration (name, datatype, rank, fixed dims, byte
/// length) and decodes it. Every error names the tensor.
fn decode_inputs(
    model: &ServedModel,
    req: &pb::ModelInferRequest,
) -> Result<HashMap<String, HostTensor>, Status> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(Status::invalid_argument(format!(
            "{} inputs but {} raw_input_contents entries",
            req.inputs.len(),
            req.raw_input_contents.len()
        )));
    }
    let mut feeds = HashMap::new();
    for (i, input) in req.inputs.iter().enumerate() {
        let name = input.name.as_str();
        let spec = model
            .model
            .inputs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = model.model.inputs.iter().map(|s| s.name.as_str()).collect();
                Status::invalid_argument(format!(
                    "unknown input '{name}' for model '{}' (inputs: {names:?})",
                    model.name
                ))
            })?;
        if feeds.contains_key(name) {
            return Err(Status::invalid_argument(format!(
                "input '{name}' given twice"
            )));
        }
        let dtype = tensor::dtype(name, &input.datatype)?;
        if dtype != spec.dtype {
            return Err(Status::invalid_argument(format!(
                "input '{name}' has datatype {dtype}, model '{}' expects {}",
                model.name, spec.dtype
            )));
        }
        let shape = tensor::shape(name, &input.shape)?;
        if let Some(decl) = &spec.shape {
            let fits = decl.len() == shape.len()
                && decl
                    .iter()
                    .zip(&shape)
                    .all(|(d, &s)| !matches!(d, Dim::Fixed(n) if *n != s));
            if !fits {
                return Err(Status::invalid_argument(format!(
                    "input '{name}' has shape {:?}, model '{}' expects {:?}",
                    input.shape,
                    model.name,
                    spec.kserve_shape()
                )));
            }
        }
        if model.settings.max_batch_size > 0
            && shape
                .first()
                .is_some_and(|&b| b > model.settings.max_batch_size as usize)
        {
            return Err(Status::invalid_argument(format!(
                "input '{name}': batch {} exceeds max_batch_size {}",
                shape[0], model.settings.max_batch_size
            )));
        }
        let t = if raw {
            tensor::from_raw(name, dtype, &shape, &req.raw_input_contents[i])?
        } else {
            let contents = input.contents.as_ref().ok_or_else(|| {
                Status::invalid_argument(format!("input '{name}' has no contents"))
            })?;
            let bytes = tensor::typed_to_raw(name, dtype, shape.iter().product(), contents)?;
            tensor::from_raw(name, dtype, &shape, &bytes)?
        };
        feeds.insert(name.to_string(), t);
    }
    if let Some(missing) = model
        .model
        .inputs
        .iter()
        .find(|s| !feeds.contains_key(&s.name))
    {
        return Err(Status::invalid_argument(format!(
            "missing input '{}' for model '{}'",
            missing.name, model.name
        )));
    }
    Ok(feeds)
}
