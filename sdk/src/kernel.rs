//! Operator kernels: how they are described, instantiated per node, and run.
//!
//! Resolution follows ONNX Runtime's kernel registry: a kernel is registered for a domain, an
//! op type, an inclusive opset range, type constraints and a device, with a priority. The host
//! picks, for each node, the highest-priority kernel on the most preferred device whose range
//! covers the schema version the model's `opset_import` selects and whose constraints accept
//! the node's types.

use crate::{
    blas::FfiBlas_TO,
    context::KernelContext,
    error::guard,
    tensor::{Device, OwnedTensor, TensorView},
    DType, PluginError,
};
use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    RRef, StableAbi,
};

/// `end_version` of a kernel that covers every later opset.
pub const OPEN_END: i32 = i32::MAX;

/// Named set of types a kernel accepts (ONNX's `T`, `T1`, `Tind`, ...).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TypeConstraint {
    /// The constraint's name, as in the operator schema.
    pub name: RString,
    /// The accepted types.
    pub types: RVec<DType>,
}

/// What a kernel implements and where it runs.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct KernelDesc {
    /// Operator domain: `""` for the default ONNX domain (`ai.onnx`).
    pub domain: RString,
    /// Operator type, e.g. `"Conv"`.
    pub op_type: RString,
    /// First opset version covered.
    pub since_version: i32,
    /// Last opset version covered, inclusive ([`OPEN_END`] for open-ended).
    pub end_version: i32,
    /// Type constraints.
    pub type_constraints: RVec<TypeConstraint>,
    /// The constraint name of each input, by position; the last one repeats for variadic
    /// inputs. Empty: inputs are not checked.
    pub input_constraints: RVec<RString>,
    /// The constraint name of each output, by position; same rules as inputs.
    pub output_constraints: RVec<RString>,
    /// The device the kernel's inputs and outputs live on.
    pub device: Device,
    /// Higher wins among kernels that match the same node on the same device.
    pub priority: i32,
}

impl KernelDesc {
    /// A CPU kernel for `op_type` in `domain`, covering opsets `since..=end`.
    pub fn new(domain: &str, op_type: &str, since: i32, end: i32) -> Self {
        KernelDesc {
            domain: domain.into(),
            op_type: op_type.into(),
            since_version: since,
            end_version: end,
            type_constraints: RVec::new(),
            input_constraints: RVec::new(),
            output_constraints: RVec::new(),
            device: Device::CPU,
            priority: 0,
        }
    }

    /// A CPU kernel for a default-domain ONNX operator.
    pub fn onnx(op_type: &str, since: i32, end: i32) -> Self {
        Self::new("", op_type, since, end)
    }

    /// Adds the type constraint `name` accepting `types`.
    pub fn constraint(mut self, name: &str, types: &[DType]) -> Self {
        self.type_constraints.push(TypeConstraint {
            name: name.into(),
            types: types.iter().copied().collect(),
        });
        self
    }

    /// Sets the constraint name of each input.
    pub fn inputs(mut self, names: &[&str]) -> Self {
        self.input_constraints = names.iter().map(|&n| RString::from(n)).collect();
        self
    }

    /// Sets the constraint name of each output.
    pub fn outputs(mut self, names: &[&str]) -> Self {
        self.output_constraints = names.iter().map(|&n| RString::from(n)).collect();
        self
    }

    /// Sets the device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// True when the opset range covers `version`.
    pub fn covers(&self, version: i32) -> bool {
        self.since_version <= version && version <= self.end_version
    }

    /// Whether the kernel accepts these input types (`None`: an absent optional input).
    /// Returns the first mismatch as a message.
    pub fn accepts(&self, inputs: &[Option<DType>]) -> Result<(), String> {
        if self.input_constraints.is_empty() {
            return Ok(());
        }
        for (i, dtype) in inputs.iter().enumerate() {
            let Some(dtype) = dtype else { continue };
            let idx = i.min(self.input_constraints.len() - 1);
            let name = &self.input_constraints[idx];
            let Some(c) = self.type_constraints.iter().find(|c| &c.name == name) else {
                continue;
            };
            if !c.types.contains(dtype) {
                return Err(format!(
                    "input {i} is {dtype}, constraint {name} allows {:?}",
                    c.types.iter().map(|t| t.kserve_name()).collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }
}

/// The value of a node attribute.
#[repr(u8)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// `INT`.
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `STRING` (bytes; usually UTF-8).
    String(RString),
    /// `INTS`.
    Ints(RVec<i64>),
    /// `FLOATS`.
    Floats(RVec<f32>),
    /// `STRINGS`.
    Strings(RVec<RString>),
    /// `TENSOR`.
    Tensor(OwnedTensor),
    /// `GRAPH`: a serialized ONNX `GraphProto`.
    Graph(RVec<u8>),
}

/// A named attribute of a node.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Attribute {
    /// Attribute name.
    pub name: RString,
    /// Attribute value.
    pub value: AttrValue,
}

/// What is known about one input or output of a node when its kernel is instantiated.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct ValueInfo<'a> {
    /// The value's name in the graph.
    pub name: RStr<'a>,
    /// False for an optional input the node leaves out.
    pub present: bool,
    /// Element type.
    pub dtype: DType,
    /// Static shape where known; `-1` marks a dimension known only at run time.
    pub shape: ROption<RSlice<'a, i64>>,
    /// The value itself when it is a constant (initializer): kernels pre-pack weights from it.
    pub constant: ROption<TensorView<'a>>,
}

/// A node, as its kernel sees it at instantiation.
#[repr(C)]
#[derive(StableAbi)]
pub struct NodeInfo<'a> {
    /// Node name (may be empty).
    pub name: RStr<'a>,
    /// Operator domain.
    pub domain: RStr<'a>,
    /// Operator type.
    pub op_type: RStr<'a>,
    /// The opset version resolved for the node.
    pub opset: i32,
    /// The device the node was placed on.
    pub device: Device,
    /// Attributes, as written in the model.
    pub attributes: RSlice<'a, Attribute>,
    /// Inputs, by position.
    pub inputs: RSlice<'a, ValueInfo<'a>>,
    /// Outputs, by position.
    pub outputs: RSlice<'a, ValueInfo<'a>>,
    /// The BLAS backend of the node's device, for pre-packing constant weights at model load
    /// (use the same backend from [`KernelContext::blas`] when computing).
    pub blas: ROption<FfiBlas_TO<'a, RRef<'a, ()>>>,
}

impl std::fmt::Debug for NodeInfo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeInfo")
            .field("name", &self.name)
            .field("domain", &self.domain)
            .field("op_type", &self.op_type)
            .field("opset", &self.opset)
            .field("device", &self.device)
            .field("attributes", &self.attributes)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("blas", &self.blas.is_some())
            .finish()
    }
}

impl<'a> NodeInfo<'a> {
    /// The BLAS backend of the node's device, if the host has one.
    pub fn blas(&self) -> Option<crate::blas::BlasRef<'_>> {
        self.blas
            .as_ref()
            .map(|b| crate::blas::BlasRef::new(b.sabi_reborrow()))
            .into_option()
    }

    /// The attribute `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&'a AttrValue> {
        self.attributes
            .as_slice()
            .iter()
            .find(|a| a.name.as_str() == name)
            .map(|a| &a.value)
    }

    /// An `INT` attribute, or `default` when absent.
    pub fn int_or(&self, name: &str, default: i64) -> Result<i64, PluginError> {
        match self.attr(name) {
            None => Ok(default),
            Some(AttrValue::Int(v)) => Ok(*v),
            Some(other) => Err(self.wrong_attr(name, "INT", other)),
        }
    }

    /// A `FLOAT` attribute, or `default` when absent.
    pub fn float_or(&self, name: &str, default: f32) -> Result<f32, PluginError> {
        match self.attr(name) {
            None => Ok(default),
            Some(AttrValue::Float(v)) => Ok(*v),
            Some(other) => Err(self.wrong_attr(name, "FLOAT", other)),
        }
    }

    /// A `STRING` attribute, or `default` when absent.
    pub fn string_or(&self, name: &str, default: &str) -> Result<String, PluginError> {
        match self.attr(name) {
            None => Ok(default.to_string()),
            Some(AttrValue::String(v)) => Ok(v.to_string()),
            Some(other) => Err(self.wrong_attr(name, "STRING", other)),
        }
    }

    /// An `INTS` attribute, if present.
    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, PluginError> {
        match self.attr(name) {
            None => Ok(None),
            Some(AttrValue::Ints(v)) => Ok(Some(v.to_vec())),
            Some(other) => Err(self.wrong_attr(name, "INTS", other)),
        }
    }

    /// A `FLOATS` attribute, if present.
    pub fn floats(&self, name: &str) -> Result<Option<Vec<f32>>, PluginError> {
        match self.attr(name) {
            None => Ok(None),
            Some(AttrValue::Floats(v)) => Ok(Some(v.to_vec())),
            Some(other) => Err(self.wrong_attr(name, "FLOATS", other)),
        }
    }

    fn wrong_attr(&self, name: &str, want: &str, got: &AttrValue) -> PluginError {
        PluginError::invalid(format!(
            "node '{}' ({}): attribute '{name}' must be {want}, got {got:?}",
            self.name, self.op_type
        ))
    }
}

/// A kernel prepared for one node. Called concurrently from many requests: keep per-call
/// state on the stack or in [`KernelContext::scratch`].
pub trait Kernel: Send + Sync + 'static {
    /// Computes the node's outputs from `inputs`, by position. An optional input the node
    /// leaves out is [`TensorView::absent`] (check [`TensorView::is_absent`]); trailing ones
    /// may be missing from the slice altogether. Outputs are allocated through
    /// [`KernelContext::output`]; [`KernelContext::num_outputs`] says how many the node has.
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError>;
}

/// Builds a [`Kernel`] for each node that resolves to this registration.
pub trait KernelFactory: Send + Sync + 'static {
    /// Reads attributes, checks what can be checked statically and pre-packs constant
    /// weights. Errors here fail the model load, with the node named.
    fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

    /// Checks the kernel: run by the daemon when the plugin loads (and before a hot swap is
    /// published); a kernel that fails is refused with its plugin. Default: nothing to check.
    fn self_test(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

impl<F> KernelFactory for F
where
    F: Fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> + Send + Sync + 'static,
{
    fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        self(node)
    }
}

/// A factory for kernels without per-node state: each node gets a clone of `kernel`.
pub fn stateless<K: Kernel + Clone>(kernel: K) -> impl KernelFactory {
    move |_: &NodeInfo<'_>| Ok(Box::new(kernel.clone()) as Box<dyn Kernel>)
}

/// The ABI form of [`KernelFactory`]. Implemented by the SDK; hosts call it.
#[sabi_trait]
pub trait FfiKernelFactory: Send + Sync {
    /// See [`KernelFactory::instantiate`].
    fn instantiate(&self, node: &NodeInfo<'_>) -> RResult<FfiKernelBox, PluginError>;

    /// See [`KernelFactory::self_test`].
    #[sabi(last_prefix_field)]
    fn self_test(&self) -> RResult<(), PluginError>;
}

/// The ABI form of [`Kernel`]. Implemented by the SDK; hosts call it.
#[sabi_trait]
pub trait FfiKernel: Send + Sync {
    /// See [`Kernel::compute`].
    #[sabi(last_prefix_field)]
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: RSlice<'_, TensorView<'_>>,
    ) -> RResult<(), PluginError>;
}

/// An owned kernel factory object, as it crosses the ABI.
pub type FfiKernelFactoryBox = FfiKernelFactory_TO<'static, RBox<()>>;
/// An owned kernel object, as it crosses the ABI.
pub type FfiKernelBox = FfiKernel_TO<'static, RBox<()>>;

struct FactoryAdapter<F>(F);
struct KernelAdapter(Box<dyn Kernel>);

impl<F: KernelFactory> FfiKernelFactory for FactoryAdapter<F> {
    fn instantiate(&self, node: &NodeInfo<'_>) -> RResult<FfiKernelBox, PluginError> {
        guard("kernel instantiation", || {
            let kernel = self.0.instantiate(node)?;
            Ok(FfiKernel_TO::from_value(
                KernelAdapter(kernel),
                abi_stable::sabi_trait::TD_Opaque,
            ))
        })
        .into()
    }

    fn self_test(&self) -> RResult<(), PluginError> {
        guard("kernel self-test", || self.0.self_test()).into()
    }
}

impl FfiKernel for KernelAdapter {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: RSlice<'_, TensorView<'_>>,
    ) -> RResult<(), PluginError> {
        guard("kernel", || self.0.compute(ctx, inputs.as_slice())).into()
    }
}

/// Wraps a [`KernelFactory`] into its ABI form, with every call guarded against panics.
pub fn into_ffi_factory<F: KernelFactory>(factory: F) -> FfiKernelFactoryBox {
    FfiKernelFactory_TO::from_value(FactoryAdapter(factory), abi_stable::sabi_trait::TD_Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opset_range_and_type_constraints() {
        let d = KernelDesc::onnx("Add", 7, 13)
            .constraint("T", &[DType::F32, DType::I64])
            .inputs(&["T", "T"]);
        assert!(d.covers(7) && d.covers(13) && !d.covers(6) && !d.covers(14));
        assert!(d.accepts(&[Some(DType::F32), Some(DType::F32)]).is_ok());
        let err = d
            .accepts(&[Some(DType::F32), Some(DType::F16)])
            .unwrap_err();
        assert!(err.contains("input 1 is FP16"), "{err}");
        // An absent optional input is not checked.
        assert!(d.accepts(&[Some(DType::I64), None]).is_ok());
    }
}
