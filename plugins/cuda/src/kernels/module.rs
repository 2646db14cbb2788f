//! The operator kernels' GPU code: `kernels.cu`, compiled by NVRTC when the plugin registers,
//! for each GPU's own architecture, and loaded into its context; launches, copies and the
//! device buffers that hold a model's constants.
//!
//! NVRTC rather than committed PTX: PTX from one toolkit carries that toolkit's ISA version,
//! which an older driver refuses, while NVRTC writes what the machine's own libraries accept
//! (the source compiles in well under a second). Without NVRTC the plugin still offers its
//! device provider and cuBLAS, and registers no operator kernels (one line says so).

use crate::device::{driver_error, Cuda};
use cudarc::driver::{result, sys};
use opreg_sdk::prelude::*;
use std::ffi::{c_void, CString};
use std::sync::Arc;

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The kernels' entry points in [`SOURCE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F {
    Unary,
    Binary,
    GatherStrided,
    BiasAct,
    Softmax,
    LayerNorm,
    Im2col,
    ConvDirect,
    Pool,
    PlaneMean,
    BatchNorm,
    ConcatPart,
    Gather,
    Resize,
    ResizeLinear3,
}

impl F {
    pub const ALL: [F; 15] = [
        F::Unary,
        F::Binary,
        F::GatherStrided,
        F::BiasAct,
        F::Softmax,
        F::LayerNorm,
        F::Im2col,
        F::ConvDirect,
        F::Pool,
        F::PlaneMean,
        F::BatchNorm,
        F::ConcatPart,
        F::Gather,
        F::Resize,
        F::ResizeLinear3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            F::Unary => "unary_f32",
            F::Binary => "binary_f32",
            F::GatherStrided => "gather_strided_f32",
            F::BiasAct => "bias_act_f32",
            F::Softmax => "softmax_f32",
            F::LayerNorm => "layernorm_f32",
            F::Im2col => "im2col_f32",
            F::ConvDirect => "conv_direct_f32",
            F::Pool => "pool_f32",
            F::PlaneMean => "plane_mean_f32",
            F::BatchNorm => "batchnorm_f32",
            F::ConcatPart => "concat_part_f32",
            F::Gather => "gather_f32",
            F::Resize => "resize_f32",
            F::ResizeLinear3 => "resize_linear3_f32",
        }
    }
}

/// Whether NVRTC can be opened (`cudarc` panics on first use when it cannot).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by cudarc's names.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// [`SOURCE`] compiled to PTX for compute capability `cc` (major, minor).
pub fn compile(cc: (i32, i32)) -> Result<String, String> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    if !nvrtc_present() {
        return Err("NVRTC (libnvrtc) not found".into());
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{}{}", cc.0, cc.1)],
        // IEEE division and square roots, as the CPU kernels compute.
        use_fast_math: Some(false),
        name: Some("opreg_cuda_kernels.cu".into()),
        ..Default::default()
    };
    match std::panic::catch_unwind(|| compile_ptx_with_opts(SOURCE, opts)) {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(e)) => Err(format!("NVRTC failed: {e:?}")),
        Err(_) => Err("NVRTC panicked".into()),
    }
}

/// One GPU's loaded module.
struct Loaded {
    module: sys::CUmodule,
    funcs: Vec<sys::CUfunction>,
    /// Multiprocessors, for sizing grids.
    sms: u32,
}

/// The kernels loaded on every GPU. Dropping it unloads the modules (before the contexts go,
/// which it keeps alive).
pub struct Kernels {
    pub cuda: Arc<Cuda>,
    loaded: Vec<Loaded>,
}

// SAFETY: module and function handles are plain driver handles, usable from any thread with
// the context bound (every use binds it first).
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    /// Compiles and loads the kernels on every GPU of `cuda`.
    pub fn load(cuda: Arc<Cuda>) -> Result<Kernels, String> {
        let mut ptx_for: Vec<((i32, i32), CString)> = Vec::new();
        // Modules go in as they load: an error on a later GPU drops `kernels`, which unloads
        // those already loaded.
        let mut kernels = Kernels {
            cuda: cuda.clone(),
            loaded: Vec::new(),
        };
        for gpu in &cuda.gpus {
            gpu.bind().map_err(|e| e.message.to_string())?;
            let cc = gpu
                .ctx
                .compute_capability()
                .map_err(|e| format!("reading {}'s compute capability: {e:?}", gpu.device))?;
            let sms = gpu
                .ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .unwrap_or(16)
                .max(1) as u32;
            // Compiled once per architecture.
            let at = match ptx_for.iter().position(|(c, _)| *c == cc) {
                Some(at) => at,
                None => {
                    let ptx = CString::new(compile(cc)?)
                        .map_err(|_| "PTX with a NUL byte".to_string())?;
                    ptx_for.push((cc, ptx));
                    ptx_for.len() - 1
                }
            };
            let ptx = &ptx_for[at].1;
            // SAFETY: a NUL-terminated PTX image; the device's context is bound.
            let module = unsafe { result::module::load_data(ptx.as_ptr().cast()) }
                .map_err(|e| format!("loading the kernels on {}: {e:?}", gpu.device))?;
            let mut funcs = Vec::new();
            for f in F::ALL {
                let name = CString::new(f.name()).expect("no NUL in a kernel name");
                // SAFETY: `module` was just loaded.
                match unsafe { result::module::get_function(module, name) } {
                    Ok(h) => funcs.push(h),
                    Err(e) => {
                        // SAFETY: loaded above, used by nobody.
                        let _ = unsafe { result::module::unload(module) };
                        return Err(format!("kernel {} missing: {e:?}", f.name()));
                    }
                }
            }
            kernels.loaded.push(Loaded { module, funcs, sms });
        }
        Ok(kernels)
    }

    fn on(&self, device: Device) -> Result<&Loaded, PluginError> {
        self.loaded
            .get(device.ordinal as usize)
            .filter(|_| device.kind == DeviceKind::CUDA)
            .ok_or_else(|| PluginError::invalid(format!("cuda: no kernels on {device}")))
    }

    /// A grid of `block`-thread blocks for `n` grid-stride items: enough blocks to fill the
    /// GPU several times over, no more (the loops cover the rest).
    pub fn grid(&self, device: Device, n: usize, block: u32) -> u32 {
        let sms = self.on(device).map_or(16, |l| l.sms);
        let want = n.div_ceil(block as usize).max(1);
        want.min(sms as usize * 32) as u32
    }

    /// Launches `f` on `stream` of `device` with `args` (pointers to each argument, in the
    /// kernel's order).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and layout, and every device
    /// pointer among them must cover what the kernel reads and writes.
    pub unsafe fn launch(
        &self,
        device: Device,
        stream: Stream,
        f: F,
        grid: u32,
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), PluginError> {
        let l = self.on(device)?;
        let gpu = self.cuda.gpu(device)?;
        let s = gpu.stream(stream)?;
        // `funcs` is in the order of `F::ALL`, the declaration order (a test checks).
        let func = l.funcs[f as usize];
        // SAFETY: per the contract; the context is bound by `gpu`.
        unsafe { result::launch_kernel(func, (grid.max(1), 1, 1), (block, 1, 1), 0, s, args) }
            .map_err(|e| driver_error(&format!("launching {}", f.name()), e))
    }

    /// Copies `bytes` between two device addresses of `device`, in `stream`'s order.
    pub fn copy_d2d(
        &self,
        device: Device,
        stream: Stream,
        dst: u64,
        src: u64,
        bytes: usize,
    ) -> Result<(), PluginError> {
        if bytes == 0 || dst == src {
            return Ok(());
        }
        let gpu = self.cuda.gpu(device)?;
        let s = gpu.stream(stream)?;
        // SAFETY: the caller's pointers cover `bytes` on this device.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, s) }
            .result()
            .map_err(|e| driver_error("copying on the device", e))
    }

    /// Copies host bytes to a device address, in `stream`'s order. The source may be reused
    /// when this returns (pageable memory is staged by the driver before the call returns).
    pub fn upload(
        &self,
        device: Device,
        stream: Stream,
        dst: u64,
        src: &[u8],
    ) -> Result<(), PluginError> {
        if src.is_empty() {
            return Ok(());
        }
        let gpu = self.cuda.gpu(device)?;
        let s = gpu.stream(stream)?;
        // SAFETY: `dst` covers `src.len()` bytes on this device (the caller's); `src` is live.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), s) }
            .result()
            .map_err(|e| driver_error("copying to the device", e))?;
        // The driver may still read pageable memory after an async call returns when the copy
        // is small: waiting makes reusing `src` safe whatever the size.
        // SAFETY: a live stream of the bound context.
        unsafe { result::stream::synchronize(s) }.map_err(|e| driver_error("synchronizing", e))
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        for (gpu, l) in self.cuda.gpus.iter().zip(&self.loaded) {
            if gpu.bind().is_ok() {
                // SAFETY: loaded by `load`; the kernels that launch from it are gone (they hold
                // this object).
                let _ = unsafe { result::module::unload(l.module) };
            }
        }
    }
}

/// Device memory a kernel owns for the model's life: its constants, uploaded once at load.
pub struct DeviceBuf {
    kernels: Arc<Kernels>,
    device: Device,
    pub ptr: u64,
}

// SAFETY: a device address; the allocation is freed once, in `drop`.
unsafe impl Send for DeviceBuf {}
unsafe impl Sync for DeviceBuf {}

impl DeviceBuf {
    /// Allocates and fills a buffer with `data` on `device` (synchronously: at model load).
    pub fn upload(
        kernels: &Arc<Kernels>,
        device: Device,
        data: &[u8],
    ) -> Result<DeviceBuf, PluginError> {
        let _gpu = kernels.cuda.gpu(device)?;
        // SAFETY: the context is bound.
        let ptr = unsafe { result::malloc_sync(data.len().max(1)) }.map_err(|e| {
            driver_error(
                &format!("allocating {} bytes for a constant", data.len()),
                e,
            )
        })?;
        let buf = DeviceBuf {
            kernels: kernels.clone(),
            device,
            ptr,
        };
        if !data.is_empty() {
            // SAFETY: `ptr` holds `data.len()` bytes; a synchronous copy from live memory.
            unsafe { sys::cuMemcpyHtoD_v2(ptr, data.as_ptr().cast(), data.len()) }
                .result()
                .map_err(|e| driver_error("uploading a constant", e))?;
        }
        Ok(buf)
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if self.kernels.cuda.gpu(self.device).is_ok() {
            // Kernels that read it may still be queued (the host does not wait after each
            // call): let the device finish first. A model unload, not a request path.
            let _ = result::ctx::synchronize();
            // SAFETY: allocated in `upload`, freed once, no work left that reads it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `launch` indexes the loaded functions by discriminant: `F::ALL` must list every entry
    /// point in declaration order.
    #[test]
    fn the_entry_points_are_listed_in_declaration_order() {
        for (i, f) in F::ALL.into_iter().enumerate() {
            assert_eq!(f as usize, i, "{f:?}");
        }
        assert_eq!(F::ALL.len(), F::ResizeLinear3 as usize + 1);
    }

    /// The kernels' source compiles for the oldest and newest architectures the plugin
    /// targets, where NVRTC is installed (no GPU needed: `.ci/run` installs NVRTC from pip),
    /// and the PTX has every entry point.
    #[test]
    fn the_kernel_source_compiles_with_nvrtc() {
        if !nvrtc_present() {
            if std::env::var_os("OPREG_REQUIRE_NVRTC").is_some() {
                panic!("OPREG_REQUIRE_NVRTC is set and NVRTC cannot be opened");
            }
            eprintln!("skipped: NVRTC (libnvrtc) is not installed");
            return;
        }
        // sm_75 is the oldest CUDA 13's NVRTC still targets.
        for cc in [(7, 5), (9, 0)] {
            let ptx = compile(cc).unwrap_or_else(|e| panic!("compute_{}{}: {e}", cc.0, cc.1));
            assert!(
                ptx.contains(&format!(".target sm_{}{}", cc.0, cc.1)),
                "{}",
                &ptx[..400.min(ptx.len())]
            );
            for f in F::ALL {
                assert!(
                    ptx.contains(&format!(".entry {}(", f.name())),
                    "{} missing",
                    f.name()
                );
            }
        }
    }
}
