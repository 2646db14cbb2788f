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

    /// The BLAS epilogue that computes this activation with the same formula (and so the same
    /// bits) inside the gemm's tiles (ABI 1.7), where there is one: a product with a bias and
    /// this activation then needs no pass of its own over the output.
    pub(crate) fn blas_epilogue(self) -> Option<Epilogue> {
        match self {
            Activation::None => Some(Epilogue::NONE),
            Activation::Relu => Some(Epilogue::RELU),
            Activation::Clip(lo, hi) if lo == 0.0 && hi == 6.0 => Some(Epilogue::RELU6),
            Activation::SiLU => Some(Epilogue::SILU),
            Activation::Gelu => Some(Epilogue::GELU),
            Activation::Clip(..) | Activation::LeakyRelu(_) => None,
        }
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

#[cfg(target_arch = "x86_64")]
impl Activation {
    /// [`apply`](Self::apply) on the 16 lanes of an AVX-512 register, with its bits (NaN
    /// included: `max`/`min` return their second operand when either is NaN). The AVX-512
    /// epilogues of the direct and depthwise convolutions share it.
    ///
    /// `#[inline(always)]`, not `#[target_feature]` (the two may not be combined): it is
    /// inlined into the AVX-512 kernels that call it, whose feature then compiles its
    /// intrinsics. As an `#[inline]` target-feature function it was inlined or not by the
    /// callers' sizes: when a channels-last store joined the direct convolution's, it went out
    /// of line in both and cost 5 % of a small CNN.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(crate) unsafe fn apply512(self, v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        /// `f` on each lane of `v`: compiled for AVX-512 with the activation fixed, the loop
        /// vectorizes (the exponential included).
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn lanes(v: __m512, f: impl Fn(f32) -> f32) -> __m512 {
            let mut l = [0f32; 16];
            // SAFETY: `l` holds 16 floats.
            unsafe { _mm512_storeu_ps(l.as_mut_ptr(), v) };
            for x in &mut l {
                *x = f(*x);
            }
            // SAFETY: as above.
            unsafe { _mm512_loadu_ps(l.as_ptr()) }
        }
        // SAFETY: the CPU has AVX-512F (caller).
        unsafe {
            match self {
                Activation::None => v,
                // f32::max(NaN, 0) is 0.
                Activation::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
                // NaN stays NaN.
                Activation::Clip(lo, hi) => {
                    _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), v))
                }
                // `v < 0` is false for NaN, which stays.
                Activation::LeakyRelu(a) => {
                    let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_setzero_ps());
                    _mm512_mask_mul_ps(v, neg, v, _mm512_set1_ps(a))
                }
                Activation::SiLU => lanes(v, |x| Activation::SiLU.apply(x)),
                Activation::Gelu => lanes(v, |x| Activation::Gelu.apply(x)),
            }
        }
    }

    /// [`apply512`](Self::apply512) on the 8 lanes of an AVX2 register (the AVX2 epilogues
    /// of the direct convolution), with the same bits.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline(always)]
    pub(crate) unsafe fn apply256(self, v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        /// `f` on each lane of `v` (see `apply512`).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn lanes(v: __m256, f: impl Fn(f32) -> f32) -> __m256 {
            let mut l = [0f32; 8];
            // SAFETY: `l` holds 8 floats.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
            for x in &mut l {
                *x = f(*x);
            }
            // SAFETY: as above.
            unsafe { _mm256_loadu_ps(l.as_ptr()) }
        }
        // SAFETY: the CPU has AVX2 and FMA (caller).
        unsafe {
            match self {
                Activation::None => v,
                // `max_ps(v, 0)` is 0 for NaN, as f32::max(NaN, 0).
                Activation::Relu => _mm256_max_ps(v, _mm256_setzero_ps()),
                // NaN stays NaN (`max_ps`/`min_ps` return their second operand on NaN).
                Activation::Clip(lo, hi) => {
                    _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), v))
                }
                // `v < 0` is false for NaN, which stays.
                Activation::LeakyRelu(a) => {
                    let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps());
                    _mm256_blendv_ps(v, _mm256_mul_ps(v, _mm256_set1_ps(a)), neg)
                }
                Activation::SiLU => lanes(v, |x| Activation::SiLU.apply(x)),
                Activation::Gelu => lanes(v, |x| Activation::Gelu.apply(x)),
            }
        }
    }
}
