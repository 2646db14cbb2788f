//! Loss functions: SoftmaxCrossEntropyLoss (opsets 12+) and NegativeLogLikelihoodLoss
//! (opsets 12+), for inputs of shape (N, C) or (N, C, D1, ..., Dk) and integer targets of
//! shape (N) or (N, D1, ..., Dk).
//!
//! A target equal to `ignore_index` contributes neither loss nor weight; `mean` divides the
//! weighted sum by the sum of the weights that were used.

use crate::transformer::{read_f32, write_f32, FLOATS};
use crate::util::optional;
use opreg_sdk::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Reduction {
    None,
    Sum,
    Mean,
}

#[derive(Clone, Debug)]
struct Loss {
    op: &'static str,
    /// SoftmaxCrossEntropyLoss: the input is scores, turned into log-probabilities first.
    softmax: bool,
    reduction: Reduction,
    ignore_index: Option<i64>,
}

impl Loss {
    fn from_node(
        node: &NodeInfo<'_>,
        op: &'static str,
        softmax: bool,
    ) -> Result<Self, PluginError> {
        let reduction = match node.string_or("reduction", "mean")?.as_str() {
            "none" => Reduction::None,
            "sum" => Reduction::Sum,
            "mean" => Reduction::Mean,
            other => {
                return Err(PluginError::invalid(format!(
                    "{op}: reduction must be none, sum or mean, got '{other}'"
                )))
            }
        };
        let ignore_index = match node.attr("ignore_index") {
            None => None,
            Some(_) => Some(node.int_or("ignore_index", 0)?),
        };
        Ok(Loss {
            op,
            softmax,
            reduction,
            ignore_index,
        })
    }
}

impl Kernel for Loss {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = self.op;
        let [xv, tv] = crate::util::required(op, inputs, ["scores", "labels"])?;
        let xs = xv.shape();
        let ts = tv.shape();
        if xs.len() < 2 || ts.len() != xs.len() - 1 || ts[0] != xs[0] || ts[1..] != xs[2..] {
            return Err(PluginError::invalid(format!(
                "{op}: input {xs:?} and target {ts:?} must be (N, C, d...) and (N, d...)"
            )));
        }
        let (n, c) = (xs[0], xs[1]);
        // Saturating: exact whenever the target has elements (it holds n * d of them).
        let d = crate::util::product_sat(&xs[2..]);
        let mut x = read_f32(&xv, "input")?;
        let target = tv.to_i64s()?;
        let weight = match optional(inputs, 2) {
            Some(w) => {
                if w.shape() != [c] {
                    return Err(PluginError::invalid(format!(
                        "{op}: weight must have shape [{c}], got {:?}",
                        w.shape()
                    )));
                }
                Some(read_f32(w, "weight")?)
            }
            None => None,
        };
        if self.softmax {
            // log_softmax along C, in place.
            for ni in 0..n {
                let base = ni * c * d;
                for di in 0..d {
                    let at = |ci: usize| base + ci * d + di;
                    let max = (0..c).map(|ci| x[at(ci)]).fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = (0..c).map(|ci| (x[at(ci)] - max).exp()).sum();
                    let lse = max + sum.ln();
                    for ci in 0..c {
                        x[at(ci)] -= lse;
                    }
                }
            }
        }
        let mut loss = vec![0.0f32; n * d];
        let (mut total, mut wsum) = (0.0f64, 0.0f64);
        for ni in 0..n {
            for di in 0..d {
                let t = target[ni * d + di];
                if Some(t) == self.ignore_index {
                    continue;
                }
                if t < 0 || t as usize >= c {
                    return Err(PluginError::invalid(format!(
                        "{op}: target {t} out of range [0, {c})"
                    )));
                }
                let ci = t as usize;
                let w = weight.as_ref().map_or(1.0, |w| w[ci]);
                let l = -x[(ni * c + ci) * d + di] * w;
                loss[ni * d + di] = l;
                total += f64::from(l);
                wsum += f64::from(w);
            }
        }
        let dtype = xv.dtype;
        match self.reduction {
            Reduction::None => write_f32(ctx, 0, dtype, ts, &loss)?,
            Reduction::Sum => write_f32(ctx, 0, dtype, &[], &[total as f32])?,
            Reduction::Mean => write_f32(ctx, 0, dtype, &[], &[(total / wsum) as f32])?,
        }
        if self.softmax && ctx.num_outputs() > 1 {
            write_f32(ctx, 1, dtype, xs, &x)?;
        }
        Ok(())
    }
}

fn sce_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Loss::from_node(
        node,
        "SoftmaxCrossEntropyLoss",
        true,
    )?))
}

fn nll_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Loss::from_node(
        node,
        "NegativeLogLikelihoodLoss",
        false,
    )?))
}

pub fn register(r: &mut Registrar) {
    let labels = [DType::I32, DType::I64];
    r.kernel(
        KernelDesc::onnx("SoftmaxCrossEntropyLoss", 12, OPEN_END)
            .constraint("T", FLOATS)
            .constraint("Tind", &labels)
            .inputs(&["T", "Tind", "T"])
            .outputs(&["T", "T"]),
        sce_factory,
    );
    r.kernel(
        KernelDesc::onnx("NegativeLogLikelihoodLoss", 12, OPEN_END)
            .constraint("T", FLOATS)
            .constraint("Tind", &labels)
            .inputs(&["T", "Tind", "T"])
            .outputs(&["T"]),
        nll_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcases::run_cases;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel_opt, NodeSpec},
    };

    #[test]
    fn conformance_cases() {
        for (prefix, f) in [
            ("test_sce", sce_factory as fn(&NodeInfo<'_>) -> _),
            ("test_nllloss", nll_factory),
        ] {
            run_cases(&[prefix], f);
        }
    }

    #[test]
    fn nll_by_hand_with_weights_and_ignore_index() {
        // N=3, C=2: loss = -x[n, t[n]] * w[t[n]]; target 1 at n=2 is ignored.
        let x = HostTensor::from_vec(&[3, 2], &[-1.0f32, -2.0, -3.0, -4.0, -5.0, -6.0]).unwrap();
        let t = HostTensor::from_vec(&[3], &[0i64, 1, 1]).unwrap();
        let w = HostTensor::from_vec(&[2], &[2.0f32, 0.5]).unwrap();
        let run = |red: &str| {
            let spec = NodeSpec::onnx("NegativeLogLikelihoodLoss", 22)
                .attr("reduction", AttrValue::String(red.into()))
                .attr("ignore_index", AttrValue::Int(-7));
            run_kernel_opt(nll_factory, &spec, &[Some(&x), Some(&t), Some(&w)], None).unwrap()
        };
        assert_eq!(run("none")[0].to_vec::<f32>().unwrap(), vec![2.0, 2.0, 3.0]);
        assert_eq!(run("sum")[0].to_vec::<f32>().unwrap(), vec![7.0]);
        // mean: (2 + 2 + 3) / (2 + 0.5 + 0.5)
        let mean = run("mean")[0].to_vec::<f32>().unwrap()[0];
        assert!((mean - 7.0 / 3.0).abs() < 1e-6, "{mean}");
        let spec = NodeSpec::onnx("NegativeLogLikelihoodLoss", 22)
            .attr("reduction", AttrValue::String("mean".into()))
            .attr("ignore_index", AttrValue::Int(1));
        let out =
            run_kernel_opt(nll_factory, &spec, &[Some(&x), Some(&t), Some(&w)], None).unwrap();
        assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![1.0]);
    }

    #[test]
    fn sce_log_prob_and_loss() {
        let x = HostTensor::from_vec(&[1, 3], &[1.0f32, 2.0, 3.0]).unwrap();
        let t = HostTensor::from_vec(&[1], &[2i32]).unwrap();
        let spec = NodeSpec::onnx("SoftmaxCrossEntropyLoss", 13)
            .attr("reduction", AttrValue::String("none".into()))
            .outputs(2);
        let out = run_kernel_opt(sce_factory, &spec, &[Some(&x), Some(&t)], None).unwrap();
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        let lp = out[1].to_vec::<f32>().unwrap();
        for (i, v) in lp.iter().enumerate() {
            assert!((v - ((i + 1) as f32 - lse)).abs() < 1e-6);
        }
        assert!((out[0].to_vec::<f32>().unwrap()[0] - (lse - 3.0)).abs() < 1e-6);
        assert_eq!(out[0].shape(), &[1]);
    }

    #[test]
    fn bad_target_is_an_error() {
        let x = HostTensor::from_vec(&[1, 2], &[0.0f32, 0.0]).unwrap();
        let t = HostTensor::from_vec(&[1], &[5i64]).unwrap();
        let err = run_kernel_opt(
            nll_factory,
            &NodeSpec::onnx("NegativeLogLikelihoodLoss", 22),
            &[Some(&x), Some(&t)],
            None,
        )
        .unwrap_err();
        assert!(err.message.contains("out of range"), "{}", err.message);
    }
}
