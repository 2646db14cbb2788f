//! CPU BLAS backend: opreg's own f32 gemm for the host, behind the opreg gemm API.
//!
//! A BLIS-style blocked gemm ([`gemm`] module): `op(B)` is packed into `NR`-column
//! micro-panels per `KC x NC` block (shared by all tasks of a block), `op(A)` into `MR`-row
//! micro-panels per `MC x KC` block (per task), and a register-blocked micro-kernel computes
//! one `MR x NR` tile of C per call. The micro-kernel is picked at run time by CPU feature,
//! detected once ([`kernels`]): AVX-512F (8x32, 16 zmm accumulators), AVX2 + FMA (6x16, 12 ymm
//! accumulators), or portable Rust (4x8, also the only one on non-x86 targets).
//!
//! Parallelism goes only through the host's `parallel_for` (plugins start no threads): the
//! packing of each B block is split over its micro-panels, and the product over (row block)
//! x (run of B micro-panels) tasks, so that short-and-wide (conv-like) and tall-and-narrow
//! products keep every thread busy. Packing buffers are per call / per task `Vec`s: no
//! global mutable state beyond the detected kernel (a `OnceLock` static).
//!
//! [`Blas::pack_b`] packs a constant B (weights) once into the panel layout of the detected
//! kernel, returned as a handle only this build of the backend can read back, and
//! [`Blas::gemm_packed`] multiplies with it, skipping B's packing on every call.
//!
//! Why our own gemm rather than a crate: `matrixmultiply` (the previous inner kernel) has no
//! AVX-512 micro-kernels and no pre-packing API for constant weights; the `gemm` crate has
//! AVX-512 but keeps a `thread_local!` packing slab with a destructor, and glibc then never
//! unmaps the library, so a hot-swapped BLAS plugin would leak its mapping on every swap
//! (DESIGN §3).
//!
//! The bf16 flavour (bf16 A and B, f32 or bf16 C, f32 sums) runs `vdpbf16ps` on operands packed
//! in pairs of depth where the CPU has AVX-512 BF16, else widens them for the f32 kernels
//! ([`bf16`]).
//!
//! The integer flavours (u8/i8 x u8/i8, exact i32 accumulation, then dequantized f32 or
//! requantized u8/i8 with bias and activation) run the kernels of [`int8`]: AVX-512 VNNI, AVX2
//! without `maddubs` saturation, or portable ([`quant`] is the output stage around them).
//!
//! Not supported: operands that overlap C, and types other than those above (refused with
//! `Unimplemented`; [`Blas::supports`] says so first).

mod bf16;
mod epilogue;
#[cfg(test)]
mod flavours;
mod float;
mod gemm;
mod int8;
mod kernels;
mod quant;
mod selftest;
#[cfg(test)]
mod tests;

use kernels::KernelKind;
use opreg_sdk::{prelude::*, PackedB, PackedInfo};

/// The backend name.
const NAME: &str = "cpu";

/// The CPU BLAS backend, running one micro-kernel.
struct CpuBlas {
    kind: KernelKind,
    bf16: bf16::Path,
}

impl CpuBlas {
    /// The backend with the best kernel of this CPU.
    fn detect() -> Self {
        Self::with_kernel(KernelKind::best())
    }

    /// The backend with f32 kernel `kind` (bf16 products on the best path for it).
    fn with_kernel(kind: KernelKind) -> Self {
        CpuBlas {
            kind,
            bf16: bf16::Path::best(kind),
        }
    }
}

/// What a packed B handle of this backend holds.
enum Packed {
    F32(float::PackedF32),
    Bf16(bf16::PackedBf16),
    Int(quant::PackedInt),
}

fn known_shape(g: &GemmArgs) -> bool {
    // A packed A: f32, row-major (the integer flavours pack B only); a bias per row: f32.
    let f32_flags = GemmArgs::PACKED_A | GemmArgs::BIAS_PER_ROW;
    let flags_known = g.flags == 0
        || (g.types.is_integer() && g.flags == GemmArgs::REQUANT_MULTIPLIER)
        || (g.types == GemmTypes::F32
            && g.flags & !f32_flags == 0
            && (g.flags & GemmArgs::PACKED_A == 0 || g.layout == Layout::ROW_MAJOR))
        || (g.types.a == DType::BF16 && g.flags & !f32_flags == 0);
    flags_known
        && matches!(g.layout, Layout::ROW_MAJOR | Layout::COL_MAJOR)
        && matches!(g.trans_a, Transpose::NO | Transpose::YES)
        && matches!(g.trans_b, Transpose::NO | Transpose::YES)
        && epilogue::supported(g.epilogue)
}

fn refuse(g: &GemmArgs) -> PluginError {
    PluginError::unimplemented(format!(
        "cpu blas: {} gemm with compute {}, epilogue {}, layout {}, flags {:#x} is not supported",
        g.types, g.compute, g.epilogue.0, g.layout.0, g.flags
    ))
}

impl Blas for CpuBlas {
    fn supports(&self, g: &GemmArgs) -> bool {
        known_shape(g)
            && if g.types == GemmTypes::F32 {
                g.compute == DType::F32
            } else if g.types.a == DType::BF16 {
                bf16::supports(g)
            } else {
                g.types.is_integer() && quant::supports(g)
            }
    }

    fn self_test(&self, ctx: &KernelContext<'_>) -> Result<(), PluginError> {
        selftest::run(self, ctx)
    }

    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        if !self.supports(g) {
            return Err(refuse(g));
        }
        if g.types.is_integer() {
            quant::gemm(ctx, g, None)
        } else if g.types.a == DType::BF16 {
            bf16::gemm(ctx, self.bf16, g, None)
        } else {
            float::gemm(ctx, self.kind, g, None)
        }
    }

    fn pack_b(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<PackedB, PluginError> {
        if !self.supports(g) {
            return Err(refuse(g));
        }
        let (packed, bytes) = if g.types.is_integer() {
            let p = quant::pack_b(g)?;
            let bytes = p.bytes();
            (Packed::Int(p), bytes)
        } else if g.types.a == DType::BF16 {
            let p = bf16::pack_b(ctx, self.bf16, g)?;
            let bytes = p.bytes();
            (Packed::Bf16(p), bytes)
        } else {
            let p = float::pack(self.kind, g)?;
            let bytes = p.bytes();
            (Packed::F32(p), bytes)
        };
        // A packed A records A's transpose and rows where B's would be (see PackedInfo).
        let a = g.flags & GemmArgs::PACKED_A != 0;
        Ok(PackedB::new(
            packed,
            PackedInfo {
                types: g.types,
                trans_b: if a { g.trans_a } else { g.trans_b },
                k: g.k,
                n: if a { g.m } else { g.n },
                bytes,
                device: Device::CPU,
                memory: MemoryType::DEVICE,
                flags: g.flags & GemmArgs::PACKED_A,
            },
        ))
    }

    fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        g: &GemmArgs,
        packed: &PackedB,
    ) -> Result<(), PluginError> {
        if !self.supports(g) {
            return Err(refuse(g));
        }
        let info = packed.info();
        let (role, trans) = if g.flags & GemmArgs::PACKED_A != 0 {
            ("A", g.trans_a)
        } else {
            ("B", g.trans_b)
        };
        // An integer or bf16 B's packing does not depend on C's type (i32 sums or
        // requantized bytes; f32 or bf16): one packed at load serves both.
        let same_types = if g.types.is_integer() || g.types.a == DType::BF16 {
            (info.types.a, info.types.b) == (g.types.a, g.types.b)
        } else {
            info.types == g.types
        };
        if !same_types || info.trans_b != trans {
            return Err(PluginError::invalid(format!(
                "cpu blas: {role} packed for {} (trans {}), gemm is {} (trans {})",
                info.types, info.trans_b.0, g.types, trans.0
            )));
        }
        match packed.downcast::<Packed>() {
            Some(Packed::F32(p)) => float::gemm(ctx, self.kind, g, Some(p)),
            Some(Packed::Bf16(p)) => bf16::gemm(ctx, self.bf16, g, Some(p)),
            Some(Packed::Int(p)) => quant::gemm(ctx, g, Some(p)),
            None => Err(PluginError::invalid(
                "cpu blas: B was packed by another backend (or another build of this one)",
            )),
        }
    }
}

fn register(r: &mut Registrar) {
    let types = |a, b, c| GemmTypes { a, b, c };
    r.blas(
        BlasDesc {
            name: NAME.into(),
            device: Device::CPU,
            priority: 0,
            types: vec![
                GemmTypes::F32,
                types(DType::BF16, DType::BF16, DType::F32),
                types(DType::BF16, DType::BF16, DType::BF16),
                types(DType::U8, DType::I8, DType::I32),
                types(DType::U8, DType::U8, DType::I32),
                types(DType::I8, DType::I8, DType::I32),
                types(DType::U8, DType::I8, DType::F32),
                types(DType::U8, DType::I8, DType::U8),
            ],
        },
        CpuBlas::detect(),
    );
}

opreg_sdk::export_plugin! {
    name: "blas-cpu",
    version: env!("CARGO_PKG_VERSION"),
    description: "CPU BLAS backend (f32, bf16 and exact integer gemm; AVX-512/BF16/VNNI/AVX2/portable kernels; B pre-packing; host-pool parallel)",
    register: register,
}
