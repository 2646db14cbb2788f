//! MatMul and Gemm: shape logic here, the products in the node's BLAS backend.

use super::{activation::Activation, blas, optional, register_versions, Disjoint};
use crate::util::{
    broadcast_shapes, broadcast_strides, input, product_sat, required, walk_offsets,
};
use opreg_sdk::{
    alloc::{checked_numel, try_vec, try_with_capacity},
    half::bf16,
    prelude::*,
    PackedB,
};
use std::{borrow::Cow, sync::Arc};

/// A row-major f32 gemm on contiguous operands with the given transposes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    ctx: &KernelContext<'_>,
    op: &str,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
    packed: Option<&PackedB>,
) -> Result<(), PluginError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let packed = packed.filter(|p| fits(p, k, n, trans_b));
    check_operands(op, (m, n, k), a, b, c, packed.is_some())?;
    if k == 0 {
        // No products: C = beta * C.
        if beta == 0.0 {
            c[..m * n].fill(0.0);
        } else {
            c[..m * n].iter_mut().for_each(|v| *v *= beta);
        }
        return Ok(());
    }
    let blas = blas(ctx, op)?;
    let args = gemm_args(
        trans_a,
        trans_b,
        m,
        n,
        k,
        alpha,
        a.as_ptr(),
        b.as_ptr(),
        beta,
        c.as_mut_ptr(),
    );
    run_gemm(ctx, blas, &args, packed)
}

/// `C = act(A * B + bias)` (row-major, contiguous, `bias` one per column) with the bias and
/// activation in the BLAS's tiles: `Ok(false)`, nothing written, where the backend does not
/// support that epilogue (the caller then runs the product and applies them itself).
#[allow(clippy::too_many_arguments)]
fn gemm_f32_with_epilogue(
    ctx: &KernelContext<'_>,
    op: &str,
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    packed: Option<&PackedB>,
    (bias, code): (&[f32], Epilogue),
) -> Result<bool, PluginError> {
    if m == 0 || n == 0 || k == 0 || bias.len() != n {
        return Ok(false);
    }
    let packed = packed.filter(|p| fits(p, k, n, false));
    check_operands(op, (m, n, k), a, b, c, packed.is_some())?;
    let blas = blas(ctx, op)?;
    let mut args = gemm_args(
        false,
        false,
        m,
        n,
        k,
        1.0,
        a.as_ptr(),
        b.as_ptr(),
        0.0,
        c.as_mut_ptr(),
    );
    args.bias = bias.as_ptr().cast();
    args.epilogue = code;
    if !blas.supports(&args) {
        return Ok(false);
    }
    run_gemm(ctx, blas, &args, packed).map(|()| true)
}

/// Whether `packed` was packed as the B of a `k x n` product with this transpose.
fn fits(packed: &PackedB, k: usize, n: usize, trans_b: bool) -> bool {
    let info = packed.info();
    let trans = if trans_b {
        Transpose::YES
    } else {
        Transpose::NO
    };
    info.k == k && info.n == n && info.trans_b == trans
}

/// Fails unless `c` holds `m x n` values and, for a product with depth, `a` `m x k` and `b`
/// `k x n` (`b` may be empty when a pre-packed B fitting the product serves: `packed`).
fn check_operands<T>(
    op: &str,
    (m, n, k): (usize, usize, usize),
    a: &[T],
    b: &[T],
    c: &[T],
    packed: bool,
) -> Result<(), PluginError> {
    let fits =
        |len: usize, rows: usize, cols: usize| rows.checked_mul(cols).is_some_and(|e| len >= e);
    if !fits(c.len(), m, n)
        || (k > 0 && (!fits(a.len(), m, k) || (!packed && !fits(b.len(), k, n))))
    {
        return Err(PluginError::internal(format!(
            "{op}: gemm operands too short for {m}x{k} * {k}x{n}"
        )));
    }
    Ok(())
}

/// The operand types of a bf16 product: bf16 A, B and C (the BLAS sums in f32).
pub(crate) const BF16_TYPES: GemmTypes = GemmTypes {
    a: DType::BF16,
    b: DType::BF16,
    c: DType::BF16,
};

/// Whether the node's BLAS backend has a bf16 gemm (else bf16 products are widened to f32).
pub(crate) fn has_bf16_gemm(ctx: &KernelContext<'_>) -> bool {
    ctx.blas()
        .is_some_and(|b| b.supports(&GemmArgs::new(BF16_TYPES, 1, 1, 1)))
}

/// `C = A * B` on contiguous row-major bf16 operands in the node's BLAS bf16 gemm (f32 sums,
/// C rounded to nearest even), with `packed` as B where it fits.
fn gemm_bf16(
    ctx: &KernelContext<'_>,
    (m, n, k): (usize, usize, usize),
    a: &[bf16],
    b: &[bf16],
    c: &mut [bf16],
    packed: Option<&PackedB>,
) -> Result<(), PluginError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let packed = packed.filter(|p| fits(p, k, n, false));
    check_operands("MatMul", (m, n, k), a, b, c, packed.is_some())?;
    let blas = blas(ctx, "MatMul")?;
    let mut g = GemmArgs::new(BF16_TYPES, m, n, k);
    (g.a, g.lda) = (a.as_ptr().cast(), k.max(1));
    (g.b, g.ldb) = (b.as_ptr().cast(), n);
    (g.c, g.ldc) = (c.as_mut_ptr().cast(), n);
    if !blas.supports(&g) {
        return Err(PluginError::unimplemented(
            "MatMul: the BLAS backend has no bf16 gemm",
        ));
    }
    run_gemm(ctx, blas, &g, packed)
}

/// Runs `args` with `packed` as B where it was packed for this product.
fn run_gemm(
    ctx: &KernelContext<'_>,
    blas: opreg_sdk::blas::BlasRef<'_>,
    args: &GemmArgs,
    packed: Option<&PackedB>,
) -> Result<(), PluginError> {
    match packed {
        Some(p)
            if {
                let info = p.info();
                info.k == args.k && info.n == args.n && info.trans_b == args.trans_b
            } =>
        {
            blas.gemm_packed(ctx, args, p)
        }
        // B absorbed (see `Prepacked`) and no packing fits: the callers checked `fits`, so
        // this is a bug, not a read through a null pointer.
        _ if args.b.is_null() => Err(PluginError::internal(
            "gemm: B was absorbed at model load and the packed B does not fit this product",
        )),
        _ => blas.gemm(ctx, args),
    }
}

/// Row-major f32 gemm arguments over contiguous operands.
#[allow(clippy::too_many_arguments)]
fn gemm_args(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    b: *const f32,
    beta: f32,
    c: *mut f32,
) -> GemmArgs {
    let mut g = GemmArgs::new(GemmTypes::F32, m, n, k);
    g.trans_a = if trans_a {
        Transpose::YES
    } else {
        Transpose::NO
    };
    g.trans_b = if trans_b {
        Transpose::YES
    } else {
        Transpose::NO
    };
    g.alpha = alpha;
    g.beta = beta;
    g.a = a.cast();
    g.lda = if trans_a { m } else { k };
    g.b = b.cast();
    g.ldb = if trans_b { k } else { n };
    g.c = c.cast();
    g.ldc = n;
    g
}

/// A constant B packed at model load, with its shape: every run computes with the packed
/// form, so the kernel absorbs B (ABI 1.8 `absorbed`: the host frees the original when no
/// other node reads it, and passes B absent).
#[derive(Clone)]
struct Prepacked {
    packed: Arc<PackedB>,
    /// B's shape as the node has it.
    shape: Vec<usize>,
}

/// Packs a constant 2-D f32 B (`inputs[index]`), or an untransposed bf16 one, with the node's
/// BLAS backend at model load, so that every run skips packing the weights. `None` when B is
/// not constant or the backend does not pre-pack it (then each run packs as usual).
fn prepack(node: &NodeInfo<'_>, index: usize, trans_b: bool) -> Option<Prepacked> {
    let b = node.inputs.get(index)?.constant?;
    let &[rows, cols] = b.shape() else {
        return None;
    };
    let (k, n) = if trans_b { (cols, rows) } else { (rows, cols) };
    let packed = match b.dtype {
        DType::F32 => pack_constant_b(node, b.as_slice::<f32>().ok()?, k, n, trans_b)?,
        // MatMul's (the only bf16 operator with a B here).
        DType::BF16 if !trans_b => {
            let w = b.as_slice::<bf16>().ok()?;
            if k.checked_mul(n)? > w.len() {
                return None;
            }
            let mut g = GemmArgs::new(BF16_TYPES, 1, n, k);
            (g.b, g.ldb) = (w.as_ptr().cast(), n);
            Arc::new(node.blas()?.pack_b(node.context.as_ref()?, &g).ok()?)
        }
        _ => return None,
    };
    // What a run would check packing against (`fits`): only then is B never read.
    fits(&packed, k, n, trans_b).then(|| Prepacked {
        packed,
        shape: vec![rows, cols],
    })
}

/// A node's A and B as compute reads them: B is the absorbed constant's shape and no data
/// when it was pre-packed (whether or not the host passed it), else the input.
struct Operands<'a, 'k> {
    a: TensorView<'a>,
    b_shape: Cow<'k, [usize]>,
    b: Option<TensorView<'a>>,
}

fn operands<'a, 'k>(
    op: &str,
    inputs: &[TensorView<'a>],
    pre: &'k Option<Prepacked>,
) -> Result<Operands<'a, 'k>, PluginError>
where
    'a: 'k,
{
    match pre {
        Some(p) => {
            let [a] = required(op, inputs, ["A"])?;
            let want = p.packed.info().types.a;
            if a.dtype != want {
                return Err(PluginError::invalid(format!(
                    "{op}: A is {} but B is {want}",
                    a.dtype
                )));
            }
            Ok(Operands {
                a,
                b_shape: Cow::Borrowed(&p.shape),
                b: None,
            })
        }
        None => {
            let [a, b] = required(op, inputs, ["A", "B"])?;
            Ok(Operands {
                a,
                b_shape: Cow::Owned(b.shape().to_vec()),
                b: Some(b),
            })
        }
    }
}

/// B's data: empty when it was absorbed (the packed form serves).
fn b_data<'a, T: Element>(b: &Option<TensorView<'a>>) -> Result<&'a [T], PluginError> {
    match b {
        Some(b) => b.as_slice(),
        None => Ok(&[]),
    }
}

/// Packs `b`, part of one of `node`'s constant inputs, as the right operand (`k x n`, or
/// `n x k` with `trans_b`) of an f32 gemm with the node's BLAS backend. `None` when the
/// backend does not pre-pack or `b` is too short.
pub(crate) fn pack_constant_b(
    node: &NodeInfo<'_>,
    b: &[f32],
    k: usize,
    n: usize,
    trans_b: bool,
) -> Option<Arc<PackedB>> {
    if k.checked_mul(n)? > b.len() {
        return None;
    }
    let blas = node.blas()?;
    let args = gemm_args(
        false,
        trans_b,
        1,
        n,
        k,
        1.0,
        std::ptr::null(),
        b.as_ptr(),
        0.0,
        std::ptr::null_mut(),
    );
    blas.pack_b(node.context.as_ref()?, &args)
        .ok()
        .map(Arc::new)
}

struct MatMul {
    /// B pre-packed at model load when it is a constant 2-D f32 or bf16 matrix.
    pre: Option<Prepacked>,
}

/// The products a MatMul computes: `nb` gemms of `m x k` by `k x n`, at these element offsets
/// into A and B (empty when B is shared and the batches fold into M).
struct MatMulPlan {
    out_shape: Vec<usize>,
    nb: usize,
    m: usize,
    k: usize,
    n: usize,
    offs: Vec<(usize, usize)>,
}

impl MatMulPlan {
    fn new(sa: &[usize], sb: &[usize]) -> Result<Self, PluginError> {
        if sa.is_empty() || sb.is_empty() {
            return Err(PluginError::invalid(format!(
                "MatMul: operands must have rank >= 1, got {sa:?} x {sb:?}"
            )));
        }
        // numpy rules: a 1-D A is a row vector, a 1-D B a column vector; both dims dropped.
        let (m, k) = if sa.len() == 1 {
            (1, sa[0])
        } else {
            (sa[sa.len() - 2], sa[sa.len() - 1])
        };
        let (k2, n) = if sb.len() == 1 {
            (sb[0], 1)
        } else {
            (sb[sb.len() - 2], sb[sb.len() - 1])
        };
        if k != k2 {
            return Err(PluginError::invalid(format!(
                "MatMul: inner dimensions differ ({sa:?} x {sb:?})"
            )));
        }
        let batch_a = &sa[..sa.len().saturating_sub(2)];
        let batch_b = &sb[..sb.len().saturating_sub(2)];
        let batch = broadcast_shapes(&[batch_a, batch_b]).map_err(|_| {
            PluginError::invalid(format!(
                "MatMul: batch dimensions of {sa:?} and {sb:?} do not broadcast"
            ))
        })?;
        let mut out_shape = batch.clone();
        if sa.len() > 1 {
            out_shape.push(m);
        }
        if sb.len() > 1 {
            out_shape.push(n);
        }
        // Empty operands may carry huge batch extents: saturating products (exact whenever the
        // output has elements), and no offset table for an empty output.
        let nb = product_sat(&batch);
        let nb_a = product_sat(batch_a);
        let nb_b = product_sat(batch_b);
        let empty = product_sat(&out_shape) == 0;
        let mut offs = Vec::new();
        if !empty && (nb_b != 1 || nb_a != nb) {
            let mut offs_a = try_with_capacity(nb)?;
            walk_offsets(&batch, &broadcast_strides(batch_a, &batch), 0, nb, |o| {
                offs_a.push(o * m * k)
            });
            let mut i = 0;
            offs = try_vec(nb, (0, 0))?;
            walk_offsets(&batch, &broadcast_strides(batch_b, &batch), 0, nb, |o| {
                offs[i] = (offs_a[i], o * k * n);
                i += 1;
            });
        }
        Ok(MatMulPlan {
            out_shape,
            nb,
            m,
            k,
            n,
            offs,
        })
    }

    /// The products in the node's BLAS f32 gemm.
    fn run_f32(
        &self,
        ctx: &KernelContext<'_>,
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        packed: Option<&PackedB>,
    ) -> Result<(), PluginError> {
        self.run_products(ctx, x, w, y, packed, |ctx, m, x, w, y, packed| {
            gemm_f32(
                ctx, "MatMul", false, false, m, self.n, self.k, 1.0, x, w, 0.0, y, packed,
            )
        })
    }

    /// The products in the node's BLAS bf16 gemm (bf16 operands and result, f32 sums).
    fn run_bf16(
        &self,
        ctx: &KernelContext<'_>,
        x: &[bf16],
        w: &[bf16],
        y: &mut [bf16],
        packed: Option<&PackedB>,
    ) -> Result<(), PluginError> {
        self.run_products(ctx, x, w, y, packed, |ctx, m, x, w, y, packed| {
            gemm_bf16(ctx, (m, self.n, self.k), x, w, y, packed)
        })
    }

    /// The products, each through `gemm(ctx, rows, a, b, c, packed B)` on contiguous
    /// row-major operands `rows x k`, `k x n` and `rows x n`.
    fn run_products<T: Send + Sync>(
        &self,
        ctx: &KernelContext<'_>,
        x: &[T],
        w: &[T],
        y: &mut [T],
        packed: Option<&PackedB>,
        gemm: impl Fn(
                &KernelContext<'_>,
                usize,
                &[T],
                &[T],
                &mut [T],
                Option<&PackedB>,
            ) -> Result<(), PluginError>
            + Sync,
    ) -> Result<(), PluginError> {
        let (m, k, n) = (self.m, self.k, self.n);
        if y.is_empty() {
            return Ok(());
        }
        if self.offs.is_empty() {
            // B shared by every batch: fold the batches into M, one gemm.
            return gemm(ctx, self.nb * m, x, w, y, packed);
        }
        if w.is_empty() && k > 0 {
            // Only a 2-D B is absorbed, and its products fold into one gemm above.
            return Err(PluginError::internal(
                "MatMul: batched products with an absorbed B",
            ));
        }
        // One task per product (attention's per-head products are each too small to keep
        // two threads busy inside the gemm); a task's gemm may still split further.
        let yd = Disjoint::new(y);
        ctx.parallel_for(self.offs.len(), 1, |range| {
            for (i, &(oa, ob)) in self.offs[range.clone()].iter().enumerate() {
                // SAFETY: product `range.start + i` writes its own block of y.
                let yb = unsafe { yd.part((range.start + i) * m * n, m * n) };
                gemm(ctx, m, &x[oa..], &w[ob..], yb, None)?;
            }
            Ok(())
        })
    }

    /// The products as plain loops (f64 and integers; integers wrap as numpy's do).
    fn run_loop<T: MatElem>(
        &self,
        ctx: &KernelContext<'_>,
        x: &[T],
        w: &[T],
        y: &mut [T],
    ) -> Result<(), PluginError> {
        let (m, k, n) = (self.m, self.k, self.n);
        if y.is_empty() {
            return Ok(());
        }
        let grain = (4096 / (k * n).max(1)).max(1) * n;
        ctx.parallel_chunks(y, grain, |start, chunk| {
            for (j, v) in chunk.iter_mut().enumerate() {
                let idx = start + j;
                let (row, col) = (idx / n, idx % n);
                let (bi, r) = (row / m, row % m);
                let (oa, ob) = match self.offs.get(bi) {
                    Some(&o) => o,
                    None => (bi * m * k, 0),
                };
                let a = &x[oa + r * k..oa + r * k + k];
                let mut acc = T::default();
                for (p, &av) in a.iter().enumerate() {
                    acc = acc.mul_add(av, w[ob + p * n + col]);
                }
                *v = acc;
            }
        })
    }
}

/// An element MatMul computes on without BLAS.
trait MatElem: Element + Default {
    /// `self + a * b` (wrapping for integers).
    fn mul_add(self, a: Self, b: Self) -> Self;
}

impl MatElem for f64 {
    fn mul_add(self, a: f64, b: f64) -> f64 {
        self + a * b
    }
}

macro_rules! mat_int {
    ($($t:ty),*) => {$(
        impl MatElem for $t {
            fn mul_add(self, a: $t, b: $t) -> $t {
                self.wrapping_add(a.wrapping_mul(b))
            }
        }
    )*};
}
mat_int!(i32, i64, u32, u64);

/// f16 / bf16 operands widened to f32.
fn widen<T: Element + Copy>(v: &TensorView<'_>, f: fn(T) -> f32) -> Result<Vec<f32>, PluginError> {
    Ok(v.as_slice::<T>()?.iter().map(|&x| f(x)).collect())
}

impl Kernel for MatMul {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        use opreg_sdk::half::f16;
        let Operands { a, b_shape, b } = operands("MatMul", inputs, &self.pre)?;
        if let Some(b) = &b {
            if a.dtype != b.dtype {
                return Err(PluginError::invalid(format!(
                    "MatMul: A is {} but B is {}",
                    a.dtype, b.dtype
                )));
            }
        }
        // Only an f32 or bf16 B is ever absorbed, and then A has its type (`operands`).
        let given = || {
            b.ok_or_else(|| PluginError::internal("MatMul: B was absorbed but A's type differs"))
        };
        let plan = MatMulPlan::new(a.shape(), &b_shape)?;
        let shape = plan.out_shape.clone();
        macro_rules! looped {
            ($t:ty) => {
                plan.run_loop(
                    ctx,
                    a.as_slice::<$t>()?,
                    given()?.as_slice()?,
                    ctx.output_slice(0, &shape)?,
                )
            };
        }
        match a.dtype {
            DType::F32 => plan.run_f32(
                ctx,
                a.as_slice()?,
                b_data(&b)?,
                ctx.output_slice_to_overwrite::<f32>(0, &shape)?,
                self.pre.as_ref().map(|p| &*p.packed),
            ),
            DType::F16 => {
                // Output first (the host refuses sizes past its limit), then the f32 result
                // it rounds: with K = 0 both can be far larger than A and B.
                let out = ctx.output_slice::<f16>(0, &shape)?;
                let mut y = try_vec(checked_numel(&shape)?, 0.0f32)?;
                plan.run_f32(
                    ctx,
                    &widen(&a, f16::to_f32)?,
                    &widen(&given()?, f16::to_f32)?,
                    &mut y,
                    None,
                )?;
                out.iter_mut()
                    .zip(&y)
                    .for_each(|(o, &v)| *o = f16::from_f32(v));
                Ok(())
            }
            DType::BF16 if self.pre.is_some() || has_bf16_gemm(ctx) => plan.run_bf16(
                ctx,
                a.as_slice()?,
                b_data(&b)?,
                ctx.output_slice_to_overwrite::<bf16>(0, &shape)?,
                self.pre.as_ref().map(|p| &*p.packed),
            ),
            DType::BF16 => {
                // Output first (the host refuses sizes past its limit), then the f32 result
                // it rounds: with K = 0 both can be far larger than A and B.
                let out = ctx.output_slice::<bf16>(0, &shape)?;
                let mut y = try_vec(checked_numel(&shape)?, 0.0f32)?;
                plan.run_f32(
                    ctx,
                    &widen(&a, bf16::to_f32)?,
                    &widen(&given()?, bf16::to_f32)?,
                    &mut y,
                    None,
                )?;
                out.iter_mut()
                    .zip(&y)
                    .for_each(|(o, &v)| *o = bf16::from_f32(v));
                Ok(())
            }
            DType::F64 => looped!(f64),
            DType::I32 => looped!(i32),
            DType::I64 => looped!(i64),
            DType::U32 => looped!(u32),
            DType::U64 => looped!(u64),
            other => Err(PluginError::unimplemented(format!(
                "MatMul is not implemented for {other}"
            ))),
        }
    }

    fn absorbed(&self) -> Vec<usize> {
        self.pre.iter().map(|_| 1).collect()
    }
}

/// `opreg::FusedMatMul(A, B, bias)`: MatMul followed by the `Add` of a per-column bias and,
/// with the `activation` attribute, an activation (the graph pass `matmul-add` makes these from
/// MatMul + Add [+ GELU]): both applied in one pass over the output instead of further nodes
/// with their own output buffers. f32.
struct FusedMatMul {
    matmul: MatMul,
    act: Activation,
}

impl Kernel for FusedMatMul {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let Operands { a, b_shape, b } = operands("FusedMatMul", inputs, &self.matmul.pre)?;
        let bias = input("FusedMatMul", inputs, 2, "bias")?;
        let plan = MatMulPlan::new(a.shape(), &b_shape)?;
        let bias = bias.as_slice::<f32>()?;
        if bias.len() != plan.n {
            return Err(PluginError::invalid(format!(
                "FusedMatMul: bias has {} elements for {} columns",
                bias.len(),
                plan.n
            )));
        }
        let y = ctx.output_slice_to_overwrite::<f32>(0, &plan.out_shape)?;
        let (a, b) = (a.as_slice()?, b_data(&b)?);
        let packed = self.matmul.pre.as_ref().map(|p| &*p.packed);
        // B shared by every batch (a linear layer): one gemm, the bias and activation in its
        // tiles where the backend supports them.
        if let (true, Some(code)) = (plan.offs.is_empty(), self.act.blas_epilogue()) {
            let dims = (plan.nb * plan.m, plan.n, plan.k);
            if gemm_f32_with_epilogue(ctx, "FusedMatMul", dims, a, b, y, packed, (bias, code))? {
                return Ok(());
            }
        }
        plan.run_f32(ctx, a, b, y, packed)?;
        let n = plan.n.max(1);
        let act = self.act;
        ctx.parallel_chunks(y, (16384 / n).max(1) * n, |_, chunk| {
            finish_rows(chunk, bias, act)
        })
    }

    fn absorbed(&self) -> Vec<usize> {
        self.matmul.absorbed()
    }
}

crate::simd::simd_fn! {
    /// `v = act(v + bias[column])` over whole rows of `bias.len()` columns, with the activation
    /// chosen once outside the loop so that the loop vectorizes (GELU's erf included),
    /// compiled for AVX-512 and AVX2 too.
    fn finish_rows(rows: &mut [f32], bias: &[f32], act: Activation) {
        macro_rules! each {
            ($a:expr) => {
                // Plain loops: a `for_each` may be compiled out of line, outside the
                // instruction set this function is compiled for (see blas-cpu's epilogue).
                for row in rows.chunks_mut(bias.len().max(1)) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v = $a.apply(*v + b);
                    }
                }
            };
        }
        match act {
            Activation::None => each!(Activation::None),
            Activation::Relu => each!(Activation::Relu),
            Activation::Clip(lo, hi) => each!(Activation::Clip(lo, hi)),
            Activation::LeakyRelu(a) => each!(Activation::LeakyRelu(a)),
            Activation::SiLU => each!(Activation::SiLU),
            Activation::Gelu => each!(Activation::Gelu),
        }
    }
}

fn fused_matmul_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(FusedMatMul {
        matmul: MatMul {
            pre: prepack(node, 1, false),
        },
        act: Activation::from_node(node, "FusedMatMul")?,
    }))
}

#[derive(Clone)]
struct Gemm {
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
    /// B pre-packed at model load when it is a constant f32 matrix.
    pre: Option<Prepacked>,
}

fn gemm_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Gemm {
        alpha: node.float_or("alpha", 1.0)?,
        beta: node.float_or("beta", 1.0)?,
        trans_a: node.int_or("transA", 0)? != 0,
        trans_b: node.int_or("transB", 0)? != 0,
        pre: prepack(node, 1, node.int_or("transB", 0)? != 0),
    }))
}

impl Kernel for Gemm {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let Operands { a, b_shape, b } = operands("Gemm", inputs, &self.pre)?;
        let (&[ra, ca], &[rb, cb]) = (a.shape(), &*b_shape) else {
            return Err(PluginError::invalid(format!(
                "Gemm: A and B must be 2-D, got {:?} and {:?}",
                a.shape(),
                b_shape
            )));
        };
        let (m, k) = if self.trans_a { (ca, ra) } else { (ra, ca) };
        let (k2, n) = if self.trans_b { (cb, rb) } else { (rb, cb) };
        if k != k2 {
            return Err(PluginError::invalid(format!(
                "Gemm: inner dimensions differ (op(A) is {m}x{k}, op(B) is {k2}x{n})"
            )));
        }
        let y = ctx.output_slice_to_overwrite::<f32>(0, &[m, n])?;
        let mut beta = 0.0;
        if let Some(c) = optional(inputs, 2) {
            let cs = c.shape();
            let ok = cs.len() <= 2
                && cs
                    .iter()
                    .rev()
                    .zip([n, m])
                    .all(|(&d, want)| d == 1 || d == want);
            if !ok {
                return Err(PluginError::invalid(format!(
                    "Gemm: C of shape {cs:?} does not broadcast to ({m}, {n})"
                )));
            }
            if self.beta != 0.0 {
                let cv = c.as_slice::<f32>()?;
                let mut i = 0;
                walk_offsets(&[m, n], &broadcast_strides(cs, &[m, n]), 0, m * n, |o| {
                    y[i] = self.beta * cv[o];
                    i += 1;
                });
                beta = 1.0;
            }
        }
        gemm_f32(
            ctx,
            "Gemm",
            self.trans_a,
            self.trans_b,
            m,
            n,
            k,
            self.alpha,
            a.as_slice()?,
            b_data(&b)?,
            beta,
            y,
            self.pre.as_ref().map(|p| &*p.packed),
        )
    }

    fn absorbed(&self) -> Vec<usize> {
        self.pre.iter().map(|_| 1).collect()
    }
}

fn matmul_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(MatMul {
        pre: prepack(node, 1, false),
    }))
}

pub fn register(r: &mut Registrar) {
    use opreg_sdk::dtype::names::*;
    let t: &[(&str, &[DType])] = &[("T", &[F32])];
    // MatMul's types by schema version: floats from 1, 32/64-bit integers from 9, bf16 from 13.
    let versions: [(i32, i32, &[DType]); 3] = [
        (1, 8, &[F32, F16, F64]),
        (9, 12, &[F32, F16, F64, I32, I64, U32, U64]),
        (13, OPEN_END, &[F32, F16, F64, I32, I64, U32, U64, BF16]),
    ];
    for (since, end, types) in versions {
        r.kernel(
            KernelDesc::onnx("MatMul", since, end)
                .constraint("T", types)
                .inputs(&["T", "T"])
                .outputs(&["T"]),
            matmul_factory,
        );
    }
    // MatMul with its bias Add fused in (the graph pass `matmul-add` makes these).
    r.kernel(
        KernelDesc::new("opreg", "FusedMatMul", 1, OPEN_END)
            .constraint("T", &[F32])
            .inputs(&["T", "T", "T"])
            .outputs(&["T"]),
        fused_matmul_factory,
    );
    // Gemm before 7 had the `broadcast` attribute; from 11 C is optional.
    register_versions(
        r,
        "Gemm",
        &[7, 9, 11, 13],
        t,
        &["T", "T", "T"],
        &["T"],
        gemm_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testblas::{naive_matmul, NaiveBlas, NaiveEpilogueBlas};
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, run_kernel_absorbing, run_kernel_opt, NodeSpec},
    };

    fn seq(n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * scale)
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        crate::util::testing::assert_close(a, b, 1e-4);
    }

    #[test]
    fn fused_matmul_applies_bias_then_its_activation() {
        // 3 rows of 40 columns: the epilogue's vector loop and its tail.
        let (m, k, n) = (3, 5, 40);
        let a = seq(m * k, 0.5);
        let b = seq(k * n, 0.25);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / 8.0 - 2.0).collect();
        let ta = HostTensor::from_vec(&[m, k], &a).expect("a");
        let tb = HostTensor::from_vec(&[k, n], &b).expect("b");
        let tbias = HostTensor::from_vec(&[n], &bias).expect("bias");
        let sum: Vec<f64> = naive_matmul(&a, &b, m, k, n)
            .iter()
            .enumerate()
            .map(|(i, &v)| f64::from(v) + f64::from(bias[i % n]))
            .collect();
        let erf_gelu =
            |v: f64| 0.5 * v * (1.0 + opreg_sdk::numeric::erf64(v / std::f64::consts::SQRT_2));
        for (act, f) in [
            ("", &(|v: f64| v) as &dyn Fn(f64) -> f64),
            ("Relu", &|v: f64| v.max(0.0)),
            ("Gelu", &erf_gelu),
        ] {
            let node = NodeSpec::onnx("FusedMatMul", 1)
                .domain("opreg")
                .attr("activation", AttrValue::String(act.into()));
            // The bias and activation applied here, and in the BLAS's epilogue.
            for in_blas in [false, true] {
                let blas: Box<dyn Blas> = if in_blas {
                    Box::new(NaiveEpilogueBlas)
                } else {
                    Box::new(NaiveBlas)
                };
                let out = run_kernel(fused_matmul_factory, &node, &[&ta, &tb, &tbias], Some(blas))
                    .expect("run");
                let got = out[0].to_vec::<f32>().expect("y");
                for (i, (&g, &s)) in got.iter().zip(&sum).enumerate() {
                    let want = f(s);
                    assert!(
                        (f64::from(g) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{act:?} (in the BLAS: {in_blas}) at {i}: {g} vs {want}"
                    );
                }
            }
        }
        // An activation it does not have fails the load, naming it.
        let node = NodeSpec::onnx("FusedMatMul", 1)
            .domain("opreg")
            .attr("activation", AttrValue::String("Swoosh".into()));
        let err = run_kernel(
            fused_matmul_factory,
            &node,
            &[&ta, &tb, &tbias],
            Some(Box::new(NaiveBlas)),
        )
        .expect_err("unknown activation");
        assert!(err.to_string().contains("Swoosh"), "{err}");
    }

    #[test]
    fn a_constant_b_packed_at_load_is_absorbed_and_never_read() {
        use crate::nn::testblas::NaivePackingBlas;
        // A batch of 2 x 3 rows (folded into one gemm), B 5 x 4 (Gemm: given transposed).
        let (m, k, n) = (6, 5, 4);
        let a = seq(m * k, 0.5);
        let b = seq(k * n, 0.25);
        let want: Vec<f32> = naive_matmul(&a, &b, m, k, n);
        let bias = vec![0.5f32; n];
        let ta = HostTensor::from_vec(&[2, 3, k], &a).expect("a");
        let ta2 = HostTensor::from_vec(&[m, k], &a).expect("a");
        let tb = HostTensor::from_vec(&[k, n], &b).expect("b");
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let tbt = HostTensor::from_vec(&[n, k], &bt).expect("b^T");
        let tbias = HostTensor::from_vec(&[n], &bias).expect("bias");
        let with_bias: Vec<f32> = want.iter().map(|v| v + 0.5).collect();
        type Case<'a> = (
            &'a str,
            fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>,
            NodeSpec,
            Vec<&'a HostTensor>,
            &'a [f32],
        );
        let cases: [Case<'_>; 3] = [
            (
                "MatMul",
                matmul_factory,
                NodeSpec::onnx("MatMul", 13),
                vec![&ta, &tb],
                &want,
            ),
            (
                "Gemm",
                gemm_factory,
                NodeSpec::onnx("Gemm", 13).attr("transB", AttrValue::Int(1)),
                vec![&ta2, &tbt],
                &want,
            ),
            (
                "FusedMatMul",
                fused_matmul_factory,
                NodeSpec::onnx("FusedMatMul", 1).domain("opreg"),
                vec![&ta, &tb, &tbias],
                &with_bias,
            ),
        ];
        for (op, factory, node, inputs, want) in cases {
            let inputs: Vec<Option<&HostTensor>> = inputs.into_iter().map(Some).collect();
            // B constant and packed: absorbed, and the test kit runs the kernel without it,
            // as the daemon does.
            let (out, absorbed) = run_kernel_absorbing(
                factory,
                &node.clone().constant(1),
                &inputs,
                Some(Box::new(NaivePackingBlas)),
            )
            .unwrap_or_else(|e| panic!("{op}: {e}"));
            assert_eq!(absorbed, [1], "{op}");
            close(&out[0].to_vec::<f32>().expect("y"), want);
            // B given at run time, or constant with a backend that does not pack: read.
            for (node, blas) in [
                (node.clone(), Box::new(NaivePackingBlas) as Box<dyn Blas>),
                (node.clone().constant(1), Box::new(NaiveBlas)),
            ] {
                let (out, absorbed) = run_kernel_absorbing(factory, &node, &inputs, Some(blas))
                    .unwrap_or_else(|e| panic!("{op}: {e}"));
                assert!(absorbed.is_empty(), "{op}");
                close(&out[0].to_vec::<f32>().expect("y"), want);
            }
        }
    }

    fn matmul(sa: &[usize], sb: &[usize]) -> (Vec<usize>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let a = seq(sa.iter().product(), 0.5);
        let b = seq(sb.iter().product(), 0.25);
        let ta = HostTensor::from_vec(sa, &a).expect("a");
        let tb = HostTensor::from_vec(sb, &b).expect("b");
        let out = run_kernel(
            matmul_factory,
            &NodeSpec::onnx("MatMul", 13),
            &[&ta, &tb],
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        (
            out[0].shape().to_vec(),
            out[0].to_vec::<f32>().expect("f32"),
            a,
            b,
        )
    }

    #[test]
    fn matmul_2d_and_vectors() {
        let (shape, y, a, b) = matmul(&[3, 4], &[4, 5]);
        assert_eq!(shape, vec![3, 5]);
        close(&y, &naive_matmul(&a, &b, 3, 4, 5));
        let (shape, y, a, b) = matmul(&[4], &[4, 5]);
        assert_eq!(shape, vec![5]);
        close(&y, &naive_matmul(&a, &b, 1, 4, 5));
        let (shape, y, a, b) = matmul(&[3, 4], &[4]);
        assert_eq!(shape, vec![3]);
        close(&y, &naive_matmul(&a, &b, 3, 4, 1));
        let (shape, y, a, b) = matmul(&[4], &[4]);
        assert_eq!(shape, Vec::<usize>::new());
        close(&y, &naive_matmul(&a, &b, 1, 4, 1));
    }

    #[test]
    fn matmul_batch_broadcast() {
        // A [2,1,3,4] x B [3,4,2] -> [2,3,3,2]
        let (shape, y, a, b) = matmul(&[2, 1, 3, 4], &[3, 4, 2]);
        assert_eq!(shape, vec![2, 3, 3, 2]);
        let mut want = Vec::new();
        for i in 0..2 {
            for j in 0..3 {
                want.extend(naive_matmul(
                    &a[i * 12..(i + 1) * 12],
                    &b[j * 8..(j + 1) * 8],
                    3,
                    4,
                    2,
                ));
            }
        }
        close(&y, &want);
        // Shared B folds into one gemm.
        let (shape, y, a, b) = matmul(&[2, 3, 4], &[4, 2]);
        assert_eq!(shape, vec![2, 3, 2]);
        close(&y, &naive_matmul(&a, &b, 6, 4, 2));
        // 1-D A against a batch of B.
        let (shape, y, a, b) = matmul(&[4], &[2, 4, 3]);
        assert_eq!(shape, vec![2, 3]);
        let mut want = naive_matmul(&a, &b[..12], 1, 4, 3);
        want.extend(naive_matmul(&a, &b[12..], 1, 4, 3));
        close(&y, &want);
    }

    #[test]
    fn matmul_errors() {
        let a = HostTensor::from_vec(&[1, 2], &[1.0f32, 2.0]).expect("a");
        let b = HostTensor::from_vec(&[3, 1], &[3.0f32, 4.0, 5.0]).expect("b");
        let err = run_kernel(
            matmul_factory,
            &NodeSpec::onnx("MatMul", 13),
            &[&a, &b],
            Some(Box::new(NaiveBlas)),
        )
        .expect_err("mismatch");
        assert!(err.message.contains("inner dimensions"), "{}", err.message);
        let b = HostTensor::from_vec(&[2, 1], &[3.0f32, 4.0]).expect("b");
        let err = run_kernel(
            matmul_factory,
            &NodeSpec::onnx("MatMul", 13),
            &[&a, &b],
            None,
        )
        .expect_err("no blas");
        assert!(
            err.message.contains("needs a BLAS backend"),
            "{}",
            err.message
        );
    }

    #[test]
    fn bf16_products_run_in_the_blas_bf16_gemm_or_widened() {
        use crate::nn::testblas::NaivePackingBlas;
        // Values of a few bits: every sum is exact in f32 and in bf16, whatever the path.
        let (k, n) = (5, 4);
        let a = seq(2 * 3 * k, 0.5);
        let b = seq(k * n, 0.25);
        let b2 = seq(2 * k * n, 0.125);
        let h = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let ta = HostTensor::from_vec(&[2, 3, k], &h(&a)).expect("a");
        let tb = HostTensor::from_vec(&[k, n], &h(&b)).expect("b");
        let tb2 = HostTensor::from_vec(&[2, k, n], &h(&b2)).expect("b2");
        let shared = h(&naive_matmul(&a, &b, 6, k, n));
        let batched: Vec<bf16> = (0..2)
            .flat_map(|p| {
                let (ap, bp) = (
                    &a[p * 3 * k..(p + 1) * 3 * k],
                    &b2[p * k * n..(p + 1) * k * n],
                );
                h(&naive_matmul(ap, bp, 3, k, n))
            })
            .collect();
        let run = |node: NodeSpec, b: &HostTensor, blas: Box<dyn Blas>| {
            let (out, absorbed) =
                run_kernel_absorbing(matmul_factory, &node, &[Some(&ta), Some(b)], Some(blas))
                    .expect("run");
            (out[0].to_vec::<bf16>().expect("bf16"), absorbed)
        };
        let node = NodeSpec::onnx("MatMul", 13);
        // A constant B is packed by the BLAS's bf16 flavour and absorbed (the widening path
        // could not run without it).
        let (y, absorbed) = run(node.clone().constant(1), &tb, Box::new(NaivePackingBlas));
        assert_eq!((y, absorbed), (shared.clone(), vec![1]));
        // B given at run time: the bf16 gemm per call; per product for a batched B.
        assert_eq!(run(node.clone(), &tb, Box::new(NaiveBlas)).0, shared);
        assert_eq!(run(node.clone(), &tb2, Box::new(NaiveBlas)).0, batched);
        // A backend without the bf16 flavour: widened to its f32 gemm, same values.
        let (y, absorbed) = run(node.clone().constant(1), &tb, Box::new(NaiveEpilogueBlas));
        assert_eq!((y, absorbed), (shared, vec![]));
        assert_eq!(run(node, &tb2, Box::new(NaiveEpilogueBlas)).0, batched);
    }

    #[test]
    fn matmul_other_types() {
        use opreg_sdk::half::{bf16, f16};
        // [[1,2,3],[4,5,6]] x [[1,0],[0,1],[2,-1]] = [[7,-1],[16,-1]]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 2.0, -1.0];
        let want = [7.0, -1.0, 16.0, -1.0];
        let run = |ta: HostTensor, tb: HostTensor, blas: bool| {
            let blas: Option<Box<dyn opreg_sdk::blas::Blas>> = if blas {
                Some(Box::new(NaiveBlas))
            } else {
                None
            };
            let out = run_kernel(
                matmul_factory,
                &NodeSpec::onnx("MatMul", 13),
                &[&ta, &tb],
                blas,
            )
            .expect("run");
            assert_eq!(out[0].shape(), &[2, 2]);
            out.into_iter().next().expect("output")
        };
        let h = |v: &[f64]| v.iter().map(|&x| f16::from_f64(x)).collect::<Vec<_>>();
        let y = run(
            HostTensor::from_vec(&[2, 3], &h(&a)).expect("a"),
            HostTensor::from_vec(&[3, 2], &h(&b)).expect("b"),
            true,
        );
        assert_eq!(y.to_vec::<f16>().expect("f16"), h(&want));
        let bh = |v: &[f64]| v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>();
        let y = run(
            HostTensor::from_vec(&[2, 3], &bh(&a)).expect("a"),
            HostTensor::from_vec(&[3, 2], &bh(&b)).expect("b"),
            true,
        );
        assert_eq!(y.to_vec::<bf16>().expect("bf16"), bh(&want));
        // f64 and integers need no BLAS.
        let y = run(
            HostTensor::from_vec(&[2, 3], &a).expect("a"),
            HostTensor::from_vec(&[3, 2], &b).expect("b"),
            false,
        );
        assert_eq!(y.to_vec::<f64>().expect("f64"), want.to_vec());
        let i = |v: &[f64]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
        let y = run(
            HostTensor::from_vec(&[2, 3], &i(&a)).expect("a"),
            HostTensor::from_vec(&[3, 2], &i(&b)).expect("b"),
            false,
        );
        assert_eq!(y.to_vec::<i32>().expect("i32"), i(&want));
        // Integer products wrap; batches broadcast: [2,1,2] x [2,1] (u64).
        let ta = HostTensor::from_vec(&[2, 1, 2], &[1u64, 2, u64::MAX, 1]).expect("a");
        let tb = HostTensor::from_vec(&[2, 1], &[3u64, 4]).expect("b");
        let out = run_kernel(
            matmul_factory,
            &NodeSpec::onnx("MatMul", 13),
            &[&ta, &tb],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[2, 1, 1]);
        assert_eq!(out[0].to_vec::<u64>().expect("u64"), vec![11, 1]);
        // Batched B: [2,1,2] x [2,2,1] (i64).
        let ta = HostTensor::from_vec(&[2, 1, 2], &[1i64, 2, 3, 4]).expect("a");
        let tb = HostTensor::from_vec(&[2, 2, 1], &[5i64, 6, -7, 8]).expect("b");
        let out = run_kernel(
            matmul_factory,
            &NodeSpec::onnx("MatMul", 13),
            &[&ta, &tb],
            None,
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<i64>().expect("i64"), vec![17, 11]);
    }

    fn transpose(x: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = x[i * c + j];
            }
        }
        t
    }

    #[test]
    fn gemm_transposes_and_broadcast_c() {
        let (m, k, n) = (3, 4, 5);
        let a = seq(m * k, 0.5);
        let b = seq(k * n, 0.25);
        let base = naive_matmul(&a, &b, m, k, n);
        let c_row = seq(n, 1.0);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let av = if ta { transpose(&a, m, k) } else { a.clone() };
            let bv = if tb { transpose(&b, k, n) } else { b.clone() };
            let tav = HostTensor::from_vec(&(if ta { [k, m] } else { [m, k] }), &av).expect("a");
            let tbv = HostTensor::from_vec(&(if tb { [n, k] } else { [k, n] }), &bv).expect("b");
            let tc = HostTensor::from_vec(&[n], &c_row).expect("c");
            let node = NodeSpec::onnx("Gemm", 13)
                .attr("transA", AttrValue::Int(ta as i64))
                .attr("transB", AttrValue::Int(tb as i64))
                .attr("alpha", AttrValue::Float(2.0))
                .attr("beta", AttrValue::Float(0.5));
            let out = run_kernel(
                gemm_factory,
                &node,
                &[&tav, &tbv, &tc],
                Some(Box::new(NaiveBlas)),
            )
            .expect("run");
            let want: Vec<f32> = (0..m * n)
                .map(|i| 2.0 * base[i] + 0.5 * c_row[i % n])
                .collect();
            assert_eq!(out[0].shape(), &[m, n]);
            close(&out[0].to_vec::<f32>().expect("f32"), &want);
        }
        // C of shape (M, 1), and no C at all.
        let ta = HostTensor::from_vec(&[m, k], &a).expect("a");
        let tb = HostTensor::from_vec(&[k, n], &b).expect("b");
        let tc = HostTensor::from_vec(&[m, 1], &[1.0f32, 2.0, 3.0]).expect("c");
        let out = run_kernel(
            gemm_factory,
            &NodeSpec::onnx("Gemm", 13),
            &[&ta, &tb, &tc],
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        let want: Vec<f32> = (0..m * n).map(|i| base[i] + (i / n + 1) as f32).collect();
        close(&out[0].to_vec::<f32>().expect("f32"), &want);
        let out = run_kernel_opt(
            gemm_factory,
            &NodeSpec::onnx("Gemm", 13),
            &[Some(&ta), Some(&tb), None],
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        close(&out[0].to_vec::<f32>().expect("f32"), &base);
    }

    #[test]
    fn matmul_and_gemm_official_cases() {
        crate::testcases::run_cases_with(&["test_matmul_"], matmul_factory, || {
            Some(Box::new(NaiveBlas))
        });
        crate::testcases::run_cases_with(&["test_gemm_"], gemm_factory, || {
            Some(Box::new(NaiveBlas))
        });
    }

    /// K = 0 with large M and N: 2^40 outputs from empty operands fail as too large (the f16
    /// and bf16 paths used to abort on an infallible f32 buffer); huge batch extents of empty
    /// operands do not overflow.
    #[test]
    fn empty_inner_dimension_with_huge_output() {
        use opreg_sdk::half::{bf16, f16};
        let node = NodeSpec::onnx("MatMul", 13);
        let run = |a: HostTensor, b: HostTensor| {
            run_kernel(matmul_factory, &node, &[&a, &b], Some(Box::new(NaiveBlas)))
        };
        for e in [
            run(
                HostTensor::from_vec::<f16>(&[1 << 20, 0], &[]).expect("a"),
                HostTensor::from_vec::<f16>(&[0, 1 << 20], &[]).expect("b"),
            ),
            run(
                HostTensor::from_vec::<bf16>(&[1 << 20, 0], &[]).expect("a"),
                HostTensor::from_vec::<bf16>(&[0, 1 << 20], &[]).expect("b"),
            ),
            run(
                HostTensor::from_vec::<f32>(&[1 << 20, 0], &[]).expect("a"),
                HostTensor::from_vec::<f32>(&[0, 1 << 20], &[]).expect("b"),
            ),
        ] {
            let e = e.expect_err("too large");
            assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
        }
        // [2^40, 0, 2^19, 2, 3] x [1, 3, 4]: an empty result, no offsets per batch.
        let out = run(
            HostTensor::from_vec::<f32>(&[1 << 40, 0, 1 << 19, 2, 3], &[]).expect("a"),
            HostTensor::from_vec(&[1, 3, 4], &[0.5f32; 12]).expect("b"),
        )
        .expect("empty");
        assert_eq!(out[0].shape(), &[1 << 40, 0, 1 << 19, 2, 4]);
    }
}
