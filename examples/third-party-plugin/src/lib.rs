//! A third-party opreg plugin: `example.clamp::Clamp(x; min, max)` for f32 and f64.
//!
//! Build: `cargo build --release`; load: copy `libopreg_example_clamp.so` into a plugin folder,
//! or call `opreg.v1.Registry/LoadPlugin` with its path.

use opreg_sdk::prelude::*;

#[derive(Clone, Copy)]
struct Clamp {
    lo: f64,
    hi: f64,
}

impl Clamp {
    fn run<T: Element + PartialOrd>(
        &self,
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        lo: T,
        hi: T,
    ) -> Result<(), PluginError> {
        let xs = x.as_slice::<T>()?;
        let ys = ctx.output_slice::<T>(0, x.shape())?;
        ctx.parallel_chunks(ys, 8192, |start, out| {
            for (o, &v) in out.iter_mut().zip(&xs[start..]) {
                *o = if v < lo {
                    lo
                } else if v > hi {
                    hi
                } else {
                    v
                };
            }
        })
    }
}

impl Kernel for Clamp {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = inputs
            .first()
            .ok_or_else(|| PluginError::invalid("Clamp needs one input"))?;
        match x.dtype {
            DType::F32 => self.run(ctx, x, self.lo as f32, self.hi as f32),
            DType::F64 => self.run(ctx, x, self.lo, self.hi),
            other => Err(PluginError::unimplemented(format!("Clamp of {other}"))),
        }
    }
}

/// Builds Clamp kernels, and tells the daemon what a Clamp node produces before it runs.
struct ClampFactory;

impl KernelFactory for ClampFactory {
    fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        let lo = node.float_or("min", 0.0)? as f64;
        let hi = node.float_or("max", 1.0)? as f64;
        if lo > hi {
            return Err(PluginError::invalid(format!("Clamp: min {lo} > max {hi}")));
        }
        Ok(Box::new(Clamp { lo, hi }))
    }

    /// Elementwise: the output has the input's type and shape (ABI 1.1). Without this, the
    /// daemon knows nothing static about what follows a Clamp.
    fn infer(&self, node: &NodeInfo<'_>) -> Result<Vec<OutputFact>, PluginError> {
        Ok(node
            .inputs
            .first()
            .map(|x| {
                let dtype = (x.dtype != DType::UNDEFINED).then_some(x.dtype);
                OutputFact::new(dtype, x.shape.map(<[i64]>::to_vec))
            })
            .into_iter()
            .collect())
    }
}

fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("example.clamp", "Clamp", 1, OPEN_END)
            .constraint("T", &[DType::F32, DType::F64])
            .inputs(&["T"])
            .outputs(&["T"]),
        ClampFactory,
    );
}

opreg_sdk::export_plugin! {
    name: "example-clamp",
    version: env!("CARGO_PKG_VERSION"),
    description: "third-party example: Clamp(x; min, max)",
    register: register,
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{infer_outputs, run_kernel, NodeSpec},
        ValueInfo,
    };

    #[test]
    fn clamps_to_the_attributes() {
        let b: Vec<u8> = [-1.0f64, 0.5, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let x = HostTensor::from_bytes(DType::F64, &[3], &b).unwrap();
        let node = NodeSpec::onnx("Clamp", 1)
            .domain("example.clamp")
            .attr("max", AttrValue::Float(2.0));
        let out = run_kernel(ClampFactory, &node, &[&x], None).unwrap();
        let y: Vec<f64> = out[0]
            .bytes()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(y, vec![0.0, 0.5, 2.0]);
    }

    #[test]
    fn infers_the_input_type_and_shape() {
        let node = NodeSpec::onnx("Clamp", 1).domain("example.clamp");
        let x = ValueInfo {
            name: "x",
            present: true,
            dtype: DType::F64,
            shape: Some(&[-1, 3]),
            constant: None,
        };
        let facts = infer_outputs(ClampFactory, &node, &[Some(x)]).unwrap();
        assert_eq!(
            facts,
            vec![OutputFact::new(Some(DType::F64), Some(vec![-1, 3]))]
        );
    }
}
