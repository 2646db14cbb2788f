//! Operators over rows: Softmax and LogSoftmax along an axis, LayerNormalization over the
//! trailing dimensions. One block per row, reductions in warp shuffles.

use super::module::{DeviceBuf, Kernels, F};
use super::{axis, count, f32_outputs, like_input, optional, required, upload_constant, Env, Reg};
use crate::args;
use opreg_sdk::prelude::*;
use std::sync::Arc;

struct Softmax {
    k: Arc<Kernels>,
    axis: i64,
    /// Opsets before 13 flatten from `axis` on into one row.
    flatten: bool,
    log: bool,
}

fn make_softmax(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let flatten = node.opset < 13;
    Ok(Box::new(Softmax {
        k: k.clone(),
        axis: node.int_or("axis", if flatten { 1 } else { -1 })?,
        flatten,
        log: node.op_type == "LogSoftmax",
    }))
}

impl Kernel for Softmax {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "Softmax", "X")?;
        let xs = x.shape();
        let a = axis(self.axis, xs.len(), "Softmax")?;
        let (d, inner) = if self.flatten {
            (count(&xs[a.min(xs.len())..])?, 1)
        } else {
            (
                xs.get(a).copied().unwrap_or(1),
                count(&xs[(a + 1).min(xs.len())..])?,
            )
        };
        let total = count(xs)?;
        let (xp, yp) = (env.input(x, "X")?, env.output(0, xs)?);
        if total == 0 {
            return Ok(());
        }
        let rows = (total / d.max(1)) as u64;
        let (d64, inner64, log) = (d as i64, inner as i64, self.log as i32);
        // SAFETY: softmax_f32(const float*, float*, u64 rows, i64 d, i64 inner, int).
        unsafe {
            env.launch_rows(
                F::Softmax,
                rows as usize,
                d,
                &mut args![xp, yp, rows, d64, inner64, log],
            )
        }
    }
}

struct LayerNorm {
    k: Arc<Kernels>,
    axis: i64,
    eps: f32,
    scale: Option<DeviceBuf>,
    bias: Option<DeviceBuf>,
}

fn make_layernorm(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(LayerNorm {
        k: k.clone(),
        axis: node.int_or("axis", -1)?,
        eps: node.float_or("epsilon", 1e-5)?,
        scale: upload_constant(k, node, 1)?,
        bias: upload_constant(k, node, 2)?,
    }))
}

impl Kernel for LayerNorm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "LayerNormalization", "X")?;
        let scale = required(inputs, 1, "LayerNormalization", "Scale")?;
        let xs = x.shape();
        let a = axis(self.axis, xs.len(), "LayerNormalization")?;
        let cols = count(&xs[a..])?;
        let rows = count(&xs[..a])?;
        let bias = optional(inputs, 2);
        for (t, what) in [(Some(scale), "Scale"), (bias, "B")] {
            match t {
                Some(t) if t.len() != cols => {
                    return Err(PluginError::unimplemented(format!(
                        "cuda: LayerNormalization {what} of {} values for rows of {cols} (broadcast {what} is not supported here)",
                        t.len()
                    )))
                }
                _ => {}
            }
        }
        let xp = env.input(x, "X")?;
        let sp = env.weight(scale, &self.scale, "Scale")?;
        let bp = match bias {
            Some(b) => env.weight(b, &self.bias, "B")?,
            None => 0,
        };
        let yp = env.output(0, xs)?;
        // Mean and InvStdDev: the normalized dimensions kept as 1.
        let mut stat = xs[..a].to_vec();
        stat.extend(std::iter::repeat_n(1, xs.len() - a));
        let mp = if ctx.num_outputs() > 1 {
            env.output(1, &stat)?
        } else {
            0
        };
        let ip = if ctx.num_outputs() > 2 {
            env.output(2, &stat)?
        } else {
            0
        };
        let (rows64, cols64, eps) = (rows as u64, cols as i64, self.eps);
        // SAFETY: layernorm_f32(x, scale, bias, y, mean, inv, u64 rows, i64 cols, float eps);
        // scale and bias of `cols` floats (checked), mean and inv of `rows`.
        unsafe {
            env.launch_rows(
                F::LayerNorm,
                rows,
                cols,
                &mut args![xp, sp, bp, yp, mp, ip, rows64, cols64, eps],
            )
        }
    }
}

pub fn regs() -> Vec<Reg> {
    let mut v = Vec::new();
    for op in ["Softmax", "LogSoftmax"] {
        v.push(Reg {
            domain: "",
            op,
            since: 1,
            end: OPEN_END,
            inputs: &["T"],
            outputs: 1,
            host_inputs: &[],
            make: make_softmax,
            facts: like_input,
        });
    }
    v.push(Reg {
        domain: "",
        op: "LayerNormalization",
        since: 17,
        end: OPEN_END,
        inputs: &["T", "T", "T"],
        outputs: 3,
        host_inputs: &[1, 2],
        make: make_layernorm,
        facts: f32_outputs,
    });
    v
}
