//! Loose operators: `CumProd`, `BitCast`, `Unique`, `Det`, the window functions
//! (`HannWindow`, `HammingWindow`, `BlackmanWindow`) and `DFT`.

use crate::quant::fill;
use crate::util::{floats_as_f64, input, normalize_axis, optional, product_sat, required, Factory};
use opreg_sdk::alloc::{try_vec, try_with_capacity};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::prelude::*;
use std::cmp::Ordering;

mod signal;

/// The elements of a float tensor as `f64`.
fn read_f64(t: &TensorView<'_>, what: &str) -> Result<Vec<f64>, PluginError> {
    floats_as_f64(t).unwrap_or_else(|| {
        Err(PluginError::unimplemented(format!(
            "{what}: element type {} is not supported",
            t.dtype
        )))
    })
}

/// Allocates output `index` of `dtype` from `f64` values (`as` casts for integer types).
fn fill_from_f64<F>(
    ctx: &KernelContext<'_>,
    index: usize,
    dtype: DType,
    shape: &[usize],
    f: F,
) -> Result<(), PluginError>
where
    F: Fn(usize) -> f64 + Sync,
{
    match dtype {
        DType::F32 => fill::<f32, _>(ctx, index, shape, |i| f(i) as f32),
        DType::F64 => fill::<f64, _>(ctx, index, shape, f),
        DType::F16 => fill::<f16, _>(ctx, index, shape, |i| f16::from_f64(f(i))),
        DType::BF16 => fill::<bf16, _>(ctx, index, shape, |i| bf16::from_f64(f(i))),
        DType::U8 => fill::<u8, _>(ctx, index, shape, |i| f(i) as u8),
        DType::I8 => fill::<i8, _>(ctx, index, shape, |i| f(i) as i8),
        DType::U16 => fill::<u16, _>(ctx, index, shape, |i| f(i) as u16),
        DType::I16 => fill::<i16, _>(ctx, index, shape, |i| f(i) as i16),
        DType::U32 => fill::<u32, _>(ctx, index, shape, |i| f(i) as u32),
        DType::I32 => fill::<i32, _>(ctx, index, shape, |i| f(i) as i32),
        DType::U64 => fill::<u64, _>(ctx, index, shape, |i| f(i) as u64),
        DType::I64 => fill::<i64, _>(ctx, index, shape, |i| f(i) as i64),
        other => Err(PluginError::unimplemented(format!(
            "output type {other} is not supported"
        ))),
    }
}

/// A scalar integer input (`axis`, `size`, `dft_length`).
fn scalar_i64(t: &TensorView<'_>, op: &str, name: &str) -> Result<i64, PluginError> {
    let v = t.to_i64s()?;
    if v.len() != 1 {
        return Err(PluginError::invalid(format!(
            "{op}: input '{name}' must be a scalar, got shape {:?}",
            t.shape()
        )));
    }
    Ok(v[0])
}

// ---------------------------------------------------------------------------------------------
// CumProd

trait Product: Element {
    fn one() -> Self;
    fn times(self, other: Self) -> Self;
}

macro_rules! int_product {
    ($($t:ty),*) => {$(
        impl Product for $t {
            fn one() -> Self { 1 }
            fn times(self, other: Self) -> Self { self.wrapping_mul(other) }
        }
    )*};
}
int_product!(u32, u64, i32, i64);

impl Product for f32 {
    fn one() -> Self {
        1.0
    }
    fn times(self, other: Self) -> Self {
        self * other
    }
}
impl Product for f64 {
    fn one() -> Self {
        1.0
    }
    fn times(self, other: Self) -> Self {
        self * other
    }
}
impl Product for f16 {
    fn one() -> Self {
        f16::ONE
    }
    fn times(self, other: Self) -> Self {
        f16::from_f32(self.to_f32() * other.to_f32())
    }
}
impl Product for bf16 {
    fn one() -> Self {
        bf16::ONE
    }
    fn times(self, other: Self) -> Self {
        bf16::from_f32(self.to_f32() * other.to_f32())
    }
}

#[derive(Clone)]
struct CumProd {
    exclusive: bool,
    reverse: bool,
}

impl CumProd {
    fn run<T: Product>(
        &self,
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        axis: usize,
    ) -> Result<(), PluginError> {
        let xs = x.as_slice::<T>()?;
        let shape = x.shape();
        let d = shape[axis];
        // Saturating: exact whenever x has elements.
        let post = product_sat(&shape[axis + 1..]);
        let y = ctx.output_slice::<T>(0, shape)?;
        if y.is_empty() {
            return Ok(());
        }
        // Each chunk is one [d, post] slab.
        ctx.parallel_chunks(y, d * post, |start, slab| {
            let src = &xs[start..start + slab.len()];
            for q in 0..post {
                let mut acc = T::one();
                for step in 0..d {
                    let j = if self.reverse { d - 1 - step } else { step };
                    let v = src[j * post + q];
                    if self.exclusive {
                        slab[j * post + q] = acc;
                        acc = acc.times(v);
                    } else {
                        acc = acc.times(v);
                        slab[j * post + q] = acc;
                    }
                }
            }
        })
    }
}

impl Kernel for CumProd {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [x, axis] = required("CumProd", inputs, ["x", "axis"])?;
        let x = &x;
        let axis = scalar_i64(&axis, "CumProd", "axis")?;
        if x.rank() == 0 {
            return Err(PluginError::invalid("CumProd: x must have rank >= 1"));
        }
        let axis = normalize_axis(axis, x.rank())?;
        match x.dtype {
            DType::U32 => self.run::<u32>(ctx, x, axis),
            DType::U64 => self.run::<u64>(ctx, x, axis),
            DType::I32 => self.run::<i32>(ctx, x, axis),
            DType::I64 => self.run::<i64>(ctx, x, axis),
            DType::F32 => self.run::<f32>(ctx, x, axis),
            DType::F64 => self.run::<f64>(ctx, x, axis),
            DType::F16 => self.run::<f16>(ctx, x, axis),
            DType::BF16 => self.run::<bf16>(ctx, x, axis),
            other => Err(PluginError::unimplemented(format!(
                "CumProd: type {other} is not supported"
            ))),
        }
    }
}

fn cumprod_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(CumProd {
        exclusive: node.int_or("exclusive", 0)? != 0,
        reverse: node.int_or("reverse", 0)? != 0,
    }))
}

// ---------------------------------------------------------------------------------------------
// BitCast

#[derive(Clone)]
struct BitCast {
    to: DType,
}

impl Kernel for BitCast {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("BitCast", inputs, 0, "input")?;
        if x.dtype.size() != self.to.size() || x.dtype == DType::String {
            return Err(PluginError::invalid(format!(
                "BitCast: {} and {} do not have the same bit width",
                x.dtype, self.to
            )));
        }
        let out = ctx.output(0, self.to, x.shape())?.into_bytes()?;
        out.copy_from_slice(x.as_bytes()?);
        Ok(())
    }
}

fn bitcast_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let code = match node.attr("to") {
        Some(AttrValue::Int(c)) => *c,
        _ => {
            return Err(PluginError::invalid(
                "BitCast: attribute 'to' (INT) is required",
            ))
        }
    };
    let to = DType::from_onnx_code(code as i32)
        .filter(|&d| d != DType::String)
        .ok_or_else(|| {
            PluginError::unimplemented(format!(
                "BitCast: attribute 'to' = {code} is a type opreg does not support"
            ))
        })?;
    Ok(Box::new(BitCast { to }))
}

// ---------------------------------------------------------------------------------------------
// Unique

#[derive(Clone)]
struct Unique {
    axis: Option<i64>,
    sorted: bool,
}

/// Total order for sorting (NaN compares equal to everything; equal NaNs are merged below).
fn cmp_items<T: PartialOrd>(a: &[T], b: &[T]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        match x.partial_cmp(y) {
            Some(Ordering::Equal) | None => {}
            Some(o) => return o,
        }
    }
    Ordering::Equal
}

fn same_items<T: PartialOrd>(a: &[T], b: &[T]) -> bool {
    #[allow(clippy::eq_op)] // x != x is the NaN test
    a.iter().zip(b).all(|(x, y)| x == y || (x != x && y != y))
}

impl Unique {
    /// `view` turns the allocated `Y` into a `[T]` (bools travel as bytes).
    fn run<'c, T: PartialOrd + Copy + 'static>(
        &self,
        ctx: &'c KernelContext<'_>,
        xs: &[T],
        shape: &[usize],
        dtype: DType,
        view: impl FnOnce(TensorViewMut<'c>) -> Result<&'c mut [T], PluginError>,
    ) -> Result<(), PluginError> {
        let (pre, d, post, axis) = match self.axis {
            None => (1, xs.len(), 1, None),
            Some(a) => {
                let a = normalize_axis(a, shape.len())?;
                let d = shape[a];
                (
                    product_sat(&shape[..a]),
                    d,
                    product_sat(&shape[a + 1..]),
                    Some(a),
                )
            }
        };
        // An empty X may still have a huge extent along the axis (`[0, 2^40]`): the tables
        // of `d` entries are allocated fallibly.
        // Item j: the sub-tensor at index j along the axis, flattened row-major.
        let mut items: Vec<Vec<T>> = try_with_capacity(d)?;
        items.extend((0..d).map(|j| {
            (0..pre)
                .flat_map(|p| xs[(p * d + j) * post..][..post].iter().copied())
                .collect()
        }));
        let mut order: Vec<usize> = try_with_capacity(d)?;
        order.extend(0..d);
        order.sort_by(|&a, &b| cmp_items(&items[a], &items[b]));
        // Groups of equal items, in sorted order: (first index, members).
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &j in &order {
            match groups.last_mut() {
                Some((first, members)) if same_items(&items[*first], &items[j]) => {
                    members.push(j);
                    *first = (*first).min(j);
                }
                _ => groups.push((j, vec![j])),
            }
        }
        if !self.sorted {
            groups.sort_by_key(|g| g.0);
        }
        let u = groups.len();
        let mut inverse = try_vec(d, 0i64)?;
        for (g, (_, members)) in groups.iter().enumerate() {
            for &j in members {
                inverse[j] = g as i64;
            }
        }
        let y_shape = match axis {
            None => vec![u],
            Some(a) => {
                let mut s = shape.to_vec();
                s[a] = u;
                s
            }
        };
        let y = view(ctx.output(0, dtype, &y_shape)?)?;
        for (g, (first, _)) in groups.iter().enumerate() {
            for p in 0..pre {
                let src = &items[*first][p * post..][..post];
                y[(p * u + g) * post..][..post].copy_from_slice(src);
            }
        }
        let n = ctx.num_outputs();
        if n > 1 {
            let out = ctx.output_slice::<i64>(1, &[u])?;
            for (o, (first, _)) in out.iter_mut().zip(&groups) {
                *o = *first as i64;
            }
        }
        if n > 2 {
            ctx.output_slice::<i64>(2, &[d])?.copy_from_slice(&inverse);
        }
        if n > 3 {
            let out = ctx.output_slice::<i64>(3, &[u])?;
            for (o, (_, members)) in out.iter_mut().zip(&groups) {
                *o = members.len() as i64;
            }
        }
        Ok(())
    }
}

impl Kernel for Unique {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("Unique", inputs, 0, "X")?;
        let s = x.shape();
        match x.dtype {
            DType::U8 => self.run(ctx, x.as_slice::<u8>()?, s, x.dtype, |y| y.into_slice()),
            DType::Bool => self.run(ctx, x.as_bytes()?, s, x.dtype, |y| y.into_bytes()),
            DType::I8 => self.run(ctx, x.as_slice::<i8>()?, s, x.dtype, |y| y.into_slice()),
            DType::U16 => self.run(ctx, x.as_slice::<u16>()?, s, x.dtype, |y| y.into_slice()),
            DType::I16 => self.run(ctx, x.as_slice::<i16>()?, s, x.dtype, |y| y.into_slice()),
            DType::U32 => self.run(ctx, x.as_slice::<u32>()?, s, x.dtype, |y| y.into_slice()),
            DType::I32 => self.run(ctx, x.as_slice::<i32>()?, s, x.dtype, |y| y.into_slice()),
            DType::U64 => self.run(ctx, x.as_slice::<u64>()?, s, x.dtype, |y| y.into_slice()),
            DType::I64 => self.run(ctx, x.as_slice::<i64>()?, s, x.dtype, |y| y.into_slice()),
            DType::F16 => self.run(ctx, x.as_slice::<f16>()?, s, x.dtype, |y| y.into_slice()),
            DType::BF16 => self.run(ctx, x.as_slice::<bf16>()?, s, x.dtype, |y| y.into_slice()),
            DType::F32 => self.run(ctx, x.as_slice::<f32>()?, s, x.dtype, |y| y.into_slice()),
            DType::F64 => self.run(ctx, x.as_slice::<f64>()?, s, x.dtype, |y| y.into_slice()),
            other => Err(PluginError::unimplemented(format!(
                "Unique: type {other} is not supported"
            ))),
        }
    }
}

fn unique_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let axis = match node.attr("axis") {
        None => None,
        Some(_) => Some(node.int_or("axis", 0)?),
    };
    Ok(Box::new(Unique {
        axis,
        sorted: node.int_or("sorted", 1)? != 0,
    }))
}

// ---------------------------------------------------------------------------------------------
// Det

/// Determinant of the row-major `n x n` matrix `a` by LU with partial pivoting.
fn det(mut a: Vec<f64>, n: usize) -> f64 {
    let mut det = 1.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))
            .unwrap_or(c);
        if a[p * n + c] == 0.0 {
            return 0.0;
        }
        if p != c {
            for k in 0..n {
                a.swap(p * n + k, c * n + k);
            }
            det = -det;
        }
        let pivot = a[c * n + c];
        det *= pivot;
        for r in c + 1..n {
            let f = a[r * n + c] / pivot;
            if f != 0.0 {
                for k in c..n {
                    a[r * n + k] -= f * a[c * n + k];
                }
            }
        }
    }
    det
}

#[derive(Clone)]
struct Det;

impl Kernel for Det {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("Det", inputs, 0, "X")?;
        let s = x.shape();
        if s.len() < 2 || s[s.len() - 1] != s[s.len() - 2] {
            return Err(PluginError::invalid(format!(
                "Det: input must be [*, M, M], got {s:?}"
            )));
        }
        let n = s[s.len() - 1];
        let xs = read_f64(x, "Det")?;
        let out_shape = &s[..s.len() - 2];
        fill_from_f64(ctx, 0, x.dtype, out_shape, |b| {
            det(xs[b * n * n..(b + 1) * n * n].to_vec(), n)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Windows

#[derive(Clone, Copy)]
enum WindowKind {
    Hann,
    Hamming,
    Blackman,
}

#[derive(Clone)]
struct Window {
    kind: WindowKind,
    periodic: bool,
    dtype: DType,
}

impl Kernel for Window {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let size = scalar_i64(&input("window", inputs, 0, "size")?, "window", "size")?;
        if size < 0 {
            return Err(PluginError::invalid(format!(
                "window: input 'size' must be >= 0, got {size}"
            )));
        }
        let n = if self.periodic { size } else { size - 1 } as f64;
        let tau = 2.0 * std::f64::consts::PI;
        let kind = self.kind;
        fill_from_f64(ctx, 0, self.dtype, &[size as usize], |i| {
            let x = i as f64 / n;
            match kind {
                WindowKind::Hann => (std::f64::consts::PI * x).sin().powi(2),
                WindowKind::Hamming => 25.0 / 46.0 - 21.0 / 46.0 * (tau * x).cos(),
                WindowKind::Blackman => 0.42 - 0.5 * (tau * x).cos() + 0.08 * (2.0 * tau * x).cos(),
            }
        })
    }
}

fn window_factory(kind: WindowKind, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let code = node.int_or("output_datatype", 1)?;
    let dtype = DType::from_onnx_code(code as i32)
        .filter(|d| WINDOW_OUT.contains(d))
        .ok_or_else(|| {
            PluginError::unimplemented(format!(
                "{}: attribute 'output_datatype' = {code} is not supported",
                node.op_type
            ))
        })?;
    Ok(Box::new(Window {
        kind,
        periodic: node.int_or("periodic", 1)? != 0,
        dtype,
    }))
}

const WINDOW_OUT: &[DType] = &[
    DType::U8,
    DType::U16,
    DType::U32,
    DType::U64,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::F32,
    DType::F64,
    DType::BF16,
];

// ---------------------------------------------------------------------------------------------
// DFT

#[derive(Clone)]
struct Dft {
    /// The `axis` attribute (opset 17); from opset 20 it is an input defaulting to -2.
    axis_attr: Option<i64>,
    inverse: bool,
    onesided: bool,
}

impl Kernel for Dft {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "DFT";
        let x = &input(OP, inputs, 0, "input")?;
        let s = x.shape();
        let rank = s.len();
        if rank < 2 || (s[rank - 1] != 1 && s[rank - 1] != 2) {
            return Err(PluginError::invalid(format!(
                "{OP}: input must be [..., 1] (real) or [..., 2] (complex), got {s:?}"
            )));
        }
        let present = |i: usize| optional(inputs, i);
        let axis = match (self.axis_attr, present(2)) {
            (Some(a), _) => a,
            (None, Some(t)) => scalar_i64(t, OP, "axis")?,
            (None, None) => -2,
        };
        let axis = normalize_axis(axis, rank)?;
        if axis == rank - 1 {
            return Err(PluginError::invalid(format!(
                "{OP}: axis {axis} is the real/imaginary dimension"
            )));
        }
        let in_len = s[axis];
        let irfft = self.inverse && self.onesided;
        let n = match present(1) {
            Some(t) => {
                let v = scalar_i64(t, OP, "dft_length")?;
                if v < 1 {
                    return Err(PluginError::invalid(format!(
                        "{OP}: dft_length must be >= 1, got {v}"
                    )));
                }
                v as usize
            }
            None if irfft => in_len.saturating_sub(1).saturating_mul(2),
            None => in_len,
        };
        let comp = s[rank - 1];
        // Saturating: exact whenever the input has elements.
        let post = product_sat(&s[axis + 1..rank - 1]);
        let (out_len, out_comp) = if irfft {
            (n, 1)
        } else if self.onesided {
            (n / 2 + 1, 2)
        } else {
            (n, 2)
        };
        let mut out_shape = s.to_vec();
        out_shape[axis] = out_len;
        out_shape[rank - 1] = out_comp;
        let xs = read_f64(x, OP)?;
        // Input sample t of the transformed line (p, q), zero beyond the input or dft_length.
        let used = if irfft {
            in_len.min(n / 2 + 1)
        } else {
            in_len.min(n)
        };
        let sample = |p: usize, q: usize, t: usize| -> (f64, f64) {
            let base = ((p * in_len + t) * post + q) * comp;
            (xs[base], if comp == 2 { xs[base + 1] } else { 0.0 })
        };
        let sign = if self.inverse { 1.0 } else { -1.0 };
        let scale = if self.inverse { 1.0 / n as f64 } else { 1.0 };
        let tau = 2.0 * std::f64::consts::PI;
        let twiddle = |k: usize, t: usize| {
            // In u128: dft_length is data, and k * t may pass usize.
            let ang = sign * tau * ((k as u128 * t as u128) % n as u128) as f64 / n as f64;
            (ang.cos(), ang.sin())
        };
        fill_from_f64(ctx, 0, x.dtype, &out_shape, |i| {
            let c = i % out_comp;
            let e = i / out_comp;
            let q = e % post;
            let k = (e / post) % out_len;
            let p = e / (post * out_len);
            let (mut re, mut im) = (0.0, 0.0);
            if irfft {
                // Hermitian extension of the one-sided spectrum; the real part of the sum.
                for j in 0..n {
                    let (src, conj) = if j <= n / 2 {
                        (j, false)
                    } else {
                        (n - j, true)
                    };
                    if src >= used {
                        continue;
                    }
                    let (a, mut b) = sample(p, q, src);
                    if conj {
                        b = -b;
                    }
                    let (wr, wi) = twiddle(j, k);
                    re += a * wr - b * wi;
                }
            } else {
                for t in 0..used {
                    let (a, b) = sample(p, q, t);
                    let (wr, wi) = twiddle(k, t);
                    re += a * wr - b * wi;
                    im += a * wi + b * wr;
                }
            }
            scale * if c == 0 { re } else { im }
        })
    }
}

fn dft_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Dft {
        axis_attr: if node.opset < 20 {
            Some(node.int_or("axis", 1)?)
        } else {
            None
        },
        inverse: node.int_or("inverse", 0)? != 0,
        onesided: node.int_or("onesided", 0)? != 0,
    }))
}

// ---------------------------------------------------------------------------------------------

const UNIQUE_TYPES: &[DType] = &[
    DType::U8,
    DType::U16,
    DType::U32,
    DType::U64,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::F32,
    DType::F64,
    DType::Bool,
];
const IDX: &[DType] = &[DType::I32, DType::I64];

pub fn register(r: &mut Registrar) {
    signal::register(r);
    r.kernel(
        KernelDesc::onnx("CumProd", 26, OPEN_END)
            .constraint(
                "T",
                &[
                    DType::U32,
                    DType::U64,
                    DType::I32,
                    DType::I64,
                    DType::F16,
                    DType::F32,
                    DType::F64,
                    DType::BF16,
                ],
            )
            .constraint("T2", IDX)
            .inputs(&["T", "T2"])
            .outputs(&["T"]),
        cumprod_factory as Factory,
    );
    let all: Vec<DType> = DType::ALL
        .into_iter()
        .filter(|&d| d != DType::String)
        .collect();
    r.kernel(
        KernelDesc::onnx("BitCast", 26, OPEN_END)
            .constraint("T1", &all)
            .constraint("T2", &all)
            .inputs(&["T1"])
            .outputs(&["T2"]),
        bitcast_factory as Factory,
    );
    let mut unique28 = UNIQUE_TYPES.to_vec();
    unique28.push(DType::BF16);
    for (since, end, types) in [(11, 27, UNIQUE_TYPES), (28, OPEN_END, &unique28[..])] {
        r.kernel(
            KernelDesc::onnx("Unique", since, end)
                .constraint("T", types)
                .constraint("I", &[DType::I64])
                .inputs(&["T"])
                .outputs(&["T", "I", "I", "I"]),
            unique_factory as Factory,
        );
    }
    for (since, end, types) in [
        (11, 21, &[DType::F16, DType::F32, DType::F64][..]),
        (
            22,
            OPEN_END,
            &[DType::BF16, DType::F16, DType::F32, DType::F64][..],
        ),
    ] {
        r.kernel(
            KernelDesc::onnx("Det", since, end)
                .constraint("T", types)
                .inputs(&["T"])
                .outputs(&["T"]),
            stateless(Det),
        );
    }
    let windows: [(&str, Factory); 3] = [
        ("HannWindow", |n| window_factory(WindowKind::Hann, n)),
        ("HammingWindow", |n| window_factory(WindowKind::Hamming, n)),
        ("BlackmanWindow", |n| {
            window_factory(WindowKind::Blackman, n)
        }),
    ];
    for (op, f) in windows {
        r.kernel(
            KernelDesc::onnx(op, 17, OPEN_END)
                .constraint("T1", IDX)
                .constraint("T2", WINDOW_OUT)
                .inputs(&["T1"])
                .outputs(&["T2"]),
            f,
        );
    }
    let floats = &[DType::F16, DType::F32, DType::F64, DType::BF16];
    for (since, end) in [(17, 19), (20, OPEN_END)] {
        r.kernel(
            KernelDesc::onnx("DFT", since, end)
                .constraint("T1", floats)
                .constraint("T2", IDX)
                .constraint("I", &[DType::I64])
                .inputs(&["T1", "T2", "I"])
                .outputs(&["T1"]),
            dft_factory as Factory,
        );
    }
}

#[cfg(test)]
mod tests;
