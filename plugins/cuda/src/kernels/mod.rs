//! ONNX operator kernels on CUDA devices (f32), so that CNNs and transformer encoders run on
//! the GPU with copies only where a node has no kernel here (placement falls back to the CPU
//! plugin for those, and copies at the boundaries).
//!
//! - Dense products (MatMul, Gemm, FusedMatMul, Conv as im2col + gemm) go through cuBLAS
//!   ([`crate::blas`]); everything else is a kernel of `kernels.cu` ([`module`]).
//! - Weights (Conv/Gemm/FusedMatMul B, biases, BatchNormalization and LayerNormalization
//!   parameters) are declared host-memory inputs: a constant one is uploaded once when the
//!   model loads and kept by the kernel, so requests copy only activations; one that is not
//!   constant is copied at each call.
//! - A node this plugin matched by registration but cannot run (a Conv over three spatial
//!   dimensions, a Resize with `antialias`, MaxPool's Indices output, ...) is declined with
//!   `UNIMPLEMENTED` at load, and placement moves it on to the next device of the model's list.
//! - Kernels enqueue on the device's stream and return; the host waits for the stream only
//!   where it reads device memory (its copies to the host), so a model's kernels run back to
//!   back on the GPU.

pub mod elementwise;
pub mod module;
pub mod nn;
pub mod resize;
pub mod rows;
pub mod shape;

use module::{DeviceBuf, Kernels};
use opreg_sdk::prelude::*;
use std::ffi::c_void;
use std::sync::Arc;

/// Threads per block of the elementwise kernels.
pub const BLOCK: u32 = 256;

/// Pointers to each argument of a launch, in order. Arguments must be named places (locals),
/// which outlive the launch call.
#[macro_export]
macro_rules! args {
    ($($v:ident),* $(,)?) => {
        [$( (&$v) as *const _ as *mut std::ffi::c_void ),*]
    };
}

/// What a kernel's `compute` works with.
pub struct Env<'a, 'c> {
    pub k: &'a Kernels,
    pub ctx: &'a KernelContext<'c>,
    pub device: Device,
    pub stream: Stream,
}

impl<'a, 'c> Env<'a, 'c> {
    pub fn new(k: &'a Kernels, ctx: &'a KernelContext<'c>) -> Self {
        Env {
            k,
            ctx,
            device: ctx.device(),
            stream: ctx.stream(),
        }
    }

    /// Launches `f` over `n` grid-stride items.
    ///
    /// # Safety
    /// As [`Kernels::launch`].
    pub unsafe fn launch_n(
        &self,
        f: module::F,
        n: usize,
        args: &mut [*mut c_void],
    ) -> Result<(), PluginError> {
        if n == 0 {
            return Ok(());
        }
        let grid = self.k.grid(self.device, n, BLOCK);
        // SAFETY: per the contract.
        unsafe {
            self.k
                .launch(self.device, self.stream, f, grid, BLOCK, args)
        }
    }

    /// Launches `f` with one block per row (grid-stride over `rows`), `block` threads each.
    ///
    /// # Safety
    /// As [`Kernels::launch`].
    pub unsafe fn launch_rows(
        &self,
        f: module::F,
        rows: usize,
        row_len: usize,
        args: &mut [*mut c_void],
    ) -> Result<(), PluginError> {
        if rows == 0 {
            return Ok(());
        }
        // A warp per 32 elements of the row, 32 to 256 threads.
        let block = (row_len.div_ceil(32) * 32).clamp(32, 256) as u32;
        let grid = rows.min(65_535 * 4) as u32;
        // SAFETY: per the contract.
        unsafe {
            self.k
                .launch(self.device, self.stream, f, grid, block, args)
        }
    }

    /// The device address of input `t`, which must be contiguous f32 on this device.
    pub fn input(&self, t: &TensorView<'_>, what: &str) -> Result<u64, PluginError> {
        if t.device != self.device || t.memory != MemoryType::DEVICE {
            return Err(PluginError::internal(format!(
                "cuda: {what} is in memory {} of {}, not on {} (the host copies it first)",
                t.memory.0, t.device, self.device
            )));
        }
        if t.dtype != DType::F32 || !t.is_contiguous() {
            return Err(PluginError::invalid(format!(
                "cuda: {what} must be contiguous f32, not {:?}",
                t.dtype
            )));
        }
        Ok(t.data as usize as u64)
    }

    /// Allocates f32 output `index` of `shape` on this device.
    pub fn output(&self, index: usize, shape: &[usize]) -> Result<u64, PluginError> {
        let y = self.ctx.output(index, DType::F32, shape)?;
        if y.device != self.device || y.memory != MemoryType::DEVICE {
            return Err(PluginError::internal(format!(
                "cuda: output {index} was allocated on {}, not {}",
                y.device, self.device
            )));
        }
        Ok(y.data as usize as u64)
    }

    /// The device address of an input declared host memory (weights): the constant uploaded
    /// at load when there is one, else a copy made now into the call's scratch.
    pub fn weight(
        &self,
        t: &TensorView<'_>,
        cached: &Option<DeviceBuf>,
        what: &str,
    ) -> Result<u64, PluginError> {
        if let Some(b) = cached {
            return Ok(b.ptr);
        }
        if t.dtype != DType::F32 {
            return Err(PluginError::invalid(format!("cuda: {what} must be f32")));
        }
        let bytes = t.as_bytes()?;
        let m = self.ctx.device_scratch(bytes.len())?;
        let ptr = m.ptr as usize as u64;
        self.k.upload(self.device, self.stream, ptr, bytes)?;
        Ok(ptr)
    }

    /// `len` f32 of scratch on this device.
    pub fn scratch(&self, len: usize) -> Result<u64, PluginError> {
        let bytes = len.checked_mul(4).ok_or_else(|| {
            PluginError::new(ErrorCode::ResourceExhausted, "cuda: scratch size overflows")
        })?;
        Ok(self.ctx.device_scratch(bytes)?.ptr as usize as u64)
    }
}

/// Input `i`, which `op` needs (`what` names it in the error).
pub fn required<'s, 't>(
    inputs: &'s [TensorView<'t>],
    i: usize,
    op: &str,
    what: &str,
) -> Result<&'s TensorView<'t>, PluginError> {
    optional(inputs, i).ok_or_else(|| PluginError::invalid(format!("cuda: {op} needs {what}")))
}

/// Input `i` when the node gives it (absent optional inputs are `None`).
pub fn optional<'s, 't>(inputs: &'s [TensorView<'t>], i: usize) -> Option<&'s TensorView<'t>> {
    inputs.get(i).filter(|t| !t.is_absent())
}

/// Input `i` of `node` uploaded to its device when it is an f32 constant.
pub fn upload_constant(
    k: &Arc<Kernels>,
    node: &NodeInfo<'_>,
    i: usize,
) -> Result<Option<DeviceBuf>, PluginError> {
    match node.inputs.get(i).and_then(|v| v.constant) {
        Some(t) if t.dtype == DType::F32 => {
            Ok(Some(DeviceBuf::upload(k, node.device, t.as_bytes()?)?))
        }
        _ => Ok(None),
    }
}

/// A node this plugin will not run: placement moves it to the next device.
pub fn decline(node: &NodeInfo<'_>, why: &str) -> PluginError {
    PluginError::unimplemented(format!("cuda: {} {why}", node.op_type))
}

/// The product of `dims`, refusing overflow.
pub fn count(dims: &[usize]) -> Result<usize, PluginError> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| PluginError::invalid("cuda: tensor size overflows"))
}

/// `axis` of a rank-`rank` tensor, negative from the end.
pub fn axis(axis: i64, rank: usize, op: &str) -> Result<usize, PluginError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r.max(1)).contains(&a) {
        Ok(a as usize)
    } else {
        Err(PluginError::invalid(format!(
            "{op}: axis {axis} is out of range for rank {rank}"
        )))
    }
}

/// What a kernel factory of this plugin is made of.
type Make = fn(&Arc<Kernels>, &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;
/// Output facts from a node (types and, where cheap, shapes).
type Facts = fn(&NodeInfo<'_>) -> Vec<OutputFact>;

/// A registration's factory: the kernels, how to build a node's kernel, and its inference.
struct Factory {
    k: Arc<Kernels>,
    make: Make,
    facts: Facts,
}

impl KernelFactory for Factory {
    fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        (self.make)(&self.k, node)
    }

    fn infer(&self, node: &NodeInfo<'_>) -> Result<Vec<OutputFact>, PluginError> {
        Ok((self.facts)(node))
    }
}

/// Every output f32, shapes unknown (the host learns them at run time).
pub fn f32_outputs(node: &NodeInfo<'_>) -> Vec<OutputFact> {
    node.outputs
        .iter()
        .map(|_| OutputFact::new(Some(DType::F32), None))
        .collect()
}

/// One f32 output shaped as the first input.
pub fn like_input(node: &NodeInfo<'_>) -> Vec<OutputFact> {
    vec![OutputFact::new(
        Some(DType::F32),
        node.inputs
            .first()
            .and_then(|v| v.shape)
            .map(|s| s.to_vec()),
    )]
}

/// One registration: op, opset range, the type constraint name of each input (`T` is f32),
/// which inputs are wanted in host memory, and how to build and infer.
pub struct Reg {
    pub domain: &'static str,
    pub op: &'static str,
    pub since: i32,
    pub end: i32,
    pub inputs: &'static [&'static str],
    pub outputs: usize,
    pub host_inputs: &'static [usize],
    pub make: Make,
    pub facts: Facts,
}

/// Constraint names beyond `T` (f32) that registrations use.
const CONSTRAINTS: &[(&str, &[DType])] = &[
    ("I", &[DType::I64]),
    ("F", &[DType::F32]),
    ("R", &[DType::F32, DType::F16, DType::F64]),
];

/// Every operator kernel of the plugin (registered once per GPU).
pub fn regs() -> Vec<Reg> {
    [
        elementwise::regs(),
        nn::regs(),
        rows::regs(),
        shape::regs(),
        resize::regs(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Registers every operator kernel on each GPU.
pub fn register(r: &mut Registrar, k: &Arc<Kernels>) {
    let regs = regs();
    for gpu in &k.cuda.gpus {
        for reg in &regs {
            let outputs: Vec<&str> = vec!["T"; reg.outputs];
            let mut desc = KernelDesc::new(reg.domain, reg.op, reg.since, reg.end)
                .constraint("T", &[DType::F32])
                .inputs(reg.inputs)
                .outputs(&outputs)
                .device(gpu.device);
            for (name, types) in CONSTRAINTS {
                if reg.inputs.contains(name) {
                    desc = desc.constraint(name, types);
                }
            }
            for &i in reg.host_inputs {
                desc = desc.input_memory(i, MemoryType::HOST);
            }
            r.kernel(
                desc,
                Factory {
                    k: k.clone(),
                    make: reg.make,
                    facts: reg.facts,
                },
            );
        }
    }
}
