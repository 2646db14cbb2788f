//! Data movement: Reshape, Flatten, Squeeze, Unsqueeze (a device-to-device copy under a new
//! shape), Transpose (a strided gather), Concat and Gather. Shape-like inputs (Reshape's
//! shape, axes, Gather's indices) are declared host memory: they are small and read here.

use super::elementwise::MAX_RANK;
use super::module::{DeviceBuf, Kernels, F};
use super::{axis, count, decline, f32_outputs, optional, required, upload_constant, Env, Reg};
use crate::args;
use opreg_sdk::prelude::*;
use std::sync::Arc;

/// `Strided` of `kernels.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Strided {
    pub rank: i32,
    pub dims: [i64; MAX_RANK],
    pub ss: [i64; MAX_RANK],
}

/// y = scale * src read at `strides` over the contiguous output `out`.
pub fn gather_strided(
    env: &Env<'_, '_>,
    src: u64,
    y: u64,
    out: &[usize],
    strides: &[i64],
    scale: f32,
) -> Result<(), PluginError> {
    let len = count(out)?;
    if len == 0 {
        return Ok(());
    }
    // The broadcast description with the same strides on both sides: extents of 1 dropped,
    // dimensions walked contiguously merged.
    let b = super::elementwise::coalesce(out, strides, strides)?;
    let s = Strided {
        rank: b.rank,
        dims: b.dims,
        ss: b.sa,
    };
    let n = len as u64;
    // SAFETY: gather_strided_f32(const float*, float*, u64, float, Strided); the strides
    // come from the source's shape, so every read is inside it.
    unsafe { env.launch_n(F::GatherStrided, len, &mut args![src, y, n, scale, s]) }
}

/// Which reshaping operator, and its attributes.
enum Reshaping {
    /// Reshape: the shape input (host); `allowzero`.
    Reshape(bool),
    Flatten(i64),
    /// Squeeze / Unsqueeze with axes as an attribute (opset < 13) or input 1.
    Squeeze(Option<Vec<i64>>),
    Unsqueeze(Option<Vec<i64>>),
}

struct Reshape {
    k: Arc<Kernels>,
    how: Reshaping,
}

fn make_reshape(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let how = match node.op_type {
        "Reshape" => Reshaping::Reshape(node.int_or("allowzero", 0)? != 0),
        "Flatten" => Reshaping::Flatten(node.int_or("axis", 1)?),
        "Squeeze" => Reshaping::Squeeze(node.ints("axes")?),
        "Unsqueeze" => Reshaping::Unsqueeze(node.ints("axes")?),
        _ => return Err(decline(node, "is not a reshaping operator")),
    };
    Ok(Box::new(Reshape { k: k.clone(), how }))
}

/// The output shape of a reshaping operator over `xs`, with its shape/axes input `arg`.
fn reshaped(
    how: &Reshaping,
    xs: &[usize],
    arg: Option<&TensorView<'_>>,
) -> Result<Vec<usize>, PluginError> {
    let ints = || -> Result<Vec<i64>, PluginError> {
        arg.map(|t| t.to_i64s())
            .transpose()
            .map(|v| v.unwrap_or_default())
    };
    let total = count(xs)?;
    Ok(match how {
        Reshaping::Reshape(allowzero) => {
            let want = ints()?;
            let mut out = Vec::with_capacity(want.len());
            let mut infer = None;
            for (i, &d) in want.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    0 if !allowzero => out.push(*xs.get(i).ok_or_else(|| {
                        PluginError::invalid(format!(
                            "Reshape: 0 at {i} copies a dimension X does not have"
                        ))
                    })?),
                    d if d >= 0 => out.push(d as usize),
                    _ => return Err(PluginError::invalid(format!("Reshape: shape {want:?}"))),
                }
            }
            let known = count(&out)?;
            if let Some(i) = infer {
                if known == 0 || total % known != 0 {
                    return Err(PluginError::invalid(format!(
                        "Reshape: {xs:?} cannot take shape {want:?}"
                    )));
                }
                out[i] = total / known;
            }
            out
        }
        Reshaping::Flatten(a) => {
            let a = if *a < 0 { *a + xs.len() as i64 } else { *a };
            if a < 0 || a > xs.len() as i64 {
                return Err(PluginError::invalid(format!(
                    "Flatten: axis {a} for rank {}",
                    xs.len()
                )));
            }
            vec![count(&xs[..a as usize])?, count(&xs[a as usize..])?]
        }
        Reshaping::Squeeze(attr) => {
            let axes = match attr {
                Some(a) => a.clone(),
                None => ints()?,
            };
            if axes.is_empty() {
                xs.iter().copied().filter(|&d| d != 1).collect()
            } else {
                let drop: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, xs.len(), "Squeeze"))
                    .collect::<Result<_, _>>()?;
                if let Some(&a) = drop.iter().find(|&&a| xs[a] != 1) {
                    return Err(PluginError::invalid(format!(
                        "Squeeze: dimension {a} of {xs:?} is not 1"
                    )));
                }
                xs.iter()
                    .enumerate()
                    .filter(|(i, _)| !drop.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
        }
        Reshaping::Unsqueeze(attr) => {
            let axes = match attr {
                Some(a) => a.clone(),
                None => ints()?,
            };
            let rank = xs.len() + axes.len();
            let mut add: Vec<usize> = axes
                .iter()
                .map(|&a| axis(a, rank, "Unsqueeze"))
                .collect::<Result<_, _>>()?;
            add.sort_unstable();
            add.dedup();
            if add.len() != axes.len() {
                return Err(PluginError::invalid("Unsqueeze: repeated axes"));
            }
            let mut rest = xs.iter();
            (0..rank)
                .map(|i| {
                    if add.contains(&i) {
                        1
                    } else {
                        *rest.next().unwrap_or(&1)
                    }
                })
                .collect()
        }
    })
}

impl Kernel for Reshape {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "Reshape", "data")?;
        let out = reshaped(&self.how, x.shape(), optional(inputs, 1))?;
        if count(&out)? != x.len() {
            return Err(PluginError::invalid(format!(
                "Reshape: {:?} ({} values) cannot take shape {out:?}",
                x.shape(),
                x.len()
            )));
        }
        let xp = env.input(x, "data")?;
        let yp = env.output(0, &out)?;
        env.k.copy_d2d(env.device, env.stream, yp, xp, x.len() * 4)
    }
}

struct Transpose {
    k: Arc<Kernels>,
    perm: Option<Vec<i64>>,
}

fn make_transpose(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Transpose {
        k: k.clone(),
        perm: node.ints("perm")?,
    }))
}

impl Kernel for Transpose {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "Transpose", "data")?;
        let xs = x.shape();
        let rank = xs.len();
        let perm: Vec<usize> = match &self.perm {
            Some(p) => p
                .iter()
                .map(|&a| axis(a, rank, "Transpose"))
                .collect::<Result<_, _>>()?,
            None => (0..rank).rev().collect(),
        };
        let mut seen = perm.clone();
        seen.sort_unstable();
        if seen != (0..rank).collect::<Vec<_>>() {
            return Err(PluginError::invalid(format!(
                "Transpose: perm {perm:?} for rank {rank}"
            )));
        }
        let strides = opreg_sdk::tensor::contiguous_strides(xs);
        let out: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
        let read: Vec<i64> = perm.iter().map(|&p| strides[p] as i64).collect();
        let (xp, yp) = (env.input(x, "data")?, env.output(0, &out)?);
        gather_strided(&env, xp, yp, &out, &read, 1.0)
    }
}

struct Concat {
    k: Arc<Kernels>,
    axis: i64,
}

fn make_concat(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Concat {
        k: k.clone(),
        axis: node.int_or("axis", 0)?,
    }))
}

impl Kernel for Concat {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let first = required(inputs, 0, "Concat", "inputs")?;
        let rank = first.rank();
        let a = axis(self.axis, rank, "Concat")?;
        let mut out = first.shape().to_vec();
        out[a] = 0;
        for t in inputs {
            let s = t.shape();
            if s.len() != rank || (0..rank).any(|i| i != a && s[i] != first.shape()[i]) {
                return Err(PluginError::invalid(format!(
                    "Concat: {:?} and {s:?} differ off axis {a}",
                    first.shape()
                )));
            }
            out[a] = out[a]
                .checked_add(s[a])
                .ok_or_else(|| PluginError::invalid("Concat: the output extent overflows"))?;
        }
        let yp = env.output(0, &out)?;
        if count(&out)? == 0 {
            // An empty output's other extents may not multiply.
            return Ok(());
        }
        let outer = count(&out[..a])? as u64;
        let inner = count(&out[a + 1..])?;
        let total = (out[a] * inner) as i64;
        let mut offset = 0i64;
        for t in inputs {
            let xp = env.input(t, "an input")?;
            let width = (t.shape()[a] * inner) as i64;
            // SAFETY: concat_part_f32(const float*, float*, u64 outer, i64 width, i64 total,
            // i64 offset); rows of `width` within rows of `total`.
            unsafe {
                env.launch_n(
                    F::ConcatPart,
                    t.len(),
                    &mut args![xp, yp, outer, width, total, offset],
                )?
            };
            offset += width;
        }
        Ok(())
    }
}

/// Gather: the data is declared host memory, as the tables it reads are mostly constants
/// (embeddings) uploaded once at load; data computed on the device comes back through the
/// host (two copies), the price of not copying a whole table per request.
struct Gather {
    k: Arc<Kernels>,
    axis: i64,
    data: Option<DeviceBuf>,
}

fn make_gather(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Gather {
        k: k.clone(),
        axis: node.int_or("axis", 0)?,
        data: upload_constant(k, node, 0)?,
    }))
}

impl Kernel for Gather {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "Gather", "data")?;
        let idx = required(inputs, 1, "Gather", "indices")?;
        let xs = x.shape();
        let a = axis(self.axis, xs.len(), "Gather")?;
        let extent = xs[a] as i64;
        // Checked and made positive here, on the host (the indices are host memory).
        let mut ids = idx.to_i64s()?;
        for v in ids.iter_mut() {
            let k = if *v < 0 { *v + extent } else { *v };
            if !(0..extent).contains(&k) {
                return Err(PluginError::invalid(format!(
                    "Gather: index {v} is out of range for axis {a} of extent {extent}"
                )));
            }
            *v = k;
        }
        let mut out = xs[..a].to_vec();
        out.extend_from_slice(idx.shape());
        out.extend_from_slice(&xs[a + 1..]);
        let xp = env.weight(x, &self.data, "data")?;
        let yp = env.output(0, &out)?;
        let mut bytes: Vec<u8> = Vec::new();
        bytes
            .try_reserve_exact(ids.len().saturating_mul(8))
            .map_err(|_| {
                PluginError::new(
                    ErrorCode::ResourceExhausted,
                    "Gather: no memory for the indices",
                )
            })?;
        bytes.extend(ids.iter().flat_map(|v| v.to_le_bytes()));
        let ip = env.ctx.device_scratch(bytes.len().max(8))?.ptr as usize as u64;
        env.k.upload(env.device, env.stream, ip, &bytes)?;
        let outer = count(&xs[..a])? as u64;
        let inner = count(&xs[a + 1..])? as i64;
        let cnt = ids.len() as i64;
        // SAFETY: gather_f32(const float*, const i64*, float*, u64 outer, i64 axis, i64
        // count, i64 inner); indices checked in range.
        unsafe {
            env.launch_n(
                F::Gather,
                count(&out)?,
                &mut args![xp, ip, yp, outer, extent, cnt, inner],
            )
        }
    }
}

pub fn regs() -> Vec<Reg> {
    let reg = |op, since, end, inputs: &'static [&'static str], host: &'static [usize], make| Reg {
        domain: "",
        op,
        since,
        end,
        inputs,
        outputs: 1,
        host_inputs: host,
        make,
        facts: f32_outputs,
    };
    vec![
        reg("Reshape", 5, OPEN_END, &["T", "I"], &[1], make_reshape),
        reg("Flatten", 1, OPEN_END, &["T"], &[], make_reshape),
        reg("Squeeze", 1, 12, &["T"], &[], make_reshape),
        reg("Squeeze", 13, OPEN_END, &["T", "I"], &[1], make_reshape),
        reg("Unsqueeze", 1, 12, &["T"], &[], make_reshape),
        reg("Unsqueeze", 13, OPEN_END, &["T", "I"], &[1], make_reshape),
        reg("Transpose", 1, OPEN_END, &["T"], &[], make_transpose),
        reg("Concat", 4, OPEN_END, &["T"], &[], make_concat),
        reg("Gather", 1, OPEN_END, &["T", "I"], &[0, 1], make_gather),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshaping_computes_onnx_shapes() {
        let ints =
            |v: &'static [i64]| TensorView::from_slice(v, [v.len()].to_vec().leak(), &[1]).unwrap();
        let t = ints(&[0, -1]);
        assert_eq!(
            reshaped(&Reshaping::Reshape(false), &[2, 3, 4], Some(&t)).unwrap(),
            vec![2, 12]
        );
        assert!(reshaped(
            &Reshaping::Reshape(false),
            &[2, 3, 5],
            Some(&ints(&[7, -1]))
        )
        .is_err());
        assert_eq!(
            reshaped(&Reshaping::Flatten(1), &[2, 3, 4], None).unwrap(),
            vec![2, 12]
        );
        assert_eq!(
            reshaped(&Reshaping::Flatten(0), &[2, 3], None).unwrap(),
            vec![1, 6]
        );
        assert_eq!(
            reshaped(&Reshaping::Squeeze(Some(vec![-1])), &[2, 1], None).unwrap(),
            vec![2]
        );
        assert_eq!(
            reshaped(&Reshaping::Squeeze(None), &[1, 2, 1], None).unwrap(),
            vec![2]
        );
        assert!(reshaped(&Reshaping::Squeeze(Some(vec![0])), &[2, 1], None).is_err());
        assert_eq!(
            reshaped(&Reshaping::Unsqueeze(Some(vec![0, 3])), &[2, 3], None).unwrap(),
            vec![1, 2, 3, 1]
        );
    }
}
