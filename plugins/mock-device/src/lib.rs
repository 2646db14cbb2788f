//! The mock device: a device provider whose memory is a separate space, and `Relu` and
//! `Reshape` kernels that run there. Tests use it to prove the memory model without a GPU.
//!
//! The memory is host RAM *scrambled*: every byte is stored XOR [`KEY`], and only this
//! provider's copies and kernels unscramble it. So a host that hands a CPU kernel mock memory,
//! reads a mock output without copying it, or forgets a copy, computes garbage and fails the
//! test instead of passing by accident (as plain host memory would let it). Fresh allocations
//! hold a pattern, as device memory holds whatever was there before.
//!
//! Configuration (`[plugin_config.mock-device]`, one `key = value` per line):
//! - `devices = N`: offer mock:0 .. mock:N-1 (default 1);
//! - `fail_alloc_after = N`: allocations after the first N fail (RESOURCE_EXHAUSTED); the
//!   self-test at load takes one, so 0 makes the plugin fail its self-test and 1 lets it load
//!   and fail at the first request;
//! - `null_alloc_after = N`: allocations after the first N "succeed" with a null pointer (a
//!   broken provider);
//! - `leak_report = <path>`: `shutdown` writes the bytes still allocated there, so a test can
//!   check that the daemon returned every block before unloading the plugin.

use opreg_sdk::prelude::*;
use std::sync::{
    atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    Mutex,
};

/// What every stored byte is XORed with.
pub const KEY: u8 = 0xA5;
const ALIGN: usize = 64;

static DEVICES: AtomicU32 = AtomicU32::new(1);
static FAIL_ALLOC_AFTER: AtomicU64 = AtomicU64::new(u64::MAX);
static NULL_ALLOC_AFTER: AtomicU64 = AtomicU64::new(u64::MAX);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static OUTSTANDING: AtomicUsize = AtomicUsize::new(0);
static LEAK_REPORT: Mutex<Option<String>> = Mutex::new(None);

fn layout(bytes: usize) -> Result<std::alloc::Layout, PluginError> {
    std::alloc::Layout::from_size_align(bytes.max(1), ALIGN)
        .map_err(|_| PluginError::new(ErrorCode::ResourceExhausted, "mock: size overflows"))
}

struct MockProvider;

impl DeviceProvider for MockProvider {
    fn info(&self) -> ProviderInfo {
        let n = DEVICES.load(Ordering::Relaxed);
        ProviderInfo {
            kind: DeviceKind::MOCK,
            devices: (0..n)
                .map(|ordinal| Device {
                    kind: DeviceKind::MOCK,
                    ordinal,
                })
                .collect(),
            alignment: ALIGN,
            flags: 0,
        }
    }

    fn alloc(
        &self,
        device: Device,
        memory: MemoryType,
        bytes: usize,
        _stream: Stream,
    ) -> Result<MemRef, PluginError> {
        let done = ALLOCS.fetch_add(1, Ordering::Relaxed);
        if done >= FAIL_ALLOC_AFTER.load(Ordering::Relaxed) {
            return Err(PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("mock: out of device memory allocating {bytes} bytes (fail_alloc_after)"),
            ));
        }
        if done >= NULL_ALLOC_AFTER.load(Ordering::Relaxed) {
            return Ok(MemRef {
                device,
                memory,
                ptr: std::ptr::null_mut(),
            });
        }
        // SAFETY: non-zero size, valid alignment.
        let ptr = unsafe { std::alloc::alloc(layout(bytes)?) };
        if ptr.is_null() {
            return Err(PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("mock: cannot allocate {bytes} bytes"),
            ));
        }
        // Device memory is not zeroed: leave a pattern a careless reader would trip over.
        // SAFETY: `bytes.max(1)` bytes were just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0xCD, bytes.max(1)) };
        OUTSTANDING.fetch_add(bytes, Ordering::Relaxed);
        Ok(MemRef {
            device,
            memory,
            ptr,
        })
    }

    fn free(&self, mem: MemRef, bytes: usize, _stream: Stream) {
        if mem.ptr.is_null() {
            return;
        }
        if let Ok(l) = layout(bytes) {
            // SAFETY: allocated by `alloc` with this size (the host's contract).
            unsafe { std::alloc::dealloc(mem.ptr, l) };
            OUTSTANDING.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        bytes: usize,
        _stream: Stream,
    ) -> Result<(), PluginError> {
        let mock = |m: &MemRef| m.device.kind == DeviceKind::MOCK;
        let host = |m: &MemRef| m.device == Device::CPU;
        if bytes == 0 {
            return Ok(());
        }
        if dst.ptr.is_null() || src.ptr.is_null() {
            return Err(PluginError::invalid("mock: copy with a null pointer"));
        }
        // SAFETY (all arms): the host passes `bytes` valid bytes at both ends.
        match (mock(&dst), mock(&src)) {
            (true, false) if host(&src) => unsafe { scramble_copy(dst.ptr, src.ptr, bytes) },
            (false, true) if host(&dst) => unsafe { scramble_copy(dst.ptr, src.ptr, bytes) },
            (true, true) if dst.device == src.device => unsafe {
                std::ptr::copy(src.ptr, dst.ptr, bytes)
            },
            _ => {
                return Err(PluginError::unimplemented(format!(
                    "mock: cannot copy {} -> {}",
                    src.device, dst.device
                )))
            }
        }
        Ok(())
    }

    fn self_test(&self) -> Result<(), PluginError> {
        // There and back again, through the scramble.
        let device = Device::MOCK;
        let data: Vec<u8> = (0..=255).collect();
        let mem = self.alloc(device, MemoryType::DEVICE, data.len(), Stream::DEFAULT)?;
        let host = |ptr: *const u8| MemRef {
            device: Device::CPU,
            memory: MemoryType::HOST,
            ptr: ptr.cast_mut(),
        };
        let mut back = vec![0u8; data.len()];
        let result = self
            .copy(mem, host(data.as_ptr()), data.len(), Stream::DEFAULT)
            .and_then(|()| self.copy(host(back.as_mut_ptr()), mem, data.len(), Stream::DEFAULT));
        self.free(mem, data.len(), Stream::DEFAULT);
        result?;
        if back != data {
            return Err(PluginError::internal("mock: a round trip changed the data"));
        }
        Ok(())
    }
}

/// `dst[i] = src[i] ^ KEY`: scrambles into mock memory, or unscrambles out of it.
///
/// # Safety
/// `bytes` valid bytes at `src` and `dst`, not overlapping.
unsafe fn scramble_copy(dst: *mut u8, src: *const u8, bytes: usize) {
    // SAFETY: per the contract.
    let (d, s) = unsafe {
        (
            std::slice::from_raw_parts_mut(dst, bytes),
            std::slice::from_raw_parts(src, bytes),
        )
    };
    for (d, s) in d.iter_mut().zip(s) {
        *d = s ^ KEY;
    }
}

/// Relu on f32 mock memory: unscramble, compute, scramble.
#[derive(Clone)]
struct MockRelu;

impl Kernel for MockRelu {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = inputs
            .first()
            .ok_or_else(|| PluginError::invalid("Relu needs an input"))?;
        if x.device.kind != DeviceKind::MOCK || x.memory != MemoryType::DEVICE {
            return Err(PluginError::internal(format!(
                "mock Relu was given {} memory of {} (the host must copy it to the mock device)",
                x.memory.0, x.device
            )));
        }
        if x.dtype != DType::F32 || !x.is_contiguous() {
            return Err(PluginError::invalid("mock Relu takes contiguous f32"));
        }
        let y = ctx.output(0, DType::F32, x.shape())?;
        if y.device != x.device || y.memory != MemoryType::DEVICE {
            return Err(PluginError::internal(format!(
                "the host allocated the mock Relu's output on {}, not on {}",
                y.device, x.device
            )));
        }
        let n = x.len();
        // SAFETY: the host lends `n` f32 of mock memory behind each pointer (checked above that
        // both are mock device memory); the output is unaliased.
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(x.data.cast::<[u8; 4]>(), n),
                std::slice::from_raw_parts_mut(y.data.cast::<[u8; 4]>(), n),
            )
        };
        for (d, s) in dst.iter_mut().zip(src) {
            let v = f32::from_le_bytes(s.map(|b| b ^ KEY)).max(0.0);
            *d = v.to_le_bytes().map(|b| b ^ KEY);
        }
        Ok(())
    }
}

/// A node named `decline*` is declined (UNIMPLEMENTED: placement moves it to the next device)
/// and one named `refuse*` refused (INVALID_ARGUMENT: the load fails), so tests can drive both.
fn relu_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    if node.name.starts_with("decline") {
        return Err(PluginError::unimplemented("mock: declines this Relu"));
    }
    if node.name.starts_with("refuse") {
        return Err(PluginError::invalid("mock: refuses this Relu"));
    }
    Ok(Box::new(MockRelu))
}

/// Reshape on mock memory: the data stays on the device (a device-to-device copy), the shape
/// input is declared host memory, as shape, axes and size inputs of device kernels are.
#[derive(Clone)]
struct MockReshape;

impl Kernel for MockReshape {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [x, shape] = inputs else {
            return Err(PluginError::invalid("Reshape takes data and shape"));
        };
        if x.device.kind != DeviceKind::MOCK || !x.is_contiguous() {
            return Err(PluginError::internal(format!(
                "mock Reshape was given data on {}",
                x.device
            )));
        }
        // Host memory, as declared at registration: readable as a slice (a mock copy would
        // be refused here, and would read as garbage if it were not).
        let wanted = shape.as_slice::<i64>()?;
        let len = x.len();
        let mut dims: Vec<usize> = Vec::with_capacity(wanted.len());
        let mut infer = None;
        for (i, &d) in wanted.iter().enumerate() {
            match d {
                -1 if infer.is_none() => {
                    infer = Some(i);
                    dims.push(1);
                }
                0 => dims.push(
                    *x.shape()
                        .get(i)
                        .ok_or_else(|| PluginError::invalid("Reshape: 0 past the input's rank"))?,
                ),
                d if d > 0 => dims.push(d as usize),
                d => return Err(PluginError::invalid(format!("Reshape: bad dimension {d}"))),
            }
        }
        let known: usize = dims.iter().product();
        if let Some(i) = infer {
            if known == 0 || len % known != 0 {
                return Err(PluginError::invalid("Reshape: -1 cannot be inferred"));
            }
            dims[i] = len / known;
        } else if known != len {
            return Err(PluginError::invalid(format!(
                "Reshape: {len} elements into {dims:?}"
            )));
        }
        let y = ctx.output(0, x.dtype, &dims)?;
        // SAFETY: both are `len` elements of mock memory (device to device: no unscrambling).
        unsafe { std::ptr::copy_nonoverlapping(x.data, y.data, len * x.dtype.size()) };
        Ok(())
    }
}

fn register(r: &mut Registrar) {
    r.device_provider(MockProvider);
    r.kernel(
        KernelDesc::onnx("Reshape", 14, OPEN_END)
            .constraint("T", &[DType::F32])
            .constraint("S", &[DType::I64])
            .inputs(&["T", "S"])
            .outputs(&["T"])
            .device(Device::MOCK)
            .input_memory(1, MemoryType::HOST),
        stateless(MockReshape),
    );
    r.kernel(
        KernelDesc::onnx("Relu", 6, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"])
            .device(Device::MOCK),
        relu_factory,
    );
}

fn init(config: &str) -> Result<(), PluginError> {
    for line in config.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        let count = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| PluginError::invalid(format!("mock: {key} = {v:?} is not a count")))
        };
        match key.trim() {
            "devices" => DEVICES.store(
                value
                    .parse()
                    .map_err(|_| PluginError::invalid(format!("mock: devices = {value:?}")))?,
                Ordering::Relaxed,
            ),
            "fail_alloc_after" => FAIL_ALLOC_AFTER.store(count(value)?, Ordering::Relaxed),
            "null_alloc_after" => NULL_ALLOC_AFTER.store(count(value)?, Ordering::Relaxed),
            "leak_report" => {
                *LEAK_REPORT
                    .lock()
                    .map_err(|_| PluginError::internal("poisoned"))? = Some(value.to_string())
            }
            _ => {}
        }
    }
    Ok(())
}

fn shutdown() {
    if let Ok(Some(path)) = LEAK_REPORT.lock().map(|m| m.clone()) {
        let _ = std::fs::write(path, OUTSTANDING.load(Ordering::Relaxed).to_string());
    }
}

opreg_sdk::export_plugin! {
    name: "mock-device",
    version: env!("CARGO_PKG_VERSION"),
    description: "mock device: a scrambled memory space with its own allocator and copies, and Relu on it",
    init: init,
    register: register,
    shutdown: shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::testkit::self_test_device;

    #[test]
    fn the_provider_passes_its_self_test_and_scrambles_what_it_stores() {
        self_test_device(MockProvider).expect("self-test");
        let p = MockProvider;
        let mem = p
            .alloc(Device::MOCK, MemoryType::DEVICE, 4, Stream::DEFAULT)
            .expect("alloc");
        let data = [1u8, 2, 3, 4];
        let host = MemRef {
            device: Device::CPU,
            memory: MemoryType::HOST,
            ptr: data.as_ptr().cast_mut(),
        };
        p.copy(mem, host, 4, Stream::DEFAULT).expect("copy in");
        // SAFETY: 4 bytes were allocated; read as the host would by mistake.
        let raw = unsafe { std::slice::from_raw_parts(mem.ptr, 4) }.to_vec();
        assert_ne!(raw, data, "mock memory must not read as the data it holds");
        p.free(mem, 4, Stream::DEFAULT);
    }
}
