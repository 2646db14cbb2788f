//! Running kernels: on the daemon's compute pool, in a host call frame.
//!
//! Kernel work never runs on tokio's workers (it would stall I/O); it runs on one rayon pool
//! for the whole process, which is also what plugins' `parallel_for` uses.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use crate::registry::{KernelQuery, KernelRef, ResolveError, Snapshot};
use opreg_sdk::{
    context::LogLevel,
    host::{CallFrame, HostTensor},
    kernel::{Attribute, NodeInfo, ValueInfo},
    Device, ErrorCode,
};
use std::borrow::Cow;
use std::sync::Arc;

/// The process-wide pool for kernel work.
pub struct ComputePool {
    pool: rayon::ThreadPool,
}

impl ComputePool {
    /// A pool of `threads` workers (0: one per core).
    pub fn new(threads: usize) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("opreg-compute-{i}"))
            // Without a handler rayon aborts the process on a panic in a spawned job. `run`
            // catches panics itself; this is the last line for any other job.
            .panic_handler(|p| {
                tracing::error!("compute job panicked: {}", panic_message(p.as_ref()))
            })
            .build()?;
        Ok(ComputePool { pool })
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

/// An error from a kernel call, with enough context for the client.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("kernel {op_type} of plugin '{plugin}' refused the node: {message}")]
    Instantiate {
        op_type: String,
        plugin: String,
        code: ErrorCode,
        message: String,
    },
    #[error("kernel {op_type} of plugin '{plugin}' failed: {message}")]
    Compute {
        op_type: String,
        plugin: String,
        code: ErrorCode,
        message: String,
    },
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
    pub outputs: Vec<HostTensor>,
    pub plugin: String,
    pub generation: u64,
}

/// Resolves and runs one kernel on the calling thread (call it from the compute pool).
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
    let plugin = kernel.plugin.name.clone();
    let shapes: Vec<Vec<i64>> = call
        .inputs
        .iter()
        .map(|t| t.shape().iter().map(|&d| d as i64).collect())
        .collect();
    let input_infos: Vec<ValueInfo<'_>> = call
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
        .collect();
    let output_infos: Vec<ValueInfo<'_>> = (0..call.num_outputs)
        .map(|_| ValueInfo {
            name: "",
            present: true,
            // Unknown before the kernel runs.
            dtype: opreg_sdk::DType::F32,
            shape: None,
            constant: None,
        })
        .collect();
    let log = |level: LogLevel, msg: &str| log_from_plugin(&plugin, level, msg);
    let blas = snapshot.blas_for(call.device);
    let load_frame = CallFrame::new(0, call.device, blas, &log);
    let instance = load_frame
        .with_context(|ctx| {
            let node = NodeInfo {
                name: "",
                domain: call.domain.as_str(),
                op_type: call.op_type.as_str(),
                opset: call.opset,
                device: call.device,
                attributes: Cow::Borrowed(call.attributes.as_slice()),
                inputs: input_infos,
                outputs: output_infos,
                blas: blas.map(|b| b.sabi_reborrow()),
                context: Some(ctx.reborrow()),
            };
            kernel
                .registration()
                .factory
                .instantiate(node.as_ffi())
                .into_result()
        })
        .map_err(|e| ExecError::Instantiate {
            op_type: call.op_type.clone(),
            plugin: plugin.clone(),
            code: e.code,
            message: e.message.to_string(),
        })?;
    let views: Vec<_> = call.inputs.iter().map(|t| t.view()).collect();
    let frame = CallFrame::new(
        call.num_outputs,
        call.device,
        snapshot.blas_for(call.device),
        &log,
    )
    .with_max_tensor_bytes(call.max_tensor_bytes);
    let stop = || {
        call.deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
    };
    let frame = frame.with_stop_check(&stop);
    let computed =
        frame.with_context(|ctx| instance.compute(ctx, views.as_slice().into()).into_result());
    let compute_err = |e: opreg_sdk::PluginError| ExecError::Compute {
        op_type: call.op_type.clone(),
        plugin: plugin.clone(),
        code: e.code,
        message: e.message.to_string(),
    };
    if frame.stopped() {
        return Err(ExecError::DeadlineExceeded);
    }
    computed.map_err(compute_err)?;
    let outputs = frame.into_outputs().map_err(compute_err)?;
    // The kernel instance (plugin code) is dropped here, while `kernel` still holds the plugin.
    drop(instance);
    Ok(KernelResult {
        outputs,
        generation: kernel.plugin.generation,
        plugin,
    })
}

pub(crate) fn log_from_plugin(plugin: &str, level: LogLevel, msg: &str) {
    match level {
        LogLevel::TRACE => tracing::trace!(target: "opreg::plugin", plugin, "{msg}"),
        LogLevel::DEBUG => tracing::debug!(target: "opreg::plugin", plugin, "{msg}"),
        LogLevel::WARN => tracing::warn!(target: "opreg::plugin", plugin, "{msg}"),
        LogLevel::ERROR => tracing::error!(target: "opreg::plugin", plugin, "{msg}"),
        // INFO, and levels added after this daemon was built.
        _ => tracing::info!(target: "opreg::plugin", plugin, "{msg}"),
    }
}
