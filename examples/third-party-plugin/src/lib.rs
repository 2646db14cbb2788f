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

fn instantiate(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let lo = node.float_or("min", 0.0)? as f64;
    let hi = node.float_or("max", 1.0)? as f64;
    if lo > hi {
        return Err(PluginError::invalid(format!("Clamp: min {lo} > max {hi}")));
    }
    Ok(Box::new(Clamp { lo, hi }))
}

fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("example.clamp", "Clamp", 1, OPEN_END)
            .constraint("T", &[DType::F32, DType::F64])
            .inputs(&["T"])
            .outputs(&["T"]),
        instantiate,
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
        testkit::{run_kernel, NodeSpec},
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
        let out = run_kernel(instantiate, &node, &[&x], None).unwrap();
        let y: Vec<f64> = out[0]
            .bytes()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(y, vec![0.0, 0.5, 2.0]);
    }
}
