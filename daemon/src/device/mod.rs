//! Devices that plugins provide: their pooled memory, copies and streams, as the runtime uses
//! them.
//!
//! A plugin registers a device provider (see `opreg_sdk::device`); when it loads, the daemon
//! asks the provider for its devices and keeps one [`Pool`] and one stream per device in a
//! [`LoadedDevice`] the plugin holds. A [`DeviceHandle`] names one device of one loaded plugin
//! and holds that plugin (its generation) alive: so does every buffer allocated through it, so
//! a hot swap never unmaps code or memory a tensor still uses. Unloading drains the pools back
//! to the provider before the plugin's `shutdown`. (This module does not know plugins: the
//! registry hands it what to keep alive.)

mod pool;

pub use pool::{size_class, Pool, PoolStats};

use opreg_sdk::{
    device::FfiDeviceProviderBox,
    host::{DeviceAlloc, DeviceBuffer},
    Device, ErrorCode, MemRef, MemoryType, PluginError, ProviderInfo, Stream,
};
use std::sync::Arc;

/// One provider of a loaded plugin, with a pool and a stream per device it offers.
pub struct LoadedDevice {
    pub info: ProviderInfo,
    /// Per device of `info.devices`, by position.
    pub pools: Vec<Pool>,
    pub streams: Vec<Stream>,
    // Last: dropped after `Drop::drop` has returned every cached block to it.
    pub provider: FfiDeviceProviderBox,
}

impl LoadedDevice {
    /// Asks the provider for its devices and creates a stream on each.
    pub fn new(provider: FfiDeviceProviderBox) -> Result<Self, PluginError> {
        let info = provider.info();
        let mut streams = Vec::new();
        for &d in info.devices.iter() {
            match provider.create_stream(d).into_result() {
                Ok(s) => streams.push(s),
                Err(e) => {
                    for (&d, &s) in info.devices.iter().zip(&streams) {
                        provider.destroy_stream(d, s);
                    }
                    return Err(e);
                }
            }
        }
        Ok(LoadedDevice {
            pools: info.devices.iter().map(|_| Pool::default()).collect(),
            streams,
            info,
            provider,
        })
    }

    /// Position of `device` among this provider's devices.
    pub fn index(&self, device: Device) -> Option<usize> {
        self.info.devices.iter().position(|&d| d == device)
    }
}

impl Drop for LoadedDevice {
    fn drop(&mut self) {
        for ((&d, pool), &s) in self.info.devices.iter().zip(&self.pools).zip(&self.streams) {
            // Work still queued may use cached blocks: wait for it first.
            let _ = self.provider.synchronize(d, s);
            for (class, mem) in pool.drain() {
                self.provider.free(mem, class, s);
            }
            self.provider.destroy_stream(d, s);
        }
    }
}

/// One device of one loaded plugin.
#[derive(Clone)]
pub struct DeviceHandle {
    // Before `owner`: the provider is dropped (when this was the last reference) while its
    // plugin is still mapped.
    loaded: Arc<LoadedDevice>,
    index: usize,
    pub device: Device,
    plugin: Arc<str>,
    /// Keeps the plugin generation that provides the device (its library) alive.
    _owner: Arc<dyn Send + Sync>,
}

impl std::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceHandle({} of {})", self.device, self.plugin)
    }
}

impl DeviceHandle {
    /// `device` of `loaded` (a provider of the plugin `plugin`, kept alive by `owner`), if it
    /// offers that device.
    pub fn new(
        loaded: &Arc<LoadedDevice>,
        device: Device,
        plugin: &str,
        owner: Arc<dyn Send + Sync>,
    ) -> Option<DeviceHandle> {
        Some(DeviceHandle {
            index: loaded.index(device)?,
            loaded: loaded.clone(),
            device,
            plugin: plugin.into(),
            _owner: owner,
        })
    }

    /// The plugin that provides the device.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// Whether `other` is served by the same provider object (so it copies between them).
    pub fn same_provider(&self, other: &DeviceHandle) -> bool {
        Arc::ptr_eq(&self.loaded, &other.loaded)
    }

    pub fn pool(&self) -> &Pool {
        &self.loaded.pools[self.index]
    }

    pub fn stream(&self) -> Stream {
        self.loaded.streams[self.index]
    }

    fn error(&self, e: PluginError, what: &str) -> PluginError {
        PluginError::new(
            e.code,
            format!(
                "device {} (plugin {}): {what}: {}",
                self.device, self.plugin, e.message
            ),
        )
    }

    /// `bytes` of device memory, from the pool when it has a block of the size class.
    pub fn alloc_pooled(&self, bytes: usize) -> Result<PooledBuffer, PluginError> {
        let class = size_class(bytes).ok_or_else(|| {
            PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("device {}: {bytes} bytes is too large", self.device),
            )
        })?;
        let mem = match self.pool().take(class) {
            Some(mem) => mem,
            None => self.alloc_from_provider(class)?,
        };
        Ok(PooledBuffer {
            handle: self.clone(),
            class,
            mem,
        })
    }

    fn alloc_from_provider(&self, class: usize) -> Result<MemRef, PluginError> {
        let d = &self.loaded;
        let try_alloc = || {
            d.provider
                .alloc(self.device, MemoryType::DEVICE, class, self.stream())
                .into_result()
                .and_then(|m| self.check(m, class))
        };
        let mem = match try_alloc() {
            Ok(m) => m,
            Err(_) => {
                // Give the cache back and try once more before failing the request.
                for (c, m) in self.pool().drain() {
                    d.provider.free(m, c, self.stream());
                }
                try_alloc().map_err(|e| self.error(e, &format!("allocating {class} bytes")))?
            }
        };
        self.pool().note_driver_alloc();
        Ok(mem)
    }

    /// Refuses what a provider must never return: null, or memory of another device.
    fn check(&self, m: MemRef, class: usize) -> Result<MemRef, PluginError> {
        if m.ptr.is_null() || m.device != self.device {
            return Err(PluginError::new(
                ErrorCode::Internal,
                format!(
                    "the allocator returned {} for {class} bytes on {}",
                    if m.ptr.is_null() {
                        "null".to_string()
                    } else {
                        format!("memory of {}", m.device)
                    },
                    self.device
                ),
            ));
        }
        Ok(m)
    }

    /// Copies `bytes` from `src` to `dst` on this device's stream and waits for it.
    pub fn copy(&self, dst: MemRef, src: MemRef, bytes: usize) -> Result<(), PluginError> {
        let d = &self.loaded;
        d.provider
            .copy(dst, src, bytes, self.stream())
            .into_result()
            .and_then(|()| {
                d.provider
                    .synchronize(self.device, self.stream())
                    .into_result()
            })
            .map_err(|e| {
                self.error(
                    e,
                    &format!("copying {bytes} bytes {} -> {}", src.device, dst.device),
                )
            })
    }

    /// Waits for everything queued on this device's stream.
    pub fn synchronize(&self) -> Result<(), PluginError> {
        let d = &self.loaded;
        d.provider
            .synchronize(self.device, self.stream())
            .into_result()
            .map_err(|e| self.error(e, "synchronizing"))
    }
}

impl DeviceAlloc for DeviceHandle {
    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceBuffer>, PluginError> {
        Ok(Box::new(self.alloc_pooled(bytes)?))
    }
    fn stream(&self) -> Stream {
        DeviceHandle::stream(self)
    }
    fn resource(&self, key: &str) -> u64 {
        self.loaded
            .provider
            .resource(self.device, self.stream(), key.into())
    }
}

/// Device memory from a pool; back to the pool when dropped. Holds the plugin that provided it.
pub struct PooledBuffer {
    handle: DeviceHandle,
    class: usize,
    mem: MemRef,
}

impl DeviceBuffer for PooledBuffer {
    fn mem(&self) -> MemRef {
        self.mem
    }
    fn len(&self) -> usize {
        self.class
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.handle.pool().put(self.class, self.mem);
    }
}
