//! Run a kernel on tensors in a plain unit test, without a daemon.
//!
//! The kernel goes through the same ABI wrappers the daemon calls (so a panic comes back as
//! an [`ErrorCode::Panic`](crate::ErrorCode::Panic) error, as in production), on rayon's
//! global pool.
//!
//! ```
//! use opreg_sdk::{prelude::*, testkit::{NodeSpec, run_kernel}, host::HostTensor};
//!
//! #[derive(Clone)]
//! struct Neg;
//! impl Kernel for Neg {
//!     fn compute(&self, ctx: &KernelContext<'_>, inputs: &[TensorView<'_>]) -> Result<(), PluginError> {
//!         let x = inputs[0].as_slice::<f32>()?;
//!         let y = ctx.output_slice::<f32>(0, inputs[0].shape())?;
//!         y.iter_mut().zip(x).for_each(|(y, x)| *y = -x);
//!         Ok(())
//!     }
//! }
//!
//! let x = HostTensor::from_bytes(DType::F32, &[2], bytemuck_f32(&[1.0, -2.0])).unwrap();
//! let out = run_kernel(stateless(Neg), &NodeSpec::onnx("Neg", 13), &[&x], None).unwrap();
//! assert_eq!(out[0].bytes(), bytemuck_f32(&[-1.0, 2.0]));
//! # fn bytemuck_f32(v: &[f32]) -> &[u8] { unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 4) } }
//! ```

use crate::{
    blas::{into_ffi_blas, Blas},
    host::{CallFrame, HostTensor},
    kernel::{into_ffi_factory, AttrValue, Attribute, KernelFactory, NodeInfo, ValueInfo},
    Device, PluginError,
};
use std::borrow::Cow;

/// A node to instantiate a kernel for.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Operator domain (`""` for ONNX).
    pub domain: String,
    /// Operator type.
    pub op_type: String,
    /// Opset version.
    pub opset: i32,
    /// Attributes.
    pub attributes: Vec<Attribute>,
    /// Number of outputs.
    pub num_outputs: usize,
    /// Device.
    pub device: Device,
    /// Positions of the inputs given to the factory as constants (as a model's initializers
    /// are), so that it can prepare them at load.
    pub constant_inputs: Vec<usize>,
}

impl NodeSpec {
    /// A default-domain ONNX node with one output, on the CPU.
    pub fn onnx(op_type: &str, opset: i32) -> Self {
        NodeSpec {
            domain: String::new(),
            op_type: op_type.into(),
            opset,
            attributes: Vec::new(),
            num_outputs: 1,
            device: Device::CPU,
            constant_inputs: Vec::new(),
        }
    }

    /// Sets the domain.
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = domain.into();
        self
    }

    /// Adds an attribute.
    pub fn attr(mut self, name: &str, value: AttrValue) -> Self {
        self.attributes.push(Attribute {
            name: name.into(),
            value,
        });
        self
    }

    /// Sets the number of outputs.
    pub fn outputs(mut self, n: usize) -> Self {
        self.num_outputs = n;
        self
    }

    /// Gives input `i` to the factory as a constant (its value known at instantiation).
    pub fn constant(mut self, i: usize) -> Self {
        self.constant_inputs.push(i);
        self
    }
}

/// Instantiates `factory` for `node` and runs it once on `inputs`, with `blas` as the node's
/// BLAS backend. Returns the outputs, by position.
pub fn run_kernel(
    factory: impl KernelFactory,
    node: &NodeSpec,
    inputs: &[&HostTensor],
    blas: Option<Box<dyn Blas>>,
) -> Result<Vec<HostTensor>, PluginError> {
    let inputs: Vec<Option<&HostTensor>> = inputs.iter().map(|&t| Some(t)).collect();
    run_kernel_opt(factory, node, &inputs, blas)
}

/// Like [`run_kernel`], with optional inputs: `None` is an input the node leaves out.
pub fn run_kernel_opt(
    factory: impl KernelFactory,
    node: &NodeSpec,
    inputs: &[Option<&HostTensor>],
    blas: Option<Box<dyn Blas>>,
) -> Result<Vec<HostTensor>, PluginError> {
    run_kernel_absorbing(factory, node, inputs, blas).map(|(outputs, _)| outputs)
}

/// Like [`run_kernel_opt`], also returning the constant inputs the kernel absorbed
/// ([`Kernel::absorbed`](crate::Kernel::absorbed)), which it was run without (passed absent,
/// as the daemon passes them).
pub fn run_kernel_absorbing(
    factory: impl KernelFactory,
    node: &NodeSpec,
    inputs: &[Option<&HostTensor>],
    blas: Option<Box<dyn Blas>>,
) -> Result<(Vec<HostTensor>, Vec<usize>), PluginError> {
    struct Boxed(Box<dyn Blas>);
    impl Blas for Boxed {
        fn supports(&self, args: &crate::GemmArgs) -> bool {
            self.0.supports(args)
        }
        fn gemm(
            &self,
            ctx: &crate::KernelContext<'_>,
            args: &crate::GemmArgs,
        ) -> Result<(), PluginError> {
            self.0.gemm(ctx, args)
        }
        fn pack_b(
            &self,
            ctx: &crate::KernelContext<'_>,
            args: &crate::GemmArgs,
        ) -> Result<crate::PackedB, PluginError> {
            self.0.pack_b(ctx, args)
        }
        fn gemm_packed(
            &self,
            ctx: &crate::KernelContext<'_>,
            args: &crate::GemmArgs,
            packed: &crate::PackedB,
        ) -> Result<(), PluginError> {
            self.0.gemm_packed(ctx, args, packed)
        }
        fn self_test(&self, ctx: &crate::KernelContext<'_>) -> Result<(), PluginError> {
            self.0.self_test(ctx)
        }
    }
    let factory = into_ffi_factory(factory);
    let blas = blas.map(|b| into_ffi_blas(Boxed(b)));
    let shapes: Vec<Vec<i64>> = inputs
        .iter()
        .map(|t| t.map_or(vec![], |t| t.shape().iter().map(|&d| d as i64).collect()))
        .collect();
    let input_infos: Vec<ValueInfo<'_>> = inputs
        .iter()
        .zip(&shapes)
        .enumerate()
        .map(|(i, (t, s))| ValueInfo {
            name: "",
            present: t.is_some(),
            dtype: t.map_or(crate::DType::F32, |t| t.dtype()),
            shape: t.map(|_| s.as_slice()),
            constant: t
                .filter(|_| node.constant_inputs.contains(&i))
                .map(|t| t.view()),
        })
        .collect();
    let output_infos: Vec<ValueInfo<'_>> = (0..node.num_outputs)
        .map(|_| ValueInfo {
            name: "",
            present: true,
            // Output types are not known before the kernel runs; kernels must not rely on it.
            dtype: crate::DType::F32,
            shape: None,
            constant: None,
        })
        .collect();
    let log = |level: crate::LogLevel, msg: &str| eprintln!("[{level:?}] {msg}");
    let load_frame = CallFrame::new(0, node.device, blas.as_ref(), &log);
    let kernel = load_frame.with_context(|load_ctx| {
        let info = NodeInfo {
            name: "test",
            domain: node.domain.as_str(),
            op_type: node.op_type.as_str(),
            opset: node.opset,
            device: node.device,
            attributes: Cow::Borrowed(node.attributes.as_slice()),
            inputs: input_infos,
            outputs: output_infos,
            blas: blas.as_ref().map(|b| b.sabi_reborrow()),
            context: Some(load_ctx.reborrow()),
        };
        factory.instantiate(info.as_ffi()).into_result()
    })?;
    // As the daemon does: a constant the kernel absorbed (ABI 1.8) is passed absent, so a
    // kernel that declares it and still reads it fails here.
    let absorbed: Vec<usize> = kernel
        .absorbed()
        .into_iter()
        .filter_map(|i| usize::try_from(i).ok())
        .filter(|i| node.constant_inputs.contains(i))
        .collect();
    let views: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some(t) if !absorbed.contains(&i) => t.view(),
            _ => crate::TensorView::absent(),
        })
        .collect();
    let frame = CallFrame::new(node.num_outputs, node.device, blas.as_ref(), &log);
    frame
        .with_context(|ctx| kernel.compute(ctx, views.as_slice().into()))
        .into_result()?;
    Ok((frame.into_outputs()?, absorbed))
}

/// Runs a kernel factory's self-test through the ABI wrappers, as the daemon does at load.
pub fn self_test_kernel(factory: impl KernelFactory) -> Result<(), PluginError> {
    into_ffi_factory(factory).self_test().into_result()
}

/// Runs a BLAS backend's self-test through the ABI wrappers, on a host context of `device`.
pub fn self_test_blas(blas: impl Blas, device: Device) -> Result<(), PluginError> {
    let blas = into_ffi_blas(blas);
    let log = |level: crate::LogLevel, msg: &str| eprintln!("[{level:?}] {msg}");
    let frame = CallFrame::new(0, device, Some(&blas), &log);
    frame.with_context(|ctx| blas.self_test(ctx).into_result())
}

/// Runs a quantizer's self-test through the ABI wrappers.
pub fn self_test_quantizer(q: impl crate::Quantizer) -> Result<(), PluginError> {
    crate::quant::into_ffi_quantizer(q)
        .self_test()
        .into_result()
}

/// Runs a device provider's self-test through the ABI wrappers.
pub fn self_test_device(provider: impl crate::DeviceProvider) -> Result<(), PluginError> {
    crate::device::into_ffi_device_provider(provider)
        .self_test()
        .into_result()
}

/// Asks `factory` what `node`'s outputs will be (see
/// [`KernelFactory::infer`](crate::KernelFactory::infer)), through the ABI as the daemon does,
/// given what is known statically about each input (`None`: an input the node leaves out).
pub fn infer_outputs(
    factory: impl KernelFactory,
    node: &NodeSpec,
    inputs: &[Option<ValueInfo<'_>>],
) -> Result<Vec<crate::OutputFact>, PluginError> {
    let factory = into_ffi_factory(factory);
    let absent = ValueInfo {
        name: "",
        present: false,
        dtype: crate::DType::UNDEFINED,
        shape: None,
        constant: None,
    };
    let info = NodeInfo {
        name: "test",
        domain: node.domain.as_str(),
        op_type: node.op_type.as_str(),
        opset: node.opset,
        device: node.device,
        attributes: Cow::Borrowed(node.attributes.as_slice()),
        inputs: inputs.iter().map(|v| v.unwrap_or(absent)).collect(),
        outputs: (0..node.num_outputs).map(|_| absent).collect(),
        blas: None,
        context: None,
    };
    let facts = factory.infer(info.as_ffi()).into_result()?;
    Ok(facts.into_iter().map(crate::OutputFact::from_ffi).collect())
}
