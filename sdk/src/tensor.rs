//! Tensor views and devices: the plain `#[repr(C)]` data that crosses the ABI.

use crate::{DType, Element, PluginError};
use abi_stable::{
    std_types::{RSlice, RString, RVec},
    StableAbi,
};
use std::marker::PhantomData;

/// A kind of device. Open-ended: known kinds have constants; third parties pick a number
/// at or above [`DeviceKind::FIRST_CUSTOM`] and name it in their backend registration.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKind(pub u32);

impl DeviceKind {
    /// Host memory, host threads.
    pub const CPU: DeviceKind = DeviceKind(0);
    /// NVIDIA CUDA.
    pub const CUDA: DeviceKind = DeviceKind(1);
    /// A stand-in device whose memory is host memory: lets tests exercise placement and device
    /// copies without a GPU.
    pub const MOCK: DeviceKind = DeviceKind(2);
    /// First number free for third-party device kinds.
    pub const FIRST_CUSTOM: DeviceKind = DeviceKind(1000);

    /// The name used in configuration and in the registry listing.
    pub fn name(self) -> String {
        match self {
            DeviceKind::CPU => "cpu".into(),
            DeviceKind::CUDA => "cuda".into(),
            DeviceKind::MOCK => "mock".into(),
            DeviceKind(n) => format!("device{n}"),
        }
    }

    /// Parses a name written by [`DeviceKind::name`].
    pub fn from_name(name: &str) -> Option<DeviceKind> {
        match name {
            "cpu" => Some(DeviceKind::CPU),
            "cuda" => Some(DeviceKind::CUDA),
            "mock" => Some(DeviceKind::MOCK),
            other => other.strip_prefix("device")?.parse().ok().map(DeviceKind),
        }
    }
}

/// Which memory of a device a tensor's data is in. An open code: device providers may add
/// kinds from [`MemoryType::FIRST_CUSTOM`] on.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryType(pub u32);

impl MemoryType {
    /// The device's own memory (host memory for the CPU).
    pub const DEVICE: MemoryType = MemoryType(0);
    /// Ordinary host memory, whatever the device.
    pub const HOST: MemoryType = MemoryType(1);
    /// Page-locked host memory a device can copy from and to directly.
    pub const HOST_PINNED: MemoryType = MemoryType(2);
    /// Memory both the host and the device address (unified / managed).
    pub const MANAGED: MemoryType = MemoryType(3);
    /// First code free for device-specific memory kinds.
    pub const FIRST_CUSTOM: MemoryType = MemoryType(1000);

    /// Whether host code may read and write memory of this type on `device`.
    pub fn host_accessible(self, device: Device) -> bool {
        match self {
            MemoryType::DEVICE => device.host_accessible(),
            MemoryType::HOST | MemoryType::HOST_PINNED | MemoryType::MANAGED => true,
            _ => false,
        }
    }
}

/// One device: a kind and an ordinal (GPU 0, GPU 1, ...).
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Device {
    /// The kind of device.
    pub kind: DeviceKind,
    /// Which device of that kind.
    pub ordinal: u32,
}

impl Device {
    /// The host.
    pub const CPU: Device = Device {
        kind: DeviceKind::CPU,
        ordinal: 0,
    };
    /// The first CUDA device.
    pub const CUDA0: Device = Device {
        kind: DeviceKind::CUDA,
        ordinal: 0,
    };
    /// The mock device of the test suite's `mock-device` plugin: a separate memory space.
    pub const MOCK: Device = Device {
        kind: DeviceKind::MOCK,
        ordinal: 0,
    };

    /// True when the device's memory is directly addressable by host code: the CPU's only.
    /// (The mock device's memory is a separate space, scrambled, exactly so that tests catch
    /// a host or kernel that reads it as host memory.)
    pub fn host_accessible(self) -> bool {
        self.kind == DeviceKind::CPU
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ordinal == 0 {
            f.write_str(&self.kind.name())
        } else {
            write!(f, "{}:{}", self.kind.name(), self.ordinal)
        }
    }
}

/// A read-only view of a tensor owned by someone else (usually the host).
///
/// `strides` are in elements; a contiguous row-major tensor has the strides
/// [`contiguous_strides`] gives. `data` points to the element at index `[0, 0, ...]`.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Where `data` lives.
    pub device: Device,
    /// Which memory of `device` holds `data`.
    pub memory: MemoryType,
    /// Extent of each dimension.
    pub shape: RSlice<'a, usize>,
    /// Distance between neighbours along each dimension, in elements.
    pub strides: RSlice<'a, isize>,
    /// The first element.
    pub data: *const u8,
    /// Reserved for properties added in later minors (0 today; readers ignore unknown bits).
    pub flags: u64,
    _borrow: PhantomData<&'a u8>,
}

// SAFETY: a view is a shared borrow of immutable data; the host guarantees the data outlives
// `'a` and is not written while viewed.
unsafe impl Send for TensorView<'_> {}
unsafe impl Sync for TensorView<'_> {}

impl<'a> TensorView<'a> {
    /// A view of `data`, laid out contiguously in row-major order with `shape`.
    ///
    /// # Safety
    /// `data` must hold `shape.iter().product()` elements of `dtype`, valid for `'a`.
    pub unsafe fn from_raw(
        dtype: DType,
        device: Device,
        shape: &'a [usize],
        strides: &'a [isize],
        data: *const u8,
    ) -> Self {
        TensorView {
            dtype,
            device,
            memory: MemoryType::DEVICE,
            shape: shape.into(),
            strides: strides.into(),
            data,
            flags: 0,
            _borrow: PhantomData,
        }
    }

    /// The view passed for an optional input the node leaves out (`""` in ONNX): rank 0 with a
    /// null data pointer, which no real tensor has. Check with [`is_absent`](Self::is_absent).
    pub fn absent() -> TensorView<'static> {
        TensorView {
            dtype: DType::F32,
            device: Device::CPU,
            memory: MemoryType::DEVICE,
            shape: RSlice::EMPTY,
            strides: RSlice::EMPTY,
            data: std::ptr::null(),
            flags: 0,
            _borrow: PhantomData,
        }
    }

    /// True for the view of an absent optional input.
    pub fn is_absent(&self) -> bool {
        self.data.is_null() && self.shape.is_empty()
    }

    /// The elements of an integer tensor (`I64`, `I32`, `U8`...) widened to `i64`: for inputs
    /// that carry shapes, axes, indices or counts.
    pub fn to_i64s(&self) -> Result<Vec<i64>, PluginError> {
        Ok(match self.dtype {
            DType::I64 => self.as_slice::<i64>()?.to_vec(),
            DType::I32 => self.as_slice::<i32>()?.iter().map(|&v| v as i64).collect(),
            DType::I16 => self.as_slice::<i16>()?.iter().map(|&v| v as i64).collect(),
            DType::I8 => self.as_slice::<i8>()?.iter().map(|&v| v as i64).collect(),
            DType::U8 => self.as_slice::<u8>()?.iter().map(|&v| v as i64).collect(),
            DType::U16 => self.as_slice::<u16>()?.iter().map(|&v| v as i64).collect(),
            DType::U32 => self.as_slice::<u32>()?.iter().map(|&v| v as i64).collect(),
            DType::U64 => self.as_slice::<u64>()?.iter().map(|&v| v as i64).collect(),
            other => {
                return Err(PluginError::invalid(format!(
                    "expected an integer tensor, got {other}"
                )))
            }
        })
    }

    /// A contiguous host view of a typed slice.
    ///
    /// `strides` must be `contiguous_strides(shape)`; passing it in keeps the view free of
    /// allocation.
    pub fn from_slice<T: Element>(
        data: &'a [T],
        shape: &'a [usize],
        strides: &'a [isize],
    ) -> Result<Self, PluginError> {
        check_len(shape, data.len())?;
        Ok(TensorView {
            dtype: T::DTYPE,
            device: Device::CPU,
            memory: MemoryType::DEVICE,
            shape: shape.into(),
            strides: strides.into(),
            data: data.as_ptr().cast(),
            flags: 0,
            _borrow: PhantomData,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &'a [usize] {
        self.shape.as_slice()
    }

    /// The strides, in elements.
    pub fn strides(&self) -> &'a [isize] {
        self.strides.as_slice()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        // An existing tensor is either empty or small enough to be allocated: no overflow.
        crate::alloc::numel(&self.shape).unwrap_or(0)
    }

    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the elements are dense, in row-major order.
    pub fn is_contiguous(&self) -> bool {
        is_contiguous(self.shape(), self.strides())
    }

    /// The elements as a slice: the view must be contiguous, of dtype `T`, in host memory.
    pub fn as_slice<T: Element>(&self) -> Result<&'a [T], PluginError> {
        self.check_access(T::DTYPE)?;
        if self.is_empty() {
            return Ok(&[]);
        }
        // SAFETY: checked dtype, contiguity and host accessibility; the host guarantees
        // `len()` valid elements for `'a`.
        Ok(unsafe { std::slice::from_raw_parts(self.data.cast::<T>(), self.len()) })
    }

    /// The elements of a `String` tensor.
    pub fn as_strings(&self) -> Result<&'a [RString], PluginError> {
        self.check_access(DType::String)?;
        if self.is_empty() {
            return Ok(&[]);
        }
        // SAFETY: as in `as_slice`; string tensors hold initialised `RString`s.
        Ok(unsafe { std::slice::from_raw_parts(self.data.cast::<RString>(), self.len()) })
    }

    /// The raw bytes of a contiguous host tensor.
    pub fn as_bytes(&self) -> Result<&'a [u8], PluginError> {
        self.check_access(self.dtype)?;
        // SAFETY: as in `as_slice`.
        Ok(unsafe { std::slice::from_raw_parts(self.data, self.len() * self.dtype.size()) })
    }

    fn check_access(&self, want: DType) -> Result<(), PluginError> {
        // An absent optional input has no data at all (its shape `[]` would otherwise read as
        // one scalar element behind a null pointer).
        if self.is_absent() {
            return Err(PluginError::invalid(
                "an optional input the node leaves out was read",
            ));
        }
        if self.dtype != want {
            return Err(PluginError::invalid(format!(
                "tensor is {}, read as {}",
                self.dtype, want
            )));
        }
        if !self.memory.host_accessible(self.device) {
            return Err(PluginError::invalid(format!(
                "tensor lives on {}, not in host memory",
                self.device
            )));
        }
        if !self.is_contiguous() {
            return Err(PluginError::unimplemented(
                "non-contiguous tensor read as a slice",
            ));
        }
        Ok(())
    }
}

/// A writable view of a tensor the host allocated (an output, or scratch memory).
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct TensorViewMut<'a> {
    /// Element type.
    pub dtype: DType,
    /// Where `data` lives.
    pub device: Device,
    /// Which memory of `device` holds `data`.
    pub memory: MemoryType,
    /// Extent of each dimension.
    pub shape: RSlice<'a, usize>,
    /// Distance between neighbours along each dimension, in elements.
    pub strides: RSlice<'a, isize>,
    /// The first element.
    pub data: *mut u8,
    /// Reserved for properties added in later minors (0 today; readers ignore unknown bits).
    pub flags: u64,
    _borrow: PhantomData<&'a mut u8>,
}

// SAFETY: an exclusive borrow of data the host does not touch while the view lives.
unsafe impl Send for TensorViewMut<'_> {}
unsafe impl Sync for TensorViewMut<'_> {}

impl<'a> TensorViewMut<'a> {
    /// A writable view over raw memory.
    ///
    /// # Safety
    /// `data` must hold the elements `shape`/`strides` address, valid and unaliased for `'a`.
    pub unsafe fn from_raw(
        dtype: DType,
        device: Device,
        shape: &'a [usize],
        strides: &'a [isize],
        data: *mut u8,
    ) -> Self {
        TensorViewMut {
            dtype,
            device,
            memory: MemoryType::DEVICE,
            shape: shape.into(),
            strides: strides.into(),
            data,
            flags: 0,
            _borrow: PhantomData,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &'a [usize] {
        self.shape.as_slice()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        // An existing tensor is either empty or small enough to be allocated: no overflow.
        crate::alloc::numel(&self.shape).unwrap_or(0)
    }

    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A read-only view of the same memory.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView {
            dtype: self.dtype,
            device: self.device,
            memory: self.memory,
            shape: self.shape,
            strides: self.strides,
            data: self.data,
            flags: self.flags,
            _borrow: PhantomData,
        }
    }

    /// The elements as a mutable slice (contiguous, of dtype `T`, in host memory).
    pub fn into_slice<T: Element>(self) -> Result<&'a mut [T], PluginError> {
        self.as_view().check_access(T::DTYPE)?;
        if self.is_empty() {
            return Ok(&mut []);
        }
        // SAFETY: checked as in `TensorView::as_slice`; exclusive by construction.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.data.cast::<T>(), self.len()) })
    }

    /// The elements of a `String` tensor, each initialised empty by the host.
    pub fn into_strings(self) -> Result<&'a mut [RString], PluginError> {
        self.as_view().check_access(DType::String)?;
        if self.is_empty() {
            return Ok(&mut []);
        }
        // SAFETY: as above; the host initialises string outputs.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.data.cast::<RString>(), self.len()) })
    }

    /// The raw bytes of a contiguous host tensor.
    pub fn into_bytes(self) -> Result<&'a mut [u8], PluginError> {
        let dtype = self.dtype;
        self.as_view().check_access(dtype)?;
        // SAFETY: as above.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.data, self.len() * dtype.size()) })
    }
}

/// A tensor that owns its data: attributes, constants, weights handed to quantizers.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct OwnedTensor {
    /// Element type.
    pub dtype: DType,
    /// Extent of each dimension.
    pub shape: RVec<usize>,
    /// Row-major little-endian bytes (empty for `String`).
    pub data: RVec<u8>,
    /// The elements of a `String` tensor (empty otherwise).
    pub strings: RVec<RString>,
}

impl OwnedTensor {
    /// A tensor of `T` with `shape`.
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: Vec<T>) -> Result<Self, PluginError> {
        check_len(&shape, values.len())?;
        let mut data = Vec::with_capacity(values.len() * T::DTYPE.size());
        for v in &values {
            // SAFETY: `Element` types are plain data of `DTYPE.size()` bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts((v as *const T).cast::<u8>(), T::DTYPE.size())
            };
            data.extend_from_slice(bytes);
        }
        Ok(OwnedTensor {
            dtype: T::DTYPE,
            shape: shape.into(),
            data: data.into(),
            strings: RVec::new(),
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        // An existing tensor is either empty or small enough to be allocated: no overflow.
        crate::alloc::numel(&self.shape).unwrap_or(0)
    }

    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, copied out as `T`.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, PluginError> {
        if self.dtype != T::DTYPE {
            return Err(PluginError::invalid(format!(
                "tensor is {}, read as {}",
                self.dtype,
                T::DTYPE
            )));
        }
        let size = T::DTYPE.size();
        if self.data.len() != self.len() * size {
            return Err(PluginError::invalid(format!(
                "tensor holds {} bytes, its shape {:?} needs {}",
                self.data.len(),
                self.shape.as_slice(),
                self.len() * size
            )));
        }
        Ok(self
            .data
            .chunks_exact(size)
            // SAFETY: each chunk is exactly one element; read_unaligned copes with alignment.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<T>()) })
            .collect())
    }
}

/// Row-major strides, in elements, for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    fill_contiguous_strides(shape, &mut strides);
    strides
}

/// Writes the row-major strides of `shape` into `strides` (of the same length).
pub(crate) fn fill_contiguous_strides(shape: &[usize], strides: &mut [isize]) {
    let mut acc = 1isize;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        // Saturating: an empty tensor may have dimensions whose product overflows (e.g.
        // [0, 2^32, 2^32]); its strides are never used to address memory, and a non-empty
        // tensor that large could not have been allocated.
        acc = acc.saturating_mul(isize::try_from(d.max(1)).unwrap_or(isize::MAX));
    }
}

/// True when `strides` describe a dense row-major layout of `shape`.
pub fn is_contiguous(shape: &[usize], strides: &[isize]) -> bool {
    if shape.len() != strides.len() {
        return false;
    }
    let mut acc = 1isize;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d > 1 && s != acc {
            return false;
        }
        acc = acc.saturating_mul(isize::try_from(d.max(1)).unwrap_or(isize::MAX));
    }
    true
}

fn check_len(shape: &[usize], len: usize) -> Result<(), PluginError> {
    let want = crate::alloc::numel(shape).unwrap_or(usize::MAX);
    if want != len {
        return Err(PluginError::invalid(format!(
            "shape {shape:?} needs {want} elements, got {len}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_input_is_refused_not_read() {
        let absent = TensorView::absent();
        assert!(absent.is_absent());
        let e = absent.as_slice::<f32>().expect_err("no data");
        assert_eq!(e.code, crate::ErrorCode::InvalidArgument);
        assert!(absent.as_bytes().is_err());
        assert!(absent.to_i64s().is_err());
    }

    #[test]
    fn strides_and_contiguity() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert!(is_contiguous(&[2, 3, 4], &[12, 4, 1]));
        assert!(!is_contiguous(&[2, 3, 4], &[1, 2, 6]));
        // Size-1 dimensions may carry any stride.
        assert!(is_contiguous(&[1, 3], &[99, 1]));
    }

    #[test]
    fn view_checks_dtype_and_length() {
        let data = [1.0f32, 2.0, 3.0];
        let shape = [3];
        let strides = contiguous_strides(&shape);
        let v = TensorView::from_slice(&data, &shape, &strides).expect("view");
        assert_eq!(v.as_slice::<f32>().expect("f32"), &data);
        assert!(v.as_slice::<i32>().is_err());
        assert!(TensorView::from_slice(&data, &[4], &strides).is_err());
    }

    #[test]
    fn owned_tensor_round_trip() {
        let t = OwnedTensor::from_vec(vec![2, 2], vec![1i64, -2, 3, -4]).expect("tensor");
        assert_eq!(t.to_vec::<i64>().expect("i64"), vec![1, -2, 3, -4]);
        assert!(t.to_vec::<f64>().is_err());
    }

    #[test]
    fn device_names_round_trip() {
        for k in [
            DeviceKind::CPU,
            DeviceKind::CUDA,
            DeviceKind::MOCK,
            DeviceKind(1234),
        ] {
            assert_eq!(DeviceKind::from_name(&k.name()), Some(k));
        }
        assert_eq!(DeviceKind::from_name("tpu"), None);
    }
}
