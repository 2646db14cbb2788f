//! A naive reference BLAS backend for unit tests.

use opreg_sdk::{half::bf16, prelude::*};

/// Triple-loop gemm honouring layout, transposes, alpha, beta and leading dimensions (f32);
/// row-major, untransposed, `beta` 0 for the integer and bf16 flavours.
pub(crate) struct NaiveBlas;

impl Blas for NaiveBlas {
    fn supports(&self, g: &GemmArgs) -> bool {
        g.flags == 0
            && g.batch <= 1
            && g.epilogue == Epilogue::NONE
            && g.bias.is_null()
            && (g.types == GemmTypes::F32
                || (g.types.is_integer()
                    && g.types.c == DType::I32
                    && g.layout == Layout::ROW_MAJOR
                    && g.trans_a == Transpose::NO)
                || (g.types.a == DType::BF16
                    && g.types.b == DType::BF16
                    && matches!(g.types.c, DType::BF16 | DType::F32)
                    && g.layout == Layout::ROW_MAJOR
                    && g.trans_a == Transpose::NO
                    && g.trans_b == Transpose::NO
                    && g.beta == 0.0))
    }

    fn gemm(&self, _ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        if g.types.is_integer() {
            // SAFETY: the caller's operands cover what `g` describes.
            unsafe { integer(g) };
            return Ok(());
        }
        if g.types.a == DType::BF16 {
            // SAFETY: as above.
            unsafe { bf16_product(g) };
            return Ok(());
        }
        assert_eq!(g.types, GemmTypes::F32);
        let a = g.a.cast::<f32>();
        let b = g.b.cast::<f32>();
        let c = g.c.cast::<f32>();
        // Element (r, col) of a stored matrix with leading dimension ld.
        let at = |p: *const f32, ld: usize, r: usize, col: usize| -> f32 {
            let i = match g.layout {
                Layout::COL_MAJOR => col * ld + r,
                _ => r * ld + col,
            };
            // SAFETY: the caller passes operands covering the described matrices.
            unsafe { *p.add(i) }
        };
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0.0f32;
                for p in 0..g.k {
                    let av = match g.trans_a {
                        Transpose::YES => at(a, g.lda, p, i),
                        _ => at(a, g.lda, i, p),
                    };
                    let bv = match g.trans_b {
                        Transpose::YES => at(b, g.ldb, j, p),
                        _ => at(b, g.ldb, p, j),
                    };
                    acc += av * bv;
                }
                let ci = match g.layout {
                    Layout::COL_MAJOR => j * g.ldc + i,
                    _ => i * g.ldc + j,
                };
                // SAFETY: as above.
                unsafe {
                    let prev = if g.beta == 0.0 {
                        0.0
                    } else {
                        g.beta * *c.add(ci)
                    };
                    *c.add(ci) = g.alpha * acc + prev;
                }
            }
        }
        Ok(())
    }
}

/// [`NaiveBlas`] that also takes the f32 epilogues (a bias per column or per row, the
/// activations of ABI 1.7), applied after the product with the operators' own formulas: the
/// operators' paths that hand their bias and activation to the BLAS run through it in tests.
pub(crate) struct NaiveEpilogueBlas;

impl NaiveEpilogueBlas {
    fn plain(g: &GemmArgs) -> GemmArgs {
        let mut p = *g;
        p.flags &= !GemmArgs::BIAS_PER_ROW;
        p.epilogue = Epilogue::NONE;
        p.bias = std::ptr::null();
        p
    }

    fn activation(e: Epilogue) -> Option<crate::nn::activation::Activation> {
        use crate::nn::activation::Activation;
        Some(match e {
            Epilogue::NONE => Activation::None,
            Epilogue::RELU => Activation::Relu,
            Epilogue::RELU6 => Activation::Clip(0.0, 6.0),
            Epilogue::SILU => Activation::SiLU,
            Epilogue::GELU => Activation::Gelu,
            _ => return None,
        })
    }
}

impl Blas for NaiveEpilogueBlas {
    fn supports(&self, g: &GemmArgs) -> bool {
        g.types == GemmTypes::F32
            && Self::activation(g.epilogue).is_some()
            && NaiveBlas.supports(&Self::plain(g))
    }

    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        let act = Self::activation(g.epilogue)
            .ok_or_else(|| PluginError::unimplemented("naive blas: unknown epilogue"))?;
        NaiveBlas.gemm(ctx, &Self::plain(g))?;
        let per_row = g.flags & GemmArgs::BIAS_PER_ROW != 0;
        let (c, bias) = (g.c.cast::<f32>(), g.bias.cast::<f32>());
        for i in 0..g.m {
            for j in 0..g.n {
                let at = match g.layout {
                    Layout::COL_MAJOR => j * g.ldc + i,
                    _ => i * g.ldc + j,
                };
                // SAFETY: the caller's C covers the product; the bias has m or n values.
                unsafe {
                    let b = if bias.is_null() {
                        0.0
                    } else {
                        *bias.add(if per_row { i } else { j })
                    };
                    *c.add(at) = act.apply(*c.add(at) + b);
                }
            }
        }
        Ok(())
    }
}

/// [`NaiveBlas`] that also requantizes integer products by per-column multipliers
/// (`GemmArgs::REQUANT_MULTIPLIER`) with the SDK's `requant_byte`, after an i32 product: the
/// integer convolution's path that hands its requantization to the BLAS runs through it in
/// tests.
pub(crate) struct NaiveRequantBlas;

thread_local! {
    /// Requantizing products [`NaiveRequantBlas`] ran on this thread: a test checks that the
    /// path it covers was taken.
    pub(crate) static REQUANT_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl NaiveRequantBlas {
    fn sums(g: &GemmArgs, c: &mut [i32]) -> GemmArgs {
        let mut p = *g;
        p.flags = 0;
        p.types.c = DType::I32;
        p.b_scales = std::ptr::null();
        p.bias = std::ptr::null();
        p.c = c.as_mut_ptr().cast();
        p.ldc = g.n;
        p
    }
}

impl Blas for NaiveRequantBlas {
    fn supports(&self, g: &GemmArgs) -> bool {
        if g.flags != GemmArgs::REQUANT_MULTIPLIER {
            return NaiveBlas.supports(g);
        }
        let mut none: [i32; 0] = [];
        matches!(g.types.c, DType::U8 | DType::I8) && NaiveBlas.supports(&Self::sums(g, &mut none))
    }

    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        if g.flags != GemmArgs::REQUANT_MULTIPLIER {
            return NaiveBlas.gemm(ctx, g);
        }
        REQUANT_CALLS.with(|c| c.set(c.get() + 1));
        let mut sums = vec![0i32; g.m * g.n];
        NaiveBlas.gemm(ctx, &Self::sums(g, &mut sums))?;
        let zp = g.c_zero_point;
        let (lo, hi) = opreg_sdk::numeric::requant_bounds(g.types.c == DType::I8, zp);
        for i in 0..g.m {
            for j in 0..g.n {
                // SAFETY: the caller's C covers the product; bias and multipliers n values.
                unsafe {
                    let b = if g.bias.is_null() {
                        0
                    } else {
                        *g.bias.cast::<i32>().add(j)
                    };
                    let q = opreg_sdk::numeric::requant_byte(
                        sums[i * g.n + j].wrapping_add(b),
                        *g.b_scales.add(j),
                        zp,
                        lo,
                        hi,
                    );
                    *g.c.add(i * g.ldc + j) = q;
                }
            }
        }
        Ok(())
    }
}

/// Row-major `a (m x k) * b (k x n)`.
pub(crate) fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

/// The integer flavour: `C = (A - za) (op(B) - zb[j])`, row-major, i32 out.
///
/// # Safety
/// The operands must cover the matrices `g` describes.
unsafe fn integer(g: &GemmArgs) {
    let val = |p: *const u8, i: usize, t: DType| -> i32 {
        // SAFETY: in bounds per the contract.
        let b = unsafe { *p.add(i) };
        if t == DType::I8 {
            b as i8 as i32
        } else {
            b as i32
        }
    };
    let zb = |j: usize| -> i32 {
        if g.b_zero_points.is_null() {
            0
        } else {
            // SAFETY: `b_quant_len` entries.
            unsafe { *g.b_zero_points.add(if g.b_quant_len == 1 { 0 } else { j }) }
        }
    };
    for i in 0..g.m {
        for j in 0..g.n {
            let mut acc = 0i32;
            for p in 0..g.k {
                let bi = if g.trans_b == Transpose::YES {
                    j * g.ldb + p
                } else {
                    p * g.ldb + j
                };
                acc += (val(g.a, i * g.lda + p, g.types.a) - g.a_zero_point)
                    * (val(g.b, bi, g.types.b) - zb(j));
            }
            // SAFETY: as above.
            unsafe { *g.c.cast::<i32>().add(i * g.ldc + j) = acc };
        }
    }
}

/// The bf16 flavour: row-major `C = alpha * A * B`, summed in f32, C bf16 or f32.
///
/// # Safety
/// The operands must cover the matrices `g` describes.
unsafe fn bf16_product(g: &GemmArgs) {
    // SAFETY: in bounds per the contract.
    let w = |p: *const u8, i: usize| bf16::from_bits(unsafe { *p.cast::<u16>().add(i) }).to_f32();
    for i in 0..g.m {
        for j in 0..g.n {
            let acc: f32 = (0..g.k)
                .map(|p| w(g.a, i * g.lda + p) * w(g.b, p * g.ldb + j))
                .sum();
            let (v, ci) = (g.alpha * acc, i * g.ldc + j);
            // SAFETY: as above.
            unsafe {
                if g.types.c == DType::BF16 {
                    *g.c.cast::<u16>().add(ci) = bf16::from_f32(v).to_bits();
                } else {
                    *g.c.cast::<f32>().add(ci) = v;
                }
            }
        }
    }
}

/// [`NaiveBlas`] that pre-packs an f32 B (`op(B)` copied row-major, `k x n`) or a row-major
/// bf16 one (copied). Operators that pack their constant weights at load (and then absorb
/// them, ABI 1.8) run through it in tests.
pub(crate) struct NaivePackingBlas;

impl NaivePackingBlas {
    /// What a B of `g` packed into `bytes` bytes records.
    fn info(g: &GemmArgs, bytes: usize) -> PackedInfo {
        PackedInfo {
            types: g.types,
            trans_b: g.trans_b,
            k: g.k,
            n: g.n,
            bytes,
            device: Device::CPU,
            memory: MemoryType::DEVICE,
            flags: 0,
        }
    }
}

impl Blas for NaivePackingBlas {
    fn supports(&self, g: &GemmArgs) -> bool {
        NaiveBlas.supports(g)
    }

    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        NaiveBlas.gemm(ctx, g)
    }

    fn pack_b(&self, _ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<PackedB, PluginError> {
        if g.types.a == DType::BF16 && self.supports(g) {
            // SAFETY: the caller's B covers `k x n` with leading dimension `ldb`.
            let dense: Vec<u16> = (0..g.k * g.n)
                .map(|e| unsafe { *g.b.cast::<u16>().add(e / g.n * g.ldb + e % g.n) })
                .collect();
            let bytes = dense.len() * 2;
            return Ok(PackedB::new(dense, Self::info(g, bytes)));
        }
        if g.types != GemmTypes::F32 || g.flags != 0 || g.layout != Layout::ROW_MAJOR {
            return Err(PluginError::unimplemented("packs row-major f32 B only"));
        }
        let b = g.b.cast::<f32>();
        let mut dense = Vec::with_capacity(g.k * g.n);
        for p in 0..g.k {
            for j in 0..g.n {
                let i = match g.trans_b {
                    Transpose::YES => j * g.ldb + p,
                    _ => p * g.ldb + j,
                };
                // SAFETY: the caller's B covers `op(B)` as `g` describes it.
                dense.push(unsafe { *b.add(i) });
            }
        }
        let info = Self::info(g, dense.len() * 4);
        Ok(PackedB::new(dense, info))
    }

    fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        g: &GemmArgs,
        packed: &PackedB,
    ) -> Result<(), PluginError> {
        let mut plain = *g;
        plain.b = match (packed.downcast::<Vec<f32>>(), packed.downcast::<Vec<u16>>()) {
            (Some(dense), _) => dense.as_ptr().cast(),
            (_, Some(dense)) => dense.as_ptr().cast(),
            _ => return Err(PluginError::invalid("not packed by NaivePackingBlas")),
        };
        plain.trans_b = Transpose::NO;
        plain.ldb = g.n;
        NaiveBlas.gemm(ctx, &plain)
    }
}

/// [`NaiveEpilogueBlas`] with the bf16 flavour's bias and activation epilogues (row-major,
/// untransposed): the operands (and C, with `beta`) widened, the f32 product and its epilogue computed
/// there, C rounded to bf16. Counts the bf16 products it ran ([`NaiveBf16Blas::calls`]), so a
/// test sees which path an operator took.
pub(crate) struct NaiveBf16Blas(pub std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl NaiveBf16Blas {
    fn is_bf16(g: &GemmArgs) -> bool {
        g.types.a == DType::BF16 && g.types.b == DType::BF16 && g.types.c == DType::BF16
    }

    /// The f32 arguments of a bf16 product (pointers left to the caller).
    fn widened(g: &GemmArgs) -> GemmArgs {
        let mut f = *g;
        f.types = GemmTypes::F32;
        f
    }
}

impl Blas for NaiveBf16Blas {
    fn supports(&self, g: &GemmArgs) -> bool {
        if !Self::is_bf16(g) {
            return NaiveEpilogueBlas.supports(g);
        }
        g.layout == Layout::ROW_MAJOR
            && g.trans_a == Transpose::NO
            && g.trans_b == Transpose::NO
            && NaiveEpilogueBlas.supports(&Self::widened(g))
    }

    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        if !Self::is_bf16(g) {
            return NaiveEpilogueBlas.gemm(ctx, g);
        }
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wide = |p: *const u8, rows: usize, cols: usize, ld: usize| -> Vec<f32> {
            (0..rows * cols)
                // SAFETY: the caller's operand covers `rows x cols` with leading dimension `ld`.
                .map(|e| unsafe { *p.cast::<u16>().add(e / cols * ld + e % cols) })
                .map(|v| bf16::from_bits(v).to_f32())
                .collect()
        };
        let (a, b) = (wide(g.a, g.m, g.k, g.lda), wide(g.b, g.k, g.n, g.ldb));
        let mut c = if g.beta == 0.0 {
            vec![0f32; g.m * g.n]
        } else {
            wide(g.c, g.m, g.n, g.ldc)
        };
        let mut f = Self::widened(g);
        (f.a, f.lda, f.b, f.ldb) = (a.as_ptr().cast(), g.k, b.as_ptr().cast(), g.n);
        (f.c, f.ldc) = (c.as_mut_ptr().cast(), g.n);
        NaiveEpilogueBlas.gemm(ctx, &f)?;
        for (e, v) in c.iter().enumerate() {
            // SAFETY: the caller's C covers `m x n` with leading dimension `ldc`.
            unsafe {
                *g.c.cast::<u16>().add(e / g.n * g.ldc + e % g.n) = bf16::from_f32(*v).to_bits()
            };
        }
        Ok(())
    }
}
