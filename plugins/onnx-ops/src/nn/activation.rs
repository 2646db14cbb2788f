//! What opreg's fused operators (`FusedConv`, `FusedMatMul`) apply after the bias, in the same
//! pass over the output: the graph passes `conv-activation`, `gelu` and `matmul-add` fuse a
//! product and the activation reading it into one node. The attribute names are ONNX
//! Runtime's `FusedConv` ones (`activation`, `activation_params`).

use opreg_sdk::numeric::Real;
use opreg_sdk::prelude::*;

/// An activation applied in a fused kernel's epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Activation {
    None,
    Relu,
    Clip(f32, f32),
    LeakyRelu(f32),
    /// `v * sigmoid(v)` (opreg's own activation name; the pass `conv-activation` writes it).
    SiLU,
    /// The exact (erf) GELU, `v / 2 * (1 + erf(v / sqrt 2))`, as ONNX's `Gelu` with
    /// `approximate = "none"` (the pass `gelu` recognizes it as exporters write it).
    Gelu,
}

impl Activation {
    /// The node's `activation` / `activation_params` attributes; `op` names it in errors.
    pub(crate) fn from_node(node: &NodeInfo<'_>, op: &str) -> Result<Self, PluginError> {
        let params = node.floats("activation_params")?.unwrap_or_default();
        let param = |i: usize, what: &str| {
            params.get(i).copied().ok_or_else(|| {
                PluginError::invalid(format!(
                    "{op}: activation_params needs {what} for this activation"
                ))
            })
        };
        Ok(match node.string_or("activation", "")?.as_str() {
            "" => Activation::None,
            "Relu" => Activation::Relu,
            "Clip" => Activation::Clip(param(0, "min")?, param(1, "max")?),
            "LeakyRelu" => Activation::LeakyRelu(param(0, "alpha")?),
            "SiLU" => Activation::SiLU,
            "Gelu" => Activation::Gelu,
            other => {
                return Err(PluginError::unimplemented(format!(
                    "{op}: activation '{other}' is not supported"
                )))
            }
        })
    }

    /// The activation of one value. `#[inline(always)]`: the epilogue loops call it with the
    /// activation fixed outside the loop, and must see through it to vectorize.
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            // As Clip does: NaN stays NaN.
            Activation::Clip(lo, hi) => {
                if v < lo {
                    lo
                } else if v > hi {
                    hi
                } else {
                    v
                }
            }
            Activation::LeakyRelu(a) => {
                if v < 0.0 {
                    a * v
                } else {
                    v
                }
            }
            Activation::SiLU => v * v.sigmoid(),
            Activation::Gelu => {
                0.5 * v * (1.0 + Real::erf(v * std::f64::consts::FRAC_1_SQRT_2 as f32))
            }
        }
    }
}
