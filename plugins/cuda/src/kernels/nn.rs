//! Dense products and convolution-style operators: MatMul, Gemm, FusedMatMul (cuBLAS, with
//! the bias and activation as one kernel after), Conv / FusedConv (im2col + strided-batched
//! cuBLAS gemm over the groups, or a direct kernel for depthwise-like groups), MaxPool,
//! AveragePool, GlobalAveragePool and BatchNormalization.

use super::elementwise::Act;
use super::module::{DeviceBuf, Kernels, F};
use super::{count, decline, f32_outputs, optional, required, upload_constant, Env, Reg};
use crate::args;
use crate::blas::CublasBlas;
use opreg_sdk::prelude::*;
use std::sync::Arc;

fn cublas(k: &Kernels, device: Device) -> CublasBlas {
    CublasBlas {
        cuda: k.cuda.clone(),
        device,
    }
}

// --- MatMul family -----------------------------------------------------------------------

/// How a (possibly batched, broadcast) MatMul of `a` and `b` maps onto gemms.
#[derive(Debug, PartialEq)]
pub struct MatMulPlan {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Products, and the element distance between consecutive A, B and C matrices (A or B
    /// 0 when shared by every product).
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    /// Mixed broadcasting ([3, 1] x [1, 2] batches): the output's batch shape and both
    /// sides' padded to it, from which [`pair`](Self::pair) finds each product's A and B (one
    /// gemm each, computed as they run: nothing sized by the batch is allocated). `None` when
    /// the strides above describe the batch.
    pub mixed: Option<[Vec<usize>; 3]>,
    pub out: Vec<usize>,
}

/// The plan of ONNX MatMul (NumPy `matmul`) for shapes `a` and `b`. Batch broadcasting is
/// supported where one side's batch is all ones or both are equal; others decline.
pub fn matmul_plan(a: &[usize], b: &[usize]) -> Result<MatMulPlan, PluginError> {
    if a.is_empty() || b.is_empty() {
        return Err(PluginError::invalid("MatMul: scalar operands"));
    }
    let a2: Vec<usize> = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2: Vec<usize> = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, ka) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if ka != kb {
        return Err(PluginError::invalid(format!(
            "MatMul: inner dimensions differ: {a:?} x {b:?}"
        )));
    }
    let (ba, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let batch_shape = super::elementwise::broadcast(ba, bb)?;
    let batch = count(&batch_shape)?;
    let (na, nb) = (count(ba)?, count(bb)?);
    let pad = |s: &[usize]| {
        let mut v = vec![1; batch_shape.len() - s.len()];
        v.extend_from_slice(s);
        v
    };
    // Checked: an empty operand may have dimensions whose product overflows.
    let (one_a, one_b) = (count(&[m, ka])?, count(&[ka, n])?);
    let mut mixed = None;
    let (stride_a, stride_b) = if na == batch && nb == batch && pad(ba) == pad(bb) {
        (one_a, one_b)
    } else if na == 1 && nb == batch {
        (0, one_b)
    } else if nb == 1 && na == batch {
        (one_a, 0)
    } else {
        mixed = Some([batch_shape.clone(), pad(ba), pad(bb)]);
        (one_a, one_b)
    };
    let mut out = batch_shape;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(MatMulPlan {
        m,
        n,
        k: ka,
        batch,
        stride_a,
        stride_b,
        mixed,
        out,
    })
}

impl MatMulPlan {
    /// The A and B matrices (by position in their batches) of product `i` under mixed
    /// broadcasting: its output batch index read back through both sides' broadcast.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        let Some([out, pa, pb]) = &self.mixed else {
            return (i, i);
        };
        let (mut rest, mut ia, mut ib, mut sa, mut sb) = (i, 0, 0, 1, 1);
        for d in (0..out.len()).rev() {
            let c = rest % out[d];
            rest /= out[d];
            ia += if pa[d] == 1 { 0 } else { c * sa };
            ib += if pb[d] == 1 { 0 } else { c * sb };
            sa *= pa[d];
            sb *= pb[d];
        }
        (ia, ib)
    }

    /// Runs the plan: C = A B (row-major, contiguous) on the device.
    fn run(&self, env: &Env<'_, '_>, a: u64, b: u64, c: u64) -> Result<(), PluginError> {
        if self.mixed.is_some() {
            let one = MatMulPlan {
                batch: 1,
                mixed: None,
                out: Vec::new(),
                ..*self
            };
            // Matrix sizes in bytes: the run's output and operands are allocated (each
            // matrix holds fewer bytes than its tensor), so these do not overflow.
            let (sa, sb, sc) = (self.stride_a * 4, self.stride_b * 4, self.m * self.n * 4);
            for i in 0..self.batch {
                let (ia, ib) = self.pair(i);
                one.run(
                    env,
                    a + (ia * sa) as u64,
                    b + (ib * sb) as u64,
                    c + (i * sc) as u64,
                )?;
            }
            return Ok(());
        }
        let mut g = GemmArgs::new(GemmTypes::F32, self.m, self.n, self.k);
        // One B for every product: the batch is rows of one gemm (A contiguous).
        if self.stride_b == 0 && self.batch > 1 {
            g.m = self.m * self.batch;
        } else {
            g.batch = self.batch;
            g.stride_a = self.stride_a;
            g.stride_b = self.stride_b;
            g.stride_c = self.m * self.n;
        }
        g.a = a as usize as *const u8;
        g.b = b as usize as *const u8;
        g.c = c as usize as *mut u8;
        g.lda = self.k.max(1);
        g.ldb = self.n.max(1);
        g.ldc = self.n.max(1);
        cublas(env.k, env.device).run(env.stream, &g)
    }
}

struct MatMul {
    k: Arc<Kernels>,
    fused: Option<Fused>,
}

/// What FusedMatMul adds: B and the bias are host-memory inputs (weights, uploaded at load
/// when constant), and the activation after the bias.
struct Fused {
    b: Option<DeviceBuf>,
    bias: Option<DeviceBuf>,
    act: Act,
}

fn make_matmul(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let fused = match node.domain {
        "opreg" => Some(Fused {
            b: upload_constant(k, node, 1)?,
            bias: upload_constant(k, node, 2)?,
            act: Act::fused(node)?,
        }),
        _ => None,
    };
    Ok(Box::new(MatMul {
        k: k.clone(),
        fused,
    }))
}

impl Kernel for MatMul {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let a = required(inputs, 0, "MatMul", "A")?;
        let b = required(inputs, 1, "MatMul", "B")?;
        let plan = matmul_plan(a.shape(), b.shape())?;
        let ap = env.input(a, "A")?;
        let bp = match &self.fused {
            Some(f) => env.weight(b, &f.b, "B")?,
            None => env.input(b, "B")?,
        };
        let yp = env.output(0, &plan.out)?;
        if count(&plan.out)? == 0 {
            return Ok(());
        }
        plan.run(&env, ap, bp, yp)?;
        let Some(f) = &self.fused else {
            return Ok(());
        };
        let bias = required(inputs, 2, "FusedMatMul", "its bias")?;
        if bias.len() != plan.n {
            return Err(PluginError::invalid(format!(
                "FusedMatMul: bias has {} elements for {} columns",
                bias.len(),
                plan.n
            )));
        }
        let biasp = env.weight(bias, &f.bias, "bias")?;
        bias_act(&env, yp, biasp, 0, count(&plan.out)?, 1, plan.n, f.act)
    }
}

/// y = act(y + bias[(i / inner) % channels] + z[i]) over `n` elements (bias, z: 0 for none).
#[allow(clippy::too_many_arguments)]
fn bias_act(
    env: &Env<'_, '_>,
    y: u64,
    bias: u64,
    z: u64,
    n: usize,
    inner: usize,
    channels: usize,
    act: Act,
) -> Result<(), PluginError> {
    if bias == 0 && z == 0 && act == Act::NONE {
        return Ok(());
    }
    let (n64, inner, channels) = (n as u64, inner.max(1) as i64, channels.max(1) as i64);
    let (code, p0, p1) = (act.code, act.p0, act.p1);
    // SAFETY: bias_act_f32(float*, const float*, const float*, u64, i64, i64, int, float,
    // float); bias holds `channels`, y and z `n` floats (null pointers are skipped).
    unsafe {
        env.launch_n(
            F::BiasAct,
            n,
            &mut args![y, bias, z, n64, inner, channels, code, p0, p1],
        )
    }
}

struct Gemm {
    k: Arc<Kernels>,
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    b: Option<DeviceBuf>,
    c: Option<DeviceBuf>,
}

fn make_gemm(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Gemm {
        k: k.clone(),
        alpha: node.float_or("alpha", 1.0)?,
        beta: node.float_or("beta", 1.0)?,
        trans_a: node.int_or("transA", 0)? != 0,
        trans_b: node.int_or("transB", 0)? != 0,
        b: upload_constant(k, node, 1)?,
        c: upload_constant(k, node, 2)?,
    }))
}

impl Kernel for Gemm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let a = required(inputs, 0, "Gemm", "A")?;
        let b = required(inputs, 1, "Gemm", "B")?;
        let two = |t: &TensorView<'_>, what: &str| match t.shape() {
            &[r, c] => Ok((r, c)),
            s => Err(PluginError::invalid(format!(
                "Gemm: {what} must be 2-D, not {s:?}"
            ))),
        };
        let (ar, ac) = two(a, "A")?;
        let (br, bc) = two(b, "B")?;
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if k != kb {
            return Err(PluginError::invalid(format!(
                "Gemm: inner dimensions differ ({k} vs {kb})"
            )));
        }
        let ap = env.input(a, "A")?;
        let bp = env.weight(b, &self.b, "B")?;
        let yp = env.output(0, &[m, n])?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let c = optional(inputs, 2);
        let mut beta = 0.0;
        if let (Some(c), true) = (c, self.beta != 0.0) {
            // Y = beta * broadcast(C) first, then the product accumulates onto it.
            let out = [m, n];
            super::elementwise::broadcast(c.shape(), &out)
                .ok()
                .filter(|s| s.as_slice() == out)
                .ok_or_else(|| {
                    PluginError::invalid(format!(
                        "Gemm: C {:?} does not broadcast to {out:?}",
                        c.shape()
                    ))
                })?;
            let cp = env.weight(c, &self.c, "C")?;
            let strides = super::elementwise::read_strides(c.shape(), &out);
            super::shape::gather_strided(&env, cp, yp, &out, &strides, self.beta)?;
            beta = 1.0;
        }
        let mut g = GemmArgs::new(GemmTypes::F32, m, n, k);
        g.trans_a = if self.trans_a {
            Transpose::YES
        } else {
            Transpose::NO
        };
        g.trans_b = if self.trans_b {
            Transpose::YES
        } else {
            Transpose::NO
        };
        g.a = ap as usize as *const u8;
        g.lda = ac.max(1);
        g.b = bp as usize as *const u8;
        g.ldb = bc.max(1);
        g.c = yp as usize as *mut u8;
        g.ldc = n.max(1);
        g.alpha = self.alpha;
        g.beta = beta;
        cublas(env.k, env.device).run(env.stream, &g)
    }
}

// --- windows: Conv and pooling -----------------------------------------------------------

/// `Window` of `kernels.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Window {
    pub c: i64,
    pub h: i64,
    pub w: i64,
    pub oh: i64,
    pub ow: i64,
    pub kh: i64,
    pub kw: i64,
    pub sh: i64,
    pub sw: i64,
    pub ph: i64,
    pub pw: i64,
    pub dh: i64,
    pub dw: i64,
}

/// The largest kernel extent, stride, dilation or pad accepted (2^31).
const MAX_WINDOW_ATTR: i64 = 1 << 31;
/// The largest input extent a window runs over (2^48: far past any tensor that exists, and
/// small enough that the window arithmetic stays in i64).
const MAX_WINDOW_EXTENT: usize = 1 << 48;

/// A node's window attributes (kernel from the attribute or, for Conv, the weights).
#[derive(Clone, Debug)]
pub struct WindowAttrs {
    auto_pad: String,
    kernel: Option<Vec<i64>>,
    strides: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    ceil: bool,
}

impl WindowAttrs {
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Self, PluginError> {
        Ok(WindowAttrs {
            auto_pad: node.string_or("auto_pad", "NOTSET")?,
            kernel: node.ints("kernel_shape")?,
            strides: node.ints("strides")?,
            pads: node.ints("pads")?,
            dilations: node.ints("dilations")?,
            ceil: node.int_or("ceil_mode", 0)? != 0,
        })
    }

    /// The 2-D window over input `[c, h, w]` (1-D inputs as height 1) with kernel `kernel`
    /// (spatial, from the weights when the attribute is absent).
    pub fn resolve(
        &self,
        c: usize,
        spatial: &[usize],
        kernel: &[usize],
        op: &str,
    ) -> Result<Window, PluginError> {
        let rank = spatial.len();
        if !(1..=2).contains(&rank) || kernel.len() != rank {
            return Err(PluginError::unimplemented(format!(
                "cuda: {op} over {rank} spatial dimensions (1 or 2 here)"
            )));
        }
        let get = |v: &Option<Vec<i64>>, i: usize, d: i64| {
            v.as_ref().and_then(|v| v.get(i).copied()).unwrap_or(d)
        };
        let kernel: Vec<i64> = match &self.kernel {
            Some(k) if k.len() == rank => k.clone(),
            Some(k) => {
                return Err(PluginError::invalid(format!(
                    "{op}: kernel_shape {k:?} for {rank} spatial dimensions"
                )))
            }
            None => kernel.iter().map(|&k| k as i64).collect(),
        };
        let mut dims = [(1i64, 1i64, 1i64, 1i64, 0i64, 1i64); 2]; // (in, out, k, s, pad, d)
        for i in 0..rank {
            // An empty X may claim any extents: bounded too.
            if spatial[i] > MAX_WINDOW_EXTENT {
                return Err(PluginError::invalid(format!(
                    "{op}: spatial extent {} over {MAX_WINDOW_EXTENT}",
                    spatial[i]
                )));
            }
            let (inp, k, s, d) = (
                spatial[i] as i64,
                kernel[i],
                get(&self.strides, i, 1),
                get(&self.dilations, i, 1),
            );
            if k < 1 || s < 1 || d < 1 {
                return Err(PluginError::invalid(format!(
                    "{op}: kernel, strides and dilations must be positive"
                )));
            }
            // Bounded first, so the window arithmetic below cannot overflow whatever a model
            // writes (the extents come from real tensors).
            let pads = [get(&self.pads, i, 0), get(&self.pads, i + rank, 0)];
            if [k, s, d, pads[0], pads[1]]
                .iter()
                .any(|&v| v > MAX_WINDOW_ATTR)
            {
                return Err(PluginError::invalid(format!(
                    "{op}: kernel, stride, dilation or pad over {MAX_WINDOW_ATTR}"
                )));
            }
            let span = (k - 1) * d + 1;
            let (out, pad) = match self.auto_pad.as_str() {
                "SAME_UPPER" | "SAME_LOWER" => {
                    let out = (inp + s - 1) / s;
                    let total = ((out - 1) * s + span - inp).max(0);
                    let begin = if self.auto_pad == "SAME_UPPER" {
                        total / 2
                    } else {
                        total - total / 2
                    };
                    (out, begin)
                }
                "VALID" => ((inp - span) / s + 1, 0),
                "NOTSET" | "" => {
                    let (b, e) = (get(&self.pads, i, 0), get(&self.pads, i + rank, 0));
                    if b < 0 || e < 0 {
                        return Err(PluginError::invalid(format!("{op}: negative pads")));
                    }
                    let room = inp + b + e - span;
                    let mut out = if self.ceil {
                        (room + s - 1).div_euclid(s) + 1
                    } else {
                        room.div_euclid(s) + 1
                    };
                    // The last window must start inside the input or its leading pad.
                    if self.ceil && (out - 1) * s >= inp + b {
                        out -= 1;
                    }
                    (out, b)
                }
                other => return Err(PluginError::invalid(format!("{op}: auto_pad '{other}'"))),
            };
            if out < 1 {
                return Err(PluginError::invalid(format!(
                    "{op}: the window ({span}) is larger than the padded input ({inp})"
                )));
            }
            dims[i + 2 - rank] = (inp, out, k, s, pad, d);
        }
        let [h, w] = dims;
        Ok(Window {
            c: c as i64,
            h: h.0,
            w: w.0,
            oh: h.1,
            ow: w.1,
            kh: h.2,
            kw: w.2,
            sh: h.3,
            sw: w.3,
            ph: h.4,
            pw: w.4,
            dh: h.5,
            dw: w.5,
        })
    }
}

/// The output shape `[n, channels, spatial...]` of a window over `x`.
fn window_out(x: &[usize], channels: usize, g: &Window) -> Vec<usize> {
    let mut out = vec![x[0], channels];
    if x.len() == 4 {
        out.push(g.oh as usize);
    }
    out.push(g.ow as usize);
    out
}

struct Conv {
    k: Arc<Kernels>,
    window: WindowAttrs,
    group: usize,
    act: Act,
    w: Option<DeviceBuf>,
    b: Option<DeviceBuf>,
}

/// Input channels per group at or under which the direct kernel beats im2col + gemm.
const DIRECT_MAX_CHANNELS: usize = 4;

/// im2col columns of a chunk of images at most (f32 values: 256 MiB), so a large batch is
/// a few large gemms without unbounded scratch.
const COL_SCRATCH_FLOATS: usize = 64 << 20;

fn make_conv(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let group = node.int_or("group", 1)?;
    if group < 1 {
        return Err(PluginError::invalid("Conv: group must be positive"));
    }
    if let Some(s) = node.inputs.get(1).and_then(|w| w.shape) {
        if !(3..=4).contains(&s.len()) {
            return Err(decline(node, "over other than 1 or 2 spatial dimensions"));
        }
    }
    Ok(Box::new(Conv {
        k: k.clone(),
        window: WindowAttrs::from_node(node)?,
        group: group as usize,
        act: if node.domain == "opreg" {
            Act::fused(node)?
        } else {
            Act::NONE
        },
        w: upload_constant(k, node, 1)?,
        b: upload_constant(k, node, 2)?,
    }))
}

impl Kernel for Conv {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "Conv", "X")?;
        let w = required(inputs, 1, "Conv", "W")?;
        let (xs, ws) = (x.shape(), w.shape());
        if xs.len() != ws.len() || xs.len() < 3 {
            return Err(PluginError::invalid(format!("Conv: X {xs:?} and W {ws:?}")));
        }
        let (images, c, m, group) = (xs[0], xs[1], ws[0], self.group);
        if m % group != 0 || ws[1].checked_mul(group) != Some(c) {
            return Err(PluginError::invalid(format!(
                "Conv: {c} input and {m} output channels in {group} groups with W {ws:?}"
            )));
        }
        let g = self.window.resolve(c, &xs[2..], &ws[2..], "Conv")?;
        // kernel_shape, when given, must be W's: the kernels index W by it.
        let spatial = &ws[2..];
        let kernel = [g.kh as usize, g.kw as usize];
        if spatial != &kernel[2 - spatial.len()..] {
            return Err(PluginError::invalid(format!(
                "Conv: kernel_shape {:?} differs from W's spatial extents {spatial:?}",
                &kernel[2 - spatial.len()..]
            )));
        }
        let out = window_out(xs, m, &g);
        let xp = env.input(x, "X")?;
        let wp = env.weight(w, &self.w, "W")?;
        let yp = env.output(0, &out)?;
        let bp = match optional(inputs, 2) {
            Some(b) if b.len() != m => {
                return Err(PluginError::invalid(format!(
                    "Conv: B has {} for {m} channels",
                    b.len()
                )))
            }
            Some(b) => env.weight(b, &self.b, "B")?,
            None => 0,
        };
        let zp = match optional(inputs, 3) {
            Some(z) if z.shape() != out.as_slice() => {
                return Err(PluginError::invalid(format!(
                    "FusedConv: Z {:?} for output {out:?}",
                    z.shape()
                )))
            }
            Some(z) => env.input(z, "Z")?,
            None => 0,
        };
        let total = count(&out)?;
        if total == 0 {
            // Nothing to write; the extents of an empty X may not even multiply.
            return Ok(());
        }
        let (cg, mg) = (c / group, m / group);
        if group > 1 && cg <= DIRECT_MAX_CHANNELS {
            let (images, m64, groups) = (images as i64, m as i64, group as i64);
            let (code, p0, p1) = (self.act.code, self.act.p0, self.act.p1);
            // SAFETY: conv_direct_f32(x, w, bias, z, y, i64 images, i64 m, i64 groups, Window,
            // int, float, float); shapes checked above.
            return unsafe {
                env.launch_n(
                    F::ConvDirect,
                    total,
                    &mut args![xp, wp, bp, zp, yp, images, m64, groups, g, code, p0, p1],
                )
            };
        }
        let pixels = (g.oh * g.ow) as usize;
        let kg = cg * (g.kh * g.kw) as usize;
        let plain = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
        let (in_image, out_image) = (c * (g.h * g.w) as usize, m * pixels);
        if group == 1 {
            // The images of a batch as one strided-batched gemm each chunk (W shared): the
            // input itself for 1x1 convolutions, im2col columns of a chunk of images else.
            let per = count(&[kg, pixels])?;
            let chunk = if plain {
                images
            } else {
                (COL_SCRATCH_FLOATS / per.max(1)).clamp(1, images.max(1))
            };
            let col = if plain {
                0
            } else {
                env.scratch(count(&[chunk, per])?)?
            };
            let mut img = 0;
            while img < images {
                let take = chunk.min(images - img);
                let (b, stride_b) = if plain {
                    (xp + (img * in_image * 4) as u64, in_image)
                } else {
                    for j in 0..take {
                        let xi = xp + ((img + j) * in_image * 4) as u64;
                        let cj = col + (j * per * 4) as u64;
                        // SAFETY: im2col_f32(const float*, float*, Window); `col` holds
                        // `chunk` images of c * kh * kw * pixels floats.
                        unsafe { env.launch_n(F::Im2col, per, &mut args![xi, cj, g])? };
                    }
                    (col, per)
                };
                let mut gm = GemmArgs::new(GemmTypes::F32, m, pixels, kg);
                gm.batch = take;
                gm.a = wp as usize as *const u8;
                gm.lda = kg.max(1);
                gm.b = b as usize as *const u8;
                gm.stride_b = stride_b;
                gm.ldb = pixels.max(1);
                gm.c = (yp + (img * out_image * 4) as u64) as usize as *mut u8;
                gm.stride_c = out_image;
                gm.ldc = pixels.max(1);
                cublas(env.k, env.device).run(env.stream, &gm)?;
                img += take;
            }
            return bias_act(&env, yp, bp, zp, total, pixels, m, self.act);
        }
        let col = if plain {
            0
        } else {
            env.scratch(count(&[kg, group, pixels])?)?
        };
        for img in 0..images {
            let xi = xp + (img * in_image * 4) as u64;
            let b = if plain {
                xi
            } else {
                let n = count(&[kg, group, pixels])?;
                // SAFETY: im2col_f32(const float*, float*, Window); `col` holds
                // c * kh * kw * pixels floats, the image c * h * w.
                unsafe { env.launch_n(F::Im2col, n, &mut args![xi, col, g])? };
                col
            };
            let mut gm = GemmArgs::new(GemmTypes::F32, mg, pixels, kg);
            gm.batch = group;
            gm.a = wp as usize as *const u8;
            gm.stride_a = mg * kg;
            gm.lda = kg.max(1);
            gm.b = b as usize as *const u8;
            gm.stride_b = kg * pixels;
            gm.ldb = pixels.max(1);
            gm.c = (yp + (img * out_image * 4) as u64) as usize as *mut u8;
            gm.stride_c = mg * pixels;
            gm.ldc = pixels.max(1);
            cublas(env.k, env.device).run(env.stream, &gm)?;
        }
        bias_act(&env, yp, bp, zp, total, pixels, m, self.act)
    }
}

struct Pool {
    k: Arc<Kernels>,
    window: WindowAttrs,
    /// 0 max, 1 average without pads, 2 average counting pads.
    mode: i32,
}

fn make_pool(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    if node.outputs.len() > 1 {
        return Err(decline(node, "with its Indices output"));
    }
    let mode = match node.op_type {
        "MaxPool" => 0,
        _ if node.int_or("count_include_pad", 0)? != 0 => 2,
        _ => 1,
    };
    let window = WindowAttrs::from_node(node)?;
    let rank = match &window.kernel {
        Some(k) if (1..=2).contains(&k.len()) => k.len(),
        _ => return Err(decline(node, "over other than 1 or 2 spatial dimensions")),
    };
    // The kernel counts trailing pad taps as far as the leading pad reaches: right for
    // symmetric explicit pads, not for SAME_* or ceil_mode windows past the end.
    if mode == 2 {
        let pads = window.pads.clone().unwrap_or_default();
        let symmetric = (0..rank).all(|i| pads.get(i) == pads.get(i + rank));
        if !symmetric || window.ceil || !matches!(window.auto_pad.as_str(), "NOTSET" | "" | "VALID")
        {
            return Err(decline(node, "counting asymmetric or implicit pads"));
        }
    }
    Ok(Box::new(Pool {
        k: k.clone(),
        window,
        mode,
    }))
}

impl Kernel for Pool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "pooling", "X")?;
        let xs = x.shape();
        if xs.len() < 3 {
            return Err(PluginError::invalid(format!("pooling: X {xs:?}")));
        }
        let kernel: Vec<usize> = self
            .window
            .kernel
            .iter()
            .flatten()
            .map(|&k| k.max(0) as usize)
            .collect();
        let g = self.window.resolve(xs[1], &xs[2..], &kernel, "pooling")?;
        let out = window_out(xs, xs[1], &g);
        let (xp, yp) = (env.input(x, "X")?, env.output(0, &out)?);
        let total = count(&out)?;
        if total == 0 {
            return Ok(());
        }
        let (planes, mode) = (count(&xs[..2])? as i64, self.mode);
        // SAFETY: pool_f32(const float*, float*, i64 planes, Window, int).
        unsafe { env.launch_n(F::Pool, total, &mut args![xp, yp, planes, g, mode]) }
    }
}

struct GlobalAveragePool {
    k: Arc<Kernels>,
}

impl Kernel for GlobalAveragePool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "GlobalAveragePool", "X")?;
        let xs = x.shape();
        if xs.len() < 3 {
            return Err(PluginError::invalid(format!("GlobalAveragePool: X {xs:?}")));
        }
        let mut out = xs[..2].to_vec();
        out.extend(std::iter::repeat_n(1, xs.len() - 2));
        let (xp, yp) = (env.input(x, "X")?, env.output(0, &out)?);
        let planes = count(&xs[..2])? as u64;
        let size = count(&xs[2..])? as i64;
        // SAFETY: plane_mean_f32(const float*, float*, u64 planes, i64 size).
        unsafe {
            env.launch_rows(
                F::PlaneMean,
                planes as usize,
                size as usize,
                &mut args![xp, yp, planes, size],
            )
        }
    }
}

fn make_gap(k: &Arc<Kernels>, _: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(GlobalAveragePool { k: k.clone() }))
}

struct BatchNorm {
    k: Arc<Kernels>,
    eps: f32,
    params: [Option<DeviceBuf>; 4],
}

fn make_batchnorm(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    if node.outputs.len() > 1 || node.int_or("training_mode", 0)? != 0 {
        return Err(decline(node, "in training mode"));
    }
    Ok(Box::new(BatchNorm {
        k: k.clone(),
        eps: node.float_or("epsilon", 1e-5)?,
        params: [
            upload_constant(k, node, 1)?,
            upload_constant(k, node, 2)?,
            upload_constant(k, node, 3)?,
            upload_constant(k, node, 4)?,
        ],
    }))
}

impl Kernel for BatchNorm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "BatchNormalization", "X")?;
        let xs = x.shape();
        if xs.len() < 2 {
            return Err(PluginError::invalid(format!(
                "BatchNormalization: X {xs:?}"
            )));
        }
        let channels = xs[1];
        let mut p = [0u64; 4];
        for (i, buf) in self.params.iter().enumerate() {
            let t = required(
                inputs,
                i + 1,
                "BatchNormalization",
                "scale, B, mean and var",
            )?;
            if t.len() != channels {
                return Err(PluginError::invalid(format!(
                    "BatchNormalization: input {} has {} values for {channels} channels",
                    i + 1,
                    t.len()
                )));
            }
            p[i] = env.weight(t, buf, "a parameter")?;
        }
        let (xp, yp) = (env.input(x, "X")?, env.output(0, xs)?);
        let [scale, bias, mean, var] = p;
        let n = count(xs)?;
        let (n64, inner, ch, eps) = (
            n as u64,
            count(&xs[2..])?.max(1) as i64,
            channels as i64,
            self.eps,
        );
        // SAFETY: batchnorm_f32(x, scale, b, mean, var, y, u64 n, i64 inner, i64 channels,
        // float eps); parameters of `channels` floats each.
        unsafe {
            env.launch_n(
                F::BatchNorm,
                n,
                &mut args![xp, scale, bias, mean, var, yp, n64, inner, ch, eps],
            )
        }
    }
}

pub fn regs() -> Vec<Reg> {
    let reg =
        |domain, op, since, inputs: &'static [&'static str], host: &'static [usize], make| Reg {
            domain,
            op,
            since,
            end: OPEN_END,
            inputs,
            outputs: 1,
            host_inputs: host,
            make,
            facts: f32_outputs,
        };
    vec![
        reg("", "MatMul", 1, &["T", "T"], &[], make_matmul),
        reg(
            "opreg",
            "FusedMatMul",
            1,
            &["T", "T", "T"],
            &[1, 2],
            make_matmul,
        ),
        reg("", "Gemm", 7, &["T", "T", "T"], &[1, 2], make_gemm),
        reg("", "Conv", 1, &["T", "T", "T"], &[1, 2], make_conv),
        reg(
            "opreg",
            "FusedConv",
            1,
            &["T", "T", "T", "T"],
            &[1, 2],
            make_conv,
        ),
        reg("", "MaxPool", 1, &["T"], &[], make_pool),
        reg("", "AveragePool", 1, &["T"], &[], make_pool),
        reg("", "GlobalAveragePool", 1, &["T"], &[], make_gap),
        reg(
            "",
            "BatchNormalization",
            9,
            &["T", "T", "T", "T", "T"],
            &[1, 2, 3, 4],
            make_batchnorm,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_plans_cover_onnx_shapes() {
        let p = matmul_plan(&[2, 3, 4], &[4, 5]).unwrap();
        assert_eq!(
            (p.m, p.n, p.k, p.batch, p.stride_a, p.stride_b),
            (3, 5, 4, 2, 12, 0)
        );
        assert_eq!(p.out, vec![2, 3, 5]);
        let p = matmul_plan(&[2, 3, 4], &[2, 4, 5]).unwrap();
        assert_eq!((p.batch, p.stride_a, p.stride_b), (2, 12, 20));
        let p = matmul_plan(&[3, 4], &[2, 4, 5]).unwrap();
        assert_eq!(
            (p.batch, p.stride_a, p.stride_b, p.out.clone()),
            (2, 0, 20, vec![2, 3, 5])
        );
        let p = matmul_plan(&[4], &[4, 5]).unwrap();
        assert_eq!((p.m, p.out.clone()), (1, vec![5]));
        let p = matmul_plan(&[3, 4], &[4]).unwrap();
        assert_eq!((p.n, p.out.clone()), (1, vec![3]));
        assert!(matmul_plan(&[3, 4], &[5, 6]).is_err());
        // Mixed broadcasting: one gemm per product, each reading its own A and B.
        let p = matmul_plan(&[3, 1, 3, 4], &[1, 2, 4, 2]).unwrap();
        assert_eq!(p.out, vec![3, 2, 3, 2]);
        assert_eq!(
            (0..p.batch).map(|i| p.pair(i)).collect::<Vec<_>>(),
            vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
        );
        // Empty operands with huge dimensions: a plan, or a clear error, never an
        // allocation sized by the batch or an overflow.
        let p = matmul_plan(&[1 << 20, 1, 0, 4], &[1, 1 << 20, 4, 5]).unwrap();
        assert_eq!(
            (p.batch, p.out.clone()),
            (1 << 40, vec![1 << 20, 1 << 20, 0, 5])
        );
        let e = matmul_plan(&[0, 1 << 40, 1 << 40], &[1 << 40, 2]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
    }

    fn attrs(pads: &[i64], strides: &[i64], auto_pad: &str, ceil: bool) -> WindowAttrs {
        WindowAttrs {
            auto_pad: auto_pad.into(),
            kernel: None,
            strides: Some(strides.to_vec()),
            pads: Some(pads.to_vec()),
            dilations: None,
            ceil,
        }
    }

    #[test]
    fn windows_resolve_as_onnx_says() {
        // ResNet's stem: 7x7 stride 2 pad 3 over 224 -> 112.
        let g = attrs(&[3, 3, 3, 3], &[2, 2], "NOTSET", false)
            .resolve(3, &[224, 224], &[7, 7], "Conv")
            .unwrap();
        assert_eq!((g.oh, g.ow, g.ph, g.pw), (112, 112, 3, 3));
        // SAME_UPPER with stride 2 over 5: out 3, total pad 2 (1 before).
        let g = attrs(&[], &[2, 2], "SAME_UPPER", false)
            .resolve(1, &[5, 5], &[3, 3], "Conv")
            .unwrap();
        assert_eq!((g.oh, g.ph), (3, 1));
        let g = attrs(&[], &[2, 2], "SAME_LOWER", false)
            .resolve(1, &[6, 6], &[3, 3], "Conv")
            .unwrap();
        assert_eq!((g.oh, g.ph), (3, 1));
        // ceil_mode: 3x3 stride 2 over 6 -> 3 (floor gives 2).
        let g = attrs(&[0, 0, 0, 0], &[2, 2], "NOTSET", true)
            .resolve(1, &[6, 6], &[3, 3], "MaxPool")
            .unwrap();
        assert_eq!(g.oh, 3);
        let g = attrs(&[0, 0, 0, 0], &[2, 2], "NOTSET", false)
            .resolve(1, &[6, 6], &[3, 3], "MaxPool")
            .unwrap();
        assert_eq!(g.oh, 2);
        // 1-D runs as height 1.
        let g = attrs(&[1, 1], &[1], "NOTSET", false)
            .resolve(4, &[10], &[3], "Conv")
            .unwrap();
        assert_eq!((g.h, g.oh, g.kh, g.w, g.ow, g.pw), (1, 1, 1, 10, 10, 1));
        // Attributes that would overflow the window arithmetic are refused, not wrapped.
        for (pads, strides) in [
            (vec![1i64 << 40, 0, 0, 0], vec![1, 1]),
            (vec![0; 4], vec![i64::MAX, 1]),
        ] {
            let e = attrs(&pads, &strides, "NOTSET", false)
                .resolve(1, &[5, 5], &[3, 3], "Conv")
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        }
        // So are extents past any real tensor (an empty X may claim them).
        let e = attrs(&[0; 4], &[1, 1], "NOTSET", false)
            .resolve(1, &[1 << 50, 5], &[3, 3], "Conv")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        // Three spatial dimensions decline.
        let e = attrs(&[], &[1, 1, 1], "NOTSET", false)
            .resolve(1, &[4, 4, 4], &[1, 1, 1], "Conv")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unimplemented);
    }
}
