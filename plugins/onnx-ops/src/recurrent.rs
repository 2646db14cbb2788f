//! Stateful sequence operators of opset 27: `LinearAttention` (linear, gated, delta and
//! gated-delta recurrences with grouped/multi-query heads) and `CausalConvWithState` (a
//! depthwise causal 1-D convolution carrying its last `k-1` inputs to the next call).
//!
//! Both take their state as an input and return the updated state as an output, so a
//! decoding client carries it between requests. They compute in f32 whatever the input type
//! (f16/bf16 widened), as the ONNX reference does, and narrow on output.

use crate::transformer::{read_f32, rounder, write_f32, FLOATS};
use crate::util::{optional, required};
use opreg_sdk::alloc::try_vec;
use opreg_sdk::prelude::*;

// ---------------------------------------------------------------------------------------------
// LinearAttention

/// How the state is updated per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpdateRule {
    /// `S += k ⊗ v`.
    Linear,
    /// `S = exp(g) ∘ S + k ⊗ v`.
    Gated,
    /// `S += k ⊗ β(v − Sᵀk)`.
    Delta,
    /// Both.
    GatedDelta,
}

impl UpdateRule {
    fn gated(self) -> bool {
        matches!(self, UpdateRule::Gated | UpdateRule::GatedDelta)
    }
    fn delta(self) -> bool {
        matches!(self, UpdateRule::Delta | UpdateRule::GatedDelta)
    }
}

#[derive(Clone, Debug)]
struct LinearAttention {
    q_heads: usize,
    kv_heads: usize,
    /// 0: `1/sqrt(d_k)`.
    scale: f32,
    rule: UpdateRule,
}

/// Checks that `t` is rank 3 with leading extents `[b, t]` and returns its last extent.
fn last_of_btx(
    op: &str,
    name: &str,
    t: &TensorView<'_>,
    b: usize,
    s: usize,
) -> Result<usize, PluginError> {
    match t.shape() {
        &[tb, ts, x] if tb == b && ts == s => Ok(x),
        other => Err(PluginError::invalid(format!(
            "{op}: {name} must be (batch {b}, length {s}, ·), got {other:?}"
        ))),
    }
}

impl Kernel for LinearAttention {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "LinearAttention";
        let [qv, kv, vv] = required(OP, inputs, ["query", "key", "value"])?;
        let (b, t, q_last) = match qv.shape() {
            &[b, t, x] => (b, t, x),
            other => {
                return Err(PluginError::invalid(format!(
                    "{OP}: query must be rank 3 (batch, length, heads·d_k), got {other:?}"
                )))
            }
        };
        let (hq, hk) = (self.q_heads, self.kv_heads);
        if q_last % hq != 0 {
            return Err(PluginError::invalid(format!(
                "{OP}: query's last extent {q_last} is not a multiple of q_num_heads {hq}"
            )));
        }
        let dk = q_last / hq;
        let k_last = last_of_btx(OP, "key", &kv, b, t)?;
        if Some(k_last) != hk.checked_mul(dk) {
            return Err(PluginError::invalid(format!(
                "{OP}: key's last extent {k_last} must be kv_num_heads·d_k = {hk}·{dk}"
            )));
        }
        let v_last = last_of_btx(OP, "value", &vv, b, t)?;
        if v_last % hk != 0 {
            return Err(PluginError::invalid(format!(
                "{OP}: value's last extent {v_last} is not a multiple of kv_num_heads {hk}"
            )));
        }
        let dv = v_last / hk;
        let group = hq / hk;

        let decay = optional(inputs, 4);
        let beta = optional(inputs, 5);
        let name = format!("{:?}", self.rule).to_lowercase();
        if self.rule.gated() != decay.is_some() {
            return Err(PluginError::invalid(format!(
                "{OP}: update_rule {name} {} the decay input",
                if self.rule.gated() {
                    "requires"
                } else {
                    "forbids"
                }
            )));
        }
        if self.rule.delta() != beta.is_some() {
            return Err(PluginError::invalid(format!(
                "{OP}: update_rule {name} {} the beta input",
                if self.rule.delta() {
                    "requires"
                } else {
                    "forbids"
                }
            )));
        }
        // Decay per kv head (stride 1 over d_k: 0) or per key dimension (stride 1).
        let decay = match decay {
            Some(d) => {
                let last = last_of_btx(OP, "decay", d, b, t)?;
                let per_dim = if last == hk {
                    false
                } else if Some(last) == hk.checked_mul(dk) {
                    true
                } else {
                    return Err(PluginError::invalid(format!(
                        "{OP}: decay's last extent {last} must be kv_num_heads ({hk}) or kv_num_heads·d_k ({})",
                        hk * dk
                    )));
                };
                Some((read_f32(d, "decay")?, per_dim))
            }
            None => None,
        };
        // Beta per kv head, or one per step shared by all heads.
        let beta = match beta {
            Some(bt) => {
                let last = last_of_btx(OP, "beta", bt, b, t)?;
                if last != hk && last != 1 {
                    return Err(PluginError::invalid(format!(
                        "{OP}: beta's last extent {last} must be kv_num_heads ({hk}) or 1"
                    )));
                }
                Some((read_f32(bt, "beta")?, last))
            }
            None => None,
        };
        let state_len = b
            .checked_mul(hk)
            .and_then(|n| n.checked_mul(dk))
            .and_then(|n| n.checked_mul(dv))
            .ok_or_else(|| PluginError::invalid(format!("{OP}: state size overflows")))?;
        let past = optional(inputs, 3);
        let state_dtype = past.map_or(qv.dtype, |p| p.dtype);
        if let Some(p) = past {
            if p.shape() != [b, hk, dk, dv] {
                return Err(PluginError::invalid(format!(
                    "{OP}: past_state must be {:?}, got {:?}",
                    [b, hk, dk, dv],
                    p.shape()
                )));
            }
        }

        let q = read_f32(&qv, "query")?;
        let k = read_f32(&kv, "key")?;
        let v = read_f32(&vv, "value")?;
        let scale = if self.scale == 0.0 {
            1.0 / (dk as f32).sqrt()
        } else {
            self.scale
        };
        // One unit per (batch, kv head): its state, then the outputs of its query heads
        // ([group][t][dv]); units are independent, so they run in parallel.
        let overflow = || PluginError::invalid(format!("{OP}: working set size overflows"));
        let out_len = group
            .checked_mul(t)
            .and_then(|n| n.checked_mul(dv))
            .ok_or_else(overflow)?;
        let unit = (dk * dv).checked_add(out_len).ok_or_else(overflow)?;
        let units = b * hk;
        let mut work = try_vec(units.checked_mul(unit).ok_or_else(overflow)?, 0.0f32)?;
        if let Some(p) = past {
            let p = read_f32(p, "past_state")?;
            for (u, s) in p.chunks_exact(dk * dv).enumerate() {
                work[u * unit..u * unit + dk * dv].copy_from_slice(s);
            }
        }
        ctx.parallel_chunks(&mut work, unit.max(1), |start, chunk| {
            let u = start / unit.max(1);
            let (bi, h) = (u / hk, u % hk);
            let (state, out) = chunk.split_at_mut(dk * dv);
            let mut vt = vec![0.0f32; dv];
            for step in 0..t {
                let row = bi * t + step;
                let ko = (row * hk + h) * dk;
                let kt = &k[ko..ko + dk];
                let vo = (row * hk + h) * dv;
                vt.copy_from_slice(&v[vo..vo + dv]);
                if let Some((g, per_dim)) = &decay {
                    for d in 0..dk {
                        let gi = if *per_dim {
                            (row * hk + h) * dk + d
                        } else {
                            row * hk + h
                        };
                        let f = g[gi].exp();
                        state[d * dv..(d + 1) * dv].iter_mut().for_each(|s| *s *= f);
                    }
                }
                if let Some((bt, last)) = &beta {
                    let bb = bt[row * last + if *last == 1 { 0 } else { h }];
                    for m in 0..dv {
                        let retrieved: f32 = (0..dk).map(|d| state[d * dv + m] * kt[d]).sum();
                        vt[m] = bb * (vt[m] - retrieved);
                    }
                }
                for d in 0..dk {
                    let kd = kt[d];
                    state[d * dv..(d + 1) * dv]
                        .iter_mut()
                        .zip(&vt)
                        .for_each(|(s, &x)| *s += kd * x);
                }
                for g in 0..group {
                    let qh = h * group + g;
                    let qo = (row * hq + qh) * dk;
                    let qt = &q[qo..qo + dk];
                    let o = &mut out[(g * t + step) * dv..(g * t + step + 1) * dv];
                    o.fill(0.0);
                    for d in 0..dk {
                        let qd = qt[d];
                        o.iter_mut()
                            .zip(&state[d * dv..(d + 1) * dv])
                            .for_each(|(o, &s)| *o += qd * s);
                    }
                    o.iter_mut().for_each(|o| *o *= scale);
                }
            }
        })?;

        // Scatter: output (B, T, Hq·dv), present_state (B, Hkv, dk, dv).
        let mut y = try_vec(units.checked_mul(out_len).ok_or_else(overflow)?, 0.0f32)?;
        let mut present = try_vec(state_len, 0.0f32)?;
        for (u, chunk) in work.chunks_exact(unit.max(1)).enumerate().take(units) {
            let (bi, h) = (u / hk, u % hk);
            present[u * dk * dv..(u + 1) * dk * dv].copy_from_slice(&chunk[..dk * dv]);
            let out = &chunk[dk * dv..];
            for g in 0..group {
                let qh = h * group + g;
                for step in 0..t {
                    let dst = ((bi * t + step) * hq + qh) * dv;
                    let src = (g * t + step) * dv;
                    y[dst..dst + dv].copy_from_slice(&out[src..src + dv]);
                }
            }
        }
        write_f32(ctx, 0, qv.dtype, &[b, t, hq * dv], &y)?;
        if ctx.num_outputs() > 1 {
            write_f32(ctx, 1, state_dtype, &[b, hk, dk, dv], &present)?;
        }
        Ok(())
    }
}

fn linear_attention_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let heads = |name: &str| -> Result<usize, PluginError> {
        match node.attr(name) {
            Some(AttrValue::Int(h)) if *h > 0 => usize::try_from(*h)
                .map_err(|_| PluginError::invalid(format!("LinearAttention: {name} {h}"))),
            Some(AttrValue::Int(h)) => Err(PluginError::invalid(format!(
                "LinearAttention: {name} must be positive, got {h}"
            ))),
            _ => Err(PluginError::invalid(format!(
                "LinearAttention: the {name} attribute is required"
            ))),
        }
    };
    let q_heads = heads("q_num_heads")?;
    let kv_heads = heads("kv_num_heads")?;
    if q_heads % kv_heads != 0 {
        return Err(PluginError::invalid(format!(
            "LinearAttention: q_num_heads ({q_heads}) must be a multiple of kv_num_heads ({kv_heads})"
        )));
    }
    let rule = match node.string_or("update_rule", "gated_delta")?.as_str() {
        "linear" => UpdateRule::Linear,
        "gated" => UpdateRule::Gated,
        "delta" => UpdateRule::Delta,
        "gated_delta" => UpdateRule::GatedDelta,
        other => {
            return Err(PluginError::invalid(format!(
                "LinearAttention: update_rule '{other}' is not one of linear, gated, delta, gated_delta"
            )))
        }
    };
    let scale = node.float_or("scale", 0.0)?;
    if !scale.is_finite() {
        return Err(PluginError::invalid(format!(
            "LinearAttention: scale {scale} is not finite"
        )));
    }
    Ok(Box::new(LinearAttention {
        q_heads,
        kv_heads,
        scale,
        rule,
    }))
}

// ---------------------------------------------------------------------------------------------
// CausalConvWithState

#[derive(Clone, Debug)]
struct CausalConv {
    silu: bool,
}

impl Kernel for CausalConv {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "CausalConvWithState";
        let [xv, wv] = required(OP, inputs, ["input", "weight"])?;
        let (b, c, l) = match xv.shape() {
            &[b, c, l] => (b, c, l),
            other => {
                return Err(PluginError::invalid(format!(
                    "{OP}: input must be rank 3 (batch, channels, length), got {other:?}"
                )))
            }
        };
        let k = match wv.shape() {
            &[wc, 1, k] if wc == c && k >= 1 => k,
            other => {
                return Err(PluginError::invalid(format!(
                    "{OP}: weight must be ({c}, 1, k ≥ 1) for {c} channels, got {other:?}"
                )))
            }
        };
        let past_len = k - 1;
        let bias = match optional(inputs, 2) {
            Some(bv) if bv.shape() == [c] => Some(read_f32(bv, "bias")?),
            Some(bv) => {
                return Err(PluginError::invalid(format!(
                    "{OP}: bias must be ({c}), got {:?}",
                    bv.shape()
                )))
            }
            None => None,
        };
        let past = match optional(inputs, 3) {
            Some(p) if p.shape() == [b, c, past_len] => Some(read_f32(p, "past_state")?),
            Some(p) => {
                return Err(PluginError::invalid(format!(
                    "{OP}: past_state must be {:?}, got {:?}",
                    [b, c, past_len],
                    p.shape()
                )))
            }
            None => None,
        };
        let x = read_f32(&xv, "input")?;
        let w = read_f32(&wv, "weight")?;
        let padded_len = l
            .checked_add(past_len)
            .ok_or_else(|| PluginError::invalid(format!("{OP}: length overflows")))?;
        let rows = b.saturating_mul(c);
        // Per (batch, channel) row: the past followed by the input, then the new state.
        let mut padded = try_vec(rows.saturating_mul(padded_len), 0.0f32)?;
        for r in 0..rows {
            let row = &mut padded[r * padded_len..(r + 1) * padded_len];
            if let Some(p) = &past {
                row[..past_len].copy_from_slice(&p[r * past_len..(r + 1) * past_len]);
            }
            row[past_len..].copy_from_slice(&x[r * l..(r + 1) * l]);
        }
        let round = rounder(xv.dtype);
        let silu = self.silu;
        let mut y = try_vec(rows.saturating_mul(l), 0.0f32)?;
        ctx.parallel_chunks(&mut y, l.max(1), |start, out| {
            let r = start / l.max(1);
            let ch = r % c.max(1);
            let row = &padded[r * padded_len..(r + 1) * padded_len];
            let wr = &w[ch * k..(ch + 1) * k];
            let b0 = bias.as_ref().map_or(0.0, |bv| bv[ch]);
            for (i, o) in out.iter_mut().enumerate() {
                let acc: f32 = row[i..i + k].iter().zip(wr).map(|(a, b)| a * b).sum();
                // The reference rounds the convolution to the input type before the activation.
                let v = round(acc + b0);
                *o = if silu { v / (1.0 + (-v).exp()) } else { v };
            }
        })?;
        write_f32(ctx, 0, xv.dtype, &[b, c, l], &y)?;
        if ctx.num_outputs() > 1 {
            let mut state = try_vec(rows.saturating_mul(past_len), 0.0f32)?;
            for r in 0..rows {
                state[r * past_len..(r + 1) * past_len].copy_from_slice(
                    &padded[(r + 1) * padded_len - past_len..(r + 1) * padded_len],
                );
            }
            write_f32(ctx, 1, xv.dtype, &[b, c, past_len], &state)?;
        }
        Ok(())
    }
}

fn causal_conv_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let silu = match node.string_or("activation", "none")?.as_str() {
        "none" => false,
        "silu" | "swish" => true,
        other => {
            return Err(PluginError::invalid(format!(
                "CausalConvWithState: activation '{other}' is not one of none, silu, swish"
            )))
        }
    };
    Ok(Box::new(CausalConv { silu }))
}

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("LinearAttention", 27, OPEN_END)
            .constraint("T", FLOATS)
            .constraint("S", FLOATS)
            .inputs(&["T", "T", "T", "S", "T", "T"])
            .outputs(&["T", "S"]),
        linear_attention_factory,
    );
    r.kernel(
        KernelDesc::onnx("CausalConvWithState", 27, OPEN_END)
            .constraint("T", FLOATS)
            .inputs(&["T", "T", "T", "T"])
            .outputs(&["T", "T"]),
        causal_conv_factory,
    );
}

#[cfg(test)]
mod tests;
