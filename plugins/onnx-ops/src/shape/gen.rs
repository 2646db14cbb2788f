//! Operators that make tensors from shapes or attributes: Identity, Dropout, Shape, Size,
//! Constant, ConstantOfShape, Range, EyeLike.

use super::common::*;
use opreg_sdk::abi_stable::std_types::RString;
use opreg_sdk::prelude::*;

#[derive(Clone)]
pub(crate) struct Identity;

impl Kernel for Identity {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Identity")?;
        copy_reshaped(ctx, data, data.shape())
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout (inference; training mode samples its mask in `crate::random`)

#[derive(Clone)]
pub(crate) struct Dropout {
    /// Opsets before 10 type the mask like the data; later ones use bool.
    bool_mask: bool,
    /// The `seed` attribute (opset 12+), for training mode's mask.
    seed: crate::random::Seed,
}

impl Kernel for Dropout {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Dropout")?;
        if let Some(t) = optional(x, 2) {
            let training = ints_of(t, "Dropout training_mode")?;
            if training.first().is_some_and(|&t| t != 0) {
                // The ratio only matters (and is only checked) in training mode.
                let ratio = match optional(x, 1) {
                    Some(r) => crate::random::dropout_ratio(r)?,
                    None => 0.5,
                };
                // Ratio 0 keeps everything: the identity below, with an all-true mask.
                if ratio != 0.0 {
                    return crate::random::dropout_training(
                        ctx,
                        data,
                        ratio,
                        self.seed,
                        self.bool_mask,
                    );
                }
            }
        }
        copy_reshaped(ctx, data, data.shape())?;
        if ctx.num_outputs() > 1 {
            let (dtype, one) = if self.bool_mask {
                (DType::Bool, vec![1u8])
            } else {
                (data.dtype, scalar_bytes(data.dtype, 1.0)?)
            };
            let mask = ctx.output(1, dtype, data.shape())?.into_bytes()?;
            for c in mask.chunks_exact_mut(one.len()) {
                c.copy_from_slice(&one);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Shape / Size

#[derive(Clone)]
pub(crate) struct Shape {
    start: i64,
    end: Option<i64>,
}

impl Kernel for Shape {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Shape")?;
        let r = data.rank() as i64;
        let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
        let start = clamp(self.start);
        let end = clamp(self.end.unwrap_or(r));
        let dims: Vec<i64> = if end > start {
            data.shape()[start..end].iter().map(|&d| d as i64).collect()
        } else {
            Vec::new()
        };
        ctx.output_slice::<i64>(0, &[dims.len()])?
            .copy_from_slice(&dims);
        Ok(())
    }
}

#[derive(Clone)]
pub(crate) struct Size;

impl Kernel for Size {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "Size")?;
        ctx.output_slice::<i64>(0, &[])?[0] = data.len() as i64;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Constant / ConstantOfShape

/// Writes `t` as output 0 (with `shape`, repeating its single element when `repeat`).
/// `dst` as copies of `one` end to end (`dst.len()` a multiple of it): the first copied, then
/// the filled part doubled. A copy per element (a `memcpy` call each, the size known only at
/// run time) took 2.4 ms for 1.6 M floats against ONNX Runtime's 0.1.
fn fill_repeating(dst: &mut [u8], one: &[u8]) {
    let Some(first) = dst.get_mut(..one.len()).filter(|_| !one.is_empty()) else {
        return;
    };
    first.copy_from_slice(one);
    let mut filled = one.len();
    while filled < dst.len() {
        let n = filled.min(dst.len() - filled);
        dst.copy_within(..n, filled);
        filled += n;
    }
}

fn write_owned(
    ctx: &KernelContext<'_>,
    t: &OwnedTensor,
    shape: &[usize],
    repeat: bool,
) -> Result<(), PluginError> {
    let out = ctx.output(0, t.dtype, shape)?;
    if t.dtype == DType::String {
        let dst = out.into_strings()?;
        if repeat {
            let v = t.strings.first().cloned().unwrap_or_default();
            dst.fill(v);
        } else if dst.len() == t.strings.len() {
            dst.clone_from_slice(&t.strings);
        } else {
            return Err(PluginError::invalid(format!(
                "string tensor of shape {shape:?} holds {} strings",
                t.strings.len()
            )));
        }
        return Ok(());
    }
    let dst = out.into_bytes()?;
    let size = t.dtype.size();
    if repeat {
        let one = t.data.get(..size).ok_or_else(|| {
            PluginError::invalid("ConstantOfShape: attribute 'value' holds no element")
        })?;
        fill_repeating(dst, one);
    } else if dst.len() == t.data.len() {
        dst.copy_from_slice(&t.data);
    } else {
        return Err(PluginError::invalid(format!(
            "{} tensor of shape {shape:?} holds {} bytes",
            t.dtype,
            t.data.len()
        )));
    }
    Ok(())
}

#[derive(Clone)]
pub(crate) struct Constant {
    value: OwnedTensor,
}

impl Kernel for Constant {
    fn compute(&self, ctx: &KernelContext<'_>, _: &[TensorView<'_>]) -> Result<(), PluginError> {
        write_owned(ctx, &self.value, &self.value.shape, false)
    }
}

fn string_tensor(shape: Vec<usize>, values: Vec<RString>) -> OwnedTensor {
    OwnedTensor {
        dtype: DType::String,
        shape: shape.into(),
        data: Default::default(),
        strings: values.into(),
    }
}

fn constant_value(n: &NodeInfo<'_>) -> Result<OwnedTensor, PluginError> {
    let found: Vec<_> = n
        .attributes
        .iter()
        .filter(|a| a.name.as_str().starts_with("value") || a.name.as_str() == "sparse_value")
        .collect();
    let [a] = found.as_slice() else {
        return Err(PluginError::invalid(format!(
            "Constant: exactly one value attribute expected, found {}",
            found.len()
        )));
    };
    Ok(match (a.name.as_str(), &a.value) {
        ("value", AttrValue::Tensor(t)) => t.clone(),
        ("value_float", AttrValue::Float(v)) => OwnedTensor::from_vec(vec![], vec![*v])?,
        ("value_floats", AttrValue::Floats(v)) => OwnedTensor::from_vec(vec![v.len()], v.to_vec())?,
        ("value_int", AttrValue::Int(v)) => OwnedTensor::from_vec(vec![], vec![*v])?,
        ("value_ints", AttrValue::Ints(v)) => OwnedTensor::from_vec(vec![v.len()], v.to_vec())?,
        ("value_string", AttrValue::String(s)) => string_tensor(vec![], vec![s.as_str().into()]),
        ("value_strings", AttrValue::Strings(s)) => {
            string_tensor(vec![s.len()], s.iter().map(|s| s.as_str().into()).collect())
        }
        ("sparse_value", _) => {
            return Err(PluginError::unimplemented(
                "Constant: sparse_value is not supported",
            ))
        }
        (name, v) => {
            return Err(PluginError::invalid(format!(
                "Constant: attribute '{name}' has an unexpected value {v:?}"
            )))
        }
    })
}

#[derive(Clone)]
pub(crate) struct ConstantOfShape {
    value: OwnedTensor,
}

impl Kernel for ConstantOfShape {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let shape = input(x, 0, "ConstantOfShape")?.to_i64s()?;
        let shape: Vec<usize> = shape
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| {
                    PluginError::invalid(format!("ConstantOfShape: negative dimension {d}"))
                })
            })
            .collect::<Result<_, _>>()?;
        write_owned(ctx, &self.value, &shape, true)
    }
}

// ---------------------------------------------------------------------------------------------
// Range

trait RangeNum: Element {
    fn count(start: Self, limit: Self, delta: Self) -> Result<usize, PluginError>;
    fn at(start: Self, delta: Self, i: usize) -> Self;
}

macro_rules! range_int {
    ($($t:ty),*) => {$(
        impl RangeNum for $t {
            fn count(start: Self, limit: Self, delta: Self) -> Result<usize, PluginError> {
                if delta == 0 {
                    return Err(PluginError::invalid("Range: delta is 0"));
                }
                let (s, l, d) = (start as i128, limit as i128, delta as i128);
                let n = if d > 0 { (l - s + d - 1).div_euclid(d) } else { (s - l - d - 1).div_euclid(-d) };
                Ok(n.max(0) as usize)
            }
            fn at(start: Self, delta: Self, i: usize) -> Self {
                start.wrapping_add(delta.wrapping_mul(i as $t))
            }
        }
    )*};
}
range_int!(i16, i32, i64);

macro_rules! range_float {
    ($($t:ty),*) => {$(
        impl RangeNum for $t {
            fn count(start: Self, limit: Self, delta: Self) -> Result<usize, PluginError> {
                if delta == 0.0 {
                    return Err(PluginError::invalid("Range: delta is 0"));
                }
                // As ONNX Runtime: the difference in T, the division in f64.
                let n = ((limit - start) as f64 / delta as f64).ceil();
                if !n.is_finite() {
                    return Err(PluginError::invalid("Range: element count is not finite"));
                }
                Ok(n.max(0.0) as usize)
            }
            fn at(start: Self, delta: Self, i: usize) -> Self {
                start + delta * i as $t
            }
        }
    )*};
}
range_float!(f32, f64);

fn range_run<T: RangeNum>(
    ctx: &KernelContext<'_>,
    x: &[TensorView<'_>],
) -> Result<(), PluginError> {
    let one = |i: usize, what: &str| -> Result<T, PluginError> {
        let v = input(x, i, "Range")?;
        match v.as_slice::<T>()? {
            [s] => Ok(*s),
            _ => Err(PluginError::invalid(format!(
                "Range: {what} must be a scalar, has shape {:?}",
                v.shape()
            ))),
        }
    };
    let (start, limit, delta) = (one(0, "start")?, one(1, "limit")?, one(2, "delta")?);
    let n = T::count(start, limit, delta)?;
    let out = ctx.output_slice::<T>(0, &[n])?;
    for (i, o) in out.iter_mut().enumerate() {
        *o = T::at(start, delta, i);
    }
    Ok(())
}

/// f16 / bf16 (opset 27): computed in f64 as the reference's `np.arange` on Python floats, or
/// in f32 with `stash_type` FLOAT; rounded to the element type at the end.
fn range_half<T: Element>(
    ctx: &KernelContext<'_>,
    x: &[TensorView<'_>],
    stash_f32: bool,
    load: fn(T) -> f64,
    store: fn(f64) -> T,
) -> Result<(), PluginError> {
    let one = |i: usize, what: &str| -> Result<f64, PluginError> {
        let v = input(x, i, "Range")?;
        match v.as_slice::<T>()? {
            [s] => Ok(load(*s)),
            _ => Err(PluginError::invalid(format!(
                "Range: {what} must be a scalar, has shape {:?}",
                v.shape()
            ))),
        }
    };
    let (start, limit, delta) = (one(0, "start")?, one(1, "limit")?, one(2, "delta")?);
    if stash_f32 {
        let (s, l, d) = (start as f32, limit as f32, delta as f32);
        let n = f32::count(s, l, d)?;
        let out = ctx.output_slice::<T>(0, &[n])?;
        for (i, o) in out.iter_mut().enumerate() {
            *o = store(f32::at(s, d, i) as f64);
        }
    } else {
        let n = f64::count(start, limit, delta)?;
        let out = ctx.output_slice::<T>(0, &[n])?;
        for (i, o) in out.iter_mut().enumerate() {
            *o = store(f64::at(start, delta, i));
        }
    }
    Ok(())
}

#[derive(Clone)]
pub(crate) struct Range {
    /// `stash_type` is FLOAT (1): half types computed in f32.
    stash_f32: bool,
}

impl Kernel for Range {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        use opreg_sdk::half::{bf16, f16};
        match input(x, 0, "Range")?.dtype {
            DType::F16 => range_half(ctx, x, self.stash_f32, f16::to_f64, f16::from_f64),
            DType::BF16 => range_half(ctx, x, self.stash_f32, bf16::to_f64, bf16::from_f64),
            DType::F32 => range_run::<f32>(ctx, x),
            DType::F64 => range_run::<f64>(ctx, x),
            DType::I16 => range_run::<i16>(ctx, x),
            DType::I32 => range_run::<i32>(ctx, x),
            DType::I64 => range_run::<i64>(ctx, x),
            d => Err(PluginError::invalid(format!("Range: unsupported type {d}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// EyeLike

#[derive(Clone)]
pub(crate) struct EyeLike {
    dtype: Option<DType>,
    k: i64,
}

impl Kernel for EyeLike {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let data = input(x, 0, "EyeLike")?;
        let &[rows, cols] = data.shape() else {
            return Err(PluginError::invalid(format!(
                "EyeLike: input must be 2-D, is {:?}",
                data.shape()
            )));
        };
        let dtype = self.dtype.unwrap_or(data.dtype);
        let one = scalar_bytes(dtype, 1.0)?;
        let size = one.len();
        let out = ctx.output(0, dtype, &[rows, cols])?.into_bytes()?;
        if out.is_empty() {
            // An empty input may still have a huge row count: nothing to walk.
            return Ok(());
        }
        for i in 0..rows {
            let j = (i as i64).saturating_add(self.k);
            if (0..cols as i64).contains(&j) {
                let p = (i * cols + j as usize) * size;
                out[p..p + size].copy_from_slice(&one);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

pub(crate) fn register(r: &mut Registrar) {
    let any: &[DType] = &DType::ALL;
    reg(
        r,
        KernelDesc::onnx("Identity", 1, OPEN_END)
            .constraint("T", any)
            .inputs(&["T"])
            .outputs(&["T"]),
        |_| Ok(Identity),
    );
    reg(
        r,
        KernelDesc::onnx("Dropout", 1, OPEN_END)
            .constraint("T", crate::ALL_TYPES)
            .inputs(&["T", "T1", "T2"])
            .outputs(&["T", "T2"]),
        |n| {
            Ok(Dropout {
                bool_mask: n.opset >= 10,
                seed: crate::random::Seed::from_node(n, "Dropout")?,
            })
        },
    );
    reg(
        r,
        KernelDesc::onnx("Shape", 1, OPEN_END)
            .constraint("T", any)
            .inputs(&["T"])
            .outputs(&["tensor(int64)"]),
        |n| {
            let (start, end) = if n.opset >= 15 {
                (
                    n.int_or("start", 0)?,
                    n.attr("end").map(|_| n.int_or("end", 0)).transpose()?,
                )
            } else {
                (0, None)
            };
            Ok(Shape { start, end })
        },
    );
    reg(
        r,
        KernelDesc::onnx("Size", 1, OPEN_END)
            .constraint("T", any)
            .inputs(&["T"])
            .outputs(&["tensor(int64)"]),
        |_| Ok(Size),
    );
    reg(r, KernelDesc::onnx("Constant", 1, OPEN_END), |n| {
        Ok(Constant {
            value: constant_value(n)?,
        })
    });
    reg(
        r,
        KernelDesc::onnx("ConstantOfShape", 9, OPEN_END).inputs(&["tensor(int64)"]),
        |n| {
            let value = match n.attr("value") {
                None => OwnedTensor::from_vec(vec![1], vec![0.0f32])?,
                Some(AttrValue::Tensor(t)) if t.len() == 1 => t.clone(),
                Some(v) => {
                    return Err(PluginError::invalid(format!(
                        "ConstantOfShape: attribute 'value' must be a one-element tensor, got {v:?}"
                    )))
                }
            };
            Ok(ConstantOfShape { value })
        },
    );
    // f16 and bf16 (and `stash_type`) from opset 27.
    use opreg_sdk::dtype::names::*;
    for (since, end, types) in [
        (11, 26, &[F32, F64, I16, I32, I64][..]),
        (27, OPEN_END, &[F32, F64, I16, I32, I64, F16, BF16]),
    ] {
        reg(
            r,
            KernelDesc::onnx("Range", since, end)
                .constraint("T", types)
                .inputs(&["T", "T", "T"])
                .outputs(&["T"]),
            |n| {
                Ok(Range {
                    stash_f32: n.int_or("stash_type", 11)? == 1,
                })
            },
        );
    }
    reg(
        r,
        KernelDesc::onnx("EyeLike", 9, OPEN_END)
            .constraint("T1", crate::ALL_TYPES)
            .inputs(&["T1"])
            .outputs(&["T2"]),
        |n| {
            let dtype = match n.attr("dtype") {
                None => None,
                Some(_) => {
                    let code = n.int_or("dtype", 0)?;
                    Some(DType::from_onnx_code(code as i32).ok_or_else(|| {
                        PluginError::invalid(format!("EyeLike: unsupported dtype code {code}"))
                    })?)
                }
            };
            Ok(EyeLike {
                dtype,
                k: n.int_or("k", 0)?,
            })
        },
    );
}

#[cfg(test)]
mod range_half_tests {
    use super::*;
    use opreg_sdk::{
        half::{bf16, f16},
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    fn factory(n: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        Ok(Box::new(Range {
            stash_f32: n.int_or("stash_type", 11)? == 1,
        }))
    }

    #[test]
    fn range_half_types() {
        let h = |v: f64| HostTensor::from_vec(&[], &[f16::from_f64(v)]).expect("f16");
        let out = run_kernel(
            factory,
            &NodeSpec::onnx("Range", 27),
            &[&h(1.0), &h(2.0), &h(0.25)],
            None,
        )
        .expect("range");
        let want: Vec<f16> = [1.0, 1.25, 1.5, 1.75].map(f16::from_f64).to_vec();
        assert_eq!(out[0].to_vec::<f16>().expect("f16"), want);
        let b = |v: f64| HostTensor::from_vec(&[], &[bf16::from_f64(v)]).expect("bf16");
        let node = NodeSpec::onnx("Range", 27).attr("stash_type", AttrValue::Int(1));
        let out = run_kernel(factory, &node, &[&b(10.0), &b(4.0), &b(-3.0)], None).expect("range");
        let want: Vec<bf16> = [10.0, 7.0].map(bf16::from_f64).to_vec();
        assert_eq!(out[0].to_vec::<bf16>().expect("bf16"), want);
    }

    #[test]
    fn range_official_cases() {
        crate::testcases::run_cases(&["test_range_"], factory);
    }
}

#[cfg(test)]
mod fill_tests {
    use super::fill_repeating;

    /// Copies end to end for counts around the doublings (1, 2, 3, 7, 8, 1000) and element
    /// sizes 1, 4 and 8; nothing written into an empty destination.
    #[test]
    fn fill_repeating_writes_every_copy() {
        for one in [&[7u8][..], &[1, 2, 3, 4], &[9, 8, 7, 6, 5, 4, 3, 2]] {
            for count in [0usize, 1, 2, 3, 7, 8, 1000] {
                let mut dst = vec![0u8; one.len() * count];
                fill_repeating(&mut dst, one);
                let want: Vec<u8> = one.iter().copied().cycle().take(dst.len()).collect();
                assert_eq!(dst, want, "{one:?} x {count}");
            }
        }
        fill_repeating(&mut [0u8; 4], &[]);
    }
}
