//! Elementwise operators: unary functions (one table, codes shared with `act` in
//! `kernels.cu`) and binary operators with NumPy broadcasting (strides coalesced on the host).

use super::module::{Kernels, F};
use super::{count, decline, f32_outputs, like_input, optional, required, Env, Reg};
use crate::args;
use opreg_sdk::prelude::*;
use std::sync::Arc;

/// Activation / unary function codes of `act` in `kernels.cu`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Act {
    pub code: i32,
    pub p0: f32,
    pub p1: f32,
}

impl Act {
    pub const NONE: Act = Act::of(0);

    pub const fn of(code: i32) -> Act {
        Act {
            code,
            p0: 0.0,
            p1: 0.0,
        }
    }

    /// The `activation` / `activation_params` of opreg's fused operators (as the CPU
    /// plugin's `Activation`); an unknown one declines the node.
    pub fn fused(node: &NodeInfo<'_>) -> Result<Act, PluginError> {
        let params = node.floats("activation_params")?.unwrap_or_default();
        let p = |i: usize| params.get(i).copied();
        let missing = || decline(node, "activation_params are missing");
        Ok(match node.string_or("activation", "")?.as_str() {
            "" => Act::NONE,
            "Relu" => Act::of(1),
            "Clip" => Act {
                code: 2,
                p0: p(0).ok_or_else(missing)?,
                p1: p(1).ok_or_else(missing)?,
            },
            "LeakyRelu" => Act {
                code: 3,
                p0: p(0).ok_or_else(missing)?,
                p1: 0.0,
            },
            "SiLU" => Act::of(4),
            "Gelu" => Act::of(5),
            other => return Err(decline(node, &format!("has activation '{other}'"))),
        })
    }
}

/// A unary operator: its `act` code and the attributes (with defaults) giving p0 and p1.
struct UnaryOp {
    op: &'static str,
    since: i32,
    code: i32,
    p0: Option<(&'static str, f32)>,
    p1: Option<(&'static str, f32)>,
}

const fn u(op: &'static str, since: i32, code: i32) -> UnaryOp {
    UnaryOp {
        op,
        since,
        code,
        p0: None,
        p1: None,
    }
}

const UNARY: &[UnaryOp] = &[
    u("Relu", 6, 1),
    UnaryOp {
        p0: Some(("alpha", 0.01)),
        p1: None,
        ..u("LeakyRelu", 6, 3)
    },
    u("Sigmoid", 6, 6),
    u("Tanh", 6, 7),
    u("Exp", 6, 8),
    u("Log", 6, 9),
    u("Neg", 6, 10),
    u("Abs", 6, 11),
    u("Sqrt", 6, 12),
    u("Erf", 9, 13),
    u("HardSwish", 14, 15),
    u("Reciprocal", 6, 16),
    u("Floor", 6, 17),
    u("Ceil", 6, 18),
    UnaryOp {
        p0: Some(("alpha", 1.0)),
        p1: None,
        ..u("Elu", 6, 19)
    },
    u("Softplus", 1, 20),
    u("Sin", 7, 21),
    u("Cos", 7, 22),
];

struct Unary {
    k: Arc<Kernels>,
    act: Act,
    /// Clip from opset 11: min and max are (host) inputs 1 and 2.
    clip_inputs: bool,
}

fn make_unary(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let (act, clip_inputs) = match (node.domain, node.op_type) {
        ("opreg", "Gelu") => (Act::of(5), false),
        (_, "Gelu") => {
            if node.string_or("approximate", "none")? != "none" {
                return Err(decline(node, "with approximate = tanh"));
            }
            (Act::of(5), false)
        }
        (_, "Identity") => (Act::NONE, false),
        (_, "Clip") if node.opset < 11 => (
            Act {
                code: 2,
                p0: node.float_or("min", f32::MIN)?,
                p1: node.float_or("max", f32::MAX)?,
            },
            false,
        ),
        (_, "Clip") => (Act::of(2), true),
        (_, op) => {
            let u = UNARY
                .iter()
                .find(|u| u.op == op)
                .ok_or_else(|| decline(node, "is not a unary function here"))?;
            let p = |a: Option<(&str, f32)>| match a {
                Some((name, default)) => node.float_or(name, default),
                None => Ok(0.0),
            };
            (
                Act {
                    code: u.code,
                    p0: p(u.p0)?,
                    p1: p(u.p1)?,
                },
                false,
            )
        }
    };
    Ok(Box::new(Unary {
        k: k.clone(),
        act,
        clip_inputs,
    }))
}

/// A scalar bound of Clip (opset 11+), given as a host input or absent.
fn clip_bound(t: Option<&TensorView<'_>>, default: f32) -> Result<f32, PluginError> {
    match t {
        Some(t) => {
            let v = t.as_slice::<f32>()?;
            v.first()
                .copied()
                .ok_or_else(|| PluginError::invalid("Clip: min/max must hold one value"))
        }
        None => Ok(default),
    }
}

impl Kernel for Unary {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "a unary operator", "its input")?;
        let mut act = self.act;
        if self.clip_inputs {
            act.p0 = clip_bound(optional(inputs, 1), f32::MIN)?;
            act.p1 = clip_bound(optional(inputs, 2), f32::MAX)?;
        }
        let xp = env.input(x, "X")?;
        let yp = env.output(0, x.shape())?;
        let n = x.len() as u64;
        let (code, p0, p1) = (act.code, act.p0, act.p1);
        if code == 0 {
            return env.k.copy_d2d(env.device, env.stream, yp, xp, x.len() * 4);
        }
        // SAFETY: unary_f32(const float*, float*, u64, int, float, float); n elements each.
        unsafe { env.launch_n(F::Unary, x.len(), &mut args![xp, yp, n, code, p0, p1]) }
    }
}

/// Binary operator codes of `binop` in `kernels.cu`: (op, since).
const BINARY: &[(&str, i32, i32)] = &[
    ("Add", 7, 0),
    ("Sub", 7, 1),
    ("Mul", 7, 2),
    ("Div", 7, 3),
    ("Pow", 7, 4),
    ("Max", 8, 5),
    ("Min", 8, 6),
    ("PRelu", 7, 7),
];

pub const MAX_RANK: usize = 8;

/// `Bcast` of `kernels.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bcast {
    pub rank: i32,
    pub dims: [i64; MAX_RANK],
    pub sa: [i64; MAX_RANK],
    pub sb: [i64; MAX_RANK],
}

/// The broadcast shape of `a` and `b` (NumPy rules), or why not.
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, PluginError> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank {
                a[i + a.len() - rank]
            } else {
                1
            };
            let db = if i + b.len() >= rank {
                b[i + b.len() - rank]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(PluginError::invalid(format!(
                    "shapes {a:?} and {b:?} do not broadcast"
                ))),
            }
        })
        .collect()
}

/// Strides of `shape` (contiguous) read at the positions of `out` (right-aligned), 0 along
/// broadcast dimensions.
pub fn read_strides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let mut strides = vec![0i64; out.len() - shape.len()];
    let own = opreg_sdk::tensor::contiguous_strides(shape);
    strides.extend(
        shape
            .iter()
            .zip(own)
            .map(|(&d, s)| if d == 1 { 0 } else { s as i64 }),
    );
    strides
}

/// The launch description of `out` read through strides `sa` and `sb`, with adjacent
/// dimensions merged where both inputs walk them contiguously (so most broadcasts end at rank
/// 1 or 2), and extents of 1 dropped.
pub fn coalesce(out: &[usize], sa: &[i64], sb: &[i64]) -> Result<Bcast, PluginError> {
    let mut dims: Vec<(i64, i64, i64)> = Vec::new();
    for i in 0..out.len() {
        if out[i] == 1 {
            continue;
        }
        let (d, a, b) = (out[i] as i64, sa[i], sb[i]);
        if let Some(last) = dims.last_mut() {
            if last.1 == a * d && last.2 == b * d {
                *last = (last.0 * d, a, b);
                continue;
            }
        }
        dims.push((d, a, b));
    }
    if dims.is_empty() {
        dims.push((1, 0, 0));
    }
    if dims.len() > MAX_RANK {
        return Err(PluginError::unimplemented(format!(
            "cuda: broadcasting over {} dimensions (at most {MAX_RANK})",
            dims.len()
        )));
    }
    let mut b = Bcast {
        rank: dims.len() as i32,
        ..Default::default()
    };
    for (i, (d, a, s)) in dims.into_iter().enumerate() {
        b.dims[i] = d;
        b.sa[i] = a;
        b.sb[i] = s;
    }
    Ok(b)
}

struct Binary {
    k: Arc<Kernels>,
    code: i32,
}

fn make_binary(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let &(_, _, code) = BINARY
        .iter()
        .find(|b| b.0 == node.op_type)
        .ok_or_else(|| decline(node, "is not a binary operator here"))?;
    if node.inputs.len() != 2 {
        return Err(decline(node, "with other than two inputs"));
    }
    Ok(Box::new(Binary { k: k.clone(), code }))
}

impl Kernel for Binary {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let a = required(inputs, 0, "a binary operator", "A")?;
        let b = required(inputs, 1, "a binary operator", "B")?;
        let out = broadcast(a.shape(), b.shape())?;
        let (ap, bp) = (env.input(a, "A")?, env.input(b, "B")?);
        let yp = env.output(0, &out)?;
        let len = count(&out)?;
        if len == 0 {
            // An empty input may have extents whose strides do not multiply.
            return Ok(());
        }
        let s = coalesce(
            &out,
            &read_strides(a.shape(), &out),
            &read_strides(b.shape(), &out),
        )?;
        let (n, code) = (len as u64, self.code);
        // SAFETY: binary_f32(const float*, const float*, float*, u64, int, Bcast); the
        // strides stay inside each input (computed from their shapes).
        unsafe { env.launch_n(F::Binary, len, &mut args![ap, bp, yp, n, code, s]) }
    }
}

pub fn regs() -> Vec<Reg> {
    let mut v: Vec<Reg> = UNARY
        .iter()
        .map(|u| Reg {
            domain: "",
            op: u.op,
            since: u.since,
            end: OPEN_END,
            inputs: &["T"],
            outputs: 1,
            host_inputs: &[],
            make: make_unary,
            facts: like_input,
        })
        .collect();
    for (domain, op, since, end, inputs, host) in [
        ("", "Gelu", 20, OPEN_END, &["T"][..], &[][..]),
        ("opreg", "Gelu", 1, OPEN_END, &["T"], &[]),
        ("", "Identity", 1, OPEN_END, &["T"], &[]),
        ("", "Clip", 6, 10, &["T"], &[]),
        ("", "Clip", 11, OPEN_END, &["T", "T", "T"], &[1usize, 2][..]),
    ] {
        v.push(Reg {
            domain,
            op,
            since,
            end,
            inputs,
            outputs: 1,
            host_inputs: host,
            make: make_unary,
            facts: like_input,
        });
    }
    v.extend(BINARY.iter().map(|&(op, since, _)| Reg {
        domain: "",
        op,
        since,
        end: OPEN_END,
        inputs: &["T", "T"],
        outputs: 1,
        host_inputs: &[],
        make: make_binary,
        facts: f32_outputs,
    }));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[2, 3, 4], &[4]).unwrap(), vec![2, 3, 4]);
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert_eq!(broadcast(&[], &[5]).unwrap(), vec![5]);
        assert!(broadcast(&[2, 3], &[4]).is_err());
    }

    #[test]
    fn coalescing_merges_what_both_inputs_walk_contiguously() {
        // Same shapes: one dimension.
        let out = [2, 3, 4];
        let s = read_strides(&out, &out);
        let b = coalesce(&out, &s, &s).unwrap();
        assert_eq!((b.rank, b.dims[0], b.sa[0], b.sb[0]), (1, 24, 1, 1));
        // A bias over the last dimension: rows of 4 repeat the bias.
        let b = coalesce(&out, &s, &read_strides(&[4], &out)).unwrap();
        assert_eq!(b.rank, 2);
        assert_eq!((b.dims[0], b.sa[0], b.sb[0]), (6, 4, 0));
        assert_eq!((b.dims[1], b.sa[1], b.sb[1]), (4, 1, 1));
        // A scalar: one dimension, stride 0.
        let b = coalesce(&out, &s, &read_strides(&[], &out)).unwrap();
        assert_eq!((b.rank, b.dims[0], b.sa[0], b.sb[0]), (1, 24, 1, 0));
        // A per-channel operand [C, 1, 1] of [N, C, H, W].
        let out = [2, 3, 4, 5];
        let b = coalesce(
            &out,
            &read_strides(&out, &out),
            &read_strides(&[3, 1, 1], &out),
        )
        .unwrap();
        assert_eq!(b.rank, 3);
        assert_eq!(&b.dims[..3], &[2, 3, 20]);
        assert_eq!(&b.sb[..3], &[0, 1, 0]);
    }

    /// Evaluates a coalesced description on the CPU, as the kernel indexes.
    fn offsets(b: &Bcast, i: u64) -> (i64, i64) {
        let (mut r, mut oa, mut ob) = (i, 0, 0);
        for d in (0..b.rank as usize).rev() {
            let c = (r % b.dims[d] as u64) as i64;
            r /= b.dims[d] as u64;
            oa += c * b.sa[d];
            ob += c * b.sb[d];
        }
        (oa, ob)
    }

    #[test]
    fn coalesced_offsets_equal_the_plain_broadcast() {
        for (a, b) in [
            (vec![2, 3, 4], vec![3, 1]),
            (vec![1, 3, 1, 5], vec![2, 1, 4, 1]),
            (vec![4, 1], vec![1, 6]),
            (vec![2, 2, 2, 2], vec![2, 1, 2, 1]),
        ] {
            let out = broadcast(&a, &b).unwrap();
            let (sa, sb) = (read_strides(&a, &out), read_strides(&b, &out));
            let c = coalesce(&out, &sa, &sb).unwrap();
            let total: usize = out.iter().product();
            for i in 0..total {
                // The plain walk over `out`.
                let (mut r, mut pa, mut pb) = (i, 0i64, 0i64);
                for d in (0..out.len()).rev() {
                    let x = (r % out[d]) as i64;
                    r /= out[d];
                    pa += x * sa[d];
                    pb += x * sb[d];
                }
                assert_eq!(offsets(&c, i as u64), (pa, pb), "{a:?} {b:?} at {i}");
            }
        }
    }
}
