//! Running kernels: on the daemon's compute pool, in a host call frame.
//!
//! Kernel work never runs on tokio's workers (it would stall I/O); it runs on one rayon pool
//! for the whole process, which is also what plugins' `parallel_for` uses. One path for every
//! kernel: [`bind`] (resolved kernel + node description -> [`BoundKernel`]) then [`call`]
//! (bound kernel + inputs -> outputs); graph steps, constant folding and RunKernel all use it,
//! and fail with one error, [`KernelError`].

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

mod awake;
mod bind;
mod call;

pub use awake::with_workers_awake;
pub use bind::{bind, infer, BoundKernel, NodeDesc};
pub use call::{call, CallLimits};

pub(crate) use crate::plugin::log_from_plugin;
use crate::registry::{KernelQuery, KernelRef, ResolveError, Snapshot};
use opreg_sdk::{
    host::HostTensor,
    kernel::{Attribute, ValueInfo},
    Device, ErrorCode,
};
use std::sync::Arc;

/// The process-wide pool for kernel work.
pub struct ComputePool {
    pool: rayon::ThreadPool,
}

impl ComputePool {
    /// A pool of `threads` workers (0: one per core).
    pub fn new(threads: usize) -> anyhow::Result<Self> {
        Self::build(threads, false)
    }

    /// A pool of `threads` workers (0: one per core) whose first is the calling thread:
    /// [`install`](Self::install) called from that thread runs on it, with no hand-off to
    /// another thread and no wake-up per call, as ONNX Runtime's `Run` computes on its
    /// caller's thread (a run handed to a sleeping worker and waited for costs two wake-ups,
    /// 15-25 µs per call measured on this VM: a one-node model's median 19-26 µs against
    /// 3 µs so). For in-process callers (`opreg bench`); the daemon's requests arrive on its
    /// async runtime's threads and take [`new`](Self::new)'s pool. The calling thread stays
    /// worker 0 for the life of the process (rayon leaks such a pool's registry).
    pub fn on_this_thread(threads: usize) -> anyhow::Result<Self> {
        Self::build(threads, true)
    }

    fn build(threads: usize, this_thread: bool) -> anyhow::Result<Self> {
        let mut builder = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("opreg-compute-{i}"))
            // Without a handler rayon aborts the process on a panic in a spawned job. `run`
            // catches panics itself; this is the last line for any other job.
            .panic_handler(|p| {
                tracing::error!("compute job panicked: {}", panic_message(p.as_ref()))
            });
        if this_thread {
            builder = builder.use_current_thread();
        }
        Ok(ComputePool {
            pool: builder.build()?,
        })
    }

    /// Whether idle workers poll for a run's next parallel loop (the default) or sleep (see
    /// [`with_workers_awake`]; one setting per process, as there is one pool).
    pub fn spinning(self, on: bool) -> Self {
        awake::set_spinning(on);
        self
    }

    /// Runs `f` on the pool, blocking the caller (benchmarks, tests).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` on the pool and awaits its result without blocking the async runtime. A panic
    /// in `f` fails this call with [`ExecError::Panicked`]; the pool and the daemon go on.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ExecError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            // AssertUnwindSafe: on a panic nothing `f` touched is used again except through
            // locks, which the daemon opens poison-tolerantly.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
                let message = panic_message(p.as_ref());
                tracing::error!("compute job panicked: {message}");
                ExecError::Panicked(message)
            });
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| ExecError::Lost)?
    }
}

/// The text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

/// A kernel that refused a node or failed on it: the one error of the kernel-call path.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("node {node}: kernel of plugin '{plugin}' refused it: {message}")]
    Refused {
        node: String,
        plugin: String,
        code: ErrorCode,
        message: String,
    },
    #[error("node {node}: kernel of plugin '{plugin}' failed: {message}")]
    Failed {
        node: String,
        plugin: String,
        code: ErrorCode,
        message: String,
    },
    /// The call's stop check cut it short (deadline or cancellation); its outputs are gone.
    #[error("node {node}: stopped before it finished")]
    Stopped { node: String },
}

impl KernelError {
    /// The plugin's error code (`Stopped` has none of its own: the caller says why).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            KernelError::Refused { code, .. } | KernelError::Failed { code, .. } => Some(*code),
            KernelError::Stopped { .. } => None,
        }
    }
}

/// An error of a compute job or a RunKernel call, with enough context for the client.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("{0}")]
    Invalid(String),
    #[error("the compute task was lost")]
    Lost,
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("internal error (a bug in opreg, please report it): {0}")]
    Panicked(String),
}

/// One kernel call, outside any graph (the `RunKernel` RPC).
pub struct KernelCall {
    pub domain: String,
    pub op_type: String,
    pub opset: i32,
    pub device: Device,
    pub attributes: Vec<Attribute>,
    pub inputs: Vec<HostTensor>,
    pub num_outputs: usize,
    /// The largest output or scratch buffer the kernel may allocate.
    pub max_tensor_bytes: usize,
    /// When the call is cut short (between chunks of the kernel's parallel work).
    pub deadline: Option<std::time::Instant>,
}

/// The result of a kernel call and who computed it.
pub struct KernelResult {
    pub outputs: Vec<std::sync::Arc<HostTensor>>,
    pub plugin: String,
    pub generation: u64,
}

/// Resolves, binds and calls one kernel on the calling thread (call it from the compute pool).
pub fn run_kernel(snapshot: &Arc<Snapshot>, call: &KernelCall) -> Result<KernelResult, ExecError> {
    if !call.device.host_accessible() {
        return Err(ExecError::Invalid(format!(
            "RunKernel takes host tensors; device {} is not host-accessible",
            call.device
        )));
    }
    let types: Vec<_> = call.inputs.iter().map(|t| Some(t.dtype())).collect();
    let kernel: KernelRef = snapshot.resolve(&KernelQuery {
        domain: &call.domain,
        op_type: &call.op_type,
        opset: call.opset,
        device: call.device,
        inputs: &types,
    })?;
    let shapes: Vec<Vec<i64>> = call
        .inputs
        .iter()
        .map(|t| t.shape().iter().map(|&d| d as i64).collect())
        .collect();
    let node = NodeDesc {
        label: &call.op_type,
        name: "",
        domain: &call.domain,
        op_type: &call.op_type,
        opset: call.opset,
        device: call.device,
        attributes: &call.attributes,
        inputs: call
            .inputs
            .iter()
            .zip(&shapes)
            .map(|(t, s)| ValueInfo {
                name: "",
                present: true,
                dtype: t.dtype(),
                shape: Some(s.as_slice()),
                constant: None,
            })
            .collect(),
        outputs: (0..call.num_outputs)
            .map(|_| ValueInfo {
                name: "",
                present: true,
                // Unknown before the kernel runs.
                dtype: opreg_sdk::DType::F32,
                shape: None,
                constant: None,
            })
            .collect(),
    };
    let bound = bind(snapshot, &kernel, node)?;
    let views: Vec<_> = call.inputs.iter().map(|t| t.view()).collect();
    let stop = || {
        call.deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
    };
    let limits = CallLimits {
        max_tensor_bytes: call.max_tensor_bytes,
        stop: &stop,
        wait_device: true,
    };
    let outputs = match self::call::call(
        snapshot,
        &bound,
        &call.op_type,
        call.num_outputs,
        &views,
        &limits,
        Vec::new(),
    ) {
        Ok(o) => o,
        Err(KernelError::Stopped { .. }) => return Err(ExecError::DeadlineExceeded),
        Err(e) => return Err(e.into()),
    };
    Ok(KernelResult {
        outputs,
        generation: kernel.plugin.generation,
        plugin: kernel.plugin.name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn a_pool_on_this_thread_runs_here_and_its_loops_on_the_other_workers_too() {
        // On a thread of its own: the pool keeps that thread as its worker 0 for good.
        std::thread::spawn(|| {
            let pool = ComputePool::on_this_thread(2).expect("pool");
            assert_eq!(pool.threads(), 2);
            let me = std::thread::current().id();
            let (on, index) =
                pool.install(|| (std::thread::current().id(), rayon::current_thread_index()));
            assert_eq!(on, me, "install ran on another thread");
            assert_eq!(index, Some(0));
            // Loops until one chunk ran on the other worker (on a busy machine its thread may
            // not be scheduled for a while) or 10 s passed.
            let start = std::time::Instant::now();
            let elsewhere = pool.install(|| loop {
                let others: usize = (0..64usize)
                    .into_par_iter()
                    .with_max_len(1)
                    .map(|_| {
                        std::hint::black_box((0..2000u64).sum::<u64>());
                        usize::from(rayon::current_thread_index() != Some(0))
                    })
                    .sum();
                if others > 0 || start.elapsed().as_secs() >= 10 {
                    break others;
                }
            });
            assert!(elsewhere > 0, "no chunk ran on the pool's other worker");
            // Several installs in a row, each on this thread.
            for _ in 0..3 {
                assert_eq!(pool.install(|| std::thread::current().id()), me);
            }
        })
        .join()
        .expect("test thread");
    }
}
