//! `Cast` and `CastLike` between every numeric type and bool (strings are not supported),
//! including the 8-, 4- and 2-bit types (held one element per byte; see [`crate::lowbit`]).

use super::engine::map;
use crate::lowbit::{self, RoundMode};
use crate::util::input;
use opreg_sdk::numeric::{convert, Scalar};
use opreg_sdk::prelude::*;

/// Every type `Cast` converts between: every dtype but strings.
pub const CAST_TYPES: &[DType] = &{
    let mut out = [DType::Bool; DType::ALL.len() - 1];
    let (mut i, mut j) = (0, 0);
    while i < DType::ALL.len() {
        if !matches!(DType::ALL[i], DType::String) {
            out[j] = DType::ALL[i];
            j += 1;
        }
        i += 1;
    }
    out
};

/// Elements per parallel chunk.
const GRAIN: usize = 8192;

/// `Cast` to a fixed type (`to`), or `CastLike` (`to: None`: the type of input 1).
#[derive(Clone)]
pub struct Cast {
    to: Option<DType>,
    /// `saturate` (float8 targets; default 1).
    saturate: bool,
    /// `round_mode` (float8e8m0 targets; default `up`).
    round_mode: RoundMode,
}

impl Cast {
    /// Reads `saturate` and `round_mode`.
    fn with_attrs(op: &str, node: &NodeInfo<'_>, to: Option<DType>) -> Result<Self, PluginError> {
        let saturate = node.int_or("saturate", 1)? != 0;
        let mode = node.string_or("round_mode", "up")?;
        let round_mode = RoundMode::parse(&mode).ok_or_else(|| {
            PluginError::invalid(format!(
                "{op}: attribute 'round_mode' must be 'up', 'down' or 'nearest', got '{mode}'"
            ))
        })?;
        Ok(Cast {
            to,
            saturate,
            round_mode,
        })
    }

    /// Reads `to` (and `saturate`, `round_mode`) for `Cast`.
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        let code = node
            .attr("to")
            .ok_or_else(|| PluginError::invalid("Cast: attribute 'to' is required"))?;
        let AttrValue::Int(code) = *code else {
            return Err(PluginError::invalid(format!(
                "Cast: attribute 'to' must be INT, got {code:?}"
            )));
        };
        let to = i32::try_from(code)
            .ok()
            .and_then(DType::from_onnx_code)
            .ok_or_else(|| {
                PluginError::unimplemented(format!(
                    "Cast: attribute 'to' = {code} is not supported"
                ))
            })?;
        if to == DType::String {
            return Err(PluginError::unimplemented(
                "Cast: to STRING is not supported",
            ));
        }
        Ok(Box::new(Cast::with_attrs("Cast", node, Some(to))?))
    }

    /// `CastLike`: the target type is input 1's.
    pub fn like_from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        Ok(Box::new(Cast::with_attrs("CastLike", node, None)?))
    }
}

impl Kernel for Cast {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = if self.to.is_some() {
            "Cast"
        } else {
            "CastLike"
        };
        let x = &input(op, inputs, 0, "input")?;
        let to = match self.to {
            Some(to) => to,
            None => match inputs.get(1) {
                Some(t) if !t.is_absent() => t.dtype,
                _ => {
                    return Err(PluginError::invalid(
                        "CastLike: input 'target_type' is missing",
                    ))
                }
            },
        };
        if lowbit::is_lowbit(x.dtype) {
            let xs = x.as_bytes()?;
            let from = x.dtype;
            if lowbit::is_lowbit_int(from) {
                let get = |i: usize| Wide::Int(lowbit::decode_int(from, xs[i]).unwrap_or(0).into());
                self.cast_to(ctx, x.shape(), to, get)
            } else {
                let get = |i: usize| Wide::Float(f64::from(lowbit::decode(from, xs[i])));
                self.cast_to(ctx, x.shape(), to, get)
            }
        } else if lowbit::is_lowbit(to) {
            opreg_sdk::dispatch!(x.dtype, ALL, |S| {
                let xs = x.as_slice::<S>()?;
                self.cast_to(ctx, x.shape(), to, |i| Wide::of(xs[i]))
            }, other => Err(super::unsupported("Cast (input)", other)))
        } else {
            opreg_sdk::dispatch!(x.dtype, ALL, |S| {
                opreg_sdk::dispatch!(to, ALL, |D| map(ctx, x, convert::<S, D>), other => Err(super::unsupported("Cast (target)", other)))
            }, other => Err(super::unsupported("Cast (input)", other)))
        }
    }
}

/// One source element, widened without loss (floats as their value, integers and bool as
/// integers), as [`convert`] sees it.
#[derive(Clone, Copy)]
enum Wide {
    Int(i128),
    Float(f64),
}

impl Wide {
    fn of<S: Scalar>(v: S) -> Self {
        if S::IS_FLOAT {
            Wide::Float(v.to_f64())
        } else {
            Wide::Int(v.to_i128())
        }
    }
}

impl Cast {
    /// Writes output 0 of type `to` and `shape`, element `i` converted from `get(i)`; at least
    /// one of the source and `to` is a low-bit type.
    fn cast_to<G>(
        &self,
        ctx: &KernelContext<'_>,
        shape: &[usize],
        to: DType,
        get: G,
    ) -> Result<(), PluginError>
    where
        G: Fn(usize) -> Wide + Sync,
    {
        if lowbit::is_lowbit(to) {
            let (sat, mode) = (self.saturate, self.round_mode);
            let y = ctx.output(0, to, shape)?.into_bytes()?;
            return ctx.parallel_chunks(y, GRAIN, |start, out| {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = match get(start + j) {
                        Wide::Int(v) if lowbit::is_lowbit_int(to) => lowbit::wrap_int(to, v),
                        Wide::Float(v) if lowbit::is_lowbit_int(to) => lowbit::float_to_int(to, v),
                        // ml_dtypes casts wider floats through f32, and so do we.
                        Wide::Int(v) => lowbit::encode(to, v as f32, sat, mode),
                        Wide::Float(v) => lowbit::encode(to, v as f32, sat, mode),
                    };
                }
            });
        }
        opreg_sdk::dispatch!(to, ALL, |D| {
            let y = ctx.output_slice::<D>(0, shape)?;
            ctx.parallel_chunks(y, GRAIN, |start, out| {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = match get(start + j) {
                        Wide::Int(v) => D::from_i128(v),
                        Wide::Float(v) => D::from_f64(v),
                    };
                }
            })
        }, other => Err(super::unsupported("Cast (target)", other)))
    }
}

#[cfg(test)]
mod tests {
    use super::Cast;
    use opreg_sdk::prelude::*;

    type Factory = fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

    /// The official `Cast` / `CastLike` cases: every type pair, the 8-, 4- and 2-bit types,
    /// `saturate` and `round_mode` included.
    #[test]
    fn onnx_cast_cases() {
        crate::testcases::run_cases(&["test_cast_"], Cast::from_node as Factory);
        crate::testcases::run_cases(&["test_castlike_"], Cast::like_from_node as Factory);
    }
}
