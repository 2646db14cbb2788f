//! `ModelInfer`: check a request against the model, run it, build the response.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::tensor;
use crate::{
    app::App,
    graph::{Dim, GraphError, RunControl},
    repo::{clip, ServedModel},
};
use opreg_proto::inference as pb;
use opreg_sdk::host::HostTensor;
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tonic::Status;

/// The response parameter naming the registry generation whose plugins computed it.
pub const GENERATION_PARAMETER: &str = "opreg_generation";

/// Longest piece of a client-supplied name echoed in an error.
const ECHO: usize = 128;

/// The deadline a client asked for in the `grpc-timeout` header (`<digits><unit>`, units
/// H, M, S, m, u, n), if any.
pub fn client_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    // The protocol allows at most 8 digits.
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Cancels a run when the request's future is dropped: the client went away, or tonic gave
/// up on the client's deadline. The compute job then stops at its next node boundary.
struct CancelOnDrop(Arc<RunControl>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Runs one inference request; `client_deadline` from the call's `grpc-timeout`, if any.
pub async fn infer(
    app: &Arc<App>,
    req: pb::ModelInferRequest,
    client_deadline: Option<Duration>,
) -> Result<pb::ModelInferResponse, Status> {
    let model = app.repo.get(&req.model_name, &req.model_version)?;
    let started = Instant::now();
    let deadline = app
        .config
        .limits
        .call_timeout(client_deadline)
        .map(|t| started + t);
    let result = run(app, &model, req, deadline).await;
    let ns = started.elapsed().as_nanos() as u64;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    record_metrics(app, &model, &result, ns);
    model.record(|s| match &result {
        Ok((_, timing)) => {
            s.success.0 += 1;
            s.success.1 += ns;
            s.inference_count += timing.batch;
            s.execution_count += u64::from(timing.executed);
            s.last_inference_ms = now_ms;
            s.queue.0 += 1;
            s.queue.1 += timing.queue_ns;
            s.compute_input.0 += 1;
            s.compute_input.1 += timing.input_ns;
            s.compute_infer.0 += 1;
            s.compute_infer.1 += timing.infer_ns;
            s.compute_output.0 += 1;
            s.compute_output.1 += timing.output_ns;
            s.device_copies += timing.copies;
            s.device_copy_bytes += timing.copy_bytes;
        }
        Err(_) => {
            s.fail.0 += 1;
            s.fail.1 += ns;
        }
    });
    result.map(|(r, _)| r)
}

/// What one model run gave a request.
pub(super) struct Executed {
    pub outputs: Vec<(String, Arc<HostTensor>)>,
    pub generation: u64,
    /// Waiting for a batch and for the compute pool.
    pub queue_ns: u64,
    pub peak_bytes: usize,
    pub copies: u64,
    pub copy_bytes: u64,
    /// Whether this request counts the run as an execution (one per batched run).
    pub executed: bool,
}

/// Runs `model` on `feeds` on the compute pool under `control` (and the model's instance
/// limit), stopping at `deadline`. A kernel fault counts against its plugin's quarantine.
pub(super) async fn execute(
    app: &Arc<App>,
    model: &Arc<ServedModel>,
    feeds: HashMap<String, Arc<HostTensor>>,
    control: Arc<RunControl>,
    deadline: Option<Instant>,
    on_start: Option<Box<dyn FnOnce() + Send>>,
) -> Result<Executed, Status> {
    let submitted = Instant::now();
    // At most `instance_count` runs of this version at once; the rest wait here (queue time).
    let _instance = match &model.instances {
        Some(s) => Some(
            s.clone()
                .acquire_owned()
                .await
                .map_err(|_| Status::unavailable("the model is shutting down"))?,
        ),
        None => None,
    };
    let snapshot = app.registry.snapshot();
    let m = model.clone();
    let queue_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let job = app.compute.run({
        let control = control.clone();
        let queue_ns = queue_ns.clone();
        move || -> Result<_, Status> {
            queue_ns.store(
                submitted.elapsed().as_nanos() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Some(f) = on_start {
                f();
            }
            // A request that waited past its deadline in the queue stops at the plan's first
            // node (run_with_control checks before every step) and frees its inputs there.
            let plan = m.plan(&snapshot)?;
            let result = crate::graph::run_with_control(&plan, feeds, &control)
                .map(|o| (o, plan.generation()));
            if let Err(e @ (GraphError::Cancelled { .. } | GraphError::DeadlineExceeded { .. })) =
                &result
            {
                // The client may be gone: this log line is the only trace of the stop.
                tracing::info!(model = %m.name, version = m.version, "{e}; memory released");
            }
            match result {
                Ok(r) => Ok(Ok(r)),
                Err(e) => {
                    let fault = e.plugin_fault().map(str::to_string);
                    Ok(Err((Status::from(e), fault)))
                }
            }
        }
    });
    let outputs = match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), job).await.map_err(|_| {
            control.cancel();
            Status::deadline_exceeded(format!(
                "model '{}' did not answer within the deadline",
                model.name
            ))
        })?,
        None => job.await,
    }
    .map_err(Status::from)??;
    let (outputs, generation) = match outputs {
        Ok(o) => o,
        Err((status, fault)) => {
            if let Some(plugin) = fault {
                crate::swap::quarantine::on_fault(app, &plugin);
            }
            return Err(status);
        }
    };
    let (copies, copy_bytes) = control.copies();
    Ok(Executed {
        outputs,
        generation,
        queue_ns: queue_ns.load(std::sync::atomic::Ordering::Relaxed),
        peak_bytes: control.peak_bytes(),
        copies,
        copy_bytes,
        executed: true,
    })
}

/// Counts the request in the Prometheus metrics (Triton's names).
fn record_metrics(
    app: &App,
    model: &ServedModel,
    result: &Result<(pb::ModelInferResponse, Timing), Status>,
    ns: u64,
) {
    let m = &app.metrics;
    let version = model.version.to_string();
    let labels = [model.name.as_str(), version.as_str()];
    let us = |ns: u64| ns / 1000;
    m.request_duration_us
        .with_label_values(&labels)
        .inc_by(us(ns));
    match result {
        Ok((_, t)) => {
            m.request_success.with_label_values(&labels).inc();
            m.inference_count.with_label_values(&labels).inc_by(t.batch);
            m.exec_count
                .with_label_values(&labels)
                .inc_by(u64::from(t.executed));
            m.queue_duration_us
                .with_label_values(&labels)
                .inc_by(us(t.queue_ns));
            m.compute_input_duration_us
                .with_label_values(&labels)
                .inc_by(us(t.input_ns));
            m.compute_infer_duration_us
                .with_label_values(&labels)
                .inc_by(us(t.infer_ns));
            m.compute_output_duration_us
                .with_label_values(&labels)
                .inc_by(us(t.output_ns));
            m.device_copies.with_label_values(&labels).inc_by(t.copies);
            m.device_copy_bytes
                .with_label_values(&labels)
                .inc_by(t.copy_bytes);
            m.request_peak_bytes.observe(t.peak_bytes as f64);
        }
        Err(status) => {
            use tonic::Code;
            // Triton's failure reasons.
            let reason = match status.code() {
                Code::Cancelled | Code::DeadlineExceeded => "CANCELED",
                Code::Unavailable | Code::ResourceExhausted => "REJECTED",
                Code::Internal => "BACKEND",
                _ => "OTHER",
            };
            if reason == "CANCELED" {
                m.cancelled.with_label_values(&labels).inc();
            }
            m.request_failure
                .with_label_values(&[labels[0], labels[1], reason])
                .inc();
        }
    }
}

struct Timing {
    batch: u64,
    /// False for all but one request of a dynamically batched run (it counts one execution).
    executed: bool,
    /// Waiting for the compute pool.
    queue_ns: u64,
    /// The most bytes the run's values held at once.
    peak_bytes: usize,
    input_ns: u64,
    infer_ns: u64,
    output_ns: u64,
    /// Copy steps at device boundaries the run executed, and their bytes.
    copies: u64,
    copy_bytes: u64,
}

async fn run(
    app: &Arc<App>,
    model: &Arc<ServedModel>,
    req: pb::ModelInferRequest,
    deadline: Option<Instant>,
) -> Result<(pb::ModelInferResponse, Timing), Status> {
    let t0 = Instant::now();
    let limits = &app.config.limits;
    let max_tensor = usize::try_from(limits.max_tensor_bytes).unwrap_or(usize::MAX);
    let max_live = usize::try_from(limits.max_request_bytes).unwrap_or(usize::MAX);
    let feeds = decode_inputs(model, &req, max_tensor)?;
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
                        clip(&o.name, ECHO),
                        model.name
                    )))
                }
            })
            .collect::<Result<_, _>>()?
    };
    let input_ns = t0.elapsed().as_nanos() as u64;

    let t1 = Instant::now();
    let feeds: HashMap<String, Arc<HostTensor>> =
        feeds.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
    // Inputs kept past the run (shared, not copied), for a sampled request only: they stay
    // alive for its whole run. An adaptive version samples them, and a plugin swap is
    // verified on the last few kept.
    let for_swaps = model.sample_for_swaps();
    let kept = (for_swaps || model.adaptive.is_some()).then(|| feeds.clone());
    let done = match &model.settings.dynamic_batching {
        Some(cfg) => super::batch::submit(app, model, cfg, feeds, batch as usize, deadline).await?,
        None => {
            let control = Arc::new(RunControl::new(max_tensor, max_live, deadline));
            let _cancel = CancelOnDrop(control.clone());
            execute(app, model, feeds, control, deadline, None).await?
        }
    };
    let Executed {
        outputs,
        generation,
        queue_ns,
        peak_bytes,
        copies,
        copy_bytes,
        executed,
    } = done;
    let infer_ns = (t1.elapsed().as_nanos() as u64).saturating_sub(queue_ns);
    if let Some(kept) = &kept {
        if for_swaps {
            model.remember(kept);
        }
        if let Some(adaptive) = &model.adaptive {
            if adaptive.offer(kept) {
                crate::quant::adaptive::spawn_check(app.clone(), model.clone());
            }
        }
    }

    let t2 = Instant::now();
    let by_name: HashMap<&str, &Arc<HostTensor>> =
        outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut resp = pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id: req.id,
        // Which plugin generation computed the answer (a swap changes it).
        parameters: HashMap::from([(
            GENERATION_PARAMETER.to_string(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(
                    i64::try_from(generation).unwrap_or(i64::MAX),
                )),
            },
        )]),
        ..Default::default()
    };
    for name in wanted {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| Status::internal(format!("output '{name}' missing from the run")))?;
        if !t.on_host() {
            // The plan copies every output to the host; anything else is a bug, not data.
            return Err(Status::internal(format!(
                "output '{name}' is still in device memory (a bug in opreg, please report it)"
            )));
        }
        resp.outputs
            .push(pb::model_infer_response::InferOutputTensor {
                name,
                datatype: t.dtype().kserve_name().into(),
                shape: t.shape().iter().map(|&d| d as i64).collect(),
                ..Default::default()
            });
        // tritonclient reads outputs only from raw_output_contents, by position.
        resp.raw_output_contents.push(tensor::shared_raw(t));
    }
    let output_ns = t2.elapsed().as_nanos() as u64;
    Ok((
        resp,
        Timing {
            batch,
            executed,
            queue_ns,
            peak_bytes,
            input_ns,
            infer_ns,
            output_ns,
            copies,
            copy_bytes,
        },
    ))
}

/// Checks each input against the model's declaration (name, datatype, rank, fixed dims, byte
/// length) and decodes it. Every error names the tensor.
pub fn decode_inputs(
    model: &ServedModel,
    req: &pb::ModelInferRequest,
    max_tensor_bytes: usize,
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
        let full_name = input.name.as_str();
        let shown = clip(full_name, ECHO);
        let name = shown.as_str();
        let spec = model
            .model
            .inputs
            .iter()
            .find(|s| s.name == full_name)
            .ok_or_else(|| {
                let names: Vec<&str> = model.model.inputs.iter().map(|s| s.name.as_str()).collect();
                Status::invalid_argument(format!(
                    "unknown input '{name}' for model '{}' (inputs: {names:?})",
                    model.name
                ))
            })?;
        if feeds.contains_key(full_name) {
            return Err(Status::invalid_argument(format!(
                "input '{name}' given twice"
            )));
        }
        let dtype = tensor::dtype(name, &clip(&input.datatype, ECHO))?;
        if dtype != spec.dtype {
            return Err(Status::invalid_argument(format!(
                "input '{name}' has datatype {dtype}, model '{}' expects {}",
                model.name, spec.dtype
            )));
        }
        let shape = tensor::shape(name, &input.shape)?;
        tensor::check_bytes(name, dtype, &shape, max_tensor_bytes)?;
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
                shape.first().copied().unwrap_or(0),
                model.settings.max_batch_size
            )));
        }
        let t = if raw {
            let bytes = req.raw_input_contents.get(i).ok_or_else(|| {
                Status::invalid_argument(format!("input '{name}' has no raw contents"))
            })?;
            tensor::from_raw(name, dtype, &shape, bytes)?
        } else {
            let contents = input.contents.as_ref().ok_or_else(|| {
                Status::invalid_argument(format!("input '{name}' has no contents"))
            })?;
            let bytes = tensor::typed_to_raw(name, dtype, shape.iter().product(), contents)?;
            tensor::from_raw(name, dtype, &shape, &bytes)?
        };
        feeds.insert(full_name.to_string(), t);
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
