//! The BLAS layer under the operators.
//!
//! `Gemm`, `MatMul`, `Conv` and their quantized forms call the BLAS backend of their device
//! through this small gemm API, so a third party ships a faster backend without touching a
//! single operator. Computes `C = alpha * op(A) * op(B) + beta * C` with `op(A)` of `m x k`
//! and `op(B)` of `k x n`.
//!
//! Types: f32, f16 and bf16 (accumulated in f32), and u8/i8 x u8/i8 -> i32 with zero points,
//! scales and requantization (see [`GemmArgs`]).

use crate::{context::KernelContext, error::guard, DType, Device, MemoryType, PluginError};
use abi_stable::{
    sabi_trait,
    sabi_trait::{TD_CanDowncast, TD_Opaque},
    std_types::{RBox, RResult},
    RRef, StableAbi,
};

/// Storage order of a matrix. An open code.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout(pub u32);

impl Layout {
    /// Rows are contiguous (C order).
    pub const ROW_MAJOR: Layout = Layout(0);
    /// Columns are contiguous (Fortran order).
    pub const COL_MAJOR: Layout = Layout(1);
}

/// Whether an operand is used as stored or transposed. An open code.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Transpose(pub u32);

impl Transpose {
    /// `op(X) = X`.
    pub const NO: Transpose = Transpose(0);
    /// `op(X) = X^T`.
    pub const YES: Transpose = Transpose(1);
}

/// What is applied to each element of the result before it is stored. An open code:
/// a backend that does not know a code answers `false` from
/// [`supports`](Blas::supports).
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Epilogue(pub u32);

impl Epilogue {
    /// Nothing.
    pub const NONE: Epilogue = Epilogue(0);
    /// `max(x, 0)`.
    pub const RELU: Epilogue = Epilogue(1);
    /// `x * Φ(x)` with the exact (erf) form.
    pub const GELU: Epilogue = Epilogue(2);
    /// `x * sigmoid(x)` (SiLU, Swish). Since ABI 1.7.
    pub const SILU: Epilogue = Epilogue(3);
    /// `min(max(x, 0), 6)`, NaN kept (ReLU6: ONNX `Clip(0, 6)`). Since ABI 1.7.
    pub const RELU6: Epilogue = Epilogue(4);
}

/// Operand types of one gemm flavour.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct GemmTypes {
    /// Type of A.
    pub a: DType,
    /// Type of B.
    pub b: DType,
    /// Type of C.
    pub c: DType,
}

impl GemmTypes {
    /// f32 x f32 -> f32.
    pub const F32: GemmTypes = GemmTypes {
        a: DType::F32,
        b: DType::F32,
        c: DType::F32,
    };

    /// True for the integer flavours (u8/i8 operands).
    pub fn is_integer(self) -> bool {
        matches!(self.a, DType::U8 | DType::I8) && matches!(self.b, DType::U8 | DType::I8)
    }
}

impl std::fmt::Display for GemmTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}->{}", self.a, self.b, self.c)
    }
}

/// One gemm call (or a batch of them): settled for ABI 1.0; later needs go through `flags`
/// or a new `gemm_v2` method, never a layout change.
///
/// Pointers address memory of the backend's device; leading dimensions and batch strides are
/// in elements. For each batch entry `p` (`0..batch`), with `A_p = a + p * stride_a` (and so
/// on; a stride of 0 shares one matrix across the batch):
///
/// - **float** (`types.a` is F32, F16 or BF16; accumulated in `compute`, usually F32):
///   `C_p = epilogue(alpha * op(A_p) * op(B_p) + beta * C_p + bias)`.
/// - **integer** (`types.a`, `types.b` in {U8, I8}; `compute` I32):
///   `acc[i,j] = Σ_k (A[i,k] - a_zero_point) * (B[k,j] - zp_b[j])`, exact in i32, then by
///   `types.c`:
///   - `I32`: `C = acc + bias` (bias i32; `alpha` 1, `beta` 0 or 1 to accumulate,
///     epilogue NONE);
///   - `F32`: `C = epilogue(alpha * a_scale * scale_b[j] * acc + bias + beta * C)`;
///   - `U8`/`I8` (requantize): `y = epilogue(a_scale * scale_b[j] * acc + bias)`, stored as
///     `saturate(round_half_even(y / c_scale) + c_zero_point)`.
///
/// `zp_b` and `scale_b` read `b_zero_points` / `b_scales` (null: 0 and 1) with
/// `b_quant_len` entries: 1 (per tensor) or `n` (per column of `op(B)`). `bias` (null: none)
/// has `n` entries, one per column (`m`, one per row, with [`GemmArgs::BIAS_PER_ROW`]), f32
/// unless `types.c` is I32. A bit of `flags` the backend
/// does not know makes [`supports`](Blas::supports) false.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct GemmArgs {
    /// Extension bits: [`GemmArgs::PACKED_A`]; unknown bits make a backend refuse.
    pub flags: u64,
    /// Storage order of A, B and C.
    pub layout: Layout,
    /// Transpose A.
    pub trans_a: Transpose,
    /// Transpose B.
    pub trans_b: Transpose,
    /// Applied to each result element.
    pub epilogue: Epilogue,
    /// Operand types.
    pub types: GemmTypes,
    /// Accumulation type: F32 (or F16) for float flavours, I32 for integer ones.
    pub compute: DType,
    /// Number of products (1 for a plain gemm).
    pub batch: usize,
    /// Rows of `op(A)` and C.
    pub m: usize,
    /// Columns of `op(B)` and C.
    pub n: usize,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of C's prior contents; 0 means C is write-only (may hold garbage, even NaN).
    pub beta: f32,
    /// A.
    pub a: *const u8,
    /// Leading dimension of A.
    pub lda: usize,
    /// Distance between consecutive A matrices of a batch (0: shared).
    pub stride_a: usize,
    /// B (ignored by `gemm_packed`).
    pub b: *const u8,
    /// Leading dimension of B.
    pub ldb: usize,
    /// Distance between consecutive B matrices of a batch (0: shared).
    pub stride_b: usize,
    /// C.
    pub c: *mut u8,
    /// Leading dimension of C.
    pub ldc: usize,
    /// Distance between consecutive C matrices of a batch.
    pub stride_c: usize,
    /// Scale of A (integer flavours).
    pub a_scale: f32,
    /// Zero point of A (integer flavours).
    pub a_zero_point: i32,
    /// Scales of B: `b_quant_len` entries, or null for 1.
    pub b_scales: *const f32,
    /// Zero points of B: `b_quant_len` entries, or null for 0.
    pub b_zero_points: *const i32,
    /// Entries of `b_scales` / `b_zero_points`: 1 or `n`.
    pub b_quant_len: usize,
    /// Per-column bias (`n` entries), or null.
    pub bias: *const u8,
    /// Output scale when requantizing to U8/I8.
    pub c_scale: f32,
    /// Output zero point when requantizing to U8/I8.
    pub c_zero_point: i32,
}

// SAFETY: the arguments only describe memory the caller owns for the call's duration.
unsafe impl Send for GemmArgs {}
unsafe impl Sync for GemmArgs {}

impl GemmArgs {
    /// `flags` bit: the pre-packed operand is A, not B. With it, [`Blas::pack_b`] packs
    /// `op(A)` (`a`, `lda`, `trans_a`, `m`, `k`) and [`Blas::gemm_packed`] takes A from the
    /// handle (`a` is ignored) and B from `b`. Constant weights on the left of a product (a
    /// convolution's `Y = W * cols`) are packed once this way instead of on every call. A
    /// backend that does not know the bit answers `false` from [`Blas::supports`]; ask first.
    pub const PACKED_A: u64 = 1;

    /// `flags` bit: `bias` has `m` entries, one per row of C, instead of `n` (a convolution's
    /// per-output-channel bias when its weights are on the left, `Y = W * cols`), f32 as for
    /// columns. Float flavours only. Since ABI 1.7; ask [`Blas::supports`] first.
    pub const BIAS_PER_ROW: u64 = 2;

    /// `flags` bit: the requantization of QLinearConv and QLinearMatMul (ONNX Runtime's
    /// `MlasRequantizeOutput`) instead of the scale-based one. Integer A and B, `types.c` U8
    /// or I8, epilogue NONE, alpha 1, beta 0: `bias` holds `n` **i32** values (or is null),
    /// `b_scales` holds `n` multipliers `mult[j]` (one per column, whatever `b_quant_len`,
    /// which then counts the zero points only), and
    /// `C[i, j] = `[`requant_byte`](crate::numeric::requant_byte)`(acc[i, j] + bias[j],
    /// mult[j], c_zero_point, lo, hi)` with `lo`, `hi` the output type's bounds less
    /// `c_zero_point`: the sum in f32 times the multiplier, clamped, plus the zero point,
    /// rounded half to even. `a_scale` and `c_scale` are not read. A backend applies it to
    /// each tile as it is finished, where the operator would otherwise store i32 sums and
    /// read them back. A B packed for the same A and B types with an I32 C serves these
    /// calls too ([`Blas::gemm_packed`]). A backend that does not know the bit answers
    /// `false` from [`Blas::supports`]; ask first.
    pub const REQUANT_MULTIPLIER: u64 = 4;

    /// A row-major, untransposed, single gemm of `types` with every optional part off; the
    /// caller fills in the pointers and leading dimensions.
    pub fn new(types: GemmTypes, m: usize, n: usize, k: usize) -> Self {
        GemmArgs {
            flags: 0,
            layout: Layout::ROW_MAJOR,
            trans_a: Transpose::NO,
            trans_b: Transpose::NO,
            epilogue: Epilogue::NONE,
            types,
            compute: if types.is_integer() {
                DType::I32
            } else {
                DType::F32
            },
            batch: 1,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            a: std::ptr::null(),
            lda: k,
            stride_a: 0,
            b: std::ptr::null(),
            ldb: n,
            stride_b: 0,
            c: std::ptr::null_mut(),
            ldc: n,
            stride_c: 0,
            a_scale: 1.0,
            a_zero_point: 0,
            b_scales: std::ptr::null(),
            b_zero_points: std::ptr::null(),
            b_quant_len: 1,
            bias: std::ptr::null(),
            c_scale: 1.0,
            c_zero_point: 0,
        }
    }

    /// Row-major f32 `C = A * B` with A `m x k`, B `k x n`, C `m x n`, all contiguous.
    pub fn f32(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
    ) -> Result<Self, PluginError> {
        if a.len() < m.saturating_mul(k)
            || b.len() < k.saturating_mul(n)
            || c.len() < m.saturating_mul(n)
        {
            return Err(PluginError::invalid(format!(
                "gemm {m}x{k} * {k}x{n}: operand lengths {}, {}, {} too short",
                a.len(),
                b.len(),
                c.len()
            )));
        }
        let mut g = GemmArgs::new(GemmTypes::F32, m, n, k);
        g.a = a.as_ptr().cast();
        g.b = b.as_ptr().cast();
        g.c = c.as_mut_ptr().cast();
        Ok(g)
    }

    /// Number of entries `b_scales` and `b_zero_points` hold, checked against `n`.
    pub fn quant_len(&self) -> Result<usize, PluginError> {
        match self.b_quant_len {
            1 => Ok(1),
            l if l == self.n => Ok(l),
            l => Err(PluginError::invalid(format!(
                "gemm: {l} B scales/zero points for {} columns (want 1 or {})",
                self.n, self.n
            ))),
        }
    }
}

/// What a packed B is. Settled for ABI 1.0.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq)]
pub struct PackedInfo {
    /// Operand types it was packed for.
    pub types: GemmTypes,
    /// Whether B was transposed when packed.
    pub trans_b: Transpose,
    /// Rows of `op(B)`.
    pub k: usize,
    /// Columns of `op(B)`.
    pub n: usize,
    /// Bytes it holds (for memory accounting).
    pub bytes: usize,
    /// Where it lives.
    pub device: Device,
    /// Which memory of the device.
    pub memory: MemoryType,
    /// Extension bits: [`GemmArgs::PACKED_A`] when the handle holds `op(A)` (then `k` is
    /// its columns, `n` its rows `m`, and `trans_b` records `trans_a`).
    pub flags: u64,
}

/// The ABI form of a packed B: a handle owned by the backend that packed it (its memory may
/// be on a device). Only that backend can read it back
/// ([`PackedB::downcast`] fails across libraries).
#[sabi_trait]
pub trait FfiPacked: Send + Sync {
    /// What it is.
    #[sabi(last_prefix_field)]
    fn info(&self) -> PackedInfo;
}

/// An owned packed-B handle, as it crosses the ABI.
pub type FfiPackedBox = FfiPacked_TO<'static, RBox<()>>;

struct Packed<T> {
    value: T,
    info: PackedInfo,
}

impl<T: Send + Sync + 'static> FfiPacked for Packed<T> {
    fn info(&self) -> PackedInfo {
        self.info
    }
}

/// B packed by a backend for repeated use (weights, packed once at model load).
#[repr(transparent)]
pub struct PackedB(FfiPackedBox);

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PackedB").field(&self.info()).finish()
    }
}

impl PackedB {
    /// For backends: wraps the backend's own packed representation.
    pub fn new<T: Send + Sync + 'static>(value: T, info: PackedInfo) -> Self {
        PackedB(FfiPacked_TO::from_value(
            Packed { value, info },
            TD_CanDowncast,
        ))
    }

    /// What it is.
    pub fn info(&self) -> PackedInfo {
        self.0.info()
    }

    /// For backends: their own representation back, or `None` when another backend (or
    /// another build of this one) packed it.
    pub fn downcast<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.0.obj.downcast_as::<Packed<T>>().ok().map(|p| &p.value)
    }
}

/// What a BLAS backend is and supports (the plugin's side of
/// [`FfiRegistrar::add_blas`](crate::module::FfiRegistrar::add_blas)).
#[derive(Clone, Debug)]
pub struct BlasDesc {
    /// Unique name, e.g. `"cpu-avx2"`.
    pub name: String,
    /// The device whose memory the operands live in.
    pub device: Device,
    /// Higher wins among backends of one device.
    pub priority: i32,
    /// Operand types, for listings.
    pub types: Vec<GemmTypes>,
}

/// A BLAS backend, as a plugin author implements it.
pub trait Blas: Send + Sync + 'static {
    /// Whether [`gemm`](Self::gemm) (and `gemm_packed`) can run these arguments: types,
    /// epilogue, batch, quantization parameters and flags. Callers ask before calling and fall
    /// back to their own loop otherwise. Default: plain f32 only.
    fn supports(&self, args: &GemmArgs) -> bool {
        args.flags == 0
            && args.types == GemmTypes::F32
            && args.epilogue == Epilogue::NONE
            && args.batch <= 1
            && args.bias.is_null()
    }

    /// Runs the gemm [`GemmArgs`] describes. Parallelise through `ctx.parallel_for`; on a
    /// device, enqueue on the context's stream.
    fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> Result<(), PluginError>;

    /// Packs B (`args.b`, `args.k`, `args.n`, `args.trans_b`, `args.ldb`, and for integer
    /// flavours B's zero points) for repeated use. The handle may hold device memory.
    fn pack_b(&self, _ctx: &KernelContext<'_>, _args: &GemmArgs) -> Result<PackedB, PluginError> {
        Err(PluginError::unimplemented("this backend does not pre-pack"))
    }

    /// Like [`gemm`](Self::gemm), with B taken from `packed` (`args.b` is ignored).
    fn gemm_packed(
        &self,
        _ctx: &KernelContext<'_>,
        _args: &GemmArgs,
        _packed: &PackedB,
    ) -> Result<(), PluginError> {
        Err(PluginError::unimplemented("this backend does not pre-pack"))
    }

    /// Checks the backend on this machine: run by the daemon when the plugin loads (and before
    /// a hot swap is published); a backend that fails is refused with its plugin. A backend
    /// whose results depend on the CPU or driver (kernels chosen at run time) should compare
    /// a few products with a reference here. Default: nothing to check.
    fn self_test(&self, _ctx: &KernelContext<'_>) -> Result<(), PluginError> {
        Ok(())
    }
}

/// The ABI form of [`Blas`]. Implemented by the SDK; hosts and kernels call it.
#[sabi_trait]
pub trait FfiBlas: Send + Sync {
    /// See [`Blas::supports`].
    fn supports(&self, args: &GemmArgs) -> bool;
    /// See [`Blas::gemm`].
    fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> RResult<(), PluginError>;
    /// See [`Blas::pack_b`].
    fn pack_b(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
    ) -> RResult<FfiPackedBox, PluginError>;
    /// See [`Blas::gemm_packed`].
    fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
        packed: &FfiPackedBox,
    ) -> RResult<(), PluginError>;
    /// See [`Blas::self_test`].
    #[sabi(last_prefix_field)]
    fn self_test(&self, ctx: &KernelContext<'_>) -> RResult<(), PluginError>;
}

/// An owned BLAS backend object, as it crosses the ABI.
pub type FfiBlasBox = FfiBlas_TO<'static, RBox<()>>;

struct BlasAdapter<B>(B);

impl<B: Blas> FfiBlas for BlasAdapter<B> {
    fn supports(&self, args: &GemmArgs) -> bool {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.supports(args)))
            .unwrap_or(false)
    }
    fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> RResult<(), PluginError> {
        guard("gemm", || self.0.gemm(ctx, args)).into()
    }
    fn pack_b(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
    ) -> RResult<FfiPackedBox, PluginError> {
        guard("pack_b", || self.0.pack_b(ctx, args).map(|p| p.0)).into()
    }
    fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
        packed: &FfiPackedBox,
    ) -> RResult<(), PluginError> {
        // SAFETY: `PackedB` is a transparent wrapper of the box (repr(transparent) below).
        let packed = unsafe { &*(packed as *const FfiPackedBox).cast::<PackedB>() };
        guard("gemm_packed", || self.0.gemm_packed(ctx, args, packed)).into()
    }
    fn self_test(&self, ctx: &KernelContext<'_>) -> RResult<(), PluginError> {
        guard("BLAS self-test", || self.0.self_test(ctx)).into()
    }
}

/// Wraps a [`Blas`] into its ABI form, with every call guarded against panics.
pub fn into_ffi_blas<B: Blas>(blas: B) -> FfiBlasBox {
    FfiBlas_TO::from_value(BlasAdapter(blas), TD_Opaque)
}

/// A borrowed BLAS backend, as a kernel gets it from [`KernelContext::blas`].
pub struct BlasRef<'a>(FfiBlas_TO<'a, RRef<'a, ()>>);

impl<'a> BlasRef<'a> {
    pub(crate) fn new(inner: FfiBlas_TO<'a, RRef<'a, ()>>) -> Self {
        BlasRef(inner)
    }

    /// Whether the backend can run `args`.
    pub fn supports(&self, args: &GemmArgs) -> bool {
        self.0.supports(args)
    }

    /// Runs a gemm.
    pub fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> Result<(), PluginError> {
        self.0.gemm(ctx, args).into_result()
    }

    /// Packs B for repeated use.
    pub fn pack_b(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> Result<PackedB, PluginError> {
        self.0.pack_b(ctx, args).into_result().map(PackedB)
    }

    /// Runs a gemm with a pre-packed B.
    pub fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
        packed: &PackedB,
    ) -> Result<(), PluginError> {
        self.0.gemm_packed(ctx, args, &packed.0).into_result()
    }
}
