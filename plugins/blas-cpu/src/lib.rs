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
//! kernel (a small header records kernel, panel width, depth block, `k` and `n`), and
//! [`Blas::gemm_packed`] multiplies with it, skipping B's packing on every call.
//!
//! Why our own gemm rather than a crate: `matrixmultiply` (the previous inner kernel) has no
//! AVX-512 micro-kernels and no pre-packing API for constant weights; the `gemm` crate has
//! AVX-512 but keeps a `thread_local!` packing slab with a destructor, and glibc then never
//! unmaps the library, so a hot-swapped BLAS plugin would leak its mapping on every swap
//! (DESIGN §3).
//!
//! Not supported: operands that overlap C, and types other than f32 (refused with
//! `Unimplemented`).

mod gemm;
mod kernels;
mod selftest;
#[cfg(test)]
mod tests;

use abi_stable::std_types::RVec;
use gemm::{AlignedBuf, BSource, Mat, Problem};
use kernels::KernelKind;
use opreg_sdk::{abi_stable, prelude::*, PackedB};

/// The backend name, also stamped into packed B buffers.
const NAME: &str = "cpu";

/// The CPU BLAS backend, running one micro-kernel.
struct CpuBlas {
    kind: KernelKind,
}

impl CpuBlas {
    /// The backend with the best kernel of this CPU.
    fn detect() -> Self {
        CpuBlas {
            kind: KernelKind::best(),
        }
    }
}

/// (row stride, column stride) of `op(X)` for a matrix stored with leading dimension `ld`.
fn strides(layout: Layout, trans: Transpose, ld: usize) -> (usize, usize) {
    match (layout, trans) {
        (Layout::RowMajor, Transpose::No) | (Layout::ColMajor, Transpose::Yes) => (ld, 1),
        (Layout::RowMajor, Transpose::Yes) | (Layout::ColMajor, Transpose::No) => (1, ld),
    }
}

/// Checks one operand: `op(X)` is `rows x cols`; its leading dimension must cover the
/// contiguous dimension of the stored matrix, and the pointer must be a valid f32 address.
fn check_operand(
    name: &str,
    ptr: *const u8,
    layout: Layout,
    trans: Transpose,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<Mat, PluginError> {
    let (rs, cs) = strides(layout, trans, ld);
    if rows == 0 || cols == 0 {
        return Ok(Mat {
            ptr: ptr.cast(),
            rs,
            cs,
        });
    }
    // The contiguous dimension of op(X) is the one with stride 1.
    let inner = if cs == 1 { cols } else { rows };
    let outer = if cs == 1 { rows } else { cols };
    if outer > 1 && ld < inner {
        return Err(PluginError::invalid(format!(
            "cpu blas: ld{name} = {ld} is less than {inner}"
        )));
    }
    if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<f32>()) {
        return Err(PluginError::invalid(format!(
            "cpu blas: {name} is null or not f32-aligned"
        )));
    }
    Ok(Mat {
        ptr: ptr.cast(),
        rs,
        cs,
    })
}

fn check_types(types: GemmTypes) -> Result<(), PluginError> {
    if types != GemmTypes::F32 {
        return Err(PluginError::unimplemented(format!(
            "cpu blas: {types} gemm is not supported"
        )));
    }
    Ok(())
}

/// Validates A and C of `g` (B too unless `packed`) and maps them onto a row-oriented problem.
fn problem(g: &GemmArgs, b: Option<BSource>) -> Result<Problem, PluginError> {
    check_types(g.types)?;
    let reads = g.k > 0 && g.alpha != 0.0;
    let (ar, ac) = if reads { (g.m, g.k) } else { (0, 0) };
    let a = check_operand("a", g.a, g.layout, g.trans_a, ar, ac, g.lda)?;
    let c = check_operand(
        "c",
        g.c.cast_const(),
        g.layout,
        Transpose::No,
        g.m,
        g.n,
        g.ldc,
    )?;
    let b = match b {
        Some(b) => b,
        None => {
            let (br, bc) = if reads { (g.k, g.n) } else { (0, 0) };
            BSource::Strided(check_operand("b", g.b, g.layout, g.trans_b, br, bc, g.ldb)?)
        }
    };
    Ok(Problem {
        m: g.m,
        n: g.n,
        k: g.k,
        alpha: g.alpha,
        beta: g.beta,
        a,
        b,
        c: c.ptr.cast_mut(),
        rsc: c.rs,
        csc: c.cs,
    })
}

/// Bytes of the packed-B header: magic, then kernel id, NR, depth block, k, n and the byte
/// offset of the panels, each a little-endian u64.
const HEADER: usize = 56;
const MAGIC: [u8; 8] = *b"opregB01";

fn header_field(data: &[u8], i: usize) -> Result<usize, PluginError> {
    let bytes: [u8; 8] = data
        .get(8 + 8 * i..16 + 8 * i)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| PluginError::invalid("cpu blas: packed B is truncated"))?;
    usize::try_from(u64::from_le_bytes(bytes))
        .map_err(|_| PluginError::invalid("cpu blas: packed B header out of range"))
}

impl Blas for CpuBlas {
    fn self_test(&self, ctx: &KernelContext<'_>) -> Result<(), PluginError> {
        selftest::run(self, ctx)
    }

    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        let mut p = problem(g, None)?;
        if let (Layout::ColMajor, BSource::Strided(b)) = (g.layout, p.b) {
            // C^T = op(B)^T op(A)^T is the same product with a row-major C, which the kernels
            // store with full vectors.
            p = Problem {
                m: p.n,
                n: p.m,
                a: Mat {
                    ptr: b.ptr,
                    rs: b.cs,
                    cs: b.rs,
                },
                b: BSource::Strided(Mat {
                    ptr: p.a.ptr,
                    rs: p.a.cs,
                    cs: p.a.rs,
                }),
                rsc: p.csc,
                csc: p.rsc,
                ..p
            };
        }
        // SAFETY: the caller guarantees the operands cover the matrices `g` describes (checked
        // for null, alignment and leading dimensions above); the kernel is available (chosen
        // by detection, or checked by the test constructor).
        unsafe { gemm::gemm(ctx, self.kind, &p) }
    }

    fn pack_b(&self, g: &GemmArgs) -> Result<PackedB, PluginError> {
        check_types(g.types)?;
        let (k, n) = (g.k, g.n);
        let b = check_operand("b", g.b, g.layout, g.trans_b, k, n, g.ldb)?;
        let (nr, _) = gemm::panel_width(self.kind);
        let n_pad = n.div_ceil(nr) * nr;
        let floats = k
            .checked_mul(n_pad)
            .ok_or_else(|| PluginError::invalid("cpu blas: packed B size overflows"))?;
        let mut data = Vec::new();
        data.try_reserve_exact(HEADER + 64 + 4 * floats)
            .map_err(|_| {
                PluginError::new(
                    ErrorCode::ResourceExhausted,
                    format!("cpu blas: cannot allocate packed B of {k}x{n}"),
                )
            })?;
        data.resize(HEADER + 64 + 4 * floats, 0u8);
        // Panels start 64-byte aligned in this allocation (a clone may move them off that
        // alignment; the kernels use unaligned loads, so it stays correct).
        let pad = data.as_ptr().wrapping_add(HEADER).align_offset(64);
        if pad >= 64 {
            return Err(PluginError::internal("cpu blas: cannot align packed B"));
        }
        let offset = HEADER + pad;
        // SAFETY: `data` has room for `k * n_pad` floats at `offset`, a 64-byte aligned
        // address; B was checked above.
        let kc = unsafe {
            gemm::pack_b_all_for(self.kind, b, k, n, data.as_mut_ptr().add(offset).cast())
        };
        data[..8].copy_from_slice(&MAGIC);
        let fields = [self.kind.id() as usize, nr, kc, k, n, offset];
        for (i, v) in fields.into_iter().enumerate() {
            data[8 + 8 * i..16 + 8 * i].copy_from_slice(&(v as u64).to_le_bytes());
        }
        Ok(PackedB {
            backend: NAME.into(),
            types: g.types,
            trans_b: g.trans_b,
            k,
            n,
            data: RVec::from(data),
        })
    }

    fn gemm_packed(
        &self,
        ctx: &KernelContext<'_>,
        g: &GemmArgs,
        packed: &PackedB,
    ) -> Result<(), PluginError> {
        if packed.backend.as_str() != NAME {
            return Err(PluginError::invalid(format!(
                "cpu blas: B was packed by backend {:?}",
                packed.backend.as_str()
            )));
        }
        check_types(g.types)?;
        if packed.types != g.types || packed.k != g.k || packed.n != g.n {
            return Err(PluginError::invalid(format!(
                "cpu blas: B packed as {} {}x{}, gemm wants {} {}x{}",
                packed.types, packed.k, packed.n, g.types, g.k, g.n
            )));
        }
        let data = packed.data.as_slice();
        if data.get(..8) != Some(&MAGIC[..]) {
            return Err(PluginError::invalid(
                "cpu blas: packed B has no valid header",
            ));
        }
        let f = |i| header_field(data, i);
        let (id, nr, kc, k, n, offset) = (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?, f(5)?);
        let kind = u32::try_from(id)
            .ok()
            .and_then(KernelKind::from_id)
            .filter(|k| k.available())
            .ok_or_else(|| {
                PluginError::invalid(format!(
                    "cpu blas: packed B is for kernel {id}, not on this CPU"
                ))
            })?;
        let (kernel_nr, kernel_kc) = gemm::panel_width(kind);
        let n_pad = n.div_ceil(kernel_nr) * kernel_nr;
        let floats = k.saturating_mul(n_pad);
        if nr != kernel_nr
            || kc != gemm::depth_block(k, kernel_kc)
            || (k, n) != (g.k, g.n)
            || offset < HEADER
            || data.len() < offset.saturating_add(floats.saturating_mul(4))
        {
            return Err(PluginError::invalid(
                "cpu blas: packed B header is inconsistent",
            ));
        }
        let panels = data.as_ptr().wrapping_add(offset);
        let mut copy = None;
        let ptr: *const f32 = if (panels as usize).is_multiple_of(4) {
            panels.cast()
        } else {
            // Moved to an address f32 reads cannot use: copy into an aligned buffer.
            let mut buf = AlignedBuf::new(floats)?;
            // SAFETY: `floats * 4` bytes were checked to lie in `data`; the buffer has room.
            unsafe { std::ptr::copy_nonoverlapping(panels, buf.ptr().cast::<u8>(), floats * 4) };
            copy.insert(buf).ptr().cast_const()
        };
        let p = problem(g, Some(BSource::Packed { ptr, kc }))?;
        // SAFETY: A and C checked as in `gemm`; the packed panels cover `k x n_pad` floats for
        // this kernel (header checked); the kernel is available (checked above).
        let result = unsafe { gemm::gemm(ctx, kind, &p) };
        drop(copy);
        result
    }
}

fn register(r: &mut Registrar) {
    r.blas(
        BlasDesc {
            name: NAME.into(),
            device: Device::CPU,
            priority: 0,
            types: vec![GemmTypes::F32].into(),
        },
        CpuBlas::detect(),
    );
}

opreg_sdk::export_plugin! {
    name: "blas-cpu",
    version: env!("CARGO_PKG_VERSION"),
    description: "CPU BLAS backend (f32 gemm, AVX-512/AVX2/portable kernels, B pre-packing, host-pool parallel)",
    register: register,
}
