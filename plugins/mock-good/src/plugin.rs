// The plugin's code, shared by the `mock-good` build and its observably different second
// build `mock-good-v2` (hot-swap tests); each crate's lib.rs sets OFFSET and VERSION.

use opreg_sdk::{abi_stable::std_types::ROption, prelude::*};

#[derive(Clone)]
struct Scale(f32, Option<DType>);

impl Kernel for Scale {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = inputs
            .first()
            .ok_or_else(|| PluginError::invalid("MockScale needs one input"))?
            .as_slice::<f32>()?;
        if let Some(dtype) = self.1 {
            ctx.output(0, dtype, inputs[0].shape())?;
            return Ok(());
        }
        let y = ctx.output_slice::<f32>(0, inputs[0].shape())?;
        let s = self.0;
        ctx.parallel_chunks(y, 1024, |start, out| {
            for (o, v) in out.iter_mut().zip(&x[start..]) {
                *o = v * s + OFFSET;
            }
        })
    }
}

/// `MockFlaky(x) = x`.
#[derive(Clone)]
struct Identity;

impl Kernel for Identity {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = inputs
            .first()
            .ok_or_else(|| PluginError::invalid("MockFlaky needs one input"))?;
        let y = ctx.output_slice::<f32>(0, x.shape())?;
        y.copy_from_slice(x.as_slice::<f32>()?);
        Ok(())
    }
}

struct MinMax;

impl Quantizer for MinMax {
    fn observation(&self) -> Observation {
        Observation::MIN_MAX
    }

    fn plan(&self, request: &QuantRequest) -> Result<QuantPlan, PluginError> {
        let tensors = request
            .tensors
            .iter()
            .map(|t| {
                // The range must contain 0 so that zero is exactly representable.
                let (lo, hi) = (t.min.min(0.0), t.max.max(0.0));
                let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
                let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as i32;
                let scale = if request.option("malformed") == Some("yes") {
                    f32::NAN
                } else {
                    scale
                };
                opreg_sdk::quant::TensorPlan {
                    name: t.name.clone(),
                    directive: Directive::per_tensor(scale, zero_point, DType::U8),
                }
            })
            .collect();
        Ok(QuantPlan {
            tensors,
            notes: "min-max, asymmetric u8".into(),
        })
    }

    /// A known range must give the known parameters (and the `fail_self_test` setting makes
    /// it fail, for the daemon's test of refusals).
    fn self_test(&self) -> Result<(), PluginError> {
        if FAIL_SELF_TEST.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(PluginError::internal("failing on purpose (fail_self_test)"));
        }
        let request = QuantRequest {
            tensors: vec![TensorStats {
                name: "t".into(),
                dtype: DType::F32,
                is_weight: false,
                min: -1.0,
                max: 3.0,
                histogram: Default::default(),
                hist_max: 0.0,
                weight: ROption::RNone,
            }]
            .into(),
            options: Default::default(),
        };
        let plan = self.plan(&request)?;
        let d = plan.tensors.first().map(|t| &t.directive);
        match d.map(|d| (d.kind, d.scales.first(), d.zero_points.first())) {
            Some((DirectiveKind::PER_TENSOR, Some(scale), Some(&64)))
                if (*scale - 4.0 / 255.0).abs() < 1e-7 =>
            {
                Ok(())
            }
            other => Err(PluginError::internal(format!(
                "min-max of [-1, 3] gave {other:?}, expected scale 4/255 and zero point 64"
            ))),
        }
    }
}

static FAIL_SELF_TEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("opreg.mock", "MockScale", 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"]),
        |node: &NodeInfo<'_>| -> Result<Box<dyn Kernel>, PluginError> {
            let out = node
                .attr("out_dtype")
                .is_some()
                .then(|| node.int_or("out_dtype", 1));
            let out = out.transpose()?.map(|c| DType(c as i32));
            Ok(Box::new(Scale(node.float_or("scale", 2.0)?, out)))
        },
    );
    // The fallback provider of `MockFlaky` (mock-panic overrides it at a higher priority).
    r.kernel(
        KernelDesc::new("opreg.mock", "MockFlaky", 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"]),
        |_: &NodeInfo<'_>| -> Result<Box<dyn Kernel>, PluginError> { Ok(Box::new(Identity)) },
    );
    r.quantizer(
        QuantizerDesc {
            name: "mock-minmax".into(),
            description: "test strategy: asymmetric u8 from min/max".into(),
        },
        MinMax,
    );
}

/// Where `shutdown` leaves its mark (from the `shutdown_marker` setting), so a test can see
/// that the daemon called it. A plain static: no destructor, nothing that pins the library.
static SHUTDOWN_MARKER: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The test settings, one `key = "value"` a line (the TOML the daemon renders): `refuse`
/// fails `init` with its text; `fail_self_test = "yes"` fails the quantizer's self-test;
/// `shutdown_marker` names a file `shutdown` writes.
fn init(config: &str) -> Result<(), PluginError> {
    for line in config.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim() {
            "refuse" => {
                return Err(PluginError::new(ErrorCode::FailedPrecondition, value));
            }
            "fail_self_test" => {
                FAIL_SELF_TEST.store(value == "yes", std::sync::atomic::Ordering::Relaxed);
            }
            "shutdown_marker" => {
                *SHUTDOWN_MARKER
                    .lock()
                    .map_err(|_| PluginError::internal("poisoned"))? = Some(value);
            }
            _ => {}
        }
    }
    Ok(())
}

fn shutdown() {
    if let Ok(Some(path)) = SHUTDOWN_MARKER.lock().map(|m| m.clone()) {
        let _ = std::fs::write(path, "shutdown");
    }
}

opreg_sdk::export_plugin! {
    name: "mock-good",
    version: VERSION,
    description: "well-behaved mock plugin for tests",
    init: init,
    register: register,
    shutdown: shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    #[test]
    fn scales_by_the_attribute() {
        let x: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = HostTensor::from_bytes(DType::F32, &[3000], &bytes).expect("tensor");
        let node = NodeSpec::onnx("MockScale", 1)
            .domain("opreg.mock")
            .attr("scale", AttrValue::Float(-0.5));
        let factory = |n: &NodeInfo<'_>| -> Result<Box<dyn Kernel>, PluginError> {
            Ok(Box::new(Scale(n.float_or("scale", 2.0)?, None)))
        };
        let out = run_kernel(factory, &node, &[&t], None).expect("run");
        let y: Vec<f32> = out[0]
            .bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(y.len(), 3000);
        assert!(y.iter().zip(&x).all(|(y, x)| *y == x * -0.5 + OFFSET));
    }
}
