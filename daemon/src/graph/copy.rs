//! Executing a copy step: host memory to a device, a device to host memory, or between two
//! devices of one provider, through the provider's copy on the device's stream.

use super::compiled::Place;
use crate::registry::Snapshot;
use opreg_sdk::{host::HostTensor, Device, MemRef, MemoryType, PluginError};

fn host_ref(ptr: *mut u8) -> MemRef {
    MemRef {
        device: Device::CPU,
        memory: MemoryType::HOST,
        ptr,
    }
}

fn no_device(d: Device) -> PluginError {
    PluginError::invalid(format!("no loaded plugin provides device {d}"))
}

/// `t` (which is at `from`) copied to `to`.
pub fn copy(
    snapshot: &Snapshot,
    t: &HostTensor,
    from: Place,
    to: Place,
) -> Result<HostTensor, PluginError> {
    let bytes = t.byte_len();
    let at = t.device_mem();
    match (from, to, at) {
        (Place::Host, Place::Device(d), None) => {
            let h = snapshot.device(d).ok_or_else(|| no_device(d))?;
            let buf = h.alloc_pooled(bytes)?;
            let dst = opreg_sdk::host::DeviceBuffer::mem(&buf);
            let out = HostTensor::on_device(t.dtype(), t.shape(), Box::new(buf))?;
            h.copy(dst, host_ref(t.bytes().as_ptr().cast_mut()), bytes)?;
            Ok(out)
        }
        (Place::Device(d), Place::Host, Some(src)) if src.device == d => {
            let h = snapshot.device(d).ok_or_else(|| no_device(d))?;
            let mut out = HostTensor::zeroed(t.dtype(), t.shape())?;
            h.copy(host_ref(out.bytes_mut().as_mut_ptr()), src, bytes)?;
            Ok(out)
        }
        (Place::Device(a), Place::Device(b), Some(src)) if src.device == a => {
            let ha = snapshot.device(a).ok_or_else(|| no_device(a))?;
            let hb = snapshot.device(b).ok_or_else(|| no_device(b))?;
            if !ha.same_provider(&hb) {
                return Err(PluginError::unimplemented(format!(
                    "no provider copies between {a} ({}) and {b} ({})",
                    ha.plugin(),
                    hb.plugin()
                )));
            }
            let buf = hb.alloc_pooled(bytes)?;
            let dst = opreg_sdk::host::DeviceBuffer::mem(&buf);
            let out = HostTensor::on_device(t.dtype(), t.shape(), Box::new(buf))?;
            ha.copy(dst, src, bytes)?;
            Ok(out)
        }
        _ => Err(PluginError::internal(format!(
            "copy {from} -> {to} of a value that is at {}",
            at.map_or("host".to_string(), |m| m.device.to_string())
        ))),
    }
}
