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
    tensor::{Device, MemoryType, OwnedTensor, TensorView},
    DType, PluginError,
};
use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, ROption, RResult, RResult::ROk, RSlice, RStr, RVec},
    RRef, StableAbi,
};
use std::borrow::Cow;

/// `end_version` of a kernel that covers every later opset.
pub const OPEN_END: i32 = i32::MAX;

/// Named set of types a kernel accepts (ONNX's `T`, `T1`, `Tind`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct TypeConstraint {
    /// The constraint's name, as in the operator schema.
    pub name: String,
    /// The accepted types.
    pub types: Vec<DType>,
}

/// What a kernel implements, where it runs and what it needs from the host.
///
/// Built on the plugin's side with the builder methods below; it never crosses the ABI as a
/// struct: [`Registrar::kernel`](crate::Registrar::kernel) replays it as calls on the host's
/// registrar ([`FfiRegistrar`](crate::module::FfiRegistrar)), so fields can be added here
/// without changing a layout. The host keeps its own copy (the same type) for resolution.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct KernelDesc {
    /// Operator domain: `""` for the default ONNX domain (`ai.onnx`).
    pub domain: String,
    /// Operator type, e.g. `"Conv"`.
    pub op_type: String,
    /// First opset version covered.
    pub since_version: i32,
    /// Last opset version covered, inclusive ([`OPEN_END`] for open-ended).
    pub end_version: i32,
    /// Type constraints.
    pub type_constraints: Vec<TypeConstraint>,
    /// The constraint name of each input, by position; the last one repeats for variadic
    /// inputs. Empty: inputs are not checked.
    pub input_constraints: Vec<String>,
    /// The constraint name of each output, by position; same rules as inputs.
    pub output_constraints: Vec<String>,
    /// The device the kernel runs on.
    pub device: Device,
    /// Higher wins among kernels that match the same node on the same device.
    pub priority: i32,
    /// Inputs wanted in another memory type than the device's own (`(index, memory)`), e.g.
    /// [`MemoryType::HOST`] for shape, axes and size inputs of a device kernel.
    pub input_memory: Vec<(usize, MemoryType)>,
    /// Outputs produced in another memory type than the device's own.
    pub output_memory: Vec<(usize, MemoryType)>,
    /// `(input, output)`: the output may reuse the input's buffer (in-place), when the host
    /// can prove nothing else reads the input afterwards. The host decides per call: where it
    /// does, the output [`KernelContext::output`](crate::KernelContext::output) (or
    /// [`output_to_overwrite`](crate::KernelContext::output_to_overwrite)) returns starts at
    /// the input's data pointer, holding the input's elements as they are (neither zeroed nor
    /// poisoned: a kernel that declares an alias must write every element of that output).
    /// The kernel finds out by comparing the two pointers, and then must read that input only
    /// by raw pointer, each element before its own write to it (no `&[T]` of the input may
    /// live while it writes the output). opregd's memory plan does it for host kernels
    /// whose input and output have the same byte size (a residual sum written over its
    /// addend); a host may also never do it (opregd before that did not), which the same
    /// pointer test handles.
    pub aliases: Vec<(usize, usize)>,
    /// Device scratch the kernel needs per call, in bytes, when known up front (lets the
    /// host reserve it once per plan instead of per call).
    pub workspace_bytes: u64,
}

impl KernelDesc {
    /// A CPU kernel for `op_type` in `domain`, covering opsets `since..=end`.
    pub fn new(domain: &str, op_type: &str, since: i32, end: i32) -> Self {
        KernelDesc {
            domain: domain.into(),
            op_type: op_type.into(),
            since_version: since,
            end_version: end,
            type_constraints: Vec::new(),
            input_constraints: Vec::new(),
            output_constraints: Vec::new(),
            device: Device::CPU,
            priority: 0,
            input_memory: Vec::new(),
            output_memory: Vec::new(),
            aliases: Vec::new(),
            workspace_bytes: 0,
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
            types: types.to_vec(),
        });
        self
    }

    /// Sets the constraint name of each input.
    pub fn inputs(mut self, names: &[&str]) -> Self {
        self.input_constraints = names.iter().map(|&n| n.to_string()).collect();
        self
    }

    /// Sets the constraint name of each output.
    pub fn outputs(mut self, names: &[&str]) -> Self {
        self.output_constraints = names.iter().map(|&n| n.to_string()).collect();
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

    /// Asks for input `index` in `memory` (e.g. a shape input on the host).
    pub fn input_memory(mut self, index: usize, memory: MemoryType) -> Self {
        self.input_memory.retain(|&(i, _)| i != index);
        self.input_memory.push((index, memory));
        self
    }

    /// Produces output `index` in `memory`.
    pub fn output_memory(mut self, index: usize, memory: MemoryType) -> Self {
        self.output_memory.retain(|&(i, _)| i != index);
        self.output_memory.push((index, memory));
        self
    }

    /// Declares that `output` may reuse `input`'s buffer.
    pub fn alias(mut self, input: usize, output: usize) -> Self {
        self.aliases.push((input, output));
        self
    }

    /// Declares the device scratch a call needs.
    pub fn workspace(mut self, bytes: u64) -> Self {
        self.workspace_bytes = bytes;
        self
    }

    /// The memory type input `index` is wanted in.
    pub fn input_memory_of(&self, index: usize) -> MemoryType {
        self.input_memory
            .iter()
            .find(|&&(i, _)| i == index)
            .map_or(MemoryType::DEVICE, |&(_, m)| m)
    }

    /// The memory type output `index` is produced in.
    pub fn output_memory_of(&self, index: usize) -> MemoryType {
        self.output_memory
            .iter()
            .find(|&&(i, _)| i == index)
            .map_or(MemoryType::DEVICE, |&(_, m)| m)
    }

    /// True when the opset range covers `version`.
    pub fn covers(&self, version: i32) -> bool {
        self.since_version <= version && version <= self.end_version
    }

    /// Whether the kernel accepts these input types (`None`: an absent optional input).
    /// Returns the first mismatch as a message.
    pub fn accepts(&self, inputs: &[Option<DType>]) -> Result<(), String> {
        let Some(last) = self.input_constraints.len().checked_sub(1) else {
            return Ok(());
        };
        for (i, dtype) in inputs.iter().enumerate() {
            let Some(dtype) = dtype else { continue };
            let Some(name) = self.input_constraints.get(i.min(last)) else {
                continue;
            };
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

/// The kind of an attribute: ONNX's `AttributeProto.AttributeType` codes. An open code: a
/// host may pass kinds this SDK does not know (they read as [`AttrValue::Unsupported`]).
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct AttrKind(pub u32);

impl AttrKind {
    /// `FLOAT`.
    pub const FLOAT: AttrKind = AttrKind(1);
    /// `INT`.
    pub const INT: AttrKind = AttrKind(2);
    /// `STRING`.
    pub const STRING: AttrKind = AttrKind(3);
    /// `TENSOR`.
    pub const TENSOR: AttrKind = AttrKind(4);
    /// `GRAPH` (read as a serialized `GraphProto`).
    pub const GRAPH: AttrKind = AttrKind(5);
    /// `FLOATS`.
    pub const FLOATS: AttrKind = AttrKind(6);
    /// `INTS`.
    pub const INTS: AttrKind = AttrKind(7);
    /// `STRINGS`.
    pub const STRINGS: AttrKind = AttrKind(8);
}

/// The value of a node attribute, as a plugin reads it. Not an ABI type: the host hands
/// attributes over through [`FfiNodeInfo`] accessors, one kind code at a time, so kinds can
/// be added without a layout change.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum AttrValue {
    /// `INT`.
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `STRING` (bytes read as UTF-8, invalid sequences replaced).
    String(String),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOATS`.
    Floats(Vec<f32>),
    /// `STRINGS`.
    Strings(Vec<String>),
    /// `TENSOR`.
    Tensor(OwnedTensor),
    /// `GRAPH`: a serialized ONNX `GraphProto`.
    Graph(Vec<u8>),
    /// A kind this SDK does not read (e.g. `SPARSE_TENSOR`, `GRAPHS`).
    Unsupported(AttrKind),
}

impl AttrValue {
    /// The kind code of this value.
    pub fn kind(&self) -> AttrKind {
        match self {
            AttrValue::Int(_) => AttrKind::INT,
            AttrValue::Float(_) => AttrKind::FLOAT,
            AttrValue::String(_) => AttrKind::STRING,
            AttrValue::Ints(_) => AttrKind::INTS,
            AttrValue::Floats(_) => AttrKind::FLOATS,
            AttrValue::Strings(_) => AttrKind::STRINGS,
            AttrValue::Tensor(_) => AttrKind::TENSOR,
            AttrValue::Graph(_) => AttrKind::GRAPH,
            AttrValue::Unsupported(k) => *k,
        }
    }
}

/// A named attribute of a node.
#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    /// Attribute name.
    pub name: String,
    /// Attribute value.
    pub value: AttrValue,
}

/// Which side of a node a value is on, for [`FfiNodeInfo`]'s value accessors.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Io(pub u32);

impl Io {
    /// An input.
    pub const INPUT: Io = Io(0);
    /// An output.
    pub const OUTPUT: Io = Io(1);
}

/// What is known about one input or output of a node when its kernel is instantiated.
#[derive(Copy, Clone, Debug)]
pub struct ValueInfo<'a> {
    /// The value's name in the graph.
    pub name: &'a str,
    /// False for an optional input the node leaves out.
    pub present: bool,
    /// Element type.
    pub dtype: DType,
    /// Static shape where known; `-1` marks a dimension known only at run time.
    pub shape: Option<&'a [i64]>,
    /// The value itself when it is a constant (initializer): kernels pre-pack weights from it.
    pub constant: Option<TensorView<'a>>,
}

/// A node, as its kernel sees it at instantiation.
///
/// The same type on both sides: the host fills one in and lends it through
/// [`FfiNodeInfo`] (accessors only, so the ABI can grow), and the SDK rebuilds it on the
/// plugin's side before calling [`KernelFactory::instantiate`].
pub struct NodeInfo<'a> {
    /// Node name (may be empty).
    pub name: &'a str,
    /// Operator domain.
    pub domain: &'a str,
    /// Operator type.
    pub op_type: &'a str,
    /// The opset version resolved for the node.
    pub opset: i32,
    /// The device the node was placed on.
    pub device: Device,
    /// Attributes, as written in the model.
    pub attributes: Cow<'a, [Attribute]>,
    /// Inputs, by position.
    pub inputs: Vec<ValueInfo<'a>>,
    /// Outputs, by position.
    pub outputs: Vec<ValueInfo<'a>>,
    /// The BLAS backend of the node's device, for pre-packing constant weights at model load
    /// (use the same backend from [`KernelContext::blas`] when computing).
    pub blas: Option<FfiBlas_TO<'a, RRef<'a, ()>>>,
    /// A context on the node's device for work done at load (packing weights through
    /// [`pack_b`](crate::blas::BlasRef::pack_b), uploading constants): the host's thread
    /// pool, the device's stream and allocator. Absent when the host has none to lend.
    pub context: Option<KernelContext<'a>>,
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
    }

    /// The attribute `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
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

    fn attribute(&self, i: usize) -> Option<&AttrValue> {
        self.attributes.get(i).map(|a| &a.value)
    }

    fn value(&self, io: Io, i: usize) -> Option<&ValueInfo<'a>> {
        match io {
            Io::INPUT => self.inputs.get(i),
            Io::OUTPUT => self.outputs.get(i),
            _ => None,
        }
    }

    /// For hosts: lends this node through the ABI.
    pub fn as_ffi(&self) -> FfiNodeInfo_TO<'_, RRef<'_, ()>> {
        FfiNodeInfo_TO::from_ptr(RRef::new(self), TD_Opaque)
    }

    /// For the SDK's side of the ABI: rebuilds the node from the host's accessors. Attribute
    /// values are copied (instantiation runs once per node, at model load).
    pub fn from_ffi<'t, 'p>(ffi: &'a FfiNodeInfo_TO<'t, RRef<'p, ()>>) -> NodeInfo<'a> {
        let attributes = (0..ffi.num_attributes())
            .map(|i| Attribute {
                name: ffi.attribute_name(i).as_str().to_string(),
                value: read_attr(ffi, i),
            })
            .collect::<Vec<_>>();
        let values = |io: Io| {
            (0..ffi.num_values(io))
                .map(|i| ValueInfo {
                    name: ffi.value_name(io, i).as_str(),
                    present: ffi.value_present(io, i),
                    dtype: ffi.value_dtype(io, i),
                    shape: ffi.value_shape(io, i).into_option().map(|s| s.as_slice()),
                    constant: ffi.value_constant(io, i).into_option(),
                })
                .collect::<Vec<_>>()
        };
        NodeInfo {
            name: ffi.name().as_str(),
            domain: ffi.domain().as_str(),
            op_type: ffi.op_type().as_str(),
            opset: ffi.opset(),
            device: ffi.device(),
            attributes: Cow::Owned(attributes),
            inputs: values(Io::INPUT),
            outputs: values(Io::OUTPUT),
            blas: ffi.blas().into_option(),
            context: ffi.context().into_option(),
        }
    }
}

fn read_attr(ffi: &FfiNodeInfo_TO<'_, RRef<'_, ()>>, i: usize) -> AttrValue {
    let text = |b: RSlice<'_, u8>| String::from_utf8_lossy(b.as_slice()).into_owned();
    match ffi.attribute_kind(i) {
        AttrKind::INT => AttrValue::Int(ffi.attribute_int(i)),
        AttrKind::FLOAT => AttrValue::Float(ffi.attribute_float(i)),
        AttrKind::STRING => AttrValue::String(text(ffi.attribute_bytes(i))),
        AttrKind::GRAPH => AttrValue::Graph(ffi.attribute_bytes(i).to_vec()),
        AttrKind::INTS => AttrValue::Ints(ffi.attribute_ints(i).to_vec()),
        AttrKind::FLOATS => AttrValue::Floats(ffi.attribute_floats(i).to_vec()),
        AttrKind::STRINGS => AttrValue::Strings(
            (0..ffi.attribute_num_strings(i))
                .map(|j| text(ffi.attribute_string_at(i, j)))
                .collect(),
        ),
        AttrKind::TENSOR => match ffi.attribute_tensor(i).into_option() {
            Some(t) => AttrValue::Tensor(t.clone()),
            None => AttrValue::Unsupported(AttrKind::TENSOR),
        },
        other => AttrValue::Unsupported(other),
    }
}

/// A node lent by the host at instantiation: accessors only, so later minors can append
/// accessors without changing a layout. Implemented by hosts (see [`NodeInfo::as_ffi`]);
/// plugins read it through [`NodeInfo`]. Index arguments out of range return empty values.
#[sabi_trait]
pub trait FfiNodeInfo: Send + Sync {
    /// Node name.
    fn name(&self) -> RStr<'_>;
    /// Operator domain.
    fn domain(&self) -> RStr<'_>;
    /// Operator type.
    fn op_type(&self) -> RStr<'_>;
    /// Resolved opset version.
    fn opset(&self) -> i32;
    /// The device the node was placed on.
    fn device(&self) -> Device;
    /// Number of attributes.
    fn num_attributes(&self) -> usize;
    /// Name of attribute `i`.
    fn attribute_name(&self, i: usize) -> RStr<'_>;
    /// Kind of attribute `i`.
    fn attribute_kind(&self, i: usize) -> AttrKind;
    /// Attribute `i` as `INT` (0 for another kind).
    fn attribute_int(&self, i: usize) -> i64;
    /// Attribute `i` as `FLOAT` (0 for another kind).
    fn attribute_float(&self, i: usize) -> f32;
    /// Attribute `i` as bytes: `STRING`, or `GRAPH` as a serialized `GraphProto`.
    fn attribute_bytes(&self, i: usize) -> RSlice<'_, u8>;
    /// Attribute `i` as `INTS`.
    fn attribute_ints(&self, i: usize) -> RSlice<'_, i64>;
    /// Attribute `i` as `FLOATS`.
    fn attribute_floats(&self, i: usize) -> RSlice<'_, f32>;
    /// Number of strings of a `STRINGS` attribute `i`.
    fn attribute_num_strings(&self, i: usize) -> usize;
    /// String `j` of a `STRINGS` attribute `i`.
    fn attribute_string_at(&self, i: usize, j: usize) -> RSlice<'_, u8>;
    /// Attribute `i` as `TENSOR`.
    fn attribute_tensor(&self, i: usize) -> ROption<&OwnedTensor>;
    /// Number of inputs or outputs.
    fn num_values(&self, io: Io) -> usize;
    /// Name of value `i`.
    fn value_name(&self, io: Io, i: usize) -> RStr<'_>;
    /// False for an optional input the node leaves out.
    fn value_present(&self, io: Io, i: usize) -> bool;
    /// Element type of value `i`.
    fn value_dtype(&self, io: Io, i: usize) -> DType;
    /// Static shape of value `i`, where known (`-1`: known only at run time).
    fn value_shape(&self, io: Io, i: usize) -> ROption<RSlice<'_, i64>>;
    /// The value when it is a constant.
    fn value_constant(&self, io: Io, i: usize) -> ROption<TensorView<'_>>;
    /// The BLAS backend of the node's device.
    fn blas(&self) -> ROption<FfiBlas_TO<'_, RRef<'_, ()>>>;
    /// A context for work at load time (see [`NodeInfo::context`]).
    #[sabi(last_prefix_field)]
    fn context(&self) -> ROption<KernelContext<'_>>;
}

impl FfiNodeInfo for NodeInfo<'_> {
    fn name(&self) -> RStr<'_> {
        self.name.into()
    }
    fn domain(&self) -> RStr<'_> {
        self.domain.into()
    }
    fn op_type(&self) -> RStr<'_> {
        self.op_type.into()
    }
    fn opset(&self) -> i32 {
        self.opset
    }
    fn device(&self) -> Device {
        self.device
    }
    fn num_attributes(&self) -> usize {
        self.attributes.len()
    }
    fn attribute_name(&self, i: usize) -> RStr<'_> {
        self.attributes
            .get(i)
            .map_or("", |a| a.name.as_str())
            .into()
    }
    fn attribute_kind(&self, i: usize) -> AttrKind {
        self.attribute(i).map_or(AttrKind(0), AttrValue::kind)
    }
    fn attribute_int(&self, i: usize) -> i64 {
        match self.attribute(i) {
            Some(AttrValue::Int(v)) => *v,
            _ => 0,
        }
    }
    fn attribute_float(&self, i: usize) -> f32 {
        match self.attribute(i) {
            Some(AttrValue::Float(v)) => *v,
            _ => 0.0,
        }
    }
    fn attribute_bytes(&self, i: usize) -> RSlice<'_, u8> {
        match self.attribute(i) {
            Some(AttrValue::String(v)) => v.as_bytes().into(),
            Some(AttrValue::Graph(v)) => v.as_slice().into(),
            _ => RSlice::EMPTY,
        }
    }
    fn attribute_ints(&self, i: usize) -> RSlice<'_, i64> {
        match self.attribute(i) {
            Some(AttrValue::Ints(v)) => v.as_slice().into(),
            _ => RSlice::EMPTY,
        }
    }
    fn attribute_floats(&self, i: usize) -> RSlice<'_, f32> {
        match self.attribute(i) {
            Some(AttrValue::Floats(v)) => v.as_slice().into(),
            _ => RSlice::EMPTY,
        }
    }
    fn attribute_num_strings(&self, i: usize) -> usize {
        match self.attribute(i) {
            Some(AttrValue::Strings(v)) => v.len(),
            _ => 0,
        }
    }
    fn attribute_string_at(&self, i: usize, j: usize) -> RSlice<'_, u8> {
        match self.attribute(i) {
            Some(AttrValue::Strings(v)) => v.get(j).map_or(RSlice::EMPTY, |s| s.as_bytes().into()),
            _ => RSlice::EMPTY,
        }
    }
    fn attribute_tensor(&self, i: usize) -> ROption<&OwnedTensor> {
        match self.attribute(i) {
            Some(AttrValue::Tensor(t)) => ROption::RSome(t),
            _ => ROption::RNone,
        }
    }
    fn num_values(&self, io: Io) -> usize {
        match io {
            Io::INPUT => self.inputs.len(),
            Io::OUTPUT => self.outputs.len(),
            _ => 0,
        }
    }
    fn value_name(&self, io: Io, i: usize) -> RStr<'_> {
        self.value(io, i).map_or("", |v| v.name).into()
    }
    fn value_present(&self, io: Io, i: usize) -> bool {
        self.value(io, i).is_some_and(|v| v.present)
    }
    fn value_dtype(&self, io: Io, i: usize) -> DType {
        self.value(io, i).map_or(DType(0), |v| v.dtype)
    }
    fn value_shape(&self, io: Io, i: usize) -> ROption<RSlice<'_, i64>> {
        self.value(io, i)
            .and_then(|v| v.shape)
            .map(RSlice::from_slice)
            .into()
    }
    fn value_constant(&self, io: Io, i: usize) -> ROption<TensorView<'_>> {
        self.value(io, i).and_then(|v| v.constant).into()
    }
    fn blas(&self) -> ROption<FfiBlas_TO<'_, RRef<'_, ()>>> {
        self.blas.as_ref().map(|b| b.sabi_reborrow()).into()
    }
    fn context(&self) -> ROption<KernelContext<'_>> {
        self.context.as_ref().map(KernelContext::reborrow).into()
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

    /// The constant inputs (by position) this kernel copied at instantiation, in a form of
    /// its own (weights packed for its BLAS), and never reads in [`compute`](Self::compute)
    /// (ABI 1.8). The host may then free such a constant once no other node reads it — a
    /// model's weights are otherwise held twice, as loaded and as packed — and passes
    /// [`TensorView::absent`] in its place to `compute`. Only inputs whose
    /// [`ValueInfo::constant`] was given at instantiation count; the host ignores others.
    /// Default: none (every input is passed as it is).
    fn absorbed(&self) -> Vec<usize> {
        Vec::new()
    }
}

/// Builds a [`Kernel`] for each node that resolves to this registration.
pub trait KernelFactory: Send + Sync + 'static {
    /// Reads attributes, checks what can be checked statically and pre-packs constant
    /// weights. Errors here fail the model load, with the node named — except
    /// [`ErrorCode::Unimplemented`](crate::ErrorCode::Unimplemented) from a kernel on a device
    /// (not the host), which declines the node: placement moves it to the model's next device.
    fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

    /// Checks the kernel: run by the daemon when the plugin loads (and before a hot swap is
    /// published); a kernel that fails is refused with its plugin. Default: nothing to check.
    fn self_test(&self) -> Result<(), PluginError> {
        Ok(())
    }

    /// What the node's outputs will be, before anything runs (ABI 1.1): one [`OutputFact`]
    /// per output, from the node's attributes and its inputs' types, static shapes and
    /// constants. The daemon calls it at compile time, after resolving this kernel and before
    /// instantiating it, and carries the result downstream: later nodes are resolved by these
    /// types and see these shapes in their [`ValueInfo`]s. Fewer facts than outputs (the
    /// default: none) leave the rest unknown; execution never depends on inference, since
    /// kernels size their outputs at run time. An input whose type is not known statically
    /// reads [`DType::UNDEFINED`]; output [`ValueInfo`]s carry nothing yet.
    fn infer(&self, node: &NodeInfo<'_>) -> Result<Vec<OutputFact>, PluginError> {
        let _ = node;
        Ok(Vec::new())
    }
}

/// What inference knows about one output of a node (see [`KernelFactory::infer`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputFact {
    /// The element type, `None` when unknown.
    pub dtype: Option<DType>,
    /// The shape, `-1` for a dimension known only at run time; `None` when not even the rank
    /// is known.
    pub shape: Option<Vec<i64>>,
}

impl OutputFact {
    /// A fact with a type and a shape.
    pub fn new(dtype: Option<DType>, shape: Option<Vec<i64>>) -> Self {
        OutputFact { dtype, shape }
    }

    /// Nothing known.
    pub fn unknown() -> Self {
        OutputFact::default()
    }

    /// The ABI form.
    pub fn into_ffi(self) -> FfiOutputFact {
        FfiOutputFact {
            dtype: self.dtype.unwrap_or(DType::UNDEFINED),
            shape: self.shape.map(RVec::from).into(),
        }
    }

    /// From the ABI form.
    pub fn from_ffi(f: FfiOutputFact) -> Self {
        OutputFact {
            dtype: (f.dtype != DType::UNDEFINED).then_some(f.dtype),
            shape: f.shape.into_option().map(|s| s.into_vec()),
        }
    }
}

/// [`OutputFact`] as it crosses the ABI (appended in 1.1; frozen from then on: a later minor
/// adds a method rather than a field).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct FfiOutputFact {
    /// The element type; [`DType::UNDEFINED`] when unknown.
    pub dtype: DType,
    /// The shape (`-1` for a run-time dimension), or `RNone` when the rank is unknown.
    pub shape: ROption<RVec<i64>>,
}

/// A factory whose inference is `infer` wherever `factory`'s own gives nothing: how an
/// operator library supplies one table of rules for all its kernels
/// (see [`Registrar::infer_with`](crate::Registrar::infer_with)).
pub struct WithInfer<F> {
    factory: F,
    infer: InferFn,
}

/// A shared inference function (see [`KernelFactory::infer`]).
pub type InferFn =
    std::sync::Arc<dyn Fn(&NodeInfo<'_>) -> Result<Vec<OutputFact>, PluginError> + Send + Sync>;

impl<F: KernelFactory> WithInfer<F> {
    /// Wraps `factory`, falling back to `infer`.
    pub fn new(factory: F, infer: InferFn) -> Self {
        WithInfer { factory, infer }
    }
}

impl<F: KernelFactory> KernelFactory for WithInfer<F> {
    fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        self.factory.instantiate(node)
    }

    fn self_test(&self) -> Result<(), PluginError> {
        self.factory.self_test()
    }

    fn infer(&self, node: &NodeInfo<'_>) -> Result<Vec<OutputFact>, PluginError> {
        let own = self.factory.infer(node)?;
        if own.is_empty() {
            (self.infer)(node)
        } else {
            Ok(own)
        }
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
    fn instantiate(
        &self,
        node: FfiNodeInfo_TO<'_, RRef<'_, ()>>,
    ) -> RResult<FfiKernelBox, PluginError>;

    /// See [`KernelFactory::self_test`].
    #[sabi(last_prefix_field)]
    fn self_test(&self) -> RResult<(), PluginError>;

    /// See [`KernelFactory::infer`]. Appended in 1.1: a 1.0 plugin's vtable lacks it, and
    /// this default body (nothing known) answers for it.
    fn infer(
        &self,
        node: FfiNodeInfo_TO<'_, RRef<'_, ()>>,
    ) -> RResult<RVec<FfiOutputFact>, PluginError> {
        let _ = node;
        ROk(RVec::new())
    }
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

    /// See [`Kernel::absorbed`]. Appended in 1.8: an older plugin's vtable lacks it, and this
    /// default body (none: every input is passed) answers for it.
    fn absorbed(&self) -> RVec<u32> {
        RVec::new()
    }
}

/// An owned kernel factory object, as it crosses the ABI.
pub type FfiKernelFactoryBox = FfiKernelFactory_TO<'static, RBox<()>>;
/// An owned kernel object, as it crosses the ABI.
pub type FfiKernelBox = FfiKernel_TO<'static, RBox<()>>;

struct FactoryAdapter<F>(F);
struct KernelAdapter(Box<dyn Kernel>);

impl<F: KernelFactory> FfiKernelFactory for FactoryAdapter<F> {
    fn instantiate(
        &self,
        node: FfiNodeInfo_TO<'_, RRef<'_, ()>>,
    ) -> RResult<FfiKernelBox, PluginError> {
        guard("kernel instantiation", || {
            let node = NodeInfo::from_ffi(&node);
            let kernel = self.0.instantiate(&node)?;
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

    fn infer(
        &self,
        node: FfiNodeInfo_TO<'_, RRef<'_, ()>>,
    ) -> RResult<RVec<FfiOutputFact>, PluginError> {
        guard("shape inference", || {
            let node = NodeInfo::from_ffi(&node);
            let facts = self.0.infer(&node)?;
            Ok(facts.into_iter().map(OutputFact::into_ffi).collect())
        })
        .into()
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

    fn absorbed(&self) -> RVec<u32> {
        // A position past u32 is no input of any node; a panic here would cross the ABI.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.absorbed()))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| u32::try_from(i).ok())
            .collect()
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
