//! The integer products of `MatMulInteger`, `QLinearMatMul`, `ConvInteger` and `QLinearConv`,
//! through the node's BLAS backend (exact `i32` accumulation with zero points). The operators
//! keep their own loop only as the fallback for what a backend does not support (zero points
//! per row of A, no backend on the device).

use opreg_sdk::prelude::*;

/// `C[i, j] = Σ_k (A[i, k] - a_zp) * (op(B)[k, j] - b_zp[j])` over u8/i8 bytes.
pub(super) struct IntProduct<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A, row-major `m x k` with leading dimension `lda`.
    pub a: &'a [u8],
    pub a_type: DType,
    pub lda: usize,
    pub a_zp: i32,
    /// B: row-major `k x n` (`ldb` >= n), or with `trans_b` row-major `n x k` (`ldb` >= k).
    pub b: &'a [u8],
    pub b_type: DType,
    pub ldb: usize,
    pub trans_b: bool,
    /// One zero point, or one per column of `op(B)`.
    pub b_zp: &'a [i32],
}

/// The requantizing output stage of [`IntProduct::run_requant`]:
/// `y[i, j] = requant_byte(acc[i, j] + bias[j], mult[j], zp, ..)` as a byte of `out` (U8, or
/// I8 as its two's-complement bytes), as QLinearConv requantizes.
pub(super) struct RequantOut<'a> {
    /// One per column.
    pub bias: &'a [i32],
    /// One per column.
    pub mult: &'a [f32],
    pub zp: i32,
    pub out: DType,
}

impl RequantOut<'_> {
    /// The output type's bounds less the zero point, where a product is clamped (exact in
    /// f32: a byte of either type).
    pub fn bounds(&self) -> (f32, f32) {
        opreg_sdk::numeric::requant_bounds(self.out == DType::I8, self.zp)
    }
}

impl IntProduct<'_> {
    fn args(&self, c: &mut [i32], ldc: usize) -> GemmArgs {
        self.args_of(DType::I32, c.as_mut_ptr().cast(), ldc)
    }

    /// The arguments with C of type `c_type` at `c`.
    fn args_of(&self, c_type: DType, c: *mut u8, ldc: usize) -> GemmArgs {
        let mut g = GemmArgs::new(
            GemmTypes {
                a: self.a_type,
                b: self.b_type,
                c: c_type,
            },
            self.m,
            self.n,
            self.k,
        );
        g.a = self.a.as_ptr();
        g.lda = self.lda;
        g.a_zero_point = self.a_zp;
        g.b = self.b.as_ptr();
        g.ldb = self.ldb;
        if self.trans_b {
            g.trans_b = Transpose::YES;
        }
        g.b_zero_points = self.b_zp.as_ptr();
        g.b_quant_len = self.b_zp.len();
        g.c = c;
        g.ldc = ldc;
        g
    }

    /// The arguments of [`run_requant`](Self::run_requant) (C at `c`).
    fn requant_args(&self, rq: &RequantOut<'_>, c: *mut u8, ldc: usize) -> GemmArgs {
        let mut g = self.args_of(rq.out, c, ldc);
        g.flags = GemmArgs::REQUANT_MULTIPLIER;
        g.b_scales = rq.mult.as_ptr();
        g.bias = rq.bias.as_ptr().cast();
        g.c_zero_point = rq.zp;
        g
    }

    /// Whether the node's backend requantizes this product's tiles itself
    /// ([`run_requant`](Self::run_requant) would not answer `Ok(false)`).
    pub fn supports_requant(&self, ctx: &KernelContext<'_>, rq: &RequantOut<'_>) -> bool {
        let g = self.requant_args(rq, std::ptr::null_mut(), self.n);
        ctx.blas().is_some_and(|b| b.supports(&g))
    }

    /// The product requantized by the backend, tile by tile, into `out` (row stride `ldc`):
    /// no i32 sums stored and read back. B from `packed` when it was packed for this
    /// product's operands (with an i32 C: the flag's contract lets it serve). `Ok(false)`
    /// when there is no backend or it does not requantize these operands.
    pub fn run_requant(
        &self,
        ctx: &KernelContext<'_>,
        out: &mut [u8],
        ldc: usize,
        packed: Option<&PackedB>,
        rq: &RequantOut<'_>,
    ) -> Result<bool, PluginError> {
        let Some(blas) = ctx.blas() else {
            return Ok(false);
        };
        if !self.covered(out.len(), ldc) || rq.bias.len() != self.n || rq.mult.len() != self.n {
            return Err(PluginError::internal(
                "integer product: operands shorter than their shapes",
            ));
        }
        let g = self.requant_args(rq, out.as_mut_ptr(), ldc);
        call(ctx, blas, &g, packed.filter(|p| self.fits_operands(p)))
    }

    /// Whether the operands cover what the product reads (so the backend never reads past
    /// them): checked here, on the plugin's side, before any pointer crosses.
    fn covered(&self, c_len: usize, ldc: usize) -> bool {
        let span = |rows: usize, cols: usize, ld: usize| -> Option<usize> {
            if rows == 0 || cols == 0 {
                return Some(0);
            }
            (rows - 1).checked_mul(ld)?.checked_add(cols)
        };
        let (br, bc) = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        let ok = |need: Option<usize>, have: usize| need.is_some_and(|n| n <= have);
        ok(span(self.m, self.k, self.lda), self.a.len())
            && ok(span(br, bc, self.ldb), self.b.len())
            && ok(span(self.m, self.n, ldc), c_len)
            && (self.b_zp.len() == 1 || self.b_zp.len() == self.n)
    }

    /// Runs the product into `c` (row stride `ldc`) through the node's backend. `Ok(false)`
    /// when there is no backend or it does not support these operands: the caller computes
    /// the product itself.
    pub fn run(
        &self,
        ctx: &KernelContext<'_>,
        c: &mut [i32],
        ldc: usize,
    ) -> Result<bool, PluginError> {
        self.run_packed(ctx, c, ldc, None)
    }

    /// [`run`](Self::run) with B taken from `packed` when it was packed for exactly this
    /// product (types, shape, transposition); B itself otherwise.
    pub fn run_packed(
        &self,
        ctx: &KernelContext<'_>,
        c: &mut [i32],
        ldc: usize,
        packed: Option<&PackedB>,
    ) -> Result<bool, PluginError> {
        let Some(blas) = ctx.blas() else {
            return Ok(false);
        };
        if !self.covered(c.len(), ldc) {
            return Err(PluginError::internal(
                "integer product: operands shorter than their shapes",
            ));
        }
        let g = self.args(c, ldc);
        call(ctx, blas, &g, packed.filter(|p| self.fits(p)))
    }

    /// Whether the node's backend runs this product's operand types and options (what
    /// [`run`](Self::run) would answer `Ok(false)` to otherwise), checked before any work.
    pub fn supported(&self, ctx: &KernelContext<'_>) -> bool {
        let mut none: [i32; 0] = [];
        let g = self.args(&mut none, self.n);
        ctx.blas().is_some_and(|b| b.supports(&g))
    }

    /// Whether `packed` was packed for exactly this product's B (types, shape,
    /// transposition), so that [`run_packed`](Self::run_packed) takes it instead of B.
    pub fn fits(&self, packed: &PackedB) -> bool {
        packed.info().types.c == DType::I32 && self.fits_operands(packed)
    }

    /// Whether `packed` was packed for this product's A and B types, shape and transposition
    /// (whatever its C type).
    fn fits_operands(&self, packed: &PackedB) -> bool {
        let info = packed.info();
        let mut none: [i32; 0] = [];
        let g = self.args(&mut none, self.n);
        (info.types.a, info.types.b) == (g.types.a, g.types.b)
            && info.trans_b == g.trans_b
            && info.k == g.k
            && info.n == g.n
    }

    /// B packed by the node's backend at model load (constant weights), or `None` when the
    /// backend does not pre-pack these operands. `a`, `lda` and `a_zp` are not used.
    pub fn pack(&self, node: &NodeInfo<'_>) -> Option<PackedB> {
        let blas = node.blas()?;
        let mut none: [i32; 0] = [];
        let mut g = self.args(&mut none, self.n);
        g.a = std::ptr::null();
        g.c = std::ptr::null_mut();
        let (br, bc) = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        let b_span = br.checked_sub(1)?.checked_mul(self.ldb)?.checked_add(bc)?;
        if b_span > self.b.len() || !(self.b_zp.len() == 1 || self.b_zp.len() == self.n) {
            return None;
        }
        blas.pack_b(node.context.as_ref()?, &g).ok()
    }
}

/// `g` through `blas`, with B from `packed` when given: `Ok(false)` when the backend does not
/// support `g` (nothing written).
fn call(
    ctx: &KernelContext<'_>,
    blas: opreg_sdk::blas::BlasRef<'_>,
    g: &GemmArgs,
    packed: Option<&PackedB>,
) -> Result<bool, PluginError> {
    if !blas.supports(g) {
        return Ok(false);
    }
    match packed {
        Some(p) => blas.gemm_packed(ctx, g, p)?,
        None => blas.gemm(ctx, g)?,
    }
    Ok(true)
}

/// The raw bytes of a u8/i8 tensor (i8 as its two's-complement bytes).
pub(super) fn bytes<'a>(t: &TensorView<'a>, op: &str) -> Result<&'a [u8], PluginError> {
    match t.dtype {
        DType::U8 => t.as_slice::<u8>(),
        DType::I8 => t
            .as_slice::<i8>()
            // SAFETY: i8 and u8 have the same size and alignment; every bit pattern is valid.
            .map(|s| unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len()) }),
        other => Err(PluginError::invalid(format!(
            "{op}: expected u8 or i8, got {other}"
        ))),
    }
}

/// A zero point read as one value per `len` columns: `None` for a shape the BLAS path does
/// not take (the caller falls back).
pub(super) fn zero_points(
    op: &str,
    zp: Option<&TensorView<'_>>,
    of: DType,
    len: usize,
) -> Result<Option<Vec<i32>>, PluginError> {
    let Some(z) = zp else {
        return Ok(Some(vec![0]));
    };
    if z.dtype != of {
        return Err(PluginError::invalid(format!(
            "{op}: a zero point is {} but its tensor is {of}",
            z.dtype
        )));
    }
    let v = super::read_i32(z, op)?;
    Ok(match v.len() {
        1 => Some(v),
        l if l == len && z.rank() == 1 => Some(v),
        _ => None,
    })
}
