//! The CUDA plugin: a device provider for NVIDIA GPUs and a cuBLAS BLAS backend (f32 gemm),
//! on `cudarc` with the CUDA libraries loaded at run time.
//!
//! It builds and loads everywhere, with no CUDA toolkit or driver: at registration it probes
//! for the driver library, cuBLAS and devices without panicking ([`probe`]), and on a machine
//! with no usable GPU it registers nothing and writes one line saying why, e.g.
//!
//! ```text
//! cuda: no GPU (CUDA driver library not found: tried libcuda.so.1 and 14 other names); registering nothing
//! ```
//!
//! With GPUs it registers one device provider for all of them ([`device`]) and one cuBLAS
//! backend per GPU ([`blas`], named like the device: `cuda`, `cuda:1`, ...). Both share the
//! per-device contexts and handles; when the daemon drops them (before `shutdown`), the last
//! one releases every stream, event, cuBLAS handle, allocation and context reference.
//!
//! **The GPU path is unverified until a GPU run**: the probe, the no-GPU registration, the
//! gemm argument mapping and the CPU reference are tested on any machine, and fake CUDA
//! libraries (built with `cc` by the tests) drive the probe and `cudarc` through a failing
//! `cuInit`, zero devices and a failing device open; the memory, copy, stream, event and
//! cuBLAS calls run only on a GPU (`OPREG_GPU_TESTS=1 cargo test -p opreg-plugin-cuda`, and
//! the self-tests the daemon runs at load). CUDA kernels for operators, f16/bf16/int8 gemm,
//! epilogues and pre-packing are not here yet.
//!
//! The line goes to standard error: the SDK has no log channel during registration (a
//! kernel's `KernelContext::log` is the only one), and the daemon's own log records that the
//! plugin loaded with nothing registered.

pub mod blas;
pub mod device;
pub mod kernels;
pub mod probe;

use opreg_sdk::prelude::*;
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

/// What registration found: GPUs opened, or why not.
enum Found {
    Gpus(Arc<device::Cuda>, u32),
    Nothing(String),
}

fn find() -> Found {
    let gpus = match probe::probe() {
        Ok(g) => g,
        Err(e) => return Found::Nothing(e.to_string()),
    };
    // The probe checked the libraries and counted devices; opening contexts still calls
    // cudarc, whose failures would panic: guard once more.
    let count = gpus.count;
    let opened = std::panic::catch_unwind(move || device::Cuda::open(count));
    // cudarc holds its own handles on the libraries from here on.
    drop(gpus);
    match opened {
        Ok(Ok(cuda)) => {
            let n = cuda.gpus.len() as u32;
            Found::Gpus(Arc::new(cuda), n)
        }
        Ok(Err(e)) => Found::Nothing(format!("opening the devices failed: {}", e.message)),
        Err(_) => Found::Nothing("opening the devices panicked".into()),
    }
}

/// `tf32 = true` in `[plugin_config.cuda]`: f32 products on tensor cores in TF32 (10-bit
/// mantissa inputs, f32 accumulation; several times faster on Ampere and later, at about 1e-3
/// relative error). Off by default: results then match the CPU plugin's to f32 rounding.
static TF32: AtomicBool = AtomicBool::new(false);

/// Whether f32 gemms may use TF32 tensor cores.
pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// Reads the plugin's configuration (`key = value` lines of `[plugin_config.cuda]`).
fn init(config: &str) -> Result<(), PluginError> {
    TF32.store(false, Ordering::Relaxed);
    for line in config
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line.split_once('=').ok_or_else(|| {
            PluginError::invalid(format!("cuda: config line {line:?} is not key = value"))
        })?;
        match (key.trim(), value.trim()) {
            ("tf32", "true") => TF32.store(true, Ordering::Relaxed),
            ("tf32", "false") => TF32.store(false, Ordering::Relaxed),
            (key, value) => {
                return Err(PluginError::invalid(format!(
                    "cuda: unknown setting {key} = {value} (known: tf32 = true|false)"
                )))
            }
        }
    }
    Ok(())
}

/// The line written when nothing is registered.
fn no_gpu_line(why: &str) -> String {
    format!("cuda: no GPU ({why}); registering nothing")
}

fn register(r: &mut Registrar) {
    match find() {
        Found::Nothing(why) => eprintln!("{}", no_gpu_line(&why)),
        Found::Gpus(cuda, n) => {
            r.device_provider(device::CudaProvider(cuda.clone()));
            for ordinal in 0..n {
                let device = Device {
                    kind: DeviceKind::CUDA,
                    ordinal,
                };
                r.blas(
                    BlasDesc {
                        name: device.to_string(),
                        device,
                        priority: 0,
                        types: vec![GemmTypes::F32],
                    },
                    blas::CublasBlas {
                        cuda: cuda.clone(),
                        device,
                    },
                );
            }
            match kernels::module::Kernels::load(cuda) {
                Ok(k) => kernels::register(r, &Arc::new(k)),
                Err(why) => {
                    eprintln!("cuda: no operator kernels ({why}); device provider and cuBLAS only")
                }
            }
        }
    }
}

opreg_sdk::export_plugin! {
    name: "cuda",
    version: env!("CARGO_PKG_VERSION"),
    description: "CUDA device provider, cuBLAS f32 gemm and f32 operator kernels compiled by NVRTC (libraries loaded at run time; registers nothing without a GPU)",
    init: init,
    register: register,
}

#[cfg(test)]
mod tests;
