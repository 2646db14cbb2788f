//! Calling a bound kernel: the one path every kernel call takes (graph steps, constant
//! folding, the RunKernel RPC). A host call frame with the node's device, BLAS backend, device
//! allocator and limits. A device kernel only enqueues on the device's stream: the host waits
//! where it reads device memory (every copy waits for the stream), not after each call, so
//! the GPU runs a model's kernels back to back (see [`CallLimits::wait_device`]).

use super::{log_from_plugin, BoundKernel, KernelError};
use crate::registry::Snapshot;
use std::sync::Arc;

use opreg_sdk::{
    host::{CallFrame, HostTensor, PlannedBuf},
    LogLevel, TensorView,
};

/// What bounds one call.
pub struct CallLimits<'a> {
    /// The largest output or scratch buffer the kernel may allocate.
    pub max_tensor_bytes: usize,
    /// Asked between chunks of the kernel's parallel work: `true` cuts the call short.
    pub stop: &'a (dyn Fn() -> bool + Sync),
    /// Wait for the device's stream after a device kernel: for the profiler (a step's time is
    /// its kernels' then) and callers that read outputs without a copy step. Graph runs need
    /// not: one stream per device orders every kernel, copy and pooled-buffer reuse, and the
    /// copies to the host wait for the stream before the host reads.
    pub wait_device: bool,
}

/// Runs `bound` (the kernel of node `label`, with `num_outputs` outputs) on `inputs`
/// (absent optional inputs as [`TensorView::absent`]) and returns its outputs. `planned` is the
/// host memory the run's memory plan has for each output (see `graph::memory`), if any. A call cut
/// short by `limits.stop` is [`KernelError::Stopped`]: its outputs are incomplete.
pub fn call(
    snapshot: &Snapshot,
    bound: &BoundKernel,
    label: &str,
    num_outputs: usize,
    inputs: &[TensorView<'_>],
    limits: &CallLimits<'_>,
    planned: Vec<Option<PlannedBuf>>,
) -> Result<Vec<Arc<HostTensor>>, KernelError> {
    let plugin = bound.plugin.name.as_str();
    let failed = |e: opreg_sdk::PluginError| KernelError::Failed {
        node: label.to_string(),
        plugin: plugin.to_string(),
        code: e.code,
        message: e.message.to_string(),
    };
    let device = if bound.device.host_accessible() {
        None
    } else {
        Some(snapshot.device(bound.device).ok_or_else(|| {
            failed(opreg_sdk::PluginError::invalid(format!(
                "no loaded plugin provides device {}",
                bound.device
            )))
        })?)
    };
    let log = |level: LogLevel, msg: &str| log_from_plugin(plugin, level, msg);
    let mut frame = CallFrame::new(
        num_outputs,
        bound.device,
        snapshot.blas_for(bound.device),
        &log,
    )
    .with_max_tensor_bytes(limits.max_tensor_bytes)
    .with_stop_check(limits.stop)
    .with_planned_outputs(planned);
    if let Some(d) = &device {
        frame = frame.with_device(d, &bound.output_memory);
    }
    let computed =
        frame.with_context(|ctx| bound.instance.compute(ctx, inputs.into()).into_result());
    if frame.stopped() {
        return Err(KernelError::Stopped {
            node: label.to_string(),
        });
    }
    computed.map_err(failed)?;
    if let Some(d) = device.as_ref().filter(|_| limits.wait_device) {
        // The kernel enqueued on the device's stream: its outputs are ready after this.
        d.synchronize().map_err(failed)?;
    }
    frame.into_shared_outputs().map_err(failed)
}
