//! The CUDA device provider: memory, copies, streams and events of each GPU, on `cudarc`'s
//! driver API.
//!
//! **Unverified until a GPU run**: this machine has no GPU, so this module compiles and its
//! GPU-free helpers are tested, but no line of it that calls the driver has run yet (the
//! `gpu` tests and the provider's self-test exercise it when `OPREG_GPU_TESTS=1`).
//!
//! - One primary context per device (`CudaContext::new`), bound to the calling thread at every
//!   entry (the daemon calls from any thread).
//! - `DEVICE` memory is stream-ordered (`cuMemAllocAsync` / `cuMemFreeAsync` from the device's
//!   default memory pool; plain `cuMemAlloc` where the device has no pools); the daemon pools
//!   what it gets on top, so a request in steady state never reaches the driver.
//!   `HOST_PINNED` memory (`cuMemHostAlloc`) is the staging kind for host copies.
//! - Streams and events are the driver's handles as numbers; `0` is the legacy default stream
//!   and "no event". Handles this provider did not create are refused.
//! - Everything still held when the provider is dropped (the daemon drops it before the
//!   plugin's `shutdown`) is released then: cuBLAS handles, events, streams, memory the host
//!   did not return, and the context references — an unload leaks nothing.

use cudarc::driver::{
    result::{self, DriverError},
    sys::{self, CUresult},
    CudaContext,
};
use opreg_sdk::{prelude::*, Event};
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
};

/// Alignment of every allocation: `cuMemAlloc*` give at least 256 bytes, pinned host memory
/// a page.
pub const ALIGN: usize = 256;

/// A driver error as a plugin error. Formats the code by name without calling the driver.
pub fn driver_error(what: &str, e: DriverError) -> PluginError {
    let code = if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        ErrorCode::ResourceExhausted
    } else {
        ErrorCode::Internal
    };
    PluginError::new(code, format!("cuda: {what}: {:?} ({})", e.0, e.0 as u32))
}

/// What this provider holds on one device.
#[derive(Default)]
struct Held {
    /// Streams created, by handle.
    streams: HashSet<u64>,
    /// Events created, by handle.
    events: HashSet<u64>,
    /// Memory handed out and not yet freed: address -> (memory type, bytes).
    allocs: HashMap<u64, (MemoryType, usize)>,
    /// cuBLAS handles, by the stream they are bound to.
    blas: HashMap<u64, u64>,
}

/// One GPU.
pub struct Gpu {
    pub device: Device,
    pub ctx: Arc<CudaContext>,
    held: Mutex<Held>,
}

impl Gpu {
    fn held(&self) -> MutexGuard<'_, Held> {
        // A panic while held leaves consistent sets (every update is one insert or remove).
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<(), PluginError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("binding the context", e))
    }

    /// The driver stream of `stream`: the default stream, or one this provider created.
    pub fn stream(&self, stream: Stream) -> Result<sys::CUstream, PluginError> {
        if stream == Stream::DEFAULT || self.held().streams.contains(&stream.0) {
            Ok(stream.0 as usize as sys::CUstream)
        } else {
            Err(PluginError::invalid(format!(
                "cuda: stream {:#x} was not created on {}",
                stream.0, self.device
            )))
        }
    }

    fn event(&self, event: Event) -> Result<sys::CUevent, PluginError> {
        if event.0 != 0 && self.held().events.contains(&event.0) {
            Ok(event.0 as usize as sys::CUevent)
        } else {
            Err(PluginError::invalid(format!(
                "cuda: event {:#x} was not created on {}",
                event.0, self.device
            )))
        }
    }

    /// The cuBLAS handle bound to `stream`, created on first use. The context must be bound.
    pub fn cublas(
        &self,
        stream: Stream,
    ) -> Result<cudarc::cublas::sys::cublasHandle_t, PluginError> {
        use cudarc::cublas::result as blas;
        let raw = self.stream(stream)?;
        let mut held = self.held();
        if let Some(&h) = held.blas.get(&stream.0) {
            return Ok(h as usize as _);
        }
        let h = blas::create_handle()
            .map_err(|e| PluginError::internal(format!("cuda: cublasCreate: {:?}", e.0)))?;
        // SAFETY: a fresh handle and a live stream of this context.
        if let Err(e) = unsafe { blas::set_stream(h, raw as _) } {
            // SAFETY: created above, used by nobody.
            let _ = unsafe { blas::destroy_handle(h) };
            return Err(PluginError::internal(format!(
                "cuda: cublasSetStream: {:?}",
                e.0
            )));
        }
        if crate::tf32() {
            use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
            // SAFETY: a live handle.
            let status = unsafe { cublasSetMathMode(h, cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH) };
            if status != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                // SAFETY: created above, used by nobody.
                let _ = unsafe { blas::destroy_handle(h) };
                return Err(PluginError::internal(format!(
                    "cuda: cublasSetMathMode: {status:?}"
                )));
            }
        }
        held.blas.insert(stream.0, h as usize as u64);
        Ok(h)
    }

    /// Releases everything held on this device (context bound by the caller).
    fn release_all(&self) {
        let mut held = self.held();
        // Queued work may still use memory and handles.
        let _ = result::ctx::synchronize();
        for (_, h) in held.blas.drain() {
            // SAFETY: created by `cublas`, no longer handed out (the provider is going away).
            let _ = unsafe { cudarc::cublas::result::destroy_handle(h as usize as _) };
        }
        for (ptr, (memory, _)) in held.allocs.drain() {
            // SAFETY: allocated by `alloc` and never freed (the host forgot it); no work runs.
            let _ = unsafe {
                if memory == MemoryType::HOST_PINNED {
                    result::free_host(ptr as usize as *mut std::ffi::c_void)
                } else {
                    result::free_sync(ptr)
                }
            };
        }
        for e in held.events.drain() {
            // SAFETY: created by `create_event`, not destroyed.
            let _ = unsafe { result::event::destroy(e as usize as sys::CUevent) };
        }
        for s in held.streams.drain() {
            // SAFETY: created by `create_stream`, not destroyed.
            let _ = unsafe { result::stream::destroy(s as usize as sys::CUstream) };
        }
    }
}

/// The GPUs of this machine, shared by the provider and the BLAS backends.
pub struct Cuda {
    pub gpus: Vec<Gpu>,
}

impl Cuda {
    /// Opens a context on each of `count` devices.
    pub fn open(count: u32) -> Result<Cuda, PluginError> {
        let mut gpus = Vec::new();
        for ordinal in 0..count {
            let ctx = CudaContext::new(ordinal as usize)
                .map_err(|e| driver_error(&format!("opening device {ordinal}"), e))?;
            gpus.push(Gpu {
                device: Device {
                    kind: DeviceKind::CUDA,
                    ordinal,
                },
                ctx,
                held: Mutex::new(Held::default()),
            });
        }
        Ok(Cuda { gpus })
    }

    /// The GPU `device` names, with its context bound to this thread.
    pub fn gpu(&self, device: Device) -> Result<&Gpu, PluginError> {
        let gpu = (device.kind == DeviceKind::CUDA)
            .then(|| self.gpus.get(device.ordinal as usize))
            .flatten()
            .ok_or_else(|| PluginError::invalid(format!("cuda: no device {device}")))?;
        gpu.bind()?;
        Ok(gpu)
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        for gpu in &self.gpus {
            if gpu.bind().is_ok() {
                gpu.release_all();
            }
        }
        // The contexts (`Arc<CudaContext>`) are released as `gpus` drops.
    }
}

/// Where one side of a copy is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// Memory the host addresses (any device's host or pinned memory, or the CPU's).
    Host,
    /// Device memory of CUDA device `ordinal`.
    Gpu(u32),
    /// Anything else (another provider's device, managed or custom memory).
    Other,
}

/// Classifies one side of a copy.
pub fn side(m: &MemRef) -> Side {
    match (m.device.kind, m.memory) {
        (DeviceKind::CPU, _) => Side::Host,
        (DeviceKind::CUDA, MemoryType::DEVICE) => Side::Gpu(m.device.ordinal),
        (DeviceKind::CUDA, MemoryType::HOST | MemoryType::HOST_PINNED) => Side::Host,
        _ => Side::Other,
    }
}

/// The device provider.
pub struct CudaProvider(pub Arc<Cuda>);

impl DeviceProvider for CudaProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            kind: DeviceKind::CUDA,
            devices: self.0.gpus.iter().map(|g| g.device).collect(),
            alignment: ALIGN,
            flags: 0,
        }
    }

    fn alloc(
        &self,
        device: Device,
        memory: MemoryType,
        bytes: usize,
        stream: Stream,
    ) -> Result<MemRef, PluginError> {
        let gpu = self.0.gpu(device)?;
        let n = bytes.max(1);
        let ptr: u64 = match memory {
            MemoryType::DEVICE => {
                let s = gpu.stream(stream)?;
                // SAFETY: the context is bound; `s` is a live stream of it.
                unsafe {
                    if gpu.ctx.has_async_alloc() {
                        result::malloc_async(s, n)
                    } else {
                        result::malloc_sync(n)
                    }
                }
                .map_err(|e| driver_error(&format!("allocating {bytes} bytes on {device}"), e))?
            }
            MemoryType::HOST_PINNED => {
                // SAFETY: the context is bound.
                unsafe { result::malloc_host(n, 0) }
                    .map_err(|e| driver_error(&format!("pinning {bytes} host bytes"), e))?
                    as usize as u64
            }
            other => {
                return Err(PluginError::unimplemented(format!(
                    "cuda: cannot allocate memory type {}",
                    other.0
                )))
            }
        };
        gpu.held().allocs.insert(ptr, (memory, bytes));
        Ok(MemRef {
            device,
            memory,
            ptr: ptr as usize as *mut u8,
        })
    }

    fn free(&self, mem: MemRef, _bytes: usize, stream: Stream) {
        let Ok(gpu) = self.0.gpu(mem.device) else {
            return;
        };
        let key = mem.ptr as usize as u64;
        let Some((memory, _)) = gpu.held().allocs.remove(&key) else {
            return; // Not ours (or freed twice): leave it.
        };
        // Freed in the stream's order, as the contract says; an unknown stream falls back to
        // a synchronous free.
        let s = gpu.stream(stream).ok();
        // SAFETY: allocated by `alloc` with this memory type, freed once (removed above).
        let _ = unsafe {
            match (memory, s) {
                (MemoryType::HOST_PINNED, s) => {
                    // Copies queued on the stream may still read it: wait for them.
                    match s {
                        Some(s) => result::stream::synchronize(s),
                        None => result::ctx::synchronize(),
                    }
                    .and_then(|()| result::free_host(key as usize as *mut std::ffi::c_void))
                }
                (_, Some(s)) if gpu.ctx.has_async_alloc() => result::free_async(key, s),
                _ => result::ctx::synchronize().and_then(|()| result::free_sync(key)),
            }
        };
    }

    fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        bytes: usize,
        stream: Stream,
    ) -> Result<(), PluginError> {
        if bytes == 0 {
            return Ok(());
        }
        if dst.ptr.is_null() || src.ptr.is_null() {
            return Err(PluginError::invalid("cuda: copy with a null pointer"));
        }
        let d = dst.ptr as usize as u64;
        let s = src.ptr as usize as u64;
        let what = || format!("copying {bytes} bytes {} -> {}", src.device, dst.device);
        // The stream belongs to the device side (the source's for device-to-device copies,
        // which is the handle the daemon copies through).
        // SAFETY (every arm): the host lends `bytes` valid bytes at both ends for the copy's
        // duration (it synchronizes the stream before reading or releasing them); the
        // context bound is the stream's.
        let r = match (side(&dst), side(&src)) {
            (Side::Gpu(o), Side::Host) => {
                let gpu = self.0.gpu(dst.device)?;
                debug_assert_eq!(gpu.device.ordinal, o);
                let st = gpu.stream(stream)?;
                unsafe { sys::cuMemcpyHtoDAsync_v2(d, src.ptr as *const _, bytes, st) }
            }
            (Side::Host, Side::Gpu(_)) => {
                let gpu = self.0.gpu(src.device)?;
                let st = gpu.stream(stream)?;
                unsafe { sys::cuMemcpyDtoHAsync_v2(dst.ptr as *mut _, s, bytes, st) }
            }
            (Side::Gpu(a), Side::Gpu(b)) if a == b => {
                let gpu = self.0.gpu(src.device)?;
                let st = gpu.stream(stream)?;
                unsafe { sys::cuMemcpyDtoDAsync_v2(d, s, bytes, st) }
            }
            (Side::Gpu(_), Side::Gpu(_)) => {
                let to = self.0.gpu(dst.device)?.ctx.cu_ctx();
                let gpu = self.0.gpu(src.device)?;
                let st = gpu.stream(stream)?;
                unsafe { sys::cuMemcpyPeerAsync(d, to, s, gpu.ctx.cu_ctx(), bytes, st) }
            }
            _ => {
                return Err(PluginError::unimplemented(format!(
                    "cuda: cannot copy {} memory of {} -> {} memory of {}",
                    src.memory.0, src.device, dst.memory.0, dst.device
                )))
            }
        };
        r.result().map_err(|e| driver_error(&what(), e))
    }

    fn create_stream(&self, device: Device) -> Result<Stream, PluginError> {
        let gpu = self.0.gpu(device)?;
        let s = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_error("creating a stream", e))?;
        let id = s as usize as u64;
        gpu.held().streams.insert(id);
        Ok(Stream(id))
    }

    fn destroy_stream(&self, device: Device, stream: Stream) {
        let Ok(gpu) = self.0.gpu(device) else { return };
        if stream == Stream::DEFAULT || !gpu.held().streams.remove(&stream.0) {
            return;
        }
        if let Some(h) = gpu.held().blas.remove(&stream.0) {
            // SAFETY: the handle was bound to this stream, which goes away with it.
            let _ = unsafe { cudarc::cublas::result::destroy_handle(h as usize as _) };
        }
        // SAFETY: created by `create_stream`; the driver finishes queued work first.
        let _ = unsafe { result::stream::destroy(stream.0 as usize as sys::CUstream) };
    }

    fn create_event(&self, device: Device) -> Result<Event, PluginError> {
        let gpu = self.0.gpu(device)?;
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| driver_error("creating an event", e))?;
        let id = e as usize as u64;
        gpu.held().events.insert(id);
        Ok(Event(id))
    }

    fn destroy_event(&self, device: Device, event: Event) {
        let Ok(gpu) = self.0.gpu(device) else { return };
        if gpu.held().events.remove(&event.0) {
            // SAFETY: created by `create_event`, destroyed once.
            let _ = unsafe { result::event::destroy(event.0 as usize as sys::CUevent) };
        }
    }

    fn record(&self, device: Device, event: Event, stream: Stream) -> Result<(), PluginError> {
        let gpu = self.0.gpu(device)?;
        let (e, s) = (gpu.event(event)?, gpu.stream(stream)?);
        // SAFETY: both live and of this context.
        unsafe { result::event::record(e, s) }.map_err(|e| driver_error("recording an event", e))
    }

    fn wait(&self, device: Device, stream: Stream, event: Event) -> Result<(), PluginError> {
        let gpu = self.0.gpu(device)?;
        let (e, s) = (gpu.event(event)?, gpu.stream(stream)?);
        // SAFETY: both live and of this context.
        unsafe { result::stream::wait_event(s, e, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(|e| driver_error("waiting for an event", e))
    }

    fn synchronize(&self, device: Device, stream: Stream) -> Result<(), PluginError> {
        let gpu = self.0.gpu(device)?;
        let s = gpu.stream(stream)?;
        // SAFETY: a live stream of the bound context.
        unsafe { result::stream::synchronize(s) }.map_err(|e| driver_error("synchronizing", e))
    }

    fn resource(&self, device: Device, stream: Stream, key: &str) -> u64 {
        match key {
            "cublas" => self
                .0
                .gpu(device)
                .and_then(|g| g.cublas(stream))
                .map_or(0, |h| h as usize as u64),
            _ => 0,
        }
    }

    fn self_test(&self) -> Result<(), PluginError> {
        // Each device: there and back again through device memory, and device to device.
        let data: Vec<u8> = (0..=255).collect();
        let host = |ptr: *const u8| MemRef {
            device: Device::CPU,
            memory: MemoryType::HOST,
            ptr: ptr.cast_mut(),
        };
        for gpu in &self.0.gpus {
            let d = gpu.device;
            let s = self.create_stream(d)?;
            let mut taken = Vec::new();
            let mut back = vec![0u8; data.len()];
            let mut round_trip = || -> Result<(), PluginError> {
                let a = self.alloc(d, MemoryType::DEVICE, data.len(), s)?;
                taken.push(a);
                let b = self.alloc(d, MemoryType::DEVICE, data.len(), s)?;
                taken.push(b);
                self.copy(a, host(data.as_ptr()), data.len(), s)?;
                self.copy(b, a, data.len(), s)?;
                self.copy(host(back.as_mut_ptr()), b, data.len(), s)?;
                self.synchronize(d, s)
            };
            let r = round_trip();
            for m in taken {
                self.free(m, data.len(), s);
            }
            let _ = self.synchronize(d, s);
            self.destroy_stream(d, s);
            r?;
            if back != data {
                return Err(PluginError::internal(format!(
                    "cuda: a round trip through {d} changed the data"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(device: Device, memory: MemoryType) -> MemRef {
        MemRef {
            device,
            memory,
            ptr: std::ptr::null_mut(),
        }
    }

    #[test]
    fn copy_sides_are_classified() {
        let gpu1 = Device {
            kind: DeviceKind::CUDA,
            ordinal: 1,
        };
        assert_eq!(side(&mem(Device::CPU, MemoryType::DEVICE)), Side::Host);
        assert_eq!(side(&mem(Device::CPU, MemoryType::HOST)), Side::Host);
        assert_eq!(side(&mem(Device::CUDA0, MemoryType::DEVICE)), Side::Gpu(0));
        assert_eq!(side(&mem(gpu1, MemoryType::DEVICE)), Side::Gpu(1));
        assert_eq!(side(&mem(gpu1, MemoryType::HOST_PINNED)), Side::Host);
        assert_eq!(side(&mem(gpu1, MemoryType::MANAGED)), Side::Other);
        assert_eq!(side(&mem(Device::MOCK, MemoryType::DEVICE)), Side::Other);
    }

    #[test]
    fn driver_errors_are_named_without_the_driver() {
        let e = driver_error("x", DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        assert_eq!(e.message.as_str(), "cuda: x: CUDA_ERROR_OUT_OF_MEMORY (2)");
        let e = driver_error("y", DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        assert_eq!(e.code, ErrorCode::Internal);
    }
}
