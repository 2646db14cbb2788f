//! # opreg-sdk: write opreg plugins
//!
//! Everything that computes in opreg is a plugin: a shared library (`cdylib`) that exports
//! one root module through this crate. A plugin registers any mix of
//!
//! - **ONNX operator kernels** ([`kernel`]): keyed by domain, op type, opset range, type
//!   constraints and device, with a priority;
//! - **BLAS backends** ([`blas`]): the small gemm API that `Gemm`, `MatMul` and `Conv` call;
//! - **quantization strategies** ([`quant`]): observations in, a quantization plan out.
//!
//! ## The ABI
//!
//! The boundary is built with [`abi_stable`]: the daemon checks the type layout of everything
//! a plugin exports when it loads it, and refuses a plugin built for another ABI major version
//! ([`ABI_MAJOR`]). The root module ([`module::PluginMod`]) is a prefix type: new capabilities
//! are appended, so a plugin built against an older minor SDK keeps loading into a newer
//! daemon.
//!
//! Rules the SDK enforces for you:
//!
//! - **No panic crosses the boundary.** Authors implement plain Rust traits ([`Kernel`],
//!   [`KernelFactory`], [`Blas`], [`Quantizer`]); the SDK wraps each call from the host in
//!   `catch_unwind` and turns a panic into a [`PluginError`] with [`ErrorCode::Panic`]. A
//!   panicking kernel fails one request, never the daemon.
//! - **Plugins start no threads and keep no thread-locals with destructors.** Parallelism
//!   comes from the host through [`KernelContext::parallel_for`]; memory for outputs and
//!   scratch from the host too. This is what makes unloading a plugin (hot swap) safe.
//!
//! ## A minimal plugin
//!
//! ```no_run
//! use opreg_sdk::prelude::*;
//!
//! #[derive(Clone)]
//! struct Relu;
//! impl Kernel for Relu {
//!     fn compute(&self, ctx: &KernelContext<'_>, inputs: &[TensorView<'_>]) -> Result<(), PluginError> {
//!         let x = inputs[0].as_slice::<f32>()?;
//!         let y = ctx.output_slice::<f32>(0, inputs[0].shape())?;
//!         ctx.parallel_chunks(y, 4096, |start, out| {
//!             for (o, v) in out.iter_mut().zip(&x[start..]) {
//!                 *o = v.max(0.0);
//!             }
//!         })
//!     }
//! }
//!
//! fn register(r: &mut Registrar) {
//!     r.kernel(
//!         KernelDesc::onnx("Relu", 14, OPEN_END)
//!             .constraint("T", &[DType::F32])
//!             .inputs(&["T"])
//!             .outputs(&["T"]),
//!         stateless(Relu),
//!     );
//! }
//!
//! opreg_sdk::export_plugin! {
//!     name: "example-relu",
//!     version: env!("CARGO_PKG_VERSION"),
//!     description: "Relu for f32",
//!     register: register,
//! }
//! ```

#![deny(missing_docs)]
// `#[sabi_trait]` and `#[derive(StableAbi)]` expand to impl blocks that rustc's
// `non_local_definitions` lint flags; the expansions are sound. Allowed here, on the crate that
// holds the ABI, rather than weakened for the workspace.
#![allow(non_local_definitions)]

pub mod alloc;
pub mod blas;
pub mod context;
pub mod device;
pub mod dtype;
pub mod error;
mod export;
#[cfg(feature = "host")]
pub mod host;
pub mod kernel;
pub mod module;
pub mod numeric;
pub mod quant;
pub mod simd;
pub mod tensor;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use abi_stable;
pub use half;

pub use blas::{
    Blas, BlasDesc, Epilogue, GemmArgs, GemmTypes, Layout, PackedB, PackedInfo, Transpose,
};
pub use context::{KernelContext, LogLevel};
pub use device::{DeviceProvider, Event, MemRef, ProviderInfo, Stream};
pub use dtype::{DType, Element};
pub use error::{ErrorCode, PluginError};
pub use kernel::{
    stateless, AttrKind, AttrValue, Attribute, InferFn, Kernel, KernelDesc, KernelFactory,
    NodeInfo, OutputFact, TypeConstraint, ValueInfo, WithInfer, OPEN_END,
};
pub use module::{PluginInfo, Registrar};
pub use quant::{
    Directive, DirectiveKind, Evaluation, Evaluator, GraphPlan, GraphView, NodeKind, NodePlan,
    NodeView, Observation, ObservationKind, Observer, ObserverOutput, QuantPlan, QuantRequest,
    Quantizer, QuantizerDesc, TensorObservation, TensorStats, TimedEvaluation, ValueView,
};
pub use tensor::{Device, DeviceKind, MemoryType, OwnedTensor, TensorView, TensorViewMut};

/// The ABI major version. Plugins built for another major are refused at load.
pub const ABI_MAJOR: u32 = 1;
/// The ABI minor version: bumped when capabilities are appended to the root module or to a
/// trait's vtable. Older minors keep loading.
pub const ABI_MINOR: u32 = 8;
/// `ABI_MAJOR.ABI_MINOR.0`, as checked by `abi_stable` when a plugin loads.
pub const ABI_VERSION: &str = "1.8.0";

/// Everything a plugin author usually needs.
///
/// The numeric vocabulary ([`numeric`]: dtype lists, element traits) is not in the prelude: its
/// trait methods (`to_f64`, `exp`, ...) would clash with a plugin's own traits. Import it with
/// `use opreg_sdk::numeric::*` (or by name); the dispatch macro is [`dispatch!`].
pub mod prelude {
    pub use crate::{
        stateless, AttrValue, Blas, BlasDesc, DType, Device, DeviceKind, DeviceProvider, Directive,
        DirectiveKind, Element, Epilogue, ErrorCode, Evaluation, Evaluator, GemmArgs, GemmTypes,
        GraphPlan, GraphView, Kernel, KernelContext, KernelDesc, KernelFactory, Layout, LogLevel,
        MemRef, MemoryType, NodeInfo, NodeKind, NodePlan, Observation, ObservationKind, Observer,
        ObserverOutput, OutputFact, OwnedTensor, PackedB, PackedInfo, PluginError, ProviderInfo,
        QuantPlan, QuantRequest, Quantizer, QuantizerDesc, Registrar, Stream, TensorObservation,
        TensorStats, TensorView, TensorViewMut, Transpose, OPEN_END,
    };
}
