//! Binding: a resolved kernel instantiated for one node. The one place the host builds the
//! node description a kernel factory sees (through the ABI's accessors), with a load-time
//! context on the node's device for packing weights.

use super::{log_from_plugin, KernelError};
use crate::plugin::{kernel_label, LoadedPlugin};
use crate::registry::{KernelRef, Snapshot};
use opreg_sdk::{
    host::CallFrame,
    kernel::{Attribute, FfiKernelBox, NodeInfo, ValueInfo},
    Device, LogLevel, MemoryType, OutputFact,
};
use std::{borrow::Cow, sync::Arc};

/// What the host knows about a node when it binds a kernel to it.
pub struct NodeDesc<'a> {
    /// For messages: `name (op)` or the op type.
    pub label: &'a str,
    pub name: &'a str,
    pub domain: &'a str,
    pub op_type: &'a str,
    pub opset: i32,
    pub device: Device,
    pub attributes: &'a [Attribute],
    pub inputs: Vec<ValueInfo<'a>>,
    pub outputs: Vec<ValueInfo<'a>>,
}

/// A kernel instantiated for one node, ready to call.
pub struct BoundKernel {
    // Declared before `plugin`: plugin code must be dropped while the library is mapped.
    pub instance: FfiKernelBox,
    pub plugin: Arc<LoadedPlugin>,
    /// `domain::Op(range)@device` of the registration.
    pub kernel: String,
    pub device: Device,
    /// The memory type each input is wanted in, and each output produced in.
    pub input_memory: Vec<MemoryType>,
    pub output_memory: Vec<MemoryType>,
    /// The constant inputs the kernel keeps a form of its own of and never reads at run time
    /// (ABI 1.8 `absorbed`), ascending: the plan may free them and passes them absent.
    pub absorbed: Vec<usize>,
    /// `(input, output)` positions whose output the kernel lets the host place over the
    /// input's memory ([`KernelDesc::aliases`](opreg_sdk::KernelDesc::aliases)), within the
    /// node's inputs and outputs.
    pub aliases: Vec<(usize, usize)>,
}

/// Asks `kernel` what `node`'s outputs will be (ABI 1.1 `infer`; a 1.0 plugin answers
/// nothing). One fact per output; missing ones are unknown. Runs at compile time, before
/// [`bind`]; an error refuses the node like a failed instantiation.
pub fn infer(kernel: &KernelRef, node: &NodeDesc<'_>) -> Result<Vec<OutputFact>, KernelError> {
    let info = NodeInfo {
        name: node.name,
        domain: node.domain,
        op_type: node.op_type,
        opset: node.opset,
        device: node.device,
        attributes: Cow::Borrowed(node.attributes),
        inputs: node.inputs.clone(),
        outputs: node.outputs.clone(),
        blas: None,
        context: None,
    };
    let facts = kernel
        .registration()
        .factory
        .infer(info.as_ffi())
        .into_result()
        .map_err(|e| KernelError::Refused {
            node: node.label.to_string(),
            plugin: kernel.plugin.name.clone(),
            code: e.code,
            message: e.message.to_string(),
        })?;
    let mut facts: Vec<OutputFact> = facts.into_iter().map(OutputFact::from_ffi).collect();
    // A plugin may answer for more outputs than the node has: the extra facts mean nothing.
    facts.truncate(node.outputs.len());
    Ok(facts)
}

/// Instantiates `kernel` for `node`. An error fails the model load (or the RunKernel call),
/// naming the node and plugin.
pub fn bind(
    snapshot: &Snapshot,
    kernel: &KernelRef,
    node: NodeDesc<'_>,
) -> Result<BoundKernel, KernelError> {
    let reg = kernel.registration();
    let plugin = &kernel.plugin;
    let device = node.device;
    let (num_in, num_out) = (node.inputs.len(), node.outputs.len());
    let log = |level: LogLevel, msg: &str| log_from_plugin(&plugin.name, level, msg);
    let blas = snapshot.blas_for(device);
    let handle = snapshot.device(device);
    let mut load_frame = CallFrame::new(0, device, blas, &log);
    if let Some(h) = handle.as_ref().filter(|_| !device.host_accessible()) {
        load_frame = load_frame.with_device(h, &[]);
    }
    let label = node.label.to_string();
    let constant: Vec<bool> = node.inputs.iter().map(|v| v.constant.is_some()).collect();
    let instance = load_frame
        .with_context(|ctx| {
            let info = NodeInfo {
                name: node.name,
                domain: node.domain,
                op_type: node.op_type,
                opset: node.opset,
                device,
                attributes: Cow::Borrowed(node.attributes),
                inputs: node.inputs,
                outputs: node.outputs,
                blas: blas.map(|b| b.sabi_reborrow()),
                context: Some(ctx.reborrow()),
            };
            reg.factory.instantiate(info.as_ffi()).into_result()
        })
        .map_err(|e| KernelError::Refused {
            node: label,
            plugin: plugin.name.clone(),
            code: e.code,
            message: e.message.to_string(),
        })?;
    // Only what was given as a constant can have been absorbed: any other position a plugin
    // names is ignored (its input is passed as usual).
    let mut absorbed: Vec<usize> = instance
        .absorbed()
        .into_iter()
        .filter_map(|i| usize::try_from(i).ok())
        .filter(|&i| constant.get(i).copied().unwrap_or(false))
        .collect();
    absorbed.sort_unstable();
    absorbed.dedup();
    let aliases = reg
        .desc
        .aliases
        .iter()
        .copied()
        .filter(|&(i, o)| i < num_in && o < num_out)
        .collect();
    Ok(BoundKernel {
        absorbed,
        aliases,
        instance,
        plugin: plugin.clone(),
        kernel: kernel_label(&reg.desc),
        device,
        input_memory: (0..num_in).map(|i| reg.desc.input_memory_of(i)).collect(),
        output_memory: (0..num_out).map(|i| reg.desc.output_memory_of(i)).collect(),
    })
}
