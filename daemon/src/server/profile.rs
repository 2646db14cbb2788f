//! `opreg.v1.Registry/ProfileModel`: a loaded model run on zero inputs, timed per step.

use crate::{
    app::App,
    feeds,
    graph::{self, GraphError, RunControl},
};
use opreg_proto::opreg::v1 as pb;
use std::{sync::Arc, time::Instant};
use tonic::Status;

const MAX_RUNS: u32 = 1000;

pub async fn profile(
    app: &Arc<App>,
    r: pb::ProfileModelRequest,
    deadline: Option<Instant>,
) -> Result<pb::ProfileModelResponse, Status> {
    let model = app.repo.get(&r.name, &r.version)?;
    let runs = match r.runs {
        0 => 10,
        n if n <= MAX_RUNS => n,
        n => {
            return Err(Status::invalid_argument(format!(
                "runs {n} is more than {MAX_RUNS}"
            )))
        }
    };
    let batch = match r.batch {
        0 => 1,
        b if b > 0 => usize::try_from(b).unwrap_or(usize::MAX),
        b => return Err(Status::invalid_argument(format!("batch {b} is negative"))),
    };
    let limits = &app.config.limits;
    let max_tensor = usize::try_from(limits.max_tensor_bytes).unwrap_or(usize::MAX);
    let max_live = usize::try_from(limits.max_request_bytes).unwrap_or(usize::MAX);
    let feeds = feeds::synthesize(
        &model.model.inputs,
        &feeds::Shapes::all(batch),
        feeds::Fill::Zero,
        max_tensor,
    )
    .map_err(|e| match e {
        feeds::FeedsError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        feeds::FeedsError::Alloc { .. } => Status::internal(e.to_string()),
        _ => Status::failed_precondition(format!("{e} (profile it with real requests)")),
    })?;
    let snapshot = app.registry.snapshot();
    let m = model.clone();
    let job = app.compute.run(move || -> Result<_, Status> {
        let plan = m.plan(&snapshot)?;
        let steps = plan.steps();
        let mut total = vec![(0u64, 0u64, 0u64); steps.len()];
        let mut run_ns = 0u64;
        for run in 0..=runs {
            let control = RunControl::new(max_tensor, max_live, deadline);
            let started = Instant::now();
            let (_, times) = graph::run_profiled(&plan, feeds.clone(), &control)
                .map_err(|e: GraphError| Status::from(e))?;
            // The first run warms caches and pools: not counted.
            if run == 0 {
                continue;
            }
            run_ns += started.elapsed().as_nanos() as u64;
            for t in times {
                if let Some(slot) = total.get_mut(t.step) {
                    slot.0 += 1;
                    slot.1 += (t.seconds * 1e9) as u64;
                    slot.2 = t.output_bytes as u64;
                }
            }
        }
        Ok((steps, total, run_ns))
    });
    let (steps, total, run_ns) = job.await.map_err(Status::from)??;
    Ok(pb::ProfileModelResponse {
        name: model.name.clone(),
        version: model.version.to_string(),
        runs,
        mean_run_ns: run_ns / u64::from(runs.max(1)),
        steps: steps
            .into_iter()
            .zip(total)
            .map(|(s, (calls, ns, bytes))| pb::StepProfile {
                step: s.label,
                kernel: s.kernel,
                plugin: s.plugin,
                device: s.device.to_string(),
                calls,
                total_ns: ns,
                output_bytes: bytes,
            })
            .collect(),
    })
}
