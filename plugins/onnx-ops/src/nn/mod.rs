//! Neural-network operators: matrix products (through the BLAS backend), convolution,
//! pooling, normalisation, softmax.

use opreg_sdk::prelude::*;

mod activation;
mod conv;
mod conv_transpose;
mod deform_conv;
mod einsum;
mod matmul;
mod norm;
mod pool;
mod softmax;
#[cfg(test)]
pub(crate) mod testblas;
mod unpool;

/// The element vocabulary of the float kernels: the SDK's (f16 and bf16 compute in f32).
pub(crate) use opreg_sdk::numeric::{Arith, Float, Real, Scalar, FLOATS};

pub(crate) use crate::util::{not_implemented_for, optional, Factory};
pub(crate) use matmul::{gemm_f32, pack_constant_b};

/// Registers `factory` for `op` once per schema version range: `versions` are the schema
/// versions in increasing order; the last range is open-ended.
pub(crate) fn register_versions(
    r: &mut Registrar,
    op: &str,
    versions: &[i32],
    constraints: &[(&str, &[DType])],
    inputs: &[&str],
    outputs: &[&str],
    factory: Factory,
) {
    for (i, &since) in versions.iter().enumerate() {
        let end = versions.get(i + 1).map_or(OPEN_END, |next| next - 1);
        let mut desc = KernelDesc::onnx(op, since, end)
            .inputs(inputs)
            .outputs(outputs);
        for (name, types) in constraints {
            desc = desc.constraint(name, types);
        }
        r.kernel(desc, factory);
    }
}

/// Integer attribute `name` (`default` when missing), which must be at least 1.
pub(crate) fn at_least_one(
    node: &NodeInfo<'_>,
    op: &str,
    name: &str,
    default: i64,
) -> Result<usize, PluginError> {
    let v = node.int_or(name, default)?;
    if v < 1 {
        return Err(PluginError::invalid(format!(
            "{op}: attribute '{name}' must be >= 1, got {v}"
        )));
    }
    Ok(v as usize)
}

/// The optional per-output-channel bias `B` (input 2) of a convolution with `m` outputs, as
/// elements of `T` (the convolution's element type).
pub(crate) fn conv_bias<'a, T: Element>(
    op: &str,
    inputs: &[TensorView<'a>],
    m: usize,
) -> Result<Option<&'a [T]>, PluginError> {
    match optional(inputs, 2) {
        Some(b) if b.shape() != [m] => Err(PluginError::invalid(format!(
            "{op}: bias B has shape {:?}, expected [{m}]",
            b.shape()
        ))),
        Some(b) => Ok(Some(b.as_slice::<T>()?)),
        None => Ok(None),
    }
}

/// How padding is chosen for a convolution or pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AutoPad {
    NotSet,
    Valid,
    SameUpper,
    SameLower,
}

/// Window attributes shared by convolution and pooling, as written on the node.
#[derive(Clone, Debug)]
pub(crate) struct WindowAttrs {
    pub kernel_shape: Option<Vec<i64>>,
    pub strides: Option<Vec<i64>>,
    pub dilations: Option<Vec<i64>>,
    pub pads: Option<Vec<i64>>,
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
}

/// The resolved geometry of a window over `s` spatial dimensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pad_begin: Vec<usize>,
    pub pad_end: Vec<usize>,
    pub out: Vec<usize>,
}

impl WindowAttrs {
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Self, PluginError> {
        Self::from_node_prefixed(node, "")
    }

    /// The window of the attributes named `<prefix>kernel_shape`, `<prefix>strides`, ... (a
    /// fused node carrying a second window: `opreg::FusedConvMaxPool`'s `pool_` ones).
    pub fn from_node_prefixed(node: &NodeInfo<'_>, prefix: &str) -> Result<Self, PluginError> {
        let name = |a: &str| format!("{prefix}{a}");
        let auto_pad = match node.string_or(&name("auto_pad"), "NOTSET")?.as_str() {
            "NOTSET" | "" => AutoPad::NotSet,
            "VALID" => AutoPad::Valid,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            other => {
                return Err(PluginError::invalid(format!(
                    "{}: unknown auto_pad '{other}'",
                    node.op_type
                )))
            }
        };
        Ok(WindowAttrs {
            kernel_shape: node.ints(&name("kernel_shape"))?,
            strides: node.ints(&name("strides"))?,
            dilations: node.ints(&name("dilations"))?,
            pads: node.ints(&name("pads"))?,
            auto_pad,
            ceil_mode: node.int_or(&name("ceil_mode"), 0)? != 0,
        })
    }

    /// Resolves the window over `input` spatial extents; `kernel` is the kernel shape (from
    /// the weights for Conv; from `kernel_shape` when `None`).
    pub fn resolve(
        &self,
        op: &str,
        input: &[usize],
        kernel: Option<&[usize]>,
    ) -> Result<Geometry, PluginError> {
        let s = input.len();
        let list = |name: &str, v: &Option<Vec<i64>>, len: usize, default: usize, min: i64| match v
        {
            None => Ok(vec![default; len]),
            Some(v) if v.len() != len => Err(PluginError::invalid(format!(
                "{op}: attribute '{name}' has {} values, expected {len}",
                v.len()
            ))),
            Some(v) => v
                .iter()
                .map(|&x| {
                    if x < min {
                        Err(PluginError::invalid(format!(
                            "{op}: attribute '{name}' has value {x} below {min}"
                        )))
                    } else {
                        Ok(x as usize)
                    }
                })
                .collect(),
        };
        let kernel = match (kernel, &self.kernel_shape) {
            (Some(k), Some(attr)) => {
                if attr.len() != k.len() || attr.iter().zip(k).any(|(&a, &b)| a != b as i64) {
                    return Err(PluginError::invalid(format!(
                        "{op}: kernel_shape {attr:?} does not match the weights' {k:?}"
                    )));
                }
                k.to_vec()
            }
            (Some(k), None) => k.to_vec(),
            (None, Some(_)) => list("kernel_shape", &self.kernel_shape, s, 1, 1)?,
            (None, None) => {
                return Err(PluginError::invalid(format!(
                    "{op}: attribute 'kernel_shape' is required"
                )))
            }
        };
        if kernel.len() != s {
            return Err(PluginError::invalid(format!(
                "{op}: kernel has {} spatial dimensions, input has {s}",
                kernel.len()
            )));
        }
        let strides = list("strides", &self.strides, s, 1, 1)?;
        let dilations = list("dilations", &self.dilations, s, 1, 1)?;
        let pads = list("pads", &self.pads, 2 * s, 0, 0)?;
        let mut g = Geometry {
            kernel,
            strides,
            dilations,
            pad_begin: vec![0; s],
            pad_end: vec![0; s],
            out: vec![0; s],
        };
        // Attributes are arbitrary i64s: extents are computed checked, so that absurd pads or
        // dilations are an error rather than an overflow.
        let too_large = |d: usize| {
            PluginError::invalid(format!(
                "{op}: window extents on spatial axis {d} overflow (pads {pads:?})"
            ))
        };
        for d in 0..s {
            if g.kernel[d] == 0 {
                return Err(PluginError::invalid(format!(
                    "{op}: kernel {:?} is empty on spatial axis {d}",
                    g.kernel
                )));
            }
            let ek = (g.kernel[d] - 1)
                .checked_mul(g.dilations[d])
                .and_then(|e| e.checked_add(1))
                .ok_or_else(|| too_large(d))?;
            let st = g.strides[d];
            let inp = input[d];
            match self.auto_pad {
                AutoPad::NotSet | AutoPad::Valid => {
                    if self.auto_pad == AutoPad::NotSet {
                        g.pad_begin[d] = pads[d];
                        g.pad_end[d] = pads[s + d];
                    }
                    // Window positions are isize (from minus the begin pad): keep them there.
                    let padded = inp
                        .checked_add(g.pad_begin[d])
                        .and_then(|v| v.checked_add(g.pad_end[d]))
                        .filter(|&v| v <= isize::MAX as usize)
                        .ok_or_else(|| too_large(d))?;
                    if padded < ek {
                        return Err(PluginError::invalid(format!(
                            "{op}: window of extent {ek} does not fit the padded input extent \
                             {padded} on spatial axis {d}"
                        )));
                    }
                    let num = padded - ek;
                    let mut out = if self.ceil_mode && self.auto_pad == AutoPad::NotSet {
                        num.div_ceil(st) + 1
                    } else {
                        num / st + 1
                    };
                    // With ceil_mode, a window may not start in the end padding.
                    if self.ceil_mode && out > 1 && (out - 1) * st >= inp + g.pad_begin[d] {
                        out -= 1;
                    }
                    g.out[d] = out;
                }
                AutoPad::SameUpper | AutoPad::SameLower => {
                    let out = inp.div_ceil(st);
                    let total = ((out.max(1) - 1) * st)
                        .checked_add(ek)
                        .filter(|&v| v <= isize::MAX as usize)
                        .ok_or_else(|| too_large(d))?
                        .saturating_sub(inp);
                    let small = total / 2;
                    let (b, e) = if self.auto_pad == AutoPad::SameUpper {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                    g.pad_begin[d] = b;
                    g.pad_end[d] = e;
                    g.out[d] = out;
                }
            }
        }
        Ok(g)
    }
}

/// A mutable slice shared with parallel tasks that each write a disjoint part of it.
pub(crate) struct Disjoint<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: tasks only take disjoint sub-slices (see `part`); T is plain data.
unsafe impl<T: Send> Send for Disjoint<T> {}
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    pub fn new(s: &mut [T]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// `start..start + len` of the slice.
    ///
    /// # Safety
    /// No two live results may overlap, and the source slice must outlive them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "Disjoint::part out of range");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

/// The BLAS backend of the node's device, or the error an operator reports without one.
pub(crate) fn blas<'a>(
    ctx: &'a KernelContext<'_>,
    op: &str,
) -> Result<opreg_sdk::blas::BlasRef<'a>, PluginError> {
    ctx.blas().ok_or_else(|| {
        PluginError::unimplemented(format!("{op} needs a BLAS backend on {}", ctx.device()))
    })
}

pub fn register(r: &mut Registrar) {
    matmul::register(r);
    conv::register(r);
    conv_transpose::register(r);
    einsum::register(r);
    pool::register(r);
    norm::register(r);
    softmax::register(r);
    unpool::register(r);
    deform_conv::register(r);
}

#[cfg(test)]
mod tests {
    use super::register;
    use opreg_sdk::prelude::*;

    /// Every op this plugin registers resolves to exactly one kernel per opset: schema
    /// version ranges never overlap and leave no gap up to the newest.
    #[test]
    fn registrations_are_disjoint_and_open_ended() {
        // Only this family's registrations: other families split some ops by type.
        let reg = opreg_sdk::module::collect_from(|r| {
            register(r);
            crate::reduce::register(r);
        })
        .expect("registration");
        let mut by_op: std::collections::BTreeMap<String, Vec<(i32, i32)>> = Default::default();
        for k in reg.kernels.iter() {
            by_op
                .entry(k.desc.op_type.to_string())
                .or_default()
                .push((k.desc.since_version, k.desc.end_version));
        }
        for (op, mut ranges) in by_op {
            ranges.sort();
            for w in ranges.windows(2) {
                assert_eq!(w[0].1.saturating_add(1), w[1].0, "{op}: ranges {ranges:?}");
            }
            assert_eq!(ranges.last().map(|r| r.1), Some(OPEN_END), "{op}");
        }
        for op in [
            "MatMul",
            "Gemm",
            "Conv",
            "ConvTranspose",
            "Einsum",
            "MaxPool",
            "AveragePool",
            "LpPool",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "BatchNormalization",
            "InstanceNormalization",
            "LayerNormalization",
            "GroupNormalization",
            "LRN",
            "Softmax",
            "LogSoftmax",
            "Hardmax",
            "ReduceSum",
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
            "ArgMax",
            "ArgMin",
            "CumSum",
            "TopK",
        ] {
            assert!(
                reg.kernels.iter().any(|k| k.desc.op_type.as_str() == op),
                "{op} registered"
            );
        }
    }
}
