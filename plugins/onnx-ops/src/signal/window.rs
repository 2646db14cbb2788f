//! Window functions (opset 17): `HannWindow`, `HammingWindow`, `BlackmanWindow`.

use crate::util::fill_from_f64;
use crate::util::{input, scalar_i64, Factory};
use opreg_sdk::numeric::INDICES;
use opreg_sdk::prelude::*;

#[derive(Clone, Copy)]
enum WindowKind {
    Hann,
    Hamming,
    Blackman,
}

#[derive(Clone)]
struct Window {
    kind: WindowKind,
    periodic: bool,
    dtype: DType,
}

impl Kernel for Window {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let size = scalar_i64(&input("window", inputs, 0, "size")?, "window", "size")?;
        if size < 0 {
            return Err(PluginError::invalid(format!(
                "window: input 'size' must be >= 0, got {size}"
            )));
        }
        let n = if self.periodic { size } else { size - 1 } as f64;
        let tau = 2.0 * std::f64::consts::PI;
        let kind = self.kind;
        fill_from_f64(ctx, 0, self.dtype, &[size as usize], |i| {
            let x = i as f64 / n;
            match kind {
                WindowKind::Hann => (std::f64::consts::PI * x).sin().powi(2),
                WindowKind::Hamming => 25.0 / 46.0 - 21.0 / 46.0 * (tau * x).cos(),
                WindowKind::Blackman => 0.42 - 0.5 * (tau * x).cos() + 0.08 * (2.0 * tau * x).cos(),
            }
        })
    }
}

fn window_factory(kind: WindowKind, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let code = node.int_or("output_datatype", 1)?;
    let dtype = DType::from_onnx_code(code as i32)
        .filter(|d| WINDOW_OUT.contains(d))
        .ok_or_else(|| {
            PluginError::unimplemented(format!(
                "{}: attribute 'output_datatype' = {code} is not supported",
                node.op_type
            ))
        })?;
    Ok(Box::new(Window {
        kind,
        periodic: node.int_or("periodic", 1)? != 0,
        dtype,
    }))
}

const WINDOW_OUT: &[DType] = &[
    DType::U8,
    DType::U16,
    DType::U32,
    DType::U64,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::F32,
    DType::F64,
    DType::BF16,
];

pub fn register(r: &mut Registrar) {
    let windows: [(&str, Factory); 3] = [
        ("HannWindow", |n| window_factory(WindowKind::Hann, n)),
        ("HammingWindow", |n| window_factory(WindowKind::Hamming, n)),
        ("BlackmanWindow", |n| {
            window_factory(WindowKind::Blackman, n)
        }),
    ];
    for (op, f) in windows {
        r.kernel(
            KernelDesc::onnx(op, 17, OPEN_END)
                .constraint("T1", INDICES)
                .constraint("T2", WINDOW_OUT)
                .inputs(&["T1"])
                .outputs(&["T2"]),
            f,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{close, run, t};
    use opreg_sdk::testkit::NodeSpec;

    #[test]
    fn windows() {
        let size = t::<i32>(&[], &[10]);
        let hamming: Factory = |n| window_factory(WindowKind::Hamming, n);
        let out = run(hamming, NodeSpec::onnx("HammingWindow", 17), &[Some(&size)]).unwrap();
        close(
            &out[0].to_vec::<f32>().unwrap(),
            &[
                0.086_956_52,
                0.174_144_42,
                0.402_405_3,
                0.684_551_2,
                0.912_812_1,
                1.0,
                0.912_812_1,
                0.684_551_1,
                0.402_405_2,
                0.174_144_42,
            ],
            1e-6,
        );
        let blackman: Factory = |n| window_factory(WindowKind::Blackman, n);
        let node = NodeSpec::onnx("BlackmanWindow", 17).attr("periodic", AttrValue::Int(0));
        let out = run(blackman, node, &[Some(&size)]).unwrap();
        close(
            &out[0].to_vec::<f32>().unwrap(),
            &[
                0.0,
                0.050_869_636,
                0.258_000_5,
                0.63,
                0.951_13,
                0.951_13,
                0.63,
                0.258_000_4,
                0.050_869_6,
                0.0,
            ],
            1e-6,
        );
        let hann: Factory = |n| window_factory(WindowKind::Hann, n);
        let node = NodeSpec::onnx("HannWindow", 17).attr("output_datatype", AttrValue::Int(11));
        let size = t::<i64>(&[], &[4]);
        let out = run(hann, node, &[Some(&size)]).unwrap();
        let w = out[0].to_vec::<f64>().unwrap();
        assert!(
            w.iter()
                .zip([0.0, 0.5, 1.0, 0.5])
                .all(|(a, b)| (a - b).abs() < 1e-12),
            "{w:?}"
        );
    }
}
