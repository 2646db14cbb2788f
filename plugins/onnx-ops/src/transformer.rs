//! Transformer building blocks: Attention (opsets 23-25), RMSNormalization, RotaryEmbedding,
//! LpNormalization, MeanVarianceNormalization.
//!
//! Floating-point inputs of any supported type (f32, f16, bf16) are widened to f32, computed
//! in f32 and narrowed on output; where the ONNX reference rounds intermediates to the input
//! type (Attention's scaled Q/K, scores, probabilities) we round the same way, so reduced
//! precision results follow the reference closely.

use crate::util::{
    broadcast_strides, floats_as_f32, input, normalize_axis, numel, optional, product_sat, required,
};
use opreg_sdk::alloc::{try_vec, try_with_capacity};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::prelude::*;

/// The floating-point types these kernels accept: they compute in f32 (attention, rotary
/// embedding, ...), so f64 is not offered.
pub(crate) use opreg_sdk::numeric::FLOATS_TO_F32 as FLOATS;

/// The elements of a floating-point tensor, widened to f32. `what` names the input in errors.
pub(crate) fn read_f32(t: &TensorView<'_>, what: &str) -> Result<Vec<f32>, PluginError> {
    match floats_as_f32(t) {
        Some(v) => v
            .map(|v| v.into_owned())
            .map_err(|e| PluginError::invalid(format!("{what}: {}", e.message))),
        None => Err(PluginError::invalid(format!(
            "{what}: expected a floating-point tensor, got {}",
            t.dtype
        ))),
    }
}

/// Allocates output `index` as `dtype` with `shape` and fills it from `data`.
pub(crate) fn write_f32(
    ctx: &KernelContext<'_>,
    index: usize,
    dtype: DType,
    shape: &[usize],
    data: &[f32],
) -> Result<(), PluginError> {
    match dtype {
        DType::F32 => ctx.output_slice::<f32>(index, shape)?.copy_from_slice(data),
        DType::F16 => ctx
            .output_slice::<f16>(index, shape)?
            .iter_mut()
            .zip(data)
            .for_each(|(o, &v)| *o = f16::from_f32(v)),
        DType::BF16 => ctx
            .output_slice::<bf16>(index, shape)?
            .iter_mut()
            .zip(data)
            .for_each(|(o, &v)| *o = bf16::from_f32(v)),
        DType::F64 => ctx
            .output_slice::<f64>(index, shape)?
            .iter_mut()
            .zip(data)
            .for_each(|(o, &v)| *o = v as f64),
        other => {
            return Err(PluginError::invalid(format!(
                "output {index}: unsupported type {other}"
            )))
        }
    }
    Ok(())
}

/// Rounding of an f32 value to `dtype`'s precision (identity for f32 and wider).
pub(crate) fn rounder(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::F16 => |v| f16::from_f32(v).to_f32(),
        DType::BF16 => |v| bf16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

#[derive(Clone, Debug)]
struct Attention {
    opset: i32,
    is_causal: bool,
    scale: Option<f32>,
    q_num_heads: Option<usize>,
    kv_num_heads: Option<usize>,
    softcap: f32,
    qk_mode: i64,
    softmax_precision: Option<i64>,
    left_window: i64,
    right_window: i64,
}

fn opt_heads(node: &NodeInfo<'_>, name: &str) -> Result<Option<usize>, PluginError> {
    match node.attr(name) {
        None => Ok(None),
        Some(_) => {
            let v = node.int_or(name, 0)?;
            if v <= 0 {
                return Err(PluginError::invalid(format!(
                    "Attention: attribute {name} must be positive, got {v}"
                )));
            }
            Ok(Some(v as usize))
        }
    }
}

impl Attention {
    fn from_node(node: &NodeInfo<'_>) -> Result<Self, PluginError> {
        let qk_mode = node.int_or("qk_matmul_output_mode", 0)?;
        if !(0..=3).contains(&qk_mode) {
            return Err(PluginError::invalid(format!(
                "Attention: qk_matmul_output_mode must be 0..3, got {qk_mode}"
            )));
        }
        let (left_window, right_window) = if node.opset >= 25 {
            (
                node.int_or("left_window_size", -1)?,
                node.int_or("right_window_size", -1)?,
            )
        } else {
            (-1, -1)
        };
        if left_window < -1 || right_window < -1 {
            return Err(PluginError::invalid(format!(
                "Attention: window sizes must be -1 or nonnegative, got {left_window}/{right_window}"
            )));
        }
        Ok(Attention {
            opset: node.opset,
            is_causal: node.int_or("is_causal", 0)? != 0,
            scale: match node.attr("scale") {
                None => None,
                Some(_) => Some(node.float_or("scale", 1.0)?),
            },
            q_num_heads: opt_heads(node, "q_num_heads")?,
            kv_num_heads: opt_heads(node, "kv_num_heads")?,
            softcap: node.float_or("softcap", 0.0)?,
            qk_mode,
            softmax_precision: match node.attr("softmax_precision") {
                None => None,
                Some(_) => Some(node.int_or("softmax_precision", 1)?),
            },
            left_window,
            right_window,
        })
    }
}

/// (B, S, H*D) -> (B, H, S, D).
fn split_heads(x: &[f32], b: usize, s: usize, h: usize, d: usize) -> Vec<f32> {
    if x.is_empty() {
        // The extents of an empty operand may be huge: no loop over them.
        return Vec::new();
    }
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                let src = ((bi * s + si) * h + hi) * d;
                let dst = ((bi * h + hi) * s + si) * d;
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    out
}

/// A Q/K/V operand as (B, H, S, D) plus its dims.
struct Heads {
    data: Vec<f32>,
    b: usize,
    h: usize,
    s: usize,
    d: usize,
}

fn to_heads(t: &TensorView<'_>, what: &str, heads: Option<usize>) -> Result<Heads, PluginError> {
    let data = read_f32(t, what)?;
    match *t.shape() {
        [b, h, s, d] => Ok(Heads { data, b, h, s, d }),
        [b, s, hidden] => {
            let h = heads.ok_or_else(|| {
                PluginError::invalid(format!(
                    "Attention: 3-D {what} needs the q_num_heads and kv_num_heads attributes"
                ))
            })?;
            if hidden % h != 0 {
                return Err(PluginError::invalid(format!(
                    "Attention: {what} hidden size {hidden} is not a multiple of {h} heads"
                )));
            }
            let d = hidden / h;
            Ok(Heads {
                data: split_heads(&data, b, s, h, d),
                b,
                h,
                s,
                d,
            })
        }
        ref other => Err(PluginError::invalid(format!(
            "Attention: {what} must be 3-D or 4-D, got shape {other:?}"
        ))),
    }
}

/// Concatenates `past` (B, H, P, D) and `cur` (B, H, S, D) along the sequence axis.
fn concat_seq(past: Option<&Heads>, cur: &Heads, what: &str) -> Result<Heads, PluginError> {
    let Some(p) = past else {
        return Ok(Heads {
            data: cur.data.clone(),
            ..*cur
        });
    };
    if p.b != cur.b || p.h != cur.h || p.d != cur.d {
        return Err(PluginError::invalid(format!(
            "Attention: past_{what} shape [{}, {}, {}, {}] does not match {what} [{}, {}, _, {}]",
            p.b, p.h, p.s, p.d, cur.b, cur.h, cur.d
        )));
    }
    let t = p.s + cur.s;
    let d = cur.d;
    // Empty heads (d = 0) may carry huge extents: a checked size.
    let len = numel(&[cur.b, cur.h, t, d])?;
    let mut data = try_with_capacity(len)?;
    // Only when there is data: then B * H does not overflow (nor run 2^64 empty copies).
    for bh in 0..if len == 0 { 0 } else { cur.b * cur.h } {
        data.extend_from_slice(&p.data[bh * p.s * d..(bh + 1) * p.s * d]);
        data.extend_from_slice(&cur.data[bh * cur.s * d..(bh + 1) * cur.s * d]);
    }
    Ok(Heads {
        data,
        b: cur.b,
        h: cur.h,
        s: t,
        d,
    })
}

impl Heads {
    fn dims(&self) -> [usize; 4] {
        [self.b, self.h, self.s, self.d]
    }
}

/// The additive bias of one (batch, head, query) row: attention mask (padded with -inf past
/// its last column), causal and sliding-window frontiers, and key padding.
struct Bias {
    /// Additive mask values, its last-dimension length and its strides over (B, H, S, L).
    mask: Option<(Vec<f32>, usize, [usize; 4])>,
    causal: bool,
    left: i64,
    right: i64,
    /// Per batch: the number of keys that precede the query block.
    offsets: Vec<i64>,
    /// Per batch: the number of valid (non-padding) keys.
    nonpad: Option<Vec<i64>>,
}

impl Bias {
    fn row(&self, b: usize, h: usize, i: usize, out: &mut [f32]) {
        let t = out.len();
        let ninf = f32::NEG_INFINITY;
        match &self.mask {
            Some((m, len, st)) => {
                let base = b * st[0] + h * st[1] + i * st[2];
                for (j, o) in out.iter_mut().enumerate() {
                    *o = if j < *len { m[base + j * st[3]] } else { ninf };
                }
            }
            None => out.fill(0.0),
        }
        // Saturating: offsets come from nonpad_kv_seqlen, data.
        let pos = (i as i64).saturating_add(self.offsets[b]);
        for (j, o) in out.iter_mut().enumerate() {
            let diff = pos.saturating_sub(j as i64);
            if self.causal && diff < 0 {
                *o += ninf;
            }
            if (self.left >= 0 && diff > self.left) || (self.right >= 0 && diff < -self.right) {
                *o += ninf;
            }
        }
        if let Some(np) = &self.nonpad {
            let valid = np[b].clamp(0, t as i64) as usize;
            for o in &mut out[valid..] {
                *o += ninf;
            }
        }
    }
}

impl Kernel for Attention {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [qv, kv, vv] = required("Attention", inputs, ["Q", "K", "V"])?;
        let rank = qv.rank();
        if kv.rank() != rank || vv.rank() != rank {
            return Err(PluginError::invalid(format!(
                "Attention: Q, K and V must have the same rank, got {:?}, {:?}, {:?}",
                qv.shape(),
                kv.shape(),
                vv.shape()
            )));
        }
        if rank == 4
            && self.opset >= 25
            && (self.q_num_heads.is_some() || self.kv_num_heads.is_some())
        {
            return Err(PluginError::invalid(
                "Attention: q_num_heads and kv_num_heads must not be set for 4-D inputs",
            ));
        }
        let q = to_heads(&qv, "Q", self.q_num_heads)?;
        let k = to_heads(&kv, "K", self.kv_num_heads)?;
        let v = to_heads(&vv, "V", self.kv_num_heads)?;
        let (b, hq, s, dk) = (q.b, q.h, q.s, q.d);
        if k.b != b || v.b != b || k.d != dk || k.h != v.h || k.s != v.s {
            return Err(PluginError::invalid(format!(
                "Attention: incompatible Q {:?}, K {:?}, V {:?} (as batch, heads, seq, head size)",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        let hkv = k.h;
        if hkv == 0 || hq % hkv != 0 {
            return Err(PluginError::invalid(format!(
                "Attention: {hq} query heads are not a multiple of {hkv} key/value heads"
            )));
        }
        let mask_in = optional(inputs, 3);
        let past_k_in = optional(inputs, 4);
        let past_v_in = optional(inputs, 5);
        let nonpad_in = optional(inputs, 6);
        if past_k_in.is_some() != past_v_in.is_some() {
            return Err(PluginError::invalid(
                "Attention: past_key and past_value must be given together",
            ));
        }
        if nonpad_in.is_some() && past_k_in.is_some() {
            return Err(PluginError::invalid(
                "Attention: nonpad_kv_seqlen cannot be combined with past_key/past_value",
            ));
        }
        let past_k = past_k_in
            .map(|t| to_heads(t, "past_key", None))
            .transpose()?;
        let past_v = past_v_in
            .map(|t| to_heads(t, "past_value", None))
            .transpose()?;
        if let Some(p) = &past_k {
            if past_k_in.map(|t| t.rank()) != Some(4) || past_v_in.map(|t| t.rank()) != Some(4) {
                return Err(PluginError::invalid(
                    "Attention: past_key and past_value must be 4-D",
                ));
            }
            if past_v.as_ref().map(|pv| pv.s) != Some(p.s) {
                return Err(PluginError::invalid(
                    "Attention: past_key and past_value sequence lengths differ",
                ));
            }
        }
        let pk = concat_seq(past_k.as_ref(), &k, "key")?;
        let pv = concat_seq(past_v.as_ref(), &v, "value")?;
        let t = pk.s;
        let dv = v.d;
        let past_len = past_k.as_ref().map_or(0, |p| p.s);

        let dtype = qv.dtype;
        let rt = rounder(dtype);
        let scale = self.scale.map_or(1.0 / (dk as f64).sqrt(), f64::from);
        let sq = rt(scale.sqrt() as f32);
        let sm_type = match self.softmax_precision {
            Some(code) => DType::from_onnx_code(code as i32).ok_or_else(|| {
                PluginError::invalid(format!("Attention: softmax_precision {code} is no type"))
            })?,
            None => dtype,
        };
        let rs = rounder(sm_type);
        let sequential_sum = sm_type == DType::BF16;
        let qs: Vec<f32> = q.data.iter().map(|&x| rt(x * sq)).collect();
        let ks: Vec<f32> = pk.data.iter().map(|&x| rt(x * sq)).collect();

        // Mask, as an additive f32 bias broadcast over (B, Hq, S, L).
        let mask = match mask_in {
            None => None,
            Some(m) => {
                let ms = m.shape();
                if ms.is_empty() || ms.len() > 4 {
                    return Err(PluginError::invalid(format!(
                        "Attention: attn_mask must have rank 1 to 4, got {ms:?}"
                    )));
                }
                let len = ms[ms.len() - 1];
                if len > t {
                    return Err(PluginError::invalid(format!(
                        "Attention: attn_mask has {len} key columns, more than the {t} keys"
                    )));
                }
                let target = [b, hq, s, len];
                for (i, &d) in ms.iter().enumerate() {
                    let want = target[4 - ms.len() + i];
                    if d != 1 && d != want {
                        return Err(PluginError::invalid(format!(
                            "Attention: attn_mask shape {ms:?} does not broadcast to {target:?}"
                        )));
                    }
                }
                let values: Vec<f32> = if m.dtype == DType::Bool {
                    m.as_bytes()?
                        .iter()
                        .map(|&x| if x != 0 { 0.0 } else { f32::NEG_INFINITY })
                        .collect()
                } else {
                    read_f32(m, "attn_mask")?
                };
                let st = broadcast_strides(ms, &target);
                Some((values, len, [st[0], st[1], st[2], st[3]]))
            }
        };
        let nonpad = nonpad_in
            .map(|t| -> Result<Vec<i64>, PluginError> {
                let v = t.to_i64s()?;
                if v.len() != b {
                    return Err(PluginError::invalid(format!(
                        "Attention: nonpad_kv_seqlen has {} entries for batch {b}",
                        v.len()
                    )));
                }
                Ok(v)
            })
            .transpose()?;
        let offsets: Vec<i64> = match &nonpad {
            Some(np) => np.iter().map(|&n| n.saturating_sub(s as i64)).collect(),
            // Q may be empty with a huge batch.
            None => try_vec(b, past_len as i64)?,
        };
        let bias = Bias {
            mask,
            causal: self.is_causal,
            left: self.left_window,
            right: self.right_window,
            offsets,
            nonpad,
        };

        // Pass 1: per (batch, query head), the exposed QK values and the probabilities.
        // Saturating: exact whenever `buf` below has elements.
        let st = s.saturating_mul(t);
        let group = hq / hkv;
        let softcap = self.softcap;
        let mode = self.qk_mode;
        // Sized by the sequence lengths, which empty Q and K (head size 0) leave unbounded by
        // data: allocated fallibly.
        let mut buf = try_vec(numel(&[b, hq, 2, s, t])?, 0.0f32)?;
        ctx.parallel_chunks(&mut buf, st.saturating_mul(2).max(1), |start, chunk| {
            if st == 0 {
                return;
            }
            let bh = start / (2 * st);
            let (bi, hi) = (bh / hq, bh % hq);
            let kh = bi * hkv + hi / group;
            let (qk_out, probs) = chunk.split_at_mut(st);
            let mut bias_row = vec![0.0f32; t];
            let mut logits = vec![0.0f32; t];
            for i in 0..s {
                bias.row(bi, hi, i, &mut bias_row);
                let qrow = &qs[(bh * s + i) * dk..(bh * s + i + 1) * dk];
                let out_row = &mut qk_out[i * t..(i + 1) * t];
                for j in 0..t {
                    let krow = &ks[(kh * t + j) * dk..(kh * t + j + 1) * dk];
                    let mut dot = rt(qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>());
                    if softcap > 0.0 {
                        dot = rt(softcap * rt(rt(dot / softcap).tanh()));
                    }
                    let with_bias = rt(dot + bias_row[j]);
                    out_row[j] = if mode == 2 { with_bias } else { dot };
                    logits[j] = with_bias;
                }
                let prow = &mut probs[i * t..(i + 1) * t];
                let fully_masked = bias_row.iter().all(|&x| x == f32::NEG_INFINITY);
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if fully_masked || max == f32::NEG_INFINITY {
                    prow.fill(0.0);
                } else if logits.iter().any(|l| l.is_nan()) {
                    // A NaN logit poisons the row, as in the reference.
                    prow.fill(f32::NAN);
                } else {
                    // In the softmax precision, rounding as numpy does: f16 sums
                    // accumulate in f32, bf16 sums round at every step.
                    let mut sum = 0.0f32;
                    for (p, &l) in prow.iter_mut().zip(&logits) {
                        *p = rs(rs(l - max).exp());
                        sum = if sequential_sum {
                            rs(sum + *p)
                        } else {
                            sum + *p
                        };
                    }
                    let sum = rs(sum);
                    let sum = if sum == 0.0 { 1.0 } else { sum };
                    prow.iter_mut().for_each(|p| *p = rt(rs(*p / sum)));
                }
                if mode == 3 {
                    out_row.copy_from_slice(prow);
                }
            }
        })?;

        // Pass 2: Y = P V, per (batch, query head), as (B, Hq, S, Dv).
        let sdv = s.saturating_mul(dv);
        let mut y = try_vec(numel(&[b, hq, s, dv])?, 0.0f32)?;
        ctx.parallel_chunks(&mut y, sdv.max(1), |start, chunk| {
            if sdv == 0 {
                return;
            }
            let bh = start / sdv;
            let (bi, hi) = (bh / hq, bh % hq);
            let kh = bi * hkv + hi / group;
            let probs = &buf[bh * 2 * st + st..(bh + 1) * 2 * st];
            let vh = &pv.data[kh * t * dv..(kh + 1) * t * dv];
            for i in 0..s {
                let out = &mut chunk[i * dv..(i + 1) * dv];
                for (j, &p) in probs[i * t..(i + 1) * t].iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let vrow = &vh[j * dv..(j + 1) * dv];
                    out.iter_mut().zip(vrow).for_each(|(o, &x)| *o += p * x);
                }
                out.iter_mut().for_each(|o| *o = rt(*o));
            }
        })?;

        if rank == 3 {
            // (B, Hq, S, Dv) -> (B, S, Hq * Dv)
            let hidden = hq.checked_mul(dv).ok_or_else(|| {
                PluginError::invalid(format!(
                    "Attention: {hq} heads of {dv} values overflow the output's hidden size"
                ))
            })?;
            let mut y3 = try_vec(y.len(), 0.0f32)?;
            // Only when Y has elements: the extents of an empty Y may be huge.
            for bi in 0..if y.is_empty() { 0 } else { b } {
                for hi in 0..hq {
                    for si in 0..s {
                        let src = ((bi * hq + hi) * s + si) * dv;
                        let dst = ((bi * s + si) * hq + hi) * dv;
                        y3[dst..dst + dv].copy_from_slice(&y[src..src + dv]);
                    }
                }
            }
            write_f32(ctx, 0, dtype, &[b, s, hidden], &y3)?;
        } else {
            write_f32(ctx, 0, dtype, &[b, hq, s, dv], &y)?;
        }
        let n_out = ctx.num_outputs();
        if n_out > 1 {
            write_f32(ctx, 1, kv.dtype, &pk.dims(), &pk.data)?;
        }
        if n_out > 2 {
            write_f32(ctx, 2, vv.dtype, &pv.dims(), &pv.data)?;
        }
        if n_out > 3 {
            let mut qk: Vec<f32> = try_with_capacity(buf.len() / 2)?;
            qk.extend(
                buf.chunks(st.max(1).saturating_mul(2))
                    .flat_map(|c| c[..st.min(c.len())].iter().copied()),
            );
            write_f32(ctx, 3, dtype, &[b, hq, s, t], &qk)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNormalization

#[derive(Clone, Debug)]
struct RmsNorm {
    axis: i64,
    epsilon: f32,
}

impl Kernel for RmsNorm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [xv, wv] = required("RMSNormalization", inputs, ["X", "scale"])?;
        let xs = xv.shape();
        let axis = normalize_axis(self.axis, xs.len())?;
        let x = read_f32(&xv, "X")?;
        let w = read_f32(&wv, "scale")?;
        let ws = wv.shape();
        if ws.len() > xs.len()
            || ws
                .iter()
                .rev()
                .zip(xs.iter().rev())
                .any(|(&a, &b)| a != 1 && a != b)
        {
            return Err(PluginError::invalid(format!(
                "RMSNormalization: scale shape {ws:?} does not broadcast to X {xs:?}"
            )));
        }
        let wst = broadcast_strides(ws, xs);
        // Saturating: exact whenever X has elements.
        let inner = product_sat(&xs[axis..]);
        let rt = rounder(xv.dtype);
        let mut y = vec![0.0f32; x.len()];
        let eps = self.epsilon;
        ctx.parallel_chunks(&mut y, inner.max(1), |start, chunk| {
            let xr = &x[start..start + chunk.len()];
            let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
                / (chunk.len().max(1) as f64);
            let inv = 1.0 / ((ms as f32) + eps).sqrt();
            let mut k = 0;
            crate::util::walk_offsets(xs, &wst, start, chunk.len(), |off| {
                chunk[k] = rt(xr[k] * inv) * w[off];
                k += 1;
            });
        })?;
        // Y has the scale's type (V).
        write_f32(ctx, 0, wv.dtype, xs, &y)
    }
}

// ---------------------------------------------------------------------------------------------
// RotaryEmbedding

#[derive(Clone, Debug)]
struct Rotary {
    interleaved: bool,
    rotary_dim: usize,
    num_heads: usize,
}

impl Kernel for Rotary {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [xv, cv, sv] = required(
            "RotaryEmbedding",
            inputs,
            ["input", "cos_cache", "sin_cache"],
        )?;
        let shape = xv.shape();
        let x = read_f32(&xv, "input")?;
        if x.is_empty() {
            // Nothing to rotate; the extents of an empty input may be huge (no per-position
            // table is built for them).
            return write_f32(ctx, 0, xv.dtype, shape, &x);
        }
        let cos = read_f32(&cv, "cos_cache")?;
        let sin = read_f32(&sv, "sin_cache")?;
        // Index of element (b, s, h, d) in `x`: b*sb + s*ss + h*sh + d.
        let (b, s, h, d, sb, ss, sh) = match *shape {
            [b, h, s, d] => (b, s, h, d, h * s * d, d, s * d),
            [b, s, hidden] => {
                let h = self.num_heads;
                if h == 0 || hidden % h != 0 {
                    return Err(PluginError::invalid(format!(
                        "RotaryEmbedding: 3-D input needs num_heads dividing {hidden}, got {h}"
                    )));
                }
                (b, s, h, hidden / h, s * hidden, hidden, hidden / h)
            }
            ref other => {
                return Err(PluginError::invalid(format!(
                    "RotaryEmbedding: input must be 3-D or 4-D, got {other:?}"
                )))
            }
        };
        let rd = if self.rotary_dim == 0 {
            d
        } else {
            self.rotary_dim
        };
        if rd > d || rd % 2 != 0 {
            return Err(PluginError::invalid(format!(
                "RotaryEmbedding: rotary_embedding_dim {rd} must be even and at most head size {d}"
            )));
        }
        let half = rd / 2;
        let cs = cv.shape();
        if sv.shape() != cs || cs.last() != Some(&half) {
            return Err(PluginError::invalid(format!(
                "RotaryEmbedding: cos/sin caches {cs:?} and {:?} must match, last dim {half}",
                sv.shape()
            )));
        }
        // Row of the caches for (b, s).
        let rows: Vec<usize> = match optional(inputs, 3) {
            Some(p) => {
                if p.shape() != [b, s] || cs.len() != 2 {
                    return Err(PluginError::invalid(format!(
                        "RotaryEmbedding: position_ids {:?} must be [{b}, {s}] with 2-D caches",
                        p.shape()
                    )));
                }
                p.to_i64s()?
                    .into_iter()
                    .map(|i| {
                        if i < 0 || i as usize >= cs[0] {
                            Err(PluginError::invalid(format!(
                                "RotaryEmbedding: position id {i} out of range [0, {})",
                                cs[0]
                            )))
                        } else {
                            Ok(i as usize)
                        }
                    })
                    .collect::<Result<_, _>>()?
            }
            None => {
                if cs != [b, s, half] {
                    return Err(PluginError::invalid(format!(
                        "RotaryEmbedding: without position_ids the caches must be [{b}, {s}, {half}], got {cs:?}"
                    )));
                }
                (0..b * s).collect()
            }
        };
        let rt = rounder(xv.dtype);
        let mut y = x.clone();
        for bi in 0..b {
            for si in 0..s {
                let row = rows[bi * s + si] * half;
                let (c, sn) = (&cos[row..row + half], &sin[row..row + half]);
                for hi in 0..h {
                    let base = bi * sb + si * ss + hi * sh;
                    for i in 0..half {
                        let (i1, i2) = if self.interleaved {
                            (base + 2 * i, base + 2 * i + 1)
                        } else {
                            (base + i, base + i + half)
                        };
                        let (x1, x2) = (x[i1], x[i2]);
                        y[i1] = rt(rt(c[i] * x1) - rt(sn[i] * x2));
                        y[i2] = rt(rt(sn[i] * x1) + rt(c[i] * x2));
                    }
                }
            }
        }
        write_f32(ctx, 0, xv.dtype, shape, &y)
    }
}

// ---------------------------------------------------------------------------------------------
// LpNormalization, MeanVarianceNormalization

#[derive(Clone, Debug)]
struct LpNorm {
    axis: i64,
    p: i64,
}

impl Kernel for LpNorm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input("LpNormalization", inputs, 0, "input")?;
        let shape = xv.shape();
        let axis = normalize_axis(self.axis, shape.len())?;
        let x = read_f32(&xv, "input")?;
        let n = shape[axis];
        // Saturating: exact whenever the input has elements.
        let inner = product_sat(&shape[axis + 1..]);
        let block = n.saturating_mul(inner).max(1);
        let mut y = vec![0.0f32; x.len()];
        for (o, xo) in y.chunks_mut(block).zip(x.chunks(block)) {
            for i in 0..inner {
                let norm = if self.p == 1 {
                    (0..n).map(|k| xo[k * inner + i].abs()).sum::<f32>()
                } else {
                    (0..n)
                        .map(|k| xo[k * inner + i].powi(2))
                        .sum::<f32>()
                        .sqrt()
                };
                for k in 0..n {
                    o[k * inner + i] = if norm == 0.0 {
                        0.0
                    } else {
                        xo[k * inner + i] / norm
                    };
                }
            }
        }
        write_f32(ctx, 0, xv.dtype, shape, &y)
    }
}

#[derive(Clone, Debug)]
struct Mvn {
    axes: Vec<i64>,
}

impl Kernel for Mvn {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input("MeanVarianceNormalization", inputs, 0, "X")?;
        let shape = xv.shape();
        let rank = shape.len();
        let mut reduced = vec![false; rank];
        for &a in &self.axes {
            reduced[normalize_axis(a, rank)?] = true;
        }
        let x = read_f32(&xv, "X")?;
        if x.is_empty() {
            // No statistics to take (and the kept extents of an empty X may be huge).
            return write_f32(ctx, 0, xv.dtype, shape, &x);
        }
        // Statistics live in the shape with reduced axes set to 1.
        let stat_shape: Vec<usize> = shape
            .iter()
            .zip(&reduced)
            .map(|(&d, &r)| if r { 1 } else { d })
            .collect();
        let st = broadcast_strides(&stat_shape, shape);
        let n_stats: usize = stat_shape.iter().product();
        let count = (x.len() / n_stats.max(1)).max(1) as f64;
        let (mut sum, mut sq) = (vec![0.0f64; n_stats], vec![0.0f64; n_stats]);
        let mut k = 0;
        crate::util::walk_offsets(shape, &st, 0, x.len(), |off| {
            sum[off] += x[k] as f64;
            sq[off] += (x[k] as f64).powi(2);
            k += 1;
        });
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let std: Vec<f64> = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / count - m * m).max(0.0).sqrt())
            .collect();
        let mut y = vec![0.0f32; x.len()];
        let mut k = 0;
        crate::util::walk_offsets(shape, &st, 0, x.len(), |off| {
            y[k] = ((x[k] as f64 - mean[off]) / (std[off] + 1e-9)) as f32;
            k += 1;
        });
        write_f32(ctx, 0, xv.dtype, shape, &y)
    }
}

fn attention_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Attention::from_node(node)?))
}

fn rms_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let stash = node.int_or("stash_type", 1)?;
    if stash != 1 {
        return Err(PluginError::unimplemented(format!(
            "RMSNormalization: stash_type {stash} (only 1, float32)"
        )));
    }
    Ok(Box::new(RmsNorm {
        axis: node.int_or("axis", -1)?,
        epsilon: node.float_or("epsilon", 1e-5)?,
    }))
}

fn rotary_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let rd = node.int_or("rotary_embedding_dim", 0)?;
    let nh = node.int_or("num_heads", 0)?;
    if rd < 0 || nh < 0 {
        return Err(PluginError::invalid(
            "RotaryEmbedding: rotary_embedding_dim and num_heads must be nonnegative",
        ));
    }
    Ok(Box::new(Rotary {
        interleaved: node.int_or("interleaved", 0)? != 0,
        rotary_dim: rd as usize,
        num_heads: nh as usize,
    }))
}

fn lp_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let p = node.int_or("p", 2)?;
    if p != 1 && p != 2 {
        return Err(PluginError::invalid(format!(
            "LpNormalization: p must be 1 or 2, got {p}"
        )));
    }
    Ok(Box::new(LpNorm {
        axis: node.int_or("axis", -1)?,
        p,
    }))
}

fn mvn_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Mvn {
        axes: node.ints("axes")?.unwrap_or_else(|| vec![0, 2, 3]),
    }))
}

pub fn register(r: &mut Registrar) {
    let mask_types = [DType::Bool, DType::F32, DType::F16, DType::BF16];
    r.kernel(
        KernelDesc::onnx("Attention", 23, OPEN_END)
            .constraint("T1", FLOATS)
            .constraint("T2", FLOATS)
            .constraint("U", &mask_types)
            .constraint("I", &[DType::I64])
            .inputs(&["T1", "T1", "T2", "U", "T1", "T2", "I"])
            .outputs(&["T1", "T1", "T2", "T1"]),
        attention_factory,
    );
    r.kernel(
        KernelDesc::onnx("RMSNormalization", 23, OPEN_END)
            .constraint("T", FLOATS)
            .constraint("V", FLOATS)
            .inputs(&["T", "V"])
            .outputs(&["V"]),
        rms_factory,
    );
    r.kernel(
        KernelDesc::onnx("RotaryEmbedding", 23, OPEN_END)
            .constraint("T", FLOATS)
            .constraint("M", &[DType::I64])
            .inputs(&["T", "T", "T", "M"])
            .outputs(&["T"]),
        rotary_factory,
    );
    r.kernel(
        KernelDesc::onnx("LpNormalization", 1, OPEN_END)
            .constraint("T", FLOATS)
            .inputs(&["T"])
            .outputs(&["T"]),
        lp_factory,
    );
    r.kernel(
        KernelDesc::onnx("MeanVarianceNormalization", 9, OPEN_END)
            .constraint("T", FLOATS)
            .inputs(&["T"])
            .outputs(&["T"]),
        mvn_factory,
    );
}

#[cfg(test)]
mod tests;
