//! TensorScatter (opset 24): writes `update` into a copy of `past_cache` along the sequence
//! axis, at each batch's write index (modulo the cache length in "circular" mode).

use super::common::{input, optional, reg};
use opreg_sdk::prelude::*;

#[derive(Clone)]
pub(crate) struct TensorScatter {
    axis: i64,
    circular: bool,
}

impl TensorScatter {
    pub fn from_node(n: &NodeInfo<'_>) -> Result<Self, PluginError> {
        let circular = match n.string_or("mode", "linear")?.as_str() {
            "linear" => false,
            "circular" => true,
            other => {
                return Err(PluginError::invalid(format!(
                    "TensorScatter: attribute 'mode' must be \"linear\" or \"circular\", got \
                     {other:?}"
                )))
            }
        };
        Ok(TensorScatter {
            axis: n.int_or("axis", -2)?,
            circular,
        })
    }
}

impl Kernel for TensorScatter {
    fn compute(&self, ctx: &KernelContext<'_>, x: &[TensorView<'_>]) -> Result<(), PluginError> {
        let past = input(x, 0, "TensorScatter")?;
        let update = input(x, 1, "TensorScatter")?;
        let (ps, us) = (past.shape(), update.shape());
        let rank = ps.len() as i64;
        if rank < 2 || !(-rank..rank).contains(&self.axis) {
            return Err(PluginError::invalid(format!(
                "TensorScatter: axis {} is out of range for past_cache of shape {ps:?} (rank >= 2)",
                self.axis
            )));
        }
        let axis = self.axis.rem_euclid(rank) as usize;
        if axis == 0 {
            return Err(PluginError::invalid(
                "TensorScatter: axis must not be the batch axis 0",
            ));
        }
        let fits = us.len() == ps.len()
            && past.dtype == update.dtype
            && ps
                .iter()
                .zip(us)
                .enumerate()
                .all(|(d, (&p, &u))| if d == axis { u <= p } else { u == p });
        if !fits {
            return Err(PluginError::invalid(format!(
                "TensorScatter: update {} {us:?} does not fit past_cache {} {ps:?} on axis {axis}",
                update.dtype, past.dtype
            )));
        }
        let batch = ps[0];
        let src = past.as_bytes()?;
        let upd = update.as_bytes()?;
        let out = ctx.output(0, past.dtype, ps)?.into_bytes()?;
        if out.is_empty() {
            // An empty cache may still have a huge batch: nothing to write, nothing per batch
            // to allocate or walk.
            return Ok(());
        }
        out.copy_from_slice(src);
        let writes: Vec<i64> = match optional(x, 2) {
            Some(w) => {
                let w = w.to_i64s()?;
                if w.len() != batch {
                    return Err(PluginError::invalid(format!(
                        "TensorScatter: write_indices has {} values, batch is {batch}",
                        w.len()
                    )));
                }
                w
            }
            None => vec![0; batch],
        };
        let size = past.dtype.size();
        let max_seq = ps[axis];
        let seq = us[axis];
        // Bytes of one step along the axis (the dims after it), and prefixes per batch.
        let inner: usize = ps[axis + 1..].iter().product::<usize>() * size;
        let per_batch: usize = ps[1..axis].iter().product();
        for (b, &w) in writes.iter().enumerate() {
            for p in 0..per_batch {
                let prefix = b * per_batch + p;
                for s in 0..seq {
                    // In i128: write indices are data, and w + s must not overflow.
                    let mut at = w as i128 + s as i128;
                    if self.circular {
                        at = at.rem_euclid(max_seq as i128);
                    }
                    if at < 0 || at >= max_seq as i128 {
                        return Err(PluginError::invalid(format!(
                            "TensorScatter: write index {w} + {s} is outside the cache length \
                             {max_seq} (batch {b})"
                        )));
                    }
                    let dst = (prefix * max_seq + at as usize) * inner;
                    let from = (prefix * seq + s) * inner;
                    out[dst..dst + inner].copy_from_slice(&upd[from..from + inner]);
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn register(r: &mut Registrar) {
    let types: Vec<DType> = crate::ALL_TYPES.to_vec();
    reg(
        r,
        KernelDesc::onnx("TensorScatter", 24, OPEN_END)
            .constraint("T", &types)
            .constraint("tensor(int64)", &[DType::I64])
            .inputs(&["T", "T", "tensor(int64)"])
            .outputs(&["T"]),
        TensorScatter::from_node,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel_opt, NodeSpec},
    };

    fn factory(n: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        Ok(Box::new(TensorScatter::from_node(n)?))
    }

    #[test]
    fn tensor_scatter_by_hand() {
        // past [2, 4, 1] zeros, update [2, 2, 1]; batch 0 writes at 1, batch 1 at 3 (circular).
        let past = HostTensor::from_vec(&[2, 4, 1], &[0i32; 8]).expect("past");
        let upd = HostTensor::from_vec(&[2, 2, 1], &[1i32, 2, 3, 4]).expect("update");
        let idx = HostTensor::from_vec(&[2], &[1i64, 3]).expect("idx");
        let node =
            NodeSpec::onnx("TensorScatter", 24).attr("mode", AttrValue::String("circular".into()));
        let out = run_kernel_opt(factory, &node, &[Some(&past), Some(&upd), Some(&idx)], None)
            .expect("run");
        assert_eq!(
            out[0].to_vec::<i32>().expect("i32"),
            vec![0, 1, 2, 0, 4, 0, 0, 3]
        );
        // Linear mode: writing past the end is an error.
        let node = NodeSpec::onnx("TensorScatter", 24);
        assert!(
            run_kernel_opt(factory, &node, &[Some(&past), Some(&upd), Some(&idx)], None).is_err()
        );
        let out =
            run_kernel_opt(factory, &node, &[Some(&past), Some(&upd), None], None).expect("run");
        assert_eq!(
            out[0].to_vec::<i32>().expect("i32"),
            vec![1, 2, 0, 0, 3, 4, 0, 0]
        );
    }

    #[test]
    fn tensor_scatter_official_cases() {
        crate::testcases::run_cases(&["test_tensorscatter"], factory);
    }
}
