//! Dynamic batching (`[dynamic_batching]` in a model's `config.toml`): concurrent requests to
//! one model version are merged along the batch dimension (the first) into one run and the
//! outputs split back, as Triton's dynamic batcher does.
//!
//! One collector task per model version takes requests from its queue; a request counts as
//! queued from its arrival until its batch starts on the compute pool (waiting for the batch,
//! for a free instance and for the pool), and past `max_queue_size` queued requests a new one
//! is refused with `UNAVAILABLE` and the reason. The first request of a batch waits at most
//! `max_queue_delay_us` for others, and the batch goes as soon as it reaches
//! `max_batch_size` or a preferred size. Only requests whose inputs agree in names, types and
//! every dimension but the first are merged; one that does not starts the next batch. Each
//! batch runs as its own task, so the next one gathers while it computes. A request's own
//! deadline still bounds its wait; the batch runs until the latest deadline of its members.

// Request data reaches this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::infer::{execute, Executed};
use crate::{
    app::App,
    graph::RunControl,
    repo::{DynamicBatching, ServedModel},
};
use opreg_sdk::{host::HostTensor, DType};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

type Feeds = HashMap<String, Arc<HostTensor>>;

/// A request waiting for a batch.
struct Pending {
    /// Held while the request is queued; its drop makes room.
    ticket: Option<Ticket>,
    feeds: Feeds,
    batch: usize,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Executed, Status>>,
}

/// Counts a request as queued until dropped.
struct Ticket(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The queue of one model version, with the version it belongs to (a reloaded version gets a
/// new queue) and how many of its requests are queued.
struct Queue {
    model: Weak<ServedModel>,
    tx: mpsc::UnboundedSender<Pending>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// Every model version's batching queue.
#[derive(Default)]
pub struct Batchers {
    queues: Mutex<HashMap<(String, u64), Queue>>,
}

impl Batchers {
    /// The queue of `model`, started on first use.
    fn queue(
        &self,
        app: &Arc<App>,
        model: &Arc<ServedModel>,
        cfg: &DynamicBatching,
    ) -> (
        mpsc::UnboundedSender<Pending>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let key = (model.name.clone(), model.version);
        if let Some(q) = queues.get(&key) {
            if Weak::ptr_eq(&q.model, &Arc::downgrade(model)) {
                return (q.tx.clone(), q.queued.clone());
            }
        }
        // Unbounded: the bound is `queued`, which also counts requests the collector already
        // took but that have not started.
        // Versions that were unloaded or replaced: their collectors end with their senders.
        // Swept here, when a queue is made, not on every request.
        queues.retain(|_, q| q.model.strong_count() > 0);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(collect(
            Arc::downgrade(app),
            Arc::downgrade(model),
            rx,
            cfg.clone(),
        ));
        queues.insert(
            key,
            Queue {
                model: Arc::downgrade(model),
                tx: tx.clone(),
                queued: queued.clone(),
            },
        );
        (tx, queued)
    }
}

/// Queues a request of `batch` rows for `model`'s next batch and waits for its share.
pub(super) async fn submit(
    app: &Arc<App>,
    model: &Arc<ServedModel>,
    cfg: &DynamicBatching,
    feeds: Feeds,
    batch: usize,
    deadline: Option<Instant>,
) -> Result<Executed, Status> {
    let (tx, queued) = app.batchers.queue(app, model, cfg);
    let before = queued.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let ticket = Ticket(queued);
    if before >= cfg.max_queue_size {
        return Err(Status::unavailable(format!(
            "model '{}' version {}: the batching queue is full ({before} requests queued, its max_queue_size is {}); retry later",
            model.name, model.version, cfg.max_queue_size
        )));
    }
    let (reply, rx) = oneshot::channel();
    let pending = Pending {
        ticket: Some(ticket),
        feeds,
        batch,
        deadline,
        enqueued: Instant::now(),
        reply,
    };
    tx.send(pending)
        .map_err(|_| Status::unavailable(format!("model '{}' is being unloaded", model.name)))?;
    let answer = match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), rx).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "model '{}' did not answer within the deadline",
                model.name
            ))
        })?,
        None => rx.await,
    };
    answer.map_err(|_| Status::internal("the batcher dropped the request (a bug in opreg)"))?
}

/// Whether `b` can join a batch that starts with `a`: the same inputs, types and
/// non-batch dimensions.
fn compatible(a: &Feeds, b: &Feeds) -> bool {
    a.len() == b.len()
        && a.iter().all(|(name, x)| {
            b.get(name).is_some_and(|y| {
                x.dtype() == y.dtype()
                    && x.shape().len() == y.shape().len()
                    && x.shape().get(1..) == y.shape().get(1..)
            })
        })
}

/// The collector of one model version: gathers batches and starts each as its own task.
async fn collect(
    app: Weak<App>,
    model: Weak<ServedModel>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    cfg: DynamicBatching,
) {
    let delay = Duration::from_micros(cfg.max_queue_delay_us);
    let largest_preferred = cfg.preferred_batch_sizes.iter().copied().max();
    // Batches in flight at once: the instance count (one without a limit). A batch is formed
    // only when an instance is free, so what queued meanwhile joins it — measured on
    // ResNet-18 with 16 clients, batches run concurrently starved each other and some requests
    // waited seconds.
    let instances = model
        .upgrade()
        .map_or(1, |m| m.settings.instance_count.max(1));
    let free = Arc::new(tokio::sync::Semaphore::new(instances));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Some(max) = model
            .upgrade()
            .map(|m| usize::try_from(m.settings.max_batch_size).unwrap_or(0))
        else {
            let _ = first
                .reply
                .send(Err(Status::unavailable("the model was unloaded")));
            return;
        };
        let Ok(slot) = free.clone().acquire_owned().await else {
            return;
        };
        let until = tokio::time::Instant::from_std(first.enqueued + delay);
        let mut total = first.batch;
        let mut group = vec![first];
        let full = |total: usize| {
            total >= max
                || cfg.preferred_batch_sizes.contains(&total)
                || largest_preferred.is_some_and(|p| total >= p)
        };
        while !full(total) {
            // What queued while waiting for an instance joins at once; then the delay applies.
            let next = match rx.try_recv() {
                Ok(p) => Ok(Some(p)),
                Err(mpsc::error::TryRecvError::Disconnected) => Ok(None),
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(until, rx.recv()).await
                }
            };
            match next {
                Ok(Some(p)) => {
                    let fits = group
                        .first()
                        .is_some_and(|f| compatible(&f.feeds, &p.feeds))
                        && total + p.batch <= max;
                    if fits {
                        total += p.batch;
                        group.push(p);
                    } else {
                        carried = Some(p);
                        break;
                    }
                }
                // The queue closed (the version is gone) or the delay ran out.
                Ok(None) | Err(_) => break,
            }
        }
        match (app.upgrade(), model.upgrade()) {
            (Some(app), Some(model)) => {
                tokio::spawn(async move {
                    run_batch(app, model, group).await;
                    drop(slot);
                });
            }
            _ => {
                for p in group {
                    let _ = p
                        .reply
                        .send(Err(Status::unavailable("the model was unloaded")));
                }
                return;
            }
        }
    }
}

/// Runs one batch and answers each member with its rows of every output.
async fn run_batch(app: Arc<App>, model: Arc<ServedModel>, mut group: Vec<Pending>) {
    let started = Instant::now();
    // The members stop counting as queued when the run starts on the pool.
    let tickets: Vec<Ticket> = group.iter_mut().filter_map(|p| p.ticket.take()).collect();
    let result = run_merged(&app, &model, &group, Box::new(move || drop(tickets))).await;
    match result {
        Ok((outputs, executed)) => {
            let mut first = true;
            for (p, outputs) in group.into_iter().zip(outputs) {
                let waited = started.duration_since(p.enqueued).as_nanos() as u64;
                let _ = p.reply.send(Ok(Executed {
                    outputs,
                    generation: executed.generation,
                    queue_ns: waited + executed.queue_ns,
                    peak_bytes: executed.peak_bytes,
                    copies: if first { executed.copies } else { 0 },
                    copy_bytes: if first { executed.copy_bytes } else { 0 },
                    executed: first,
                }));
                first = false;
            }
        }
        Err(status) => {
            for p in group {
                let _ = p.reply.send(Err(status.clone()));
            }
        }
    }
}

type Outputs = Vec<(String, Arc<HostTensor>)>;

/// Merges the members' inputs, runs once, and splits the outputs by member.
async fn run_merged(
    app: &Arc<App>,
    model: &Arc<ServedModel>,
    group: &[Pending],
    on_start: Box<dyn FnOnce() + Send>,
) -> Result<(Vec<Outputs>, Executed), Status> {
    let limits = &app.config.limits;
    let max_tensor = usize::try_from(limits.max_tensor_bytes).unwrap_or(usize::MAX);
    let max_live = usize::try_from(limits.max_request_bytes)
        .unwrap_or(usize::MAX)
        .saturating_mul(group.len());
    // The batch runs until its last member's deadline; one without a deadline has none.
    let deadline = group
        .iter()
        .map(|p| p.deadline)
        .try_fold(None::<Instant>, |acc, d| {
            d.map(|d| Some(acc.map_or(d, |a| a.max(d))))
        })
        .flatten();
    let sizes: Vec<usize> = group.iter().map(|p| p.batch).collect();
    let feeds = match group {
        [one] => one.feeds.clone(),
        _ => merge(group)?,
    };
    let control = Arc::new(RunControl::new(max_tensor, max_live, deadline));
    let executed = execute(app, model, feeds, control, deadline, Some(on_start)).await?;
    let split = split_outputs(&executed.outputs, &sizes)?;
    Ok((split, executed))
}

/// Concatenates each input of the members along the first dimension.
fn merge(group: &[Pending]) -> Result<Feeds, Status> {
    let first = group
        .first()
        .ok_or_else(|| Status::internal("an empty batch"))?;
    let mut out = Feeds::new();
    for (name, t) in &first.feeds {
        let parts: Vec<&Arc<HostTensor>> = group
            .iter()
            .map(|p| {
                p.feeds
                    .get(name)
                    .ok_or_else(|| Status::internal("a batch member lacks an input"))
            })
            .collect::<Result<_, _>>()?;
        let rows: usize = parts
            .iter()
            .map(|p| p.shape().first().copied().unwrap_or(0))
            .sum();
        let mut shape = t.shape().to_vec();
        if let Some(d) = shape.first_mut() {
            *d = rows;
        }
        let merged = if t.dtype() == DType::String {
            let items: Vec<&[u8]> = parts
                .iter()
                .flat_map(|p| p.strings().iter().map(|s| s.as_bytes()))
                .collect();
            HostTensor::from_strings(&shape, &items)
        } else {
            let mut bytes =
                opreg_sdk::alloc::try_with_capacity(parts.iter().map(|p| p.bytes().len()).sum())
                    .map_err(|e| Status::resource_exhausted(e.message.to_string()))?;
            for p in &parts {
                bytes.extend_from_slice(p.bytes());
            }
            HostTensor::from_bytes(t.dtype(), &shape, &bytes)
        }
        .map_err(|e| Status::internal(format!("merging input '{name}': {}", e.message)))?;
        out.insert(name.clone(), Arc::new(merged));
    }
    Ok(out)
}

/// Splits every output along its first dimension into the members' rows.
fn split_outputs(outputs: &Outputs, sizes: &[usize]) -> Result<Vec<Outputs>, Status> {
    let total: usize = sizes.iter().sum();
    let mut per: Vec<Outputs> = sizes.iter().map(|_| Vec::new()).collect();
    for (name, t) in outputs {
        if sizes.len() == 1 {
            if let Some(o) = per.first_mut() {
                o.push((name.clone(), t.clone()));
            }
            continue;
        }
        let rows = t.shape().first().copied().unwrap_or(0);
        if rows != total || !t.on_host() {
            return Err(Status::internal(format!(
                "output '{name}' has {rows} rows for a batch of {total}: this model's outputs do not follow its batch dimension, so it cannot be batched (remove [dynamic_batching] from its config.toml)"
            )));
        }
        let per_row = t.len() / total.max(1);
        let mut start = 0usize;
        for (k, &n) in sizes.iter().enumerate() {
            let mut shape = t.shape().to_vec();
            if let Some(d) = shape.first_mut() {
                *d = n;
            }
            let range = start * per_row..(start + n) * per_row;
            let part = if t.dtype() == DType::String {
                let items: Vec<&[u8]> = t
                    .strings()
                    .get(range)
                    .unwrap_or(&[])
                    .iter()
                    .map(|s| s.as_bytes())
                    .collect();
                HostTensor::from_strings(&shape, &items)
            } else {
                let size = t.dtype().size();
                let bytes = t
                    .bytes()
                    .get(range.start * size..range.end * size)
                    .unwrap_or(&[]);
                HostTensor::from_bytes(t.dtype(), &shape, bytes)
            }
            .map_err(|e| Status::internal(format!("splitting output '{name}': {}", e.message)))?;
            if let Some(o) = per.get_mut(k) {
                o.push((name.clone(), Arc::new(part)));
            }
            start += n;
        }
    }
    Ok(per)
}
