//! ONNX's preview-training optimizers (domain `ai.onnx.preview.training`, opset 1): Adagrad,
//! Adam and Momentum.
//!
//! Each takes a learning rate `R` (a scalar), an iteration count `T` (an i64 scalar), then its
//! tensors grouped by role rather than by optimized tensor: every X, then every gradient G,
//! then the state tensors (Adagrad: H; Adam: V then H; Momentum: V). The outputs are the
//! updated X, then the updated state tensors, in the same order. Tensors of one group (X_i,
//! G_i and its state) share a shape.
//!
//! Arithmetic follows ONNX's reference implementation (its `aionnx_preview_training` ops): the
//! elementwise updates run in the tensors' own type (f32 or f64), as numpy's do when an array
//! meets a Python float, while the scalar learning-rate adjustments of Adagrad and Adam (which
//! involve the i64 iteration count, so numpy promotes them to f64) are computed in f64, and so
//! is the step that applies them to X, before it is rounded to X's type.

use crate::util::{all_present, floats_as_f64, scalar_i64, Factory};
use opreg_sdk::numeric::Real;
use opreg_sdk::prelude::*;

/// The operators' domain.
const DOMAIN: &str = "ai.onnx.preview.training";

/// The floating-point types of `R` (T1) and the optimized tensors (T3).
const TYPES: &[DType] = &[DType::F32, DType::F64];

/// An optimizer's update rule, with its attributes (as written: f32).
#[derive(Clone, Copy, Debug)]
enum Rule {
    Adagrad {
        decay_factor: f32,
        epsilon: f32,
        norm_coefficient: f32,
    },
    Adam {
        alpha: f32,
        beta: f32,
        epsilon: f32,
        norm_coefficient: f32,
        norm_coefficient_post: f32,
    },
    Momentum {
        alpha: f32,
        beta: f32,
        norm_coefficient: f32,
        nesterov: bool,
    },
}

impl Rule {
    fn op(&self) -> &'static str {
        match self {
            Rule::Adagrad { .. } => "Adagrad",
            Rule::Adam { .. } => "Adam",
            Rule::Momentum { .. } => "Momentum",
        }
    }

    /// Tensors per optimized tensor: X, G and the state tensors.
    fn group(&self) -> usize {
        match self {
            Rule::Adagrad { .. } | Rule::Momentum { .. } => 3,
            Rule::Adam { .. } => 4,
        }
    }

    /// The roles of a group's tensors, for error messages.
    fn roles(&self) -> &'static str {
        match self {
            Rule::Adagrad { .. } => "X, G, H",
            Rule::Adam { .. } => "X, G, V, H",
            Rule::Momentum { .. } => "X, G, V",
        }
    }
}

#[derive(Clone, Debug)]
struct Optimizer {
    rule: Rule,
}

/// A `FLOAT` attribute the schema marks required (Momentum's have no default).
fn required_float(node: &NodeInfo<'_>, op: &str, name: &str) -> Result<f32, PluginError> {
    if node.attr(name).is_none() {
        return Err(PluginError::invalid(format!(
            "{op}: attribute '{name}' is required"
        )));
    }
    node.float_or(name, 0.0)
}

fn adagrad_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Optimizer {
        rule: Rule::Adagrad {
            decay_factor: node.float_or("decay_factor", 0.0)?,
            epsilon: node.float_or("epsilon", 1e-6)?,
            norm_coefficient: node.float_or("norm_coefficient", 0.0)?,
        },
    }))
}

fn adam_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Optimizer {
        rule: Rule::Adam {
            alpha: node.float_or("alpha", 0.9)?,
            beta: node.float_or("beta", 0.999)?,
            epsilon: node.float_or("epsilon", 1e-6)?,
            norm_coefficient: node.float_or("norm_coefficient", 0.0)?,
            norm_coefficient_post: node.float_or("norm_coefficient_post", 0.0)?,
        },
    }))
}

fn momentum_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    const OP: &str = "Momentum";
    if node.attr("mode").is_none() {
        return Err(PluginError::invalid(
            "Momentum: attribute 'mode' is required",
        ));
    }
    let nesterov = match node.string_or("mode", "")?.as_str() {
        "standard" => false,
        "nesterov" => true,
        other => {
            return Err(PluginError::invalid(format!(
                "Momentum: attribute 'mode' must be \"standard\" or \"nesterov\", got {other:?}"
            )))
        }
    };
    Ok(Box::new(Optimizer {
        rule: Rule::Momentum {
            alpha: required_float(node, OP, "alpha")?,
            beta: required_float(node, OP, "beta")?,
            norm_coefficient: required_float(node, OP, "norm_coefficient")?,
            nesterov,
        },
    }))
}

/// The learning rate `R`: one floating-point value (shape `[]`, or `[1]` as numpy also
/// broadcasts).
fn learning_rate(op: &str, r: &TensorView<'_>) -> Result<f64, PluginError> {
    let values = floats_as_f64(r).unwrap_or_else(|| {
        Err(PluginError::invalid(format!(
            "{op}: input 'R' must be float or double, got {}",
            r.dtype
        )))
    })?;
    match values.as_slice() {
        [v] => Ok(*v),
        _ => Err(PluginError::invalid(format!(
            "{op}: input 'R' must be a scalar, got shape {:?}",
            r.shape()
        ))),
    }
}

impl Optimizer {
    /// Updates every group; `tensors` are the inputs after R and T (`n` groups, checked).
    fn run<E: Real>(
        &self,
        ctx: &KernelContext<'_>,
        rate: f64,
        step: i64,
        tensors: &[TensorView<'_>],
        n: usize,
    ) -> Result<(), PluginError> {
        let op = self.rule.op();
        let group = self.rule.group();
        let e = |v: f32| E::from_f64(v as f64);
        for i in 0..n {
            // Input k*n + i is tensor k (X, G, state...) of group i; read each as E, with
            // X's shape.
            let mut data: Vec<&[E]> = Vec::with_capacity(group);
            let mut shape: &[usize] = &[];
            for k in 0..group {
                let index = k * n + i;
                let t = tensors.get(index).ok_or_else(|| {
                    PluginError::internal(format!("{op}: input {} out of range", index + 2))
                })?;
                if k == 0 {
                    shape = t.shape();
                } else if t.shape() != shape {
                    return Err(PluginError::invalid(format!(
                        "{op}: input {} has shape {:?}, but the tensor it updates (input {}) \
                         has shape {shape:?}",
                        index + 2,
                        t.shape(),
                        i + 2
                    )));
                }
                if t.dtype != E::DTYPE {
                    return Err(PluginError::invalid(format!(
                        "{op}: input {} is {}, but input 2 is {} (the optimized tensors share \
                         one type)",
                        index + 2,
                        t.dtype,
                        E::DTYPE
                    )));
                }
                data.push(t.as_slice::<E>()?);
            }
            let (x, g, s1, s2) = match (self.rule, data.as_slice()) {
                (Rule::Adam { .. }, &[x, g, v, h]) => (x, g, v, Some(h)),
                (_, &[x, g, s]) => (x, g, s, None),
                _ => return Err(PluginError::internal(format!("{op}: malformed group"))),
            };
            let x_new = ctx.output_slice::<E>(i, shape)?;
            let s1_new = ctx.output_slice::<E>(n + i, shape)?;
            match self.rule {
                Rule::Adagrad {
                    decay_factor,
                    epsilon,
                    norm_coefficient,
                } => {
                    // r / (1 + t * decay): f64 in numpy (an i64 array times a Python float).
                    let r = rate / (1.0 + step as f64 * decay_factor as f64);
                    let (nc, eps) = (e(norm_coefficient), e(epsilon));
                    for (((xo, ho), &x), (&g, &h)) in x_new
                        .iter_mut()
                        .zip(s1_new.iter_mut())
                        .zip(x)
                        .zip(g.iter().zip(s1))
                    {
                        let g = nc * x + g;
                        let h = h + g * g;
                        let denom = h.sqrt() + eps;
                        *ho = h;
                        *xo = E::from_f64(x.to_f64() - r * g.to_f64() / denom.to_f64());
                    }
                }
                Rule::Adam {
                    alpha,
                    beta,
                    epsilon,
                    norm_coefficient,
                    norm_coefficient_post,
                } => {
                    let (alpha, beta) = (alpha as f64, beta as f64);
                    // Bias correction of both momentums from the second iteration on.
                    let r = if step > 0 {
                        let t = step as f64;
                        rate * (1.0 - beta.powf(t)).sqrt() / (1.0 - alpha.powf(t))
                    } else {
                        rate
                    };
                    let h = s2.ok_or_else(|| PluginError::internal("Adam: H missing"))?;
                    let h_new = ctx.output_slice::<E>(2 * n + i, shape)?;
                    let (nc, eps) = (e(norm_coefficient), e(epsilon));
                    // `1 - alpha` is computed on Python floats, then meets the array.
                    let (a, a1) = (E::from_f64(alpha), E::from_f64(1.0 - alpha));
                    let (b, b1) = (E::from_f64(beta), E::from_f64(1.0 - beta));
                    let post = 1.0 - norm_coefficient_post as f64;
                    for ((((xo, vo), ho), (&x, &g)), (&v, &h)) in x_new
                        .iter_mut()
                        .zip(s1_new.iter_mut())
                        .zip(h_new.iter_mut())
                        .zip(x.iter().zip(g))
                        .zip(s1.iter().zip(h))
                    {
                        let g = nc * x + g;
                        let v = a * v + a1 * g;
                        let h = b * h + b1 * (g * g);
                        let denom = h.sqrt() + eps;
                        *vo = v;
                        *ho = h;
                        *xo = E::from_f64(post * (x.to_f64() - r * (v / denom).to_f64()));
                    }
                }
                Rule::Momentum {
                    alpha,
                    beta,
                    norm_coefficient,
                    nesterov,
                } => {
                    // The gradient's coefficient is 1 at the first iteration.
                    let beta = if step > 0 { e(beta) } else { E::ONE };
                    let (nc, a, r) = (e(norm_coefficient), e(alpha), E::from_f64(rate));
                    for (((xo, vo), &x), (&g, &v)) in x_new
                        .iter_mut()
                        .zip(s1_new.iter_mut())
                        .zip(x)
                        .zip(g.iter().zip(s1))
                    {
                        let g = nc * x + g;
                        let v = a * v + beta * g;
                        *vo = v;
                        *xo = if nesterov {
                            x - r * (g + a * v)
                        } else {
                            x - r * v
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

impl Kernel for Optimizer {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = self.rule.op();
        let group = self.rule.group();
        all_present(op, inputs, 2 + group)?;
        let (Some(r), Some(t), Some(tensors)) = (inputs.first(), inputs.get(1), inputs.get(2..))
        else {
            return Err(PluginError::invalid(format!(
                "{op}: inputs R and T are required"
            )));
        };
        if tensors.len() % group != 0 {
            return Err(PluginError::invalid(format!(
                "{op}: {} tensor inputs after R and T, expected a multiple of {group} ({} for \
                 each optimized tensor)",
                tensors.len(),
                self.rule.roles()
            )));
        }
        let n = tensors.len() / group;
        let outputs = n * (group - 1);
        if ctx.num_outputs() != outputs {
            return Err(PluginError::invalid(format!(
                "{op}: {n} optimized tensors give {outputs} outputs, the node has {}",
                ctx.num_outputs()
            )));
        }
        let rate = learning_rate(op, r)?;
        let step = scalar_i64(t, op, "T")?;
        let dtype = tensors.first().map_or(DType::F32, |x| x.dtype);
        opreg_sdk::dispatch!(dtype, [F32, F64], |E| self.run::<E>(ctx, rate, step, tensors, n),
        other => Err(PluginError::invalid(format!(
            "{op}: the optimized tensors must be float or double, got {other}"
        ))))
    }
}

pub fn register(r: &mut Registrar) {
    let ops: [(&str, Factory); 3] = [
        ("Adagrad", adagrad_factory),
        ("Adam", adam_factory),
        ("Momentum", momentum_factory),
    ];
    for (op, factory) in ops {
        r.kernel(
            KernelDesc::new(DOMAIN, op, 1, OPEN_END)
                .constraint("T1", TYPES)
                .constraint("T2", &[DType::I64])
                .constraint("T3", TYPES)
                // The last constraint repeats for the variadic tensors.
                .inputs(&["T1", "T2", "T3"])
                .outputs(&["T3"]),
            factory,
        );
    }
}

#[cfg(test)]
mod tests;
