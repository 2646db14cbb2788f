//! `opreg.v1.Registry/Quantize`: a quantization job streamed in (the job, then samples), its
//! progress and result streamed out. The job runs on the compute pool (`quant::job`).

use super::tensor;
use crate::{
    app::App,
    graph::IoSpec,
    quant::{
        data::{self, Sample},
        job::{self, Incoming, Progress},
        QuantError,
    },
};
use opreg_proto::opreg::v1::{self as pb, quantize_event::Event, quantize_request::Msg};
use std::{collections::HashMap, path::PathBuf, sync::Arc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// The stream of events a `Quantize` call answers with.
pub type Events = ReceiverStream<Result<pb::QuantizeEvent, Status>>;

/// Samples waiting between the network and the job: a few, so a fast client cannot make the
/// daemon hold its whole calibration set.
const SAMPLE_QUEUE: usize = 4;

/// A streamed sample as host tensors, checked against the request limits.
fn sample(app: &App, s: pb::CalibrationSample, index: u64) -> Result<Incoming, Status> {
    let max_tensor = usize::try_from(app.config.limits.max_tensor_bytes).unwrap_or(usize::MAX);
    let mut feeds = HashMap::new();
    for t in s.inputs {
        let name = crate::repo::clip(&t.name, 128);
        let dtype = tensor::dtype(&name, &crate::repo::clip(&t.datatype, 128))?;
        let shape = tensor::shape(&name, &t.shape)?;
        tensor::check_bytes(&name, dtype, &shape, max_tensor)?;
        let value = tensor::from_raw(&name, dtype, &shape, &t.raw)?;
        feeds.insert(t.name, Arc::new(value));
    }
    Ok(Incoming {
        sample: Sample {
            origin: format!("streamed sample {index}"),
            feeds,
            labels: (!s.labels.is_empty()).then_some(s.labels),
        },
        heldout: s.heldout,
    })
}

/// Samples from a folder on the daemon's machine, read one at a time.
fn folder(
    dir: PathBuf,
    inputs: Vec<IoSpec>,
    heldout: bool,
) -> Result<impl Iterator<Item = Result<Incoming, QuantError>>, QuantError> {
    let entries = data::entries(&dir)?;
    Ok(entries
        .into_iter()
        .map(move |e| data::read(&e, &inputs).map(|sample| Incoming { sample, heldout })))
}

pub async fn quantize(
    app: Arc<App>,
    mut incoming: Streaming<pb::QuantizeRequest>,
) -> Result<Events, Status> {
    let first = incoming
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("Quantize: the stream ended before the job"))?;
    let Some(Msg::Job(j)) = first.msg else {
        return Err(Status::invalid_argument(
            "Quantize: the first message must be the job (QuantizeJob)",
        ));
    };
    if j.model.is_empty() || j.strategy.is_empty() {
        return Err(Status::invalid_argument(
            "Quantize: the job needs a model and a strategy (ListQuantizers lists them)",
        ));
    }
    // Refused before anything streams: an unknown model.
    let served = app.repo.get(&j.model, &j.version)?;
    let inputs = served.model.inputs.clone();
    let mut options: Vec<(String, String)> = j.options.into_iter().collect();
    options.sort();
    let req = job::Request {
        model: j.model,
        version: j.version,
        strategy: j.strategy,
        options,
    };

    let (sample_tx, mut sample_rx) =
        tokio::sync::mpsc::channel::<Result<Incoming, QuantError>>(SAMPLE_QUEUE);
    let (event_tx, event_rx) = tokio::sync::mpsc::channel(64);
    let reader_app = app.clone();
    tokio::spawn(async move {
        let mut index = 0u64;
        loop {
            let next = match incoming.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    let _ = sample_tx
                        .send(Err(QuantError::Data(format!(
                            "the request stream failed: {}",
                            e.message()
                        ))))
                        .await;
                    break;
                }
            };
            let item = match next.msg {
                Some(Msg::Sample(s)) => {
                    index += 1;
                    sample(&reader_app, s, index).map_err(|s| QuantError::Data(s.message().into()))
                }
                _ => Err(QuantError::Data(
                    "only samples may follow the job in a Quantize stream".into(),
                )),
            };
            let failed = item.is_err();
            if sample_tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });

    let job_app = app.clone();
    let progress_tx = event_tx.clone();
    let (eval_dir, data_dir) = (j.eval_dir, j.data_dir);
    let work = move || -> Result<job::Outcome, QuantError> {
        let mut from_folders: Box<dyn Iterator<Item = Result<Incoming, QuantError>>> =
            Box::new(std::iter::empty());
        if !eval_dir.is_empty() {
            from_folders =
                Box::new(from_folders.chain(folder(eval_dir.into(), inputs.clone(), true)?));
        }
        if !data_dir.is_empty() {
            from_folders = Box::new(from_folders.chain(folder(data_dir.into(), inputs, false)?));
        }
        // Streamed samples follow the folders'. The pool worker waits for them here; the
        // queue between is a few samples long.
        let streamed = std::iter::from_fn(|| sample_rx.blocking_recv());
        let mut samples = from_folders.chain(streamed);
        let closed = progress_tx.clone();
        job::run(
            &req,
            &mut samples,
            &job_app.registry,
            &job_app.repo,
            &mut |p| {
                let progress = match p {
                    Progress::Stage(stage) => pb::QuantizeProgress { stage, samples: 0 },
                    Progress::Calibrated(n) => pb::QuantizeProgress {
                        stage: "calibrating".into(),
                        samples: n,
                    },
                };
                // Progress is advisory: a slow reader misses some, never blocks the job.
                let _ = progress_tx.try_send(Ok(pb::QuantizeEvent {
                    event: Some(Event::Progress(progress)),
                }));
            },
            &|| closed.is_closed(),
        )
    };
    tokio::spawn(async move {
        let result = match app.compute.run(work).await {
            Ok(Ok(outcome)) => {
                tracing::info!(
                    model = %outcome.report.model,
                    version = ?outcome.report.version,
                    strategy = %outcome.report.strategy,
                    sqnr_db = ?outcome.report.error.sqnr_db,
                    "quantized"
                );
                Ok(pb::QuantizeEvent {
                    event: Some(Event::Result(pb::QuantizeResult {
                        model: outcome.report.model.clone(),
                        version: outcome.report.version.unwrap_or(0),
                        report_json: outcome.report.to_json(),
                        directory: outcome
                            .dir
                            .map(|d| d.display().to_string())
                            .unwrap_or_default(),
                        model_bytes: outcome.model_bytes as u64,
                    })),
                })
            }
            Ok(Err(e)) => {
                tracing::warn!("quantization failed: {e}");
                Err(Status::from(e))
            }
            Err(e) => Err(Status::from(e)),
        };
        let _ = event_tx.send(result).await;
    });
    Ok(ReceiverStream::new(event_rx))
}
