//! ONNX random operators: RandomNormal, RandomUniform, RandomNormalLike, RandomUniformLike,
//! Bernoulli and Multinomial; and the random mask of training-mode Dropout, whose kernel stays
//! with the inference Dropout in `shape/gen.rs` and samples through [`dropout_training`].
//!
//! # Where the random bits come from
//!
//! - Every run of a node makes its own generator, PCG-64 (`rand_pcg::Pcg64Mcg`: small, fast,
//!   statistically sound; not cryptographic, which no operator here needs). Kernels are `&self`
//!   and run concurrently, so no generator is shared between runs or kept in the kernel.
//! - With a `seed` attribute the output is deterministic: the generator is seeded from the
//!   seed's bits on every run (the f32 bits of the FLOAT seed; Dropout's seed is an INT, taken
//!   as is), so every run of that node yields the same values, and a seeded model reproduces
//!   across runs, requests, threads and daemons (of the same opreg version). A NaN seed counts
//!   as none, as in ONNX's reference. Two nodes with the same seed draw the same stream: the
//!   seed is the model's choice.
//! - Without a seed, every run seeds from the operating system's entropy (`getrandom`), so two
//!   runs differ.
//! - Elements are drawn one after the other in row-major order from one stream: the values do
//!   not depend on the thread count.
//! - ONNX leaves the generator to the runtime, so values are not numpy's (the conformance
//!   cases of these operators, which replay numpy's stream, cannot match value for value).
//! - The daemon never constant-folds these operators, nor Dropout (a training-mode Dropout of
//!   constant inputs must draw a new mask per run): `NONDETERMINISTIC` in the daemon's plan.
//!
//! # Distributions
//!
//! - RandomUniform(Like): `low + (high - low) * u`, `u` uniform in [0, 1) with 53 random bits,
//!   rounded to the output type. A value that rounds out of [low, high) (up to `high` in f16,
//!   say) is drawn again, so outputs stay in range; `low == high` gives `low`.
//! - RandomNormal(Like): `mean + scale * z`, `z` standard normal (`rand_distr`'s Ziggurat).
//! - Bernoulli: 1 where `u < p`, else 0, in the output type; `p` must lie in [0, 1].
//! - Multinomial: per row, class `k` with probability `softmax(row)[k]`, by inverting the
//!   cumulative sum of `exp(x - max)` (a `-inf` logit is a class never drawn).
//! - Dropout (training): an element is kept where `u >= ratio`, as ONNX's reference does, and
//!   scaled by `1 / (1 - ratio)`; the mask is true where kept. Ratio 0 (or training off) is the
//!   identity, with an all-true mask.
//!
//! Output types: f16, bf16, f32 and f64 for the generators (ONNX's constraint); every numeric
//! type and bool for Bernoulli; int32 or int64 for Multinomial.

// Attributes and shapes come from models: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use crate::util::{input, numel};
use opreg_sdk::alloc::{try_vec, try_with_capacity};
use opreg_sdk::numeric::{Bool, Scalar};
use opreg_sdk::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rand_pcg::Pcg64Mcg;

const FLOATS: &[DType] = opreg_sdk::numeric::FLOATS;

fn invalid(op: &str, message: impl std::fmt::Display) -> PluginError {
    PluginError::invalid(format!("{op}: {message}"))
}

// ---------------------------------------------------------------------------------------------
// Seeds

/// How a node seeds its generator: from its `seed` attribute, or afresh from the OS per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seed {
    Fixed(u64),
    Fresh,
}

impl Seed {
    /// The node's `seed` attribute: FLOAT for the random operators, INT for Dropout (either is
    /// taken for either, as models in the wild mix them up).
    pub(crate) fn from_node(node: &NodeInfo<'_>, op: &str) -> Result<Seed, PluginError> {
        Ok(match node.attr("seed") {
            None => Seed::Fresh,
            // ONNX's reference treats a NaN seed as no seed.
            Some(AttrValue::Float(s)) if s.is_nan() => Seed::Fresh,
            Some(AttrValue::Float(s)) => Seed::Fixed(u64::from(s.to_bits())),
            Some(AttrValue::Int(s)) => Seed::Fixed(*s as u64),
            Some(other) => {
                return Err(invalid(
                    op,
                    format_args!("attribute seed must be a number, got {other:?}"),
                ))
            }
        })
    }

    /// A generator for one run.
    fn rng(self) -> Result<Pcg64Mcg, PluginError> {
        match self {
            // seed_from_u64 spreads the 64 bits over the whole state (through PCG-32), so
            // nearby seeds give unrelated streams.
            Seed::Fixed(s) => Ok(Pcg64Mcg::seed_from_u64(s)),
            Seed::Fresh => {
                let mut seed = <Pcg64Mcg as SeedableRng>::Seed::default();
                getrandom::fill(&mut seed).map_err(|e| {
                    PluginError::internal(format!("no entropy from the operating system: {e}"))
                })?;
                Ok(Pcg64Mcg::from_seed(seed))
            }
        }
    }
}

/// The `dtype` attribute, if present, which must name one of `allowed`.
fn dtype_attr(
    node: &NodeInfo<'_>,
    op: &str,
    allowed: &[DType],
) -> Result<Option<DType>, PluginError> {
    if node.attr("dtype").is_none() {
        return Ok(None);
    }
    let code = node.int_or("dtype", 0)?;
    i32::try_from(code)
        .ok()
        .and_then(DType::from_onnx_code)
        .filter(|d| allowed.contains(d))
        .map(Some)
        .ok_or_else(|| {
            invalid(
                op,
                format_args!(
                    "dtype {code} is not one of the output types {}",
                    names(allowed)
                ),
            )
        })
}

fn names(types: &[DType]) -> String {
    let v: Vec<String> = types.iter().map(|t| t.to_string()).collect();
    v.join(", ")
}

/// The elements of a float input, widened to f64 (reserved fallibly: the copy is as large as
/// the model's input).
fn read_floats(t: &TensorView<'_>, op: &str, what: &str) -> Result<Vec<f64>, PluginError> {
    opreg_sdk::dispatch!(t.dtype, FLOATS, |T| {
        let s = t.as_slice::<T>()?;
        let mut v = try_with_capacity(s.len())?;
        v.extend(s.iter().map(|&x| x.to_f64()));
        Ok(v)
    }, other => Err(invalid(op, format_args!("{what} must be a float tensor, got {other}"))))
}

// ---------------------------------------------------------------------------------------------
// RandomNormal, RandomUniform and their *Like forms

/// A value that keeps rounding out of [low, high) is drawn at most this many times, then
/// replaced by `low` (only a range holding no value of the output type gets there).
const MAX_DRAWS: usize = 64;

#[derive(Clone, Copy, Debug)]
enum Dist {
    Uniform { low: f64, high: f64 },
    Normal { mean: f64, scale: f64 },
}

#[derive(Clone, Debug)]
struct Generator {
    op: &'static str,
    dist: Dist,
    /// The output type; `None` for a *Like node without `dtype` (its input's type).
    dtype: Option<DType>,
    /// The output shape; `None` for the *Like forms (their input's shape).
    shape: Option<Vec<usize>>,
    seed: Seed,
}

impl Generator {
    fn from_node(node: &NodeInfo<'_>, op: &'static str, like: bool) -> Result<Self, PluginError> {
        let finite = |name: &str, default: f32| -> Result<f64, PluginError> {
            let v = node.float_or(name, default)?;
            if !v.is_finite() {
                return Err(invalid(
                    op,
                    format_args!("attribute {name} must be finite, got {v}"),
                ));
            }
            Ok(f64::from(v))
        };
        let dist = if op.starts_with("RandomUniform") {
            let (low, high) = (finite("low", 0.0)?, finite("high", 1.0)?);
            if high < low {
                return Err(invalid(op, format_args!("high {high} is below low {low}")));
            }
            Dist::Uniform { low, high }
        } else {
            Dist::Normal {
                mean: finite("mean", 0.0)?,
                scale: finite("scale", 1.0)?,
            }
        };
        let dtype = dtype_attr(node, op, FLOATS)?;
        let shape = if like {
            None
        } else {
            let dims = node
                .ints("shape")?
                .ok_or_else(|| invalid(op, "the shape attribute is required"))?;
            let dims = dims
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    invalid(op, format_args!("shape {dims:?} has a negative dimension"))
                })?;
            // Too many elements to address fails here, at load, rather than on every run.
            numel(&dims)?;
            Some(dims)
        };
        Ok(Generator {
            op,
            dist,
            // Without the attribute the plain forms make FLOAT (ONNX's default).
            dtype: dtype.or((!like).then_some(DType::F32)),
            shape,
            seed: Seed::from_node(node, op)?,
        })
    }
}

/// Fills `out` in order with draws of `dist`, rounded to `T`.
fn generate<T: Scalar>(out: &mut [T], dist: Dist, rng: &mut Pcg64Mcg) {
    match dist {
        Dist::Uniform { low, high } if low < high => {
            let width = high - low;
            for o in out {
                *o = (0..MAX_DRAWS)
                    .map(|_| T::from_f64(low + width * rng.random::<f64>()))
                    .find(|v| (low..high).contains(&v.to_f64()))
                    .unwrap_or_else(|| T::from_f64(low));
            }
        }
        Dist::Uniform { low, .. } => out.fill(T::from_f64(low)),
        Dist::Normal { mean, scale } => {
            for o in out {
                let z: f64 = StandardNormal.sample(rng);
                *o = T::from_f64(mean + scale * z);
            }
        }
    }
}

impl Kernel for Generator {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let (shape, dtype) = match &self.shape {
            Some(s) => (s.as_slice(), self.dtype.unwrap_or(DType::F32)),
            None => {
                let x = input(self.op, inputs, 0, "input")?;
                (x.shape(), self.dtype.unwrap_or(x.dtype))
            }
        };
        let mut rng = self.seed.rng()?;
        opreg_sdk::dispatch!(dtype, FLOATS, |T| {
            generate(ctx.output_slice::<T>(0, shape)?, self.dist, &mut rng);
            Ok(())
        }, other => Err(invalid(self.op, format_args!(
            "output type {other} is not a float type (give a dtype attribute: {})",
            names(FLOATS)
        ))))
    }
}

fn random_normal(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Generator::from_node(node, "RandomNormal", false)?))
}

fn random_uniform(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Generator::from_node(
        node,
        "RandomUniform",
        false,
    )?))
}

fn random_normal_like(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Generator::from_node(
        node,
        "RandomNormalLike",
        true,
    )?))
}

fn random_uniform_like(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Generator::from_node(
        node,
        "RandomUniformLike",
        true,
    )?))
}

// ---------------------------------------------------------------------------------------------
// Bernoulli

#[derive(Clone, Debug)]
struct Bernoulli {
    dtype: Option<DType>,
    seed: Seed,
}

impl Kernel for Bernoulli {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("Bernoulli", inputs, 0, "input")?;
        let p = read_floats(&x, "Bernoulli", "input")?;
        if let Some((i, v)) = p
            .iter()
            .enumerate()
            .find(|(_, v)| !(0.0..=1.0).contains(*v))
        {
            return Err(invalid(
                "Bernoulli",
                format_args!("probability {v} at element {i} is outside [0, 1]"),
            ));
        }
        let dtype = self.dtype.unwrap_or(x.dtype);
        let mut rng = self.seed.rng()?;
        opreg_sdk::dispatch!(dtype, ALL, |T| {
            let out = ctx.output_slice::<T>(0, x.shape())?;
            for (o, &p) in out.iter_mut().zip(&p) {
                *o = T::from_f64(if rng.random::<f64>() < p { 1.0 } else { 0.0 });
            }
            Ok(())
        }, other => Err(invalid("Bernoulli", format_args!("output type {other} is not supported"))))
    }
}

fn bernoulli(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Bernoulli {
        dtype: dtype_attr(node, "Bernoulli", crate::ALL_TYPES)?,
        seed: Seed::from_node(node, "Bernoulli")?,
    }))
}

// ---------------------------------------------------------------------------------------------
// Multinomial

#[derive(Clone, Debug)]
struct Multinomial {
    sample_size: usize,
    dtype: DType,
    seed: Seed,
}

/// Fills row `r` of `out` (`sample_size` draws) from the logits of row `r` of `logits`
/// (`cum.len()` classes, at least one), with `cum` as room for the cumulative weights.
fn multinomial_rows<T: Scalar>(
    out: &mut [T],
    logits: &[f64],
    cum: &mut [f64],
    sample_size: usize,
    rng: &mut Pcg64Mcg,
) -> Result<(), PluginError> {
    for (r, (row, dst)) in logits
        .chunks_exact(cum.len())
        .zip(out.chunks_exact_mut(sample_size))
        .enumerate()
    {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if row.iter().any(|v| v.is_nan()) || !max.is_finite() {
            return Err(invalid(
                "Multinomial",
                format_args!(
                    "row {r}: log-probabilities must be finite or -inf, at least one finite"
                ),
            ));
        }
        // Unnormalized probabilities exp(x - max), the largest 1: no overflow, total >= 1.
        let mut total = 0.0;
        for (c, &v) in cum.iter_mut().zip(row) {
            total += (v - max).exp();
            *c = total;
        }
        // Rounding may put a draw at the very top of the sum: then the last class that can be
        // drawn at all.
        let last = row
            .iter()
            .rposition(|&v| v > f64::NEG_INFINITY)
            .unwrap_or(0);
        for o in dst {
            let u = rng.random::<f64>() * total;
            // The first class whose cumulative weight passes u (never a zero-weight class: its
            // cumulative weight equals its predecessor's).
            let k = cum.partition_point(|&c| c <= u);
            *o = T::from_f64(if k < cum.len() { k } else { last } as f64);
        }
    }
    Ok(())
}

impl Kernel for Multinomial {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("Multinomial", inputs, 0, "input")?;
        let &[batch, classes] = x.shape() else {
            return Err(invalid(
                "Multinomial",
                format_args!("input must be 2-D [batch, classes], got {:?}", x.shape()),
            ));
        };
        if batch > 0 && classes == 0 {
            return Err(invalid("Multinomial", "no classes to draw from"));
        }
        if self.dtype == DType::I32 && i32::try_from(classes).is_err() {
            return Err(invalid(
                "Multinomial",
                format_args!("{classes} classes do not fit the int32 output"),
            ));
        }
        let shape = [batch, self.sample_size];
        let logits = read_floats(&x, "Multinomial", "input")?;
        let mut cum = try_vec(classes, 0.0f64)?;
        let mut rng = self.seed.rng()?;
        opreg_sdk::dispatch!(self.dtype, [I32, I64], |T| {
            let out = ctx.output_slice::<T>(0, &shape)?;
            if batch == 0 {
                return Ok(());
            }
            multinomial_rows(out, &logits, &mut cum, self.sample_size, &mut rng)
        }, other => Err(invalid("Multinomial", format_args!("output type {other} is unsupported"))))
    }
}

fn multinomial(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let n = node.int_or("sample_size", 1)?;
    let sample_size = usize::try_from(n).ok().filter(|&s| s >= 1).ok_or_else(|| {
        invalid(
            "Multinomial",
            format_args!("sample_size must be >= 1, got {n}"),
        )
    })?;
    Ok(Box::new(Multinomial {
        sample_size,
        dtype: dtype_attr(node, "Multinomial", &[DType::I32, DType::I64])?.unwrap_or(DType::I32),
        seed: Seed::from_node(node, "Multinomial")?,
    }))
}

// ---------------------------------------------------------------------------------------------
// Dropout (training mode)

/// Dropout's `ratio` input: a float scalar in [0, 1).
pub(crate) fn dropout_ratio(r: &TensorView<'_>) -> Result<f64, PluginError> {
    let v = read_floats(r, "Dropout", "ratio")?;
    let &[ratio] = v.as_slice() else {
        return Err(invalid(
            "Dropout",
            format_args!("ratio must be a scalar, got shape {:?}", r.shape()),
        ));
    };
    if !(0.0..1.0).contains(&ratio) {
        return Err(invalid(
            "Dropout",
            format_args!("ratio must be in [0, 1), got {ratio}"),
        ));
    }
    Ok(ratio)
}

/// Training-mode Dropout of `data` with a nonzero `ratio` (from [`dropout_ratio`]): output 0
/// is `data * mask / (1 - ratio)`, output 1 (when the node has it) the mask, bool (opsets 10
/// and later) or typed like the data (`bool_mask` false).
pub(crate) fn dropout_training(
    ctx: &KernelContext<'_>,
    data: &TensorView<'_>,
    ratio: f64,
    seed: Seed,
    bool_mask: bool,
) -> Result<(), PluginError> {
    let mut rng = seed.rng()?;
    let mut keep = try_vec(data.len(), false)?;
    for k in keep.iter_mut() {
        *k = rng.random::<f64>() >= ratio;
    }
    let scale = 1.0 / (1.0 - ratio);
    let shape = data.shape();
    opreg_sdk::dispatch!(data.dtype, FLOATS, |T| {
        let x = data.as_slice::<T>()?;
        let y = ctx.output_slice::<T>(0, shape)?;
        for ((y, &x), &k) in y.iter_mut().zip(x).zip(&keep) {
            *y = if k { T::from_f64(x.to_f64() * scale) } else { T::from_f64(0.0) };
        }
        if ctx.num_outputs() > 1 && !bool_mask {
            let m = ctx.output_slice::<T>(1, shape)?;
            for (m, &k) in m.iter_mut().zip(&keep) {
                *m = T::from_f64(if k { 1.0 } else { 0.0 });
            }
        }
        Ok::<(), PluginError>(())
    }, other => Err(PluginError::unimplemented(format!(
        "Dropout: training mode is not implemented for {other} (only {})", names(FLOATS)
    ))))?;
    if ctx.num_outputs() > 1 && bool_mask {
        let m = ctx.output_slice::<Bool>(1, shape)?;
        for (m, &k) in m.iter_mut().zip(&keep) {
            *m = Bool::new(k);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

pub fn register(r: &mut Registrar) {
    let any = opreg_sdk::numeric::ALL_AND_STRING;
    for (op, factory) in [
        ("RandomNormal", random_normal as crate::util::Factory),
        ("RandomUniform", random_uniform),
    ] {
        r.kernel(
            KernelDesc::onnx(op, 1, OPEN_END)
                .constraint("T", FLOATS)
                .outputs(&["T"]),
            factory,
        );
    }
    for (op, factory) in [
        (
            "RandomNormalLike",
            random_normal_like as crate::util::Factory,
        ),
        ("RandomUniformLike", random_uniform_like),
    ] {
        r.kernel(
            KernelDesc::onnx(op, 1, OPEN_END)
                .constraint("T1", any)
                .constraint("T2", FLOATS)
                .inputs(&["T1"])
                .outputs(&["T2"]),
            factory,
        );
    }
    r.kernel(
        KernelDesc::onnx("Bernoulli", 15, OPEN_END)
            .constraint("T1", FLOATS)
            .constraint("T2", crate::ALL_TYPES)
            .inputs(&["T1"])
            .outputs(&["T2"]),
        bernoulli,
    );
    r.kernel(
        KernelDesc::onnx("Multinomial", 7, OPEN_END)
            .constraint("T1", FLOATS)
            .constraint("T2", &[DType::I32, DType::I64])
            .inputs(&["T1"])
            .outputs(&["T2"]),
        multinomial,
    );
}

#[cfg(test)]
mod tests {
    //! Statistical checks: every bound is six standard errors or wider, so a correct kernel
    //! fails one about once in a billion runs.
    #![allow(clippy::indexing_slicing)]

    use super::*;
    use crate::util::testing::Registered;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel_opt, NodeSpec},
    };

    /// Runs the kernel registered for `spec`'s op and opset (this module's, or Dropout's in
    /// the shape family).
    fn run(
        spec: &NodeSpec,
        inputs: &[Option<&HostTensor>],
    ) -> Result<Vec<HostTensor>, PluginError> {
        let mut regs = opreg_sdk::module::collect_from(register)
            .expect("registration")
            .kernels;
        regs.extend(
            opreg_sdk::module::collect_from(crate::shape::register)
                .expect("registration")
                .kernels,
        );
        let k = regs
            .into_iter()
            .find(|k| k.desc.op_type.as_str() == spec.op_type && k.desc.covers(spec.opset))
            .expect("a kernel for the op");
        run_kernel_opt(Registered(k.factory), spec, inputs, None)
    }

    fn run1(spec: &NodeSpec, inputs: &[Option<&HostTensor>]) -> HostTensor {
        run(spec, inputs).expect("run").remove(0)
    }

    fn f64s(t: &HostTensor) -> Vec<f64> {
        match t.dtype() {
            DType::F32 => t
                .to_vec::<f32>()
                .expect("f32")
                .iter()
                .map(|&v| v as f64)
                .collect(),
            DType::F64 => t.to_vec::<f64>().expect("f64"),
            DType::F16 => t
                .to_vec::<opreg_sdk::half::f16>()
                .expect("f16")
                .iter()
                .map(|v| v.to_f64())
                .collect(),
            DType::BF16 => t
                .to_vec::<opreg_sdk::half::bf16>()
                .expect("bf16")
                .iter()
                .map(|v| v.to_f64())
                .collect(),
            other => panic!("not a float tensor: {other}"),
        }
    }

    fn mean_var(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    fn float(v: f32) -> AttrValue {
        AttrValue::Float(v)
    }

    fn int(v: i64) -> AttrValue {
        AttrValue::Int(v)
    }

    fn shape(dims: &[i64]) -> AttrValue {
        AttrValue::Ints(dims.to_vec())
    }

    fn scalar<T: opreg_sdk::Element>(v: T) -> HostTensor {
        HostTensor::from_vec(&[], &[v]).expect("scalar")
    }

    fn expect_err(spec: &NodeSpec, inputs: &[Option<&HostTensor>], words: &[&str]) {
        let e = run(spec, inputs).expect_err("must fail");
        for w in words {
            assert!(e.message.contains(w), "{:?} lacks {w:?}", e.message);
        }
    }

    const N: usize = 100_000;

    #[test]
    fn random_uniform_range_mean_and_variance() {
        let (low, high) = (-2.0f64, 3.0f64);
        let spec = NodeSpec::onnx("RandomUniform", 1)
            .attr("low", float(low as f32))
            .attr("high", float(high as f32))
            .attr("shape", shape(&[100, 1000]));
        let out = run1(&spec, &[]);
        assert_eq!(out.dtype(), DType::F32);
        assert_eq!(out.shape(), &[100, 1000]);
        let v = f64s(&out);
        assert!(v.iter().all(|x| (low..high).contains(x)));
        let (mean, var) = mean_var(&v);
        let w = high - low;
        let want_var = w * w / 12.0;
        let se_mean = (want_var / N as f64).sqrt();
        // Var((X - mu)^2) = E(X - mu)^4 - var^2 = w^4 / 80 - w^4 / 144.
        let se_var = (w.powi(4) * (1.0 / 80.0 - 1.0 / 144.0) / N as f64).sqrt();
        assert!(
            (mean - (low + high) / 2.0).abs() < 6.0 * se_mean,
            "mean {mean}"
        );
        assert!((var - want_var).abs() < 6.0 * se_var, "variance {var}");
    }

    #[test]
    fn random_uniform_stays_below_high_in_every_float_type() {
        // In f16 a quarter of the top 2^-11 of [0, 1) rounds up to 1: those are drawn again.
        for code in [10, 16, 1, 11] {
            let spec = NodeSpec::onnx("RandomUniform", 22)
                .attr("dtype", int(code))
                .attr("shape", shape(&[20_000]));
            let out = run1(&spec, &[]);
            assert_eq!(out.dtype().onnx_code(), code as i32);
            let v = f64s(&out);
            assert!(v.iter().all(|x| (0.0..1.0).contains(x)), "dtype {code}");
            let (mean, _) = mean_var(&v);
            assert!((mean - 0.5).abs() < 6.0 * (1.0 / 12.0 / 20_000.0f64).sqrt());
        }
        // low == high: every element is low.
        let spec = NodeSpec::onnx("RandomUniform", 1)
            .attr("low", float(2.5))
            .attr("high", float(2.5))
            .attr("shape", shape(&[3]));
        assert_eq!(f64s(&run1(&spec, &[])), vec![2.5; 3]);
        // A scalar shape.
        let spec = NodeSpec::onnx("RandomUniform", 1).attr("shape", shape(&[]));
        assert_eq!(run1(&spec, &[]).shape(), &[] as &[usize]);
    }

    #[test]
    fn random_normal_mean_and_std() {
        let (mu, sigma) = (1.5f64, 2.0f64);
        let spec = NodeSpec::onnx("RandomNormal", 1)
            .attr("mean", float(mu as f32))
            .attr("scale", float(sigma as f32))
            .attr("dtype", int(11))
            .attr("shape", shape(&[N as i64]));
        let out = run1(&spec, &[]);
        assert_eq!(out.dtype(), DType::F64);
        let (mean, var) = mean_var(&f64s(&out));
        let se_mean = sigma / (N as f64).sqrt();
        // The sample standard deviation of a normal has standard error sigma / sqrt(2N).
        let se_std = sigma / (2.0 * N as f64).sqrt();
        assert!((mean - mu).abs() < 6.0 * se_mean, "mean {mean}");
        assert!(
            (var.sqrt() - sigma).abs() < 6.0 * se_std,
            "std {}",
            var.sqrt()
        );
    }

    #[test]
    fn random_like_ops_take_the_input_shape_and_type() {
        let x = HostTensor::from_vec(&[2, 3], &[opreg_sdk::half::f16::ZERO; 6]).expect("x");
        let out = run1(&NodeSpec::onnx("RandomNormalLike", 1), &[Some(&x)]);
        assert_eq!((out.dtype(), out.shape()), (DType::F16, &[2usize, 3][..]));
        // An integer input needs a dtype.
        let xi = HostTensor::from_vec(&[4, 5], &[0i64; 20]).expect("xi");
        expect_err(
            &NodeSpec::onnx("RandomUniformLike", 1),
            &[Some(&xi)],
            &["RandomUniformLike", "not a float type"],
        );
        let spec = NodeSpec::onnx("RandomUniformLike", 1)
            .attr("dtype", int(1))
            .attr("low", float(10.0))
            .attr("high", float(11.0));
        let out = run1(&spec, &[Some(&xi)]);
        assert_eq!((out.dtype(), out.shape()), (DType::F32, &[4usize, 5][..]));
        assert!(f64s(&out).iter().all(|v| (10.0..11.0).contains(v)));
    }

    #[test]
    fn bernoulli_frequency() {
        let p = 0.3f64;
        let x = HostTensor::from_vec(&[N], &vec![p as f32; N]).expect("x");
        let out = run1(&NodeSpec::onnx("Bernoulli", 15), &[Some(&x)]);
        assert_eq!(out.dtype(), DType::F32);
        let v = f64s(&out);
        assert!(v.iter().all(|&b| b == 0.0 || b == 1.0));
        let freq = v.iter().sum::<f64>() / N as f64;
        assert!(
            (freq - p).abs() < 6.0 * (p * (1.0 - p) / N as f64).sqrt(),
            "{freq}"
        );

        // A bool output through dtype, and certain events.
        let x = HostTensor::from_vec(&[4], &[0.0f64, 1.0, 0.0, 1.0]).expect("x");
        let out = run1(
            &NodeSpec::onnx("Bernoulli", 15).attr("dtype", int(9)),
            &[Some(&x)],
        );
        assert_eq!(out.dtype(), DType::Bool);
        assert_eq!(out.bytes(), &[0, 1, 0, 1]);
        let out = run1(
            &NodeSpec::onnx("Bernoulli", 15).attr("dtype", int(7)),
            &[Some(&x)],
        );
        assert_eq!(out.to_vec::<i64>().expect("i64"), vec![0, 1, 0, 1]);

        let bad = HostTensor::from_vec(&[2], &[0.5f32, 1.5]).expect("bad");
        expect_err(
            &NodeSpec::onnx("Bernoulli", 15),
            &[Some(&bad)],
            &["Bernoulli", "1.5", "outside [0, 1]"],
        );
    }

    #[test]
    fn multinomial_frequencies_follow_the_softmax() {
        let samples = 50_000usize;
        let logits: Vec<f32> = vec![
            0.0,
            1.0,
            2.0,
            f32::NEG_INFINITY,
            0.1f32.ln(),
            0.2f32.ln(),
            0.3f32.ln(),
            0.4f32.ln(),
        ];
        let x = HostTensor::from_vec(&[2, 4], &logits).expect("x");
        let spec = NodeSpec::onnx("Multinomial", 7)
            .attr("sample_size", int(samples as i64))
            .attr("dtype", int(7));
        let out = run1(&spec, &[Some(&x)]);
        assert_eq!(
            (out.dtype(), out.shape()),
            (DType::I64, &[2usize, samples][..])
        );
        let draws = out.to_vec::<i64>().expect("i64");
        for (row, logit_row) in draws.chunks(samples).zip(logits.chunks(4)) {
            let w: Vec<f64> = logit_row.iter().map(|&l| (l as f64).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut counts = [0usize; 4];
            for &k in row {
                counts[usize::try_from(k).expect("class")] += 1;
            }
            // Pearson's chi-square, 3 (or 2) degrees of freedom: P(chi2 > 50) < 1e-10.
            let mut chi2 = 0.0;
            for (c, w) in counts.iter().zip(&w) {
                let expect = samples as f64 * w / total;
                if expect == 0.0 {
                    assert_eq!(*c, 0, "a -inf logit was drawn");
                } else {
                    chi2 += (*c as f64 - expect).powi(2) / expect;
                }
            }
            assert!(chi2 < 50.0, "chi-square {chi2}, counts {counts:?}");
        }
        // int32 by default.
        let out = run1(&NodeSpec::onnx("Multinomial", 7), &[Some(&x)]);
        assert_eq!((out.dtype(), out.shape()), (DType::I32, &[2usize, 1][..]));
        // An empty batch is an empty output.
        let empty = HostTensor::from_vec::<f32>(&[0, 3], &[]).expect("empty");
        let out = run1(&NodeSpec::onnx("Multinomial", 7), &[Some(&empty)]);
        assert_eq!(out.shape(), &[0, 1]);
        // A row with nothing to draw.
        let dead = HostTensor::from_vec(&[1, 2], &[f32::NEG_INFINITY; 2]).expect("dead");
        expect_err(
            &NodeSpec::onnx("Multinomial", 7),
            &[Some(&dead)],
            &["Multinomial", "row 0"],
        );
        let flat = HostTensor::from_vec(&[3], &[0.0f32; 3]).expect("flat");
        expect_err(
            &NodeSpec::onnx("Multinomial", 7),
            &[Some(&flat)],
            &["Multinomial", "2-D"],
        );
    }

    /// Runs `spec` twice on `inputs` and says whether the two outputs are bit-identical.
    fn same_twice(spec: &NodeSpec, inputs: &[Option<&HostTensor>]) -> bool {
        run1(spec, inputs).bytes() == run1(spec, inputs).bytes()
    }

    #[test]
    fn seeded_runs_repeat_and_unseeded_runs_differ() {
        let p = HostTensor::from_vec(&[1000], &[0.5f32; 1000]).expect("p");
        let logits = HostTensor::from_vec(&[1, 8], &[0.0f32; 8]).expect("logits");
        let cases: Vec<(NodeSpec, Vec<Option<&HostTensor>>)> = vec![
            (
                NodeSpec::onnx("RandomNormal", 1).attr("shape", shape(&[1000])),
                vec![],
            ),
            (
                NodeSpec::onnx("RandomUniform", 1).attr("shape", shape(&[1000])),
                vec![],
            ),
            (NodeSpec::onnx("RandomNormalLike", 1), vec![Some(&p)]),
            (NodeSpec::onnx("RandomUniformLike", 1), vec![Some(&p)]),
            (NodeSpec::onnx("Bernoulli", 15), vec![Some(&p)]),
            (
                NodeSpec::onnx("Multinomial", 7).attr("sample_size", int(1000)),
                vec![Some(&logits)],
            ),
        ];
        for (spec, inputs) in &cases {
            // 1000 draws: two independent runs agree with probability far below 1e-100.
            assert!(!same_twice(spec, inputs), "{} unseeded", spec.op_type);
            let seeded = spec.clone().attr("seed", float(3.0));
            assert!(same_twice(&seeded, inputs), "{} seeded", spec.op_type);
            let other = spec.clone().attr("seed", float(4.0));
            assert_ne!(
                run1(&seeded, inputs).bytes(),
                run1(&other, inputs).bytes(),
                "{} seeds 3 and 4",
                spec.op_type
            );
            // A NaN seed is no seed.
            let nan = spec.clone().attr("seed", float(f32::NAN));
            assert!(!same_twice(&nan, inputs), "{} NaN seed", spec.op_type);
        }
    }

    #[test]
    fn seeded_runs_repeat_across_threads() {
        let spec = NodeSpec::onnx("RandomNormal", 1)
            .attr("seed", float(11.0))
            .attr("shape", shape(&[256]));
        let want = run1(&spec, &[]).bytes().to_vec();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| run1(&spec, &[]).bytes().to_vec()))
                .collect();
            for h in handles {
                assert_eq!(h.join().expect("thread"), want);
            }
        });
    }

    fn dropout_spec(seed: Option<i64>) -> NodeSpec {
        let spec = NodeSpec::onnx("Dropout", 13).outputs(2);
        match seed {
            Some(s) => spec.attr("seed", int(s)),
            None => spec,
        }
    }

    #[test]
    fn dropout_training_masks_and_scales() {
        let data: Vec<f32> = (0..N).map(|i| (i % 97) as f32 - 48.0).collect();
        let x = HostTensor::from_vec(&[N / 100, 100], &data).expect("x");
        let ratio = scalar(0.5f32);
        let on = scalar(Bool::new(true));
        let out = run(&dropout_spec(None), &[Some(&x), Some(&ratio), Some(&on)]).expect("run");
        assert_eq!(out[1].dtype(), DType::Bool);
        assert_eq!(out[1].shape(), x.shape());
        let y = out[0].to_vec::<f32>().expect("y");
        let mask = out[1].bytes();
        for ((&y, &x), &m) in y.iter().zip(&data).zip(mask) {
            assert_eq!(y, if m != 0 { 2.0 * x } else { 0.0 });
        }
        let kept = mask.iter().filter(|&&m| m != 0).count() as f64 / N as f64;
        assert!(
            (kept - 0.5).abs() < 6.0 * (0.25 / N as f64).sqrt(),
            "{kept}"
        );

        // Ratio 0.8 in f64: a fifth kept, scaled by 5.
        let ratio = scalar(0.8f64);
        let out = run(&dropout_spec(None), &[Some(&x), Some(&ratio), Some(&on)]).expect("run");
        let mask = out[1].bytes();
        let kept = mask.iter().filter(|&&m| m != 0).count() as f64 / N as f64;
        assert!(
            (kept - 0.2).abs() < 6.0 * (0.16 / N as f64).sqrt(),
            "{kept}"
        );
        let y = out[0].to_vec::<f32>().expect("y");
        for ((&y, &x), &m) in y.iter().zip(&data).zip(mask) {
            let want = if m != 0 {
                x / (1.0 - 0.8f64) as f32
            } else {
                0.0
            };
            assert!((y - want).abs() <= 1e-5 * want.abs(), "{y} vs {want}");
        }

        // Default ratio (0.5) when only training_mode is given; no mask output.
        let out = run(&NodeSpec::onnx("Dropout", 13), &[Some(&x), None, Some(&on)]).expect("run");
        assert_eq!(out.len(), 1);
        let zeros = out[0]
            .to_vec::<f32>()
            .expect("y")
            .iter()
            .zip(&data)
            .filter(|(&y, &x)| y == 0.0 && x != 0.0)
            .count() as f64
            / N as f64;
        // A ninety-seventh of the inputs are zero anyway.
        let dropped_nonzero = 0.5 * 96.0 / 97.0;
        assert!((zeros - dropped_nonzero).abs() < 0.01, "{zeros}");
    }

    #[test]
    fn dropout_ratio_zero_or_inference_is_identity() {
        let data = [1.0f32, -2.0, 3.5, 0.0, 7.0];
        let x = HostTensor::from_vec(&[5], &data).expect("x");
        for (ratio, training) in [(0.0f32, true), (0.5, false), (0.0, false)] {
            let r = scalar(ratio);
            let t = scalar(Bool::new(training));
            let out = run(&dropout_spec(Some(1)), &[Some(&x), Some(&r), Some(&t)]).expect("run");
            assert_eq!(out[0].to_vec::<f32>().expect("y"), data);
            assert_eq!(out[1].bytes(), &[1; 5]);
        }
    }

    #[test]
    fn dropout_seeded_repeats_and_bad_ratios_fail() {
        let x = HostTensor::from_vec(&[1000], &[1.0f32; 1000]).expect("x");
        let r = scalar(0.5f32);
        let on = scalar(Bool::new(true));
        let inputs = [Some(&x), Some(&r), Some(&on)];
        assert!(same_twice(&dropout_spec(Some(42)), &inputs));
        assert!(!same_twice(&dropout_spec(None), &inputs));
        let mask = |seed| {
            run(&dropout_spec(Some(seed)), &inputs)
                .expect("run")
                .remove(1)
        };
        assert_ne!(mask(1).bytes(), mask(2).bytes());
        for bad in [1.0f32, -0.1, 1.5, f32::NAN] {
            let r = scalar(bad);
            expect_err(
                &dropout_spec(None),
                &[Some(&x), Some(&r), Some(&on)],
                &["Dropout", "ratio"],
            );
        }
        // Not a scalar.
        let r = HostTensor::from_vec(&[2], &[0.5f32, 0.5]).expect("r");
        expect_err(
            &dropout_spec(None),
            &[Some(&x), Some(&r), Some(&on)],
            &["Dropout", "scalar"],
        );
        // bf16 data and ratio.
        let xb = HostTensor::from_vec(&[64], &[opreg_sdk::half::bf16::ONE; 64]).expect("xb");
        let rb = scalar(opreg_sdk::half::bf16::from_f32(0.75));
        let out = run(&dropout_spec(Some(5)), &[Some(&xb), Some(&rb), Some(&on)]).expect("bf16");
        for (y, &m) in f64s(&out[0]).iter().zip(out[1].bytes()) {
            assert_eq!(*y, if m != 0 { 4.0 } else { 0.0 });
        }
    }

    /// The plugin's static inference for `spec` over inputs given as (type, shape).
    fn infer(spec: &NodeSpec, inputs: &[(DType, &[i64])]) -> (Option<DType>, Option<Vec<i64>>) {
        let info = |dtype, shape| opreg_sdk::ValueInfo {
            name: "",
            present: true,
            dtype,
            shape,
            constant: None,
        };
        let node = NodeInfo {
            name: "n",
            domain: "",
            op_type: spec.op_type.as_str(),
            opset: spec.opset,
            device: Device::CPU,
            attributes: std::borrow::Cow::Borrowed(spec.attributes.as_slice()),
            inputs: inputs.iter().map(|&(t, s)| info(t, Some(s))).collect(),
            outputs: vec![info(DType::UNDEFINED, None)],
            blas: None,
            context: None,
        };
        let fact = crate::infer::infer(&node).expect("infer").remove(0);
        (fact.dtype, fact.shape)
    }

    #[test]
    fn inference_rules() {
        let spec = NodeSpec::onnx("RandomNormal", 1).attr("shape", shape(&[2, 3]));
        assert_eq!(infer(&spec, &[]), (Some(DType::F32), Some(vec![2, 3])));
        let spec = NodeSpec::onnx("RandomUniform", 1)
            .attr("shape", shape(&[2, -3]))
            .attr("dtype", int(10));
        assert_eq!(infer(&spec, &[]), (Some(DType::F16), None));
        let x: &[i64] = &[-1, 5];
        let spec = NodeSpec::onnx("RandomUniformLike", 1);
        assert_eq!(
            infer(&spec, &[(DType::F64, x)]),
            (Some(DType::F64), Some(x.to_vec()))
        );
        let spec = NodeSpec::onnx("RandomNormalLike", 1).attr("dtype", int(1));
        assert_eq!(
            infer(&spec, &[(DType::I64, x)]),
            (Some(DType::F32), Some(x.to_vec()))
        );
        let spec = NodeSpec::onnx("Bernoulli", 15);
        assert_eq!(
            infer(&spec, &[(DType::F32, x)]),
            (Some(DType::F32), Some(x.to_vec()))
        );
        let spec = spec.attr("dtype", int(9));
        assert_eq!(
            infer(&spec, &[(DType::F32, x)]),
            (Some(DType::Bool), Some(x.to_vec()))
        );
        let spec = NodeSpec::onnx("Multinomial", 7).attr("sample_size", int(7));
        assert_eq!(
            infer(&spec, &[(DType::F32, x)]),
            (Some(DType::I32), Some(vec![-1, 7]))
        );
        let spec = spec.attr("dtype", int(7));
        assert_eq!(
            infer(&spec, &[(DType::F32, x)]),
            (Some(DType::I64), Some(vec![-1, 7]))
        );
    }

    #[test]
    fn invalid_attributes_fail_with_the_op_named() {
        let uniform = || NodeSpec::onnx("RandomUniform", 1).attr("shape", shape(&[2]));
        expect_err(
            &uniform().attr("dtype", int(7)),
            &[],
            &["RandomUniform", "dtype 7"],
        );
        expect_err(
            &uniform().attr("dtype", int(999)),
            &[],
            &["RandomUniform", "dtype 999"],
        );
        expect_err(
            &uniform().attr("low", float(1.0)).attr("high", float(0.0)),
            &[],
            &["RandomUniform", "below low"],
        );
        expect_err(
            &uniform().attr("high", float(f32::INFINITY)),
            &[],
            &["RandomUniform", "finite"],
        );
        expect_err(
            &NodeSpec::onnx("RandomNormal", 1).attr("shape", shape(&[2, -1])),
            &[],
            &["RandomNormal", "negative"],
        );
        expect_err(
            &NodeSpec::onnx("RandomNormal", 1),
            &[],
            &["RandomNormal", "shape"],
        );
        expect_err(
            &NodeSpec::onnx("RandomNormal", 1).attr("shape", shape(&[i64::MAX, i64::MAX])),
            &[],
            &["overflows"],
        );
        expect_err(
            &NodeSpec::onnx("RandomNormal", 1)
                .attr("shape", shape(&[2]))
                .attr("seed", AttrValue::String("x".into())),
            &[],
            &["RandomNormal", "seed"],
        );
        let x = HostTensor::from_vec(&[1, 2], &[0.0f32, 0.0]).expect("x");
        for n in [0, -3] {
            expect_err(
                &NodeSpec::onnx("Multinomial", 7).attr("sample_size", int(n)),
                &[Some(&x)],
                &["Multinomial", "sample_size"],
            );
        }
        expect_err(
            &NodeSpec::onnx("Multinomial", 7).attr("dtype", int(1)),
            &[Some(&x)],
            &["Multinomial", "dtype 1"],
        );
        expect_err(
            &NodeSpec::onnx("Bernoulli", 15).attr("dtype", int(8)),
            &[Some(&x)],
            &["Bernoulli", "dtype 8"],
        );
    }
}
