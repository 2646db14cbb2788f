//! Device providers: how a plugin brings a device (a GPU, an accelerator, the test suite's
//! mock) to the daemon.
//!
//! A provider owns its devices' memory, copies and streams; the daemon owns the policy. The
//! daemon pools what [`DeviceProvider::alloc`] returns (so a request in steady state never
//! reaches the driver's allocator), inserts a copy step in a plan wherever a value crosses
//! from one device (or memory type) to another, and hands each kernel call its node's stream.
//!
//! Handles ([`Stream`], [`Event`]) are opaque numbers the provider chooses; `0` is a device's
//! default stream and "no event". Pointers in [`MemRef`] address the memory type they name;
//! the host never dereferences device memory.

use crate::{error::guard, Device, DeviceKind, MemoryType, PluginError};
use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, RResult, RStr, RVec},
    StableAbi,
};

/// A stream: work enqueued on one stream runs in order. `0` is the device's default stream.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Stream(pub u64);

impl Stream {
    /// The default stream.
    pub const DEFAULT: Stream = Stream(0);
}

/// An event recorded on a stream, that other streams (or the host) wait for.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Event(pub u64);

/// A piece of memory: where, which kind, and its address there.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub struct MemRef {
    /// The device the memory belongs to.
    pub device: Device,
    /// Which memory of the device.
    pub memory: MemoryType,
    /// The address (meaningful to the provider; to the host only for host-accessible memory).
    pub ptr: *mut u8,
}

// SAFETY: a `MemRef` names memory; who may touch it is the provider's and the plan's business.
unsafe impl Send for MemRef {}
unsafe impl Sync for MemRef {}

/// What a device provider is.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ProviderInfo {
    /// The kind of device it provides.
    pub kind: DeviceKind,
    /// Its devices (ordinals of `kind`) present on this machine; empty is a provider with
    /// nothing to offer here (no GPU), which loads and serves nothing.
    pub devices: RVec<Device>,
    /// Alignment every allocation has, in bytes (at least 64 for host-visible memory).
    pub alignment: usize,
    /// Extension bits; none are defined in 1.0.
    pub flags: u64,
}

/// A device provider, as a plugin author implements it. Stream and event methods have
/// defaults for devices that compute synchronously (every call completes before it returns).
pub trait DeviceProvider: Send + Sync + 'static {
    /// The kind of device and the devices present.
    fn info(&self) -> ProviderInfo;

    /// `bytes` of `memory` on `device`, aligned to [`ProviderInfo::alignment`], usable in
    /// `stream`'s order. The daemon pools the result; it calls this rarely.
    fn alloc(
        &self,
        device: Device,
        memory: MemoryType,
        bytes: usize,
        stream: Stream,
    ) -> Result<MemRef, PluginError>;

    /// Returns memory from [`alloc`](Self::alloc) (same `bytes`), after work on `stream` that
    /// uses it.
    fn free(&self, mem: MemRef, bytes: usize, stream: Stream);

    /// Copies `bytes` from `src` to `dst`, in `stream`'s order. One side may be host memory;
    /// a pair the provider cannot copy between is an `UNIMPLEMENTED` error.
    fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        bytes: usize,
        stream: Stream,
    ) -> Result<(), PluginError>;

    /// A new stream on `device`. Default: the default stream (synchronous devices).
    fn create_stream(&self, _device: Device) -> Result<Stream, PluginError> {
        Ok(Stream::DEFAULT)
    }

    /// Releases a stream from [`create_stream`](Self::create_stream).
    fn destroy_stream(&self, _device: Device, _stream: Stream) {}

    /// A new event on `device`.
    fn create_event(&self, _device: Device) -> Result<Event, PluginError> {
        Ok(Event(0))
    }

    /// Releases an event.
    fn destroy_event(&self, _device: Device, _event: Event) {}

    /// Records `event` at the current end of `stream`.
    fn record(&self, _device: Device, _event: Event, _stream: Stream) -> Result<(), PluginError> {
        Ok(())
    }

    /// Makes `stream` wait for `event` before running what is enqueued after this call.
    fn wait(&self, _device: Device, _stream: Stream, _event: Event) -> Result<(), PluginError> {
        Ok(())
    }

    /// Blocks the calling thread until everything enqueued on `stream` is done.
    fn synchronize(&self, _device: Device, _stream: Stream) -> Result<(), PluginError> {
        Ok(())
    }

    /// A named per-device (per-stream) resource kernels of this device share, e.g. a BLAS
    /// library handle bound to `stream`: an opaque number, 0 when there is none.
    fn resource(&self, _device: Device, _stream: Stream, _key: &str) -> u64 {
        0
    }

    /// Checks the provider (allocate, copy there and back, compare): run at load and before a
    /// hot swap is published. Default: nothing to check.
    fn self_test(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

/// The ABI form of [`DeviceProvider`]. Implemented by the SDK; hosts call it.
#[sabi_trait]
pub trait FfiDeviceProvider: Send + Sync {
    /// See [`DeviceProvider::info`].
    fn info(&self) -> ProviderInfo;
    /// See [`DeviceProvider::alloc`].
    fn alloc(
        &self,
        device: Device,
        memory: MemoryType,
        bytes: usize,
        stream: Stream,
    ) -> RResult<MemRef, PluginError>;
    /// See [`DeviceProvider::free`].
    fn free(&self, mem: MemRef, bytes: usize, stream: Stream);
    /// See [`DeviceProvider::copy`].
    fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        bytes: usize,
        stream: Stream,
    ) -> RResult<(), PluginError>;
    /// See [`DeviceProvider::create_stream`].
    fn create_stream(&self, device: Device) -> RResult<Stream, PluginError>;
    /// See [`DeviceProvider::destroy_stream`].
    fn destroy_stream(&self, device: Device, stream: Stream);
    /// See [`DeviceProvider::create_event`].
    fn create_event(&self, device: Device) -> RResult<Event, PluginError>;
    /// See [`DeviceProvider::destroy_event`].
    fn destroy_event(&self, device: Device, event: Event);
    /// See [`DeviceProvider::record`].
    fn record(&self, device: Device, event: Event, stream: Stream) -> RResult<(), PluginError>;
    /// See [`DeviceProvider::wait`].
    fn wait(&self, device: Device, stream: Stream, event: Event) -> RResult<(), PluginError>;
    /// See [`DeviceProvider::synchronize`].
    fn synchronize(&self, device: Device, stream: Stream) -> RResult<(), PluginError>;
    /// See [`DeviceProvider::resource`].
    fn resource(&self, device: Device, stream: Stream, key: RStr<'_>) -> u64;
    /// See [`DeviceProvider::self_test`].
    #[sabi(last_prefix_field)]
    fn self_test(&self) -> RResult<(), PluginError>;
}

/// An owned device provider object, as it crosses the ABI.
pub type FfiDeviceProviderBox = FfiDeviceProvider_TO<'static, RBox<()>>;

struct ProviderAdapter<P>(P);

impl<P: DeviceProvider> FfiDeviceProvider for ProviderAdapter<P> {
    fn info(&self) -> ProviderInfo {
        // No error channel: a provider that panics here offers no devices.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.info())).unwrap_or(
            ProviderInfo {
                kind: DeviceKind::CPU,
                devices: RVec::new(),
                alignment: 64,
                flags: 0,
            },
        )
    }
    fn alloc(
        &self,
        device: Device,
        memory: MemoryType,
        bytes: usize,
        stream: Stream,
    ) -> RResult<MemRef, PluginError> {
        guard("device alloc", || {
            let mem = self.0.alloc(device, memory, bytes, stream)?;
            if mem.ptr.is_null() && bytes > 0 {
                return Err(PluginError::new(
                    crate::ErrorCode::ResourceExhausted,
                    format!("device {device}: allocator returned null for {bytes} bytes"),
                ));
            }
            Ok(mem)
        })
        .into()
    }
    fn free(&self, mem: MemRef, bytes: usize, stream: Stream) {
        let _ = guard("device free", || {
            self.0.free(mem, bytes, stream);
            Ok(())
        });
    }
    fn copy(
        &self,
        dst: MemRef,
        src: MemRef,
        bytes: usize,
        stream: Stream,
    ) -> RResult<(), PluginError> {
        guard("device copy", || self.0.copy(dst, src, bytes, stream)).into()
    }
    fn create_stream(&self, device: Device) -> RResult<Stream, PluginError> {
        guard("create stream", || self.0.create_stream(device)).into()
    }
    fn destroy_stream(&self, device: Device, stream: Stream) {
        let _ = guard("destroy stream", || {
            self.0.destroy_stream(device, stream);
            Ok(())
        });
    }
    fn create_event(&self, device: Device) -> RResult<Event, PluginError> {
        guard("create event", || self.0.create_event(device)).into()
    }
    fn destroy_event(&self, device: Device, event: Event) {
        let _ = guard("destroy event", || {
            self.0.destroy_event(device, event);
            Ok(())
        });
    }
    fn record(&self, device: Device, event: Event, stream: Stream) -> RResult<(), PluginError> {
        guard("record event", || self.0.record(device, event, stream)).into()
    }
    fn wait(&self, device: Device, stream: Stream, event: Event) -> RResult<(), PluginError> {
        guard("wait event", || self.0.wait(device, stream, event)).into()
    }
    fn synchronize(&self, device: Device, stream: Stream) -> RResult<(), PluginError> {
        guard("synchronize", || self.0.synchronize(device, stream)).into()
    }
    fn resource(&self, device: Device, stream: Stream, key: RStr<'_>) -> u64 {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.0.resource(device, stream, key.as_str())
        }))
        .unwrap_or(0)
    }
    fn self_test(&self) -> RResult<(), PluginError> {
        guard("device self-test", || self.0.self_test()).into()
    }
}

/// Wraps a [`DeviceProvider`] into its ABI form, with every call guarded against panics.
pub fn into_ffi_device_provider<P: DeviceProvider>(p: P) -> FfiDeviceProviderBox {
    FfiDeviceProvider_TO::from_value(ProviderAdapter(p), TD_Opaque)
}
