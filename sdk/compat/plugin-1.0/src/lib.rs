//! A plugin built against the frozen ABI 1.0 SDK. It uses as much of the 1.0 surface as a real
//! plugin does, so that the compatibility test exercises it across SDK changes:
//!
//! - `compat.v1::Dense(x, W[, b])`: attributes read through the node accessors (`alpha`,
//!   `activation`), W pre-packed at load through the BLAS backend with the load-time context,
//!   `y = act(alpha * x @ W + b)` through GEMM v1 (bias and epilogue in the BLAS when it
//!   supports them, here otherwise), output allocated through the kernel context;
//! - `compat.v1::Checksum(x)`: `parallel_for`, scratch memory, logging, `cancelled`;
//! - a quantizer (`compat-minmax`) and `init`/`shutdown`.

use opreg_sdk::prelude::*;
use std::sync::Arc;

struct Dense {
    alpha: f32,
    activation: Epilogue,
    packed: Option<Arc<PackedB>>,
}

fn epilogue_of(name: &str) -> Result<Epilogue, PluginError> {
    match name {
        "" | "none" => Ok(Epilogue::NONE),
        "relu" => Ok(Epilogue::RELU),
        other => Err(PluginError::invalid(format!(
            "compat.v1::Dense: unknown activation '{other}'"
        ))),
    }
}

impl Kernel for Dense {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let (x, w) = match inputs {
            [x, w, ..] => (x, w),
            _ => return Err(PluginError::invalid("Dense takes x and W")),
        };
        let (&[m, k], &[k2, n]) = (x.shape(), w.shape()) else {
            return Err(PluginError::invalid("Dense takes 2-D x and W"));
        };
        if k != k2 {
            return Err(PluginError::invalid("Dense: inner dimensions differ"));
        }
        let bias = match inputs.get(2).filter(|b| !b.is_absent()) {
            Some(b) => Some(b.as_slice::<f32>()?),
            None => None,
        };
        if bias.is_some_and(|b| b.len() != n) {
            return Err(PluginError::invalid("Dense: bias must have N elements"));
        }
        let xs = x.as_slice::<f32>()?;
        let ws = w.as_slice::<f32>()?;
        let y = ctx.output_slice::<f32>(0, &[m, n])?;
        let blas = ctx
            .blas()
            .ok_or_else(|| PluginError::unimplemented("Dense needs a BLAS backend"))?;
        let mut g = GemmArgs::f32(m, n, k, xs, ws, y)?;
        g.alpha = self.alpha;
        g.epilogue = self.activation;
        if let Some(b) = bias {
            g.bias = b.as_ptr().cast();
        }
        let fused = blas.supports(&g);
        if !fused {
            g.epilogue = Epilogue::NONE;
            g.bias = std::ptr::null();
        }
        match &self.packed {
            Some(p) if p.info().k == k && p.info().n == n => blas.gemm_packed(ctx, &g, p)?,
            _ => blas.gemm(ctx, &g)?,
        }
        if !fused {
            for row in y.chunks_mut(n.max(1)) {
                for (j, v) in row.iter_mut().enumerate() {
                    *v += bias.map_or(0.0, |b| b[j]);
                    if self.activation == Epilogue::RELU {
                        *v = v.max(0.0);
                    }
                }
            }
        }
        Ok(())
    }
}

fn dense(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let alpha = node.float_or("alpha", 1.0)?;
    let activation = epilogue_of(&node.string_or("activation", "none")?)?;
    // W constant: pack it once, now, with the load-time context.
    let packed = (|| {
        let w = node.inputs.get(1)?.constant?;
        let &[k, n] = w.shape() else { return None };
        let ws = w.as_slice::<f32>().ok()?;
        let mut g = GemmArgs::new(GemmTypes::F32, 1, n, k);
        g.b = ws.as_ptr().cast();
        node.blas()?
            .pack_b(node.context.as_ref()?, &g)
            .ok()
            .map(Arc::new)
    })();
    Ok(Box::new(Dense {
        alpha,
        activation,
        packed,
    }))
}

#[derive(Clone)]
struct Checksum;

impl Kernel for Checksum {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = inputs
            .first()
            .ok_or_else(|| PluginError::invalid("Checksum takes x"))?
            .as_slice::<f32>()?;
        let chunks = x.len().div_ceil(64).max(1);
        let partial = ctx.scratch::<f64>(chunks)?;
        let slots = std::sync::Mutex::new(partial);
        ctx.parallel_for(chunks, 1, |range| {
            for c in range {
                let s: f64 = x.iter().skip(c * 64).take(64).map(|&v| v as f64).sum();
                slots
                    .lock()
                    .map_err(|_| PluginError::internal("poisoned"))?[c] = s;
            }
            Ok(())
        })?;
        if ctx.cancelled() {
            return Err(PluginError::internal("cancelled"));
        }
        let total: f64 = slots
            .into_inner()
            .map_err(|_| PluginError::internal("poisoned"))?
            .iter()
            .sum();
        ctx.log(LogLevel::DEBUG, &format!("checksum of {} values", x.len()));
        ctx.output_slice::<f32>(0, &[])?[0] = total as f32;
        Ok(())
    }
}

struct MinMax;

impl Quantizer for MinMax {
    fn observation(&self) -> Observation {
        Observation::MIN_MAX
    }

    fn plan(&self, request: &QuantRequest) -> Result<QuantPlan, PluginError> {
        let tensors = request
            .tensors
            .iter()
            .map(|t| {
                let (lo, hi) = (t.min.min(0.0), t.max.max(0.0));
                let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
                opreg_sdk::quant::TensorPlan {
                    name: t.name.clone(),
                    directive: Directive::per_tensor(
                        scale,
                        (-lo / scale).round() as i32,
                        DType::U8,
                    ),
                }
            })
            .collect();
        Ok(QuantPlan {
            tensors,
            notes: "compat v1 min-max".into(),
        })
    }
}

fn init(_config: &str) -> Result<(), PluginError> {
    Ok(())
}

fn shutdown() {}

fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("compat.v1", "Dense", 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T", "T", "T"])
            .outputs(&["T"]),
        dense,
    );
    r.kernel(
        KernelDesc::new("compat.v1", "Checksum", 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"]),
        stateless(Checksum),
    );
    r.quantizer(
        QuantizerDesc {
            name: "compat-minmax".into(),
            description: "built against the frozen 1.0 SDK".into(),
        },
        MinMax,
    );
}

opreg_sdk::export_plugin! {
    name: "compat-v1",
    version: env!("CARGO_PKG_VERSION"),
    description: "built against the frozen ABI 1.0 SDK (compatibility test)",
    init: init,
    register: register,
    shutdown: shutdown,
}
