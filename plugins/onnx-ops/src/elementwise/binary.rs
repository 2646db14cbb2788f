//! Binary and variadic operators with multidirectional broadcasting: arithmetic, Pow, Mod,
//! PRelu, bit shifts, logic, bitwise, comparisons, Max/Min/Sum/Mean and Where.

use super::engine::{fold_into, zip2, zip2v, zip3, Plan};
use crate::util::{broadcast_shapes, required};
use opreg_sdk::numeric::{Arith, Bits, Bool, Scalar};
use opreg_sdk::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod { fmod: bool },
    PRelu,
    BitShift { left: bool },
    And,
    Or,
    Xor,
    BitwiseAnd,
    BitwiseOr,
    BitwiseXor,
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
}

impl std::fmt::Display for BinOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Clone)]
pub struct Binary(pub BinOp);

impl Kernel for Binary {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let (a, b) = two(inputs)?;
        if a.dtype != b.dtype {
            return Err(PluginError::invalid(format!(
                "{:?}: inputs A and B differ in type ({} and {})",
                self.0, a.dtype, b.dtype
            )));
        }
        let what = self.0;
        match self.0 {
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Mod { .. } => {
                opreg_sdk::dispatch!(a.dtype, NUMERIC, |T| arith::<T>(ctx, a, b, self.0), other => Err(super::unsupported(what, other)))
            }
            BinOp::PRelu => {
                if broadcast_shapes(&[a.shape(), b.shape()])? != a.shape() {
                    return Err(PluginError::invalid(format!(
                        "PRelu: slope {:?} does not broadcast to X {:?}",
                        b.shape(),
                        a.shape()
                    )));
                }
                opreg_sdk::dispatch!(a.dtype, NUMERIC, |T| arith::<T>(ctx, a, b, self.0), other => Err(super::unsupported(what, other)))
            }
            BinOp::BitShift { left } => opreg_sdk::dispatch!(a.dtype, INTEGERS, |T| if left {
                zip2v(ctx, a, b, |x: T, y: T| x.shl(y))
            } else {
                zip2v(ctx, a, b, |x: T, y: T| x.shr(y))
            }, other => Err(super::unsupported(what, other))),
            BinOp::And | BinOp::Or | BinOp::Xor => {
                if a.dtype != DType::Bool {
                    return Err(PluginError::unimplemented(format!(
                        "{what}: type {} is not supported",
                        a.dtype
                    )));
                }
                match self.0 {
                    BinOp::And => zip2v(ctx, a, b, |x: Bool, y: Bool| Bool::new(x.get() & y.get())),
                    BinOp::Or => zip2v(ctx, a, b, |x: Bool, y: Bool| Bool::new(x.get() | y.get())),
                    _ => zip2v(ctx, a, b, |x: Bool, y: Bool| Bool::new(x.get() ^ y.get())),
                }
            }
            BinOp::BitwiseAnd => {
                opreg_sdk::dispatch!(a.dtype, INTEGERS, |T| zip2v(ctx, a, b, |x: T, y: T| x.and(y)), other => Err(super::unsupported(what, other)))
            }
            BinOp::BitwiseOr => {
                opreg_sdk::dispatch!(a.dtype, INTEGERS, |T| zip2v(ctx, a, b, |x: T, y: T| x.or(y)), other => Err(super::unsupported(what, other)))
            }
            BinOp::BitwiseXor => {
                opreg_sdk::dispatch!(a.dtype, INTEGERS, |T| zip2v(ctx, a, b, |x: T, y: T| x.xor(y)), other => Err(super::unsupported(what, other)))
            }
            BinOp::Equal if a.dtype == DType::String => equal_strings(ctx, a, b),
            BinOp::Equal => {
                opreg_sdk::dispatch!(a.dtype, ALL, |T| zip2v(ctx, a, b, |x: T, y: T| Bool::new(x.load() == y.load())), other => Err(super::unsupported(what, other)))
            }
            BinOp::Less => {
                opreg_sdk::dispatch!(a.dtype, NUMERIC, |T| zip2v(ctx, a, b, |x: T, y: T| Bool::new(x.load() < y.load())), other => Err(super::unsupported(what, other)))
            }
            BinOp::LessOrEqual => {
                opreg_sdk::dispatch!(a.dtype, NUMERIC, |T| zip2v(ctx, a, b, |x: T, y: T| Bool::new(x.load() <= y.load())), other => Err(super::unsupported(what, other)))
            }
            BinOp::Greater => {
                opreg_sdk::dispatch!(a.dtype, NUMERIC, |T| zip2v(ctx, a, b, |x: T, y: T| Bool::new(x.load() > y.load())), other => Err(super::unsupported(what, other)))
            }
            BinOp::GreaterOrEqual => {
                opreg_sdk::dispatch!(a.dtype, NUMERIC, |T| zip2v(ctx, a, b, |x: T, y: T| Bool::new(x.load() >= y.load())), other => Err(super::unsupported(what, other)))
            }
        }
    }
}

fn two<'a, 'b>(
    inputs: &'b [TensorView<'a>],
) -> Result<(&'b TensorView<'a>, &'b TensorView<'a>), PluginError> {
    match inputs {
        [a, b, ..] if !a.is_absent() && !b.is_absent() => Ok((a, b)),
        _ => Err(PluginError::invalid("expected two inputs")),
    }
}

fn arith<T: Scalar>(
    ctx: &KernelContext<'_>,
    a: &TensorView<'_>,
    b: &TensorView<'_>,
    op: BinOp,
) -> Result<(), PluginError>
where
    T::Compute: Arith,
{
    let divides = matches!(op, BinOp::Div | BinOp::Mod { .. });
    if divides && !T::IS_FLOAT {
        let zero = <T::Compute as Arith>::ZERO;
        if b.as_slice::<T>()?.iter().any(|v| v.load() == zero) {
            return Err(PluginError::invalid(format!(
                "{op:?}: integer division by zero (input B)"
            )));
        }
    }
    macro_rules! go {
        (|$x:ident, $y:ident| $e:expr) => {
            zip2v(ctx, a, b, |x: T, y: T| {
                let ($x, $y) = (x.load(), y.load());
                T::store($e)
            })
        };
    }
    match op {
        BinOp::Add => go!(|x, y| x.add(y)),
        BinOp::Sub => go!(|x, y| x.sub(y)),
        BinOp::Mul => go!(|x, y| x.mul(y)),
        BinOp::Div => go!(|x, y| x.div(y)),
        BinOp::Mod { fmod: true } => go!(|x, y| x.fmod(y)),
        BinOp::Mod { fmod: false } if T::IS_FLOAT => {
            // Python's `%`: the result takes the divisor's sign.
            let zero = <T::Compute as Arith>::ZERO;
            go!(|x, y| {
                let r = x.fmod(y);
                if r != zero && ((r < zero) != (y < zero)) {
                    r.add(y)
                } else {
                    r
                }
            })
        }
        BinOp::Mod { fmod: false } => go!(|x, y| x.modulo(y)),
        BinOp::PRelu => {
            let zero = <T::Compute as Arith>::ZERO;
            go!(|x, s| if x < zero { s.mul(x) } else { x })
        }
        other => Err(PluginError::internal(format!(
            "{other:?} is not an arithmetic op"
        ))),
    }
}

/// `Pow`: the result has the base's type; the exponent may be any numeric type.
#[derive(Clone)]
pub struct Pow;

impl Kernel for Pow {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let (x, y) = two(inputs)?;
        opreg_sdk::dispatch!(x.dtype, NUMERIC, |T| pow::<T>(ctx, x, y), other => Err(super::unsupported("Pow (base X)", other)))
    }
}

fn pow<T: Scalar>(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    y: &TensorView<'_>,
) -> Result<(), PluginError> {
    let xs = (x.as_slice::<T>()?, x.shape());
    if y.is_empty() {
        // Nothing to compute (and no scratch to ask for): the broadcast output is empty too.
        let shape = broadcast_shapes(&[x.shape(), y.shape()])?;
        ctx.output_slice::<T>(0, &shape)?;
        return Ok(());
    }
    if T::IS_FLOAT || y.dtype.is_float() {
        // Widen the exponent to f64 once; compute in f64.
        let e = ctx.scratch::<f64>(y.len())?;
        opreg_sdk::dispatch!(y.dtype, NUMERIC, |E| {
            for (d, &s) in e.iter_mut().zip(y.as_slice::<E>()?) {
                *d = s.to_f64();
            }
            Ok(())
        }, other => Err(super::unsupported("Pow (exponent Y)", other)))?;
        zip2(ctx, xs, (&*e, y.shape()), |b: T, e: f64| {
            T::from_f64(b.to_f64().powf(e))
        })
    } else {
        let e = ctx.scratch::<i64>(y.len())?;
        opreg_sdk::dispatch!(y.dtype, NUMERIC, |E| {
            for (d, &s) in e.iter_mut().zip(y.as_slice::<E>()?) {
                *d = s.to_i128() as i64;
            }
            Ok(())
        }, other => Err(super::unsupported("Pow (exponent Y)", other)))?;
        zip2(ctx, xs, (&*e, y.shape()), |b: T, e: i64| {
            T::from_i128(int_pow(b.to_i128(), e))
        })
    }
}

/// `b^e` for integers, wrapping; negative exponents truncate `1 / b^|e|` toward zero.
fn int_pow(b: i128, e: i64) -> i128 {
    if e < 0 {
        return match b {
            1 => 1,
            -1 if e % 2 == 0 => 1,
            -1 => -1,
            _ => 0,
        };
    }
    let (mut acc, mut base, mut e) = (1i128, b, e as u64);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(base);
        }
        base = base.wrapping_mul(base);
        e >>= 1;
    }
    acc
}

/// Variadic operators over broadcast inputs.
#[derive(Clone, Copy, Debug)]
pub enum VarOp {
    Sum,
    Mean,
    Max,
    Min,
}

impl std::fmt::Display for VarOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Clone)]
pub struct Variadic(pub VarOp);

impl Kernel for Variadic {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let what = self.0;
        let Some(first) = inputs.first() else {
            return Err(PluginError::invalid(format!(
                "{what}: needs at least one input"
            )));
        };
        if let Some(i) = inputs
            .iter()
            .position(|v| v.is_absent() || v.dtype != first.dtype)
        {
            return Err(PluginError::invalid(format!(
                "{what}: input {i} is absent or not of type {}",
                first.dtype
            )));
        }
        opreg_sdk::dispatch!(first.dtype, NUMERIC, |T| variadic::<T>(ctx, inputs, self.0), other => Err(super::unsupported(what, other)))
    }
}

/// max/min that propagate NaN.
fn pick<C: Arith>(a: C, b: C, max: bool) -> C {
    let b_wins = if max { b > a } else { b < a };
    if b_wins || b.is_nan() {
        b
    } else {
        a
    }
}

fn variadic<T: Scalar>(
    ctx: &KernelContext<'_>,
    inputs: &[TensorView<'_>],
    op: VarOp,
) -> Result<(), PluginError>
where
    T::Compute: Arith,
{
    let shapes: Vec<&[usize]> = inputs.iter().map(|v| v.shape()).collect();
    let shape = broadcast_shapes(&shapes)?;
    let out = ctx.output_slice_to_overwrite::<T>(0, &shape)?;
    fold_into(ctx, out, &shape, &inputs[0], |_, a: T| a)?;
    for x in &inputs[1..] {
        match op {
            VarOp::Sum | VarOp::Mean => fold_into(ctx, out, &shape, x, |o: T, a: T| {
                T::store(o.load().add(a.load()))
            })?,
            VarOp::Max => fold_into(ctx, out, &shape, x, |o: T, a: T| {
                T::store(pick(o.load(), a.load(), true))
            })?,
            VarOp::Min => fold_into(ctx, out, &shape, x, |o: T, a: T| {
                T::store(pick(o.load(), a.load(), false))
            })?,
        }
    }
    if let VarOp::Mean = op {
        let n = <T::Compute as Scalar>::from_f64(inputs.len() as f64);
        ctx.parallel_chunks(out, super::engine::GRAIN, |_, chunk| {
            for o in chunk {
                *o = T::store(o.load().div(n));
            }
        })?;
    }
    Ok(())
}

/// `Where(condition, X, Y)`.
#[derive(Clone)]
pub struct Where;

impl Kernel for Where {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [c, x, y] = required("Where", inputs, ["condition", "X", "Y"])?;
        let (c, x, y) = (&c, &x, &y);
        if x.dtype != y.dtype {
            return Err(PluginError::invalid(format!(
                "Where: X and Y differ in type ({} and {})",
                x.dtype, y.dtype
            )));
        }
        if c.dtype != DType::Bool {
            return Err(PluginError::invalid(format!(
                "Where: condition must be BOOL, got {}",
                c.dtype
            )));
        }
        if x.dtype == DType::String {
            return where_strings(ctx, c, x, y);
        }
        opreg_sdk::dispatch!(x.dtype, ALL, |T| {
            zip3(ctx, c, x, y, |c: Bool, x: T, y: T| if c.get() { x } else { y })
        }, other => Err(super::unsupported("Where", other)))
    }
}

/// Elements per parallel chunk for string outputs (each element clones or compares bytes).
const STRING_GRAIN: usize = 1024;

/// `Equal` on strings: byte equality.
fn equal_strings(
    ctx: &KernelContext<'_>,
    a: &TensorView<'_>,
    b: &TensorView<'_>,
) -> Result<(), PluginError> {
    let (xa, xb) = (a.as_strings()?, b.as_strings()?);
    let shapes = [a.shape(), b.shape()];
    let shape = broadcast_shapes(&shapes)?;
    let plan = Plan::new(&shape, shapes);
    let [sa, sb] = plan.inner();
    let out = ctx.output_slice::<Bool>(0, &shape)?;
    ctx.parallel_chunks(out, STRING_GRAIN, |start, out| {
        plan.runs(start, out.len(), |pos, [oa, ob], n| {
            for (k, o) in out[pos..pos + n].iter_mut().enumerate() {
                *o = Bool::new(xa[oa + k * sa].as_str() == xb[ob + k * sb].as_str());
            }
        })
    })
}

/// `Where` on strings: copies of the chosen elements.
fn where_strings(
    ctx: &KernelContext<'_>,
    c: &TensorView<'_>,
    x: &TensorView<'_>,
    y: &TensorView<'_>,
) -> Result<(), PluginError> {
    let (xc, xx, xy) = (c.as_slice::<Bool>()?, x.as_strings()?, y.as_strings()?);
    let shapes = [c.shape(), x.shape(), y.shape()];
    let shape = broadcast_shapes(&shapes)?;
    let plan = Plan::new(&shape, shapes);
    let [sc, sx, sy] = plan.inner();
    let out = ctx.output(0, DType::String, &shape)?.into_strings()?;
    ctx.parallel_chunks(out, STRING_GRAIN, |start, out| {
        plan.runs(start, out.len(), |pos, [oc, ox, oy], n| {
            for (k, o) in out[pos..pos + n].iter_mut().enumerate() {
                let pick = if xc[oc + k * sc].get() {
                    &xx[ox + k * sx]
                } else {
                    &xy[oy + k * sy]
                };
                o.clone_from(pick);
            }
        })
    })
}
