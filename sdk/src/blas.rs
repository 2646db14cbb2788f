//! The BLAS layer under the operators.
//!
//! `Gemm`, `MatMul`, `Conv` and their quantized forms call the BLAS backend of their device
//! through this small gemm API, so a third party ships a faster backend without touching a
//! single operator. Computes `C = alpha * op(A) * op(B) + beta * C` with `op(A)` of `m x k`
//! and `op(B)` of `k x n`.
//!
//! Types: f32, f16 and bf16 (accumulated in f32), and u8/i8 x i8 -> i32 with zero points.

use crate::{context::KernelContext, error::guard, DType, Device, PluginError};
use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, RResult, RString, RVec},
    RRef, StableAbi,
};

/// Storage order of a matrix.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Rows are contiguous (C order).
    RowMajor = 0,
    /// Columns are contiguous (Fortran order).
    ColMajor = 1,
}

/// Whether an operand is used as stored or transposed.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// `op(X) = X`.
    No = 0,
    /// `op(X) = X^T`.
    Yes = 1,
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
}

impl std::fmt::Display for GemmTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}->{}", self.a, self.b, self.c)
    }
}

/// One gemm call. Pointers address host or device memory per the backend's device; leading
/// dimensions are in elements.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct GemmArgs {
    /// Storage order of A, B and C.
    pub layout: Layout,
    /// Transpose A.
    pub trans_a: Transpose,
    /// Transpose B.
    pub trans_b: Transpose,
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
    /// Operand types.
    pub types: GemmTypes,
    /// A.
    pub a: *const u8,
    /// Leading dimension of A.
    pub lda: usize,
    /// B.
    pub b: *const u8,
    /// Leading dimension of B.
    pub ldb: usize,
    /// C.
    pub c: *mut u8,
    /// Leading dimension of C.
    pub ldc: usize,
    /// Zero point of A (integer gemm only).
    pub a_zero_point: i32,
    /// Zero point of B (integer gemm only).
    pub b_zero_point: i32,
}

// SAFETY: the arguments only describe memory the caller owns for the call's duration.
unsafe impl Send for GemmArgs {}
unsafe impl Sync for GemmArgs {}

impl GemmArgs {
    /// Row-major f32 `C = A * B` with A `m x k`, B `k x n`, C `m x n`, all contiguous.
    pub fn f32(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
    ) -> Result<Self, PluginError> {
        if a.len() < m * k || b.len() < k * n || c.len() < m * n {
            return Err(PluginError::invalid(format!(
                "gemm {m}x{k} * {k}x{n}: operand lengths {}, {}, {} too short",
                a.len(),
                b.len(),
                c.len()
            )));
        }
        Ok(GemmArgs {
            layout: Layout::RowMajor,
            trans_a: Transpose::No,
            trans_b: Transpose::No,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            types: GemmTypes::F32,
            a: a.as_ptr().cast(),
            lda: k,
            b: b.as_ptr().cast(),
            ldb: n,
            c: c.as_mut_ptr().cast(),
            ldc: n,
            a_zero_point: 0,
            b_zero_point: 0,
        })
    }
}

/// B packed by a backend for repeated use (weights, packed once at model load).
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PackedB {
    /// The backend's name, to refuse a buffer packed by another backend.
    pub backend: RString,
    /// Operand types it was packed for.
    pub types: GemmTypes,
    /// Whether B was transposed when packed.
    pub trans_b: Transpose,
    /// Rows of `op(B)`.
    pub k: usize,
    /// Columns of `op(B)`.
    pub n: usize,
    /// The backend's packed representation.
    pub data: RVec<u8>,
}

/// What a BLAS backend is and supports.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct BlasDesc {
    /// Unique name, e.g. `"cpu-avx2"`.
    pub name: RString,
    /// The device whose memory the operands live in.
    pub device: Device,
    /// Higher wins among backends of one device.
    pub priority: i32,
    /// Supported operand types.
    pub types: RVec<GemmTypes>,
}

/// A BLAS backend, as a plugin author implements it.
pub trait Blas: Send + Sync + 'static {
    /// `C = alpha * op(A) * op(B) + beta * C`. Parallelise through `ctx.parallel_for`.
    fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> Result<(), PluginError>;

    /// Packs B (`args.b`, `args.k`, `args.n`, `args.trans_b`, `args.ldb`) for repeated use.
    fn pack_b(&self, _args: &GemmArgs) -> Result<PackedB, PluginError> {
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
    /// See [`Blas::gemm`].
    fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> RResult<(), PluginError>;
    /// See [`Blas::pack_b`].
    fn pack_b(&self, args: &GemmArgs) -> RResult<PackedB, PluginError>;
    /// See [`Blas::gemm_packed`].
    fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
        packed: &PackedB,
    ) -> RResult<(), PluginError>;
    /// See [`Blas::self_test`].
    #[sabi(last_prefix_field)]
    fn self_test(&self, ctx: &KernelContext<'_>) -> RResult<(), PluginError>;
}

/// An owned BLAS backend object, as it crosses the ABI.
pub type FfiBlasBox = FfiBlas_TO<'static, RBox<()>>;

struct BlasAdapter<B>(B);

impl<B: Blas> FfiBlas for BlasAdapter<B> {
    fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> RResult<(), PluginError> {
        guard("gemm", || self.0.gemm(ctx, args)).into()
    }
    fn pack_b(&self, args: &GemmArgs) -> RResult<PackedB, PluginError> {
        guard("pack_b", || self.0.pack_b(args)).into()
    }
    fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
        packed: &PackedB,
    ) -> RResult<(), PluginError> {
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

    /// Runs a gemm.
    pub fn gemm(&self, ctx: &KernelContext<'_>, args: &GemmArgs) -> Result<(), PluginError> {
        self.0.gemm(ctx, args).into_result()
    }

    /// Packs B for repeated use.
    pub fn pack_b(&self, args: &GemmArgs) -> Result<PackedB, PluginError> {
        self.0.pack_b(args).into_result()
    }

    /// Runs a gemm with a pre-packed B.
    pub fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        args: &GemmArgs,
        packed: &PackedB,
    ) -> Result<(), PluginError> {
        self.0.gemm_packed(ctx, args, packed).into_result()
    }
}
