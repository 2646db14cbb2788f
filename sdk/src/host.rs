//! Host side of a kernel call, shared by the daemon and the [test kit](crate::testkit).
//!
//! A [`CallFrame`] is what one kernel call borrows from the host: output slots, scratch
//! memory, the BLAS backend and the device. Parallel work runs on the rayon pool the caller
//! is in (the daemon installs its own pool around kernel calls).

use crate::{
    blas::{FfiBlasBox, FfiBlas_TO},
    context::{FfiHost, FfiTask_TO, LogLevel},
    tensor::{TensorView, TensorViewMut},
    DType, Device, Element, ErrorCode, KernelContext, MemRef, MemoryType, PluginError,
};
use abi_stable::{
    std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString},
    RRef,
};
use std::{alloc, any::Any, ptr::NonNull, sync::Arc, sync::Mutex};

/// Alignment of every host buffer this module allocates, and of planned ranges.
pub const ALIGN: usize = 64;

/// A 64-byte aligned host buffer: owned heap memory, or a range of a larger buffer (an arena)
/// that `keep` holds alive.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Set for a range of memory another object owns: holding it keeps the memory valid, and
    /// dropping this buffer frees nothing.
    keep: Option<Arc<dyn Any + Send + Sync>>,
}

/// A range of host memory that the host planned for one kernel output (see
/// [`CallFrame::with_planned_outputs`]), or that a tensor views in place (see
/// [`HostTensor::over_planned`]: one image of a batch): `len` bytes at `ptr`, 64-byte aligned,
/// valid while `keep` is held.
#[derive(Clone)]
pub struct PlannedBuf {
    /// Start of the range.
    pub ptr: NonNull<u8>,
    /// Its length in bytes.
    pub len: usize,
    /// The range's owner, held by the tensor placed there.
    pub keep: Arc<dyn Any + Send + Sync>,
    /// The range holds the elements of an input of the same call that the kernel declared
    /// the output may reuse ([`KernelDesc::aliases`](crate::KernelDesc::aliases)), and the
    /// input is still there: the output is handed out over them as they are, neither zeroed
    /// nor poisoned (the kernel finds out by comparing data pointers). Never set otherwise.
    pub holds_input: bool,
}

// SAFETY: the range is plain memory whose owner `keep` is Send + Sync; who writes it is
// governed by the plan (one output per range at a time).
unsafe impl Send for PlannedBuf {}
unsafe impl Sync for PlannedBuf {}

// SAFETY: plain owned memory.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Result<Self, PluginError> {
        if len == 0 {
            return Ok(AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                keep: None,
            });
        }
        let layout = alloc::Layout::from_size_align(len, ALIGN).map_err(|_| {
            PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("cannot allocate {len} bytes"),
            )
        })?;
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr)
            .map(|ptr| AlignedBuf {
                ptr,
                len,
                keep: None,
            })
            .ok_or_else(|| {
                PluginError::new(
                    ErrorCode::ResourceExhausted,
                    format!("out of memory allocating {len} bytes"),
                )
            })
    }

    /// `parts` end to end in one buffer, each copied once (nothing zeroed first): a batch
    /// assembled from its images' results.
    pub fn concat(parts: &[&[u8]]) -> Result<Self, PluginError> {
        let len = parts
            .iter()
            .try_fold(0usize, |a, p| a.checked_add(p.len()))
            .ok_or_else(|| {
                PluginError::new(ErrorCode::ResourceExhausted, "concatenation size overflows")
            })?;
        let buf = Self::uninit(len)?;
        let mut at = 0;
        for p in parts {
            // SAFETY: `buf` holds `len` writable bytes, the parts' lengths sum to `len`, and
            // they do not overlap the fresh buffer.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), buf.ptr.as_ptr().add(at), p.len()) };
            at += p.len();
        }
        Ok(buf)
    }

    /// `len` bytes, not initialised: every caller writes all of them before the buffer is
    /// read.
    fn uninit(len: usize) -> Result<Self, PluginError> {
        if len == 0 {
            return Self::zeroed(0);
        }
        let layout = alloc::Layout::from_size_align(len, ALIGN).map_err(|_| {
            PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("cannot allocate {len} bytes"),
            )
        })?;
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc(layout) }).ok_or_else(|| {
            PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("out of memory allocating {len} bytes"),
            )
        })?;
        Ok(AlignedBuf {
            ptr,
            len,
            keep: None,
        })
    }

    /// A copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> Result<Self, PluginError> {
        Self::copy_in_chunks(bytes, bytes.len(), |_| {})
    }

    /// A copy of `bytes`, made in consecutive chunks of at most `chunk_len` bytes, calling
    /// `copied(range)` after each: a caller may release each range of the source as soon as
    /// it is copied (a model's weights, read from its file's buffer, then never exist twice
    /// at once). The copy's pages become resident as they are written.
    pub fn copy_in_chunks(
        bytes: &[u8],
        chunk_len: usize,
        mut copied: impl FnMut(std::ops::Range<usize>),
    ) -> Result<Self, PluginError> {
        let len = bytes.len();
        // Every byte is written below before the buffer is used.
        let buf = Self::uninit(len)?;
        let ptr = buf.ptr;
        let step = chunk_len.max(1);
        let mut at = 0;
        while at < len {
            let n = step.min(len - at);
            // SAFETY: `ptr` holds `len` writable bytes and does not overlap `bytes`;
            // `at + n <= len`.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr().add(at), ptr.as_ptr().add(at), n)
            };
            copied(at..at + n);
            at += n;
        }
        Ok(buf)
    }

    /// `planned`'s range, borrowed from its owner (held by `keep`), holding the bytes already there.
    fn planned(planned: &PlannedBuf) -> Self {
        AlignedBuf {
            ptr: planned.ptr,
            len: planned.len,
            keep: Some(planned.keep.clone()),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 && self.keep.is_none() {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    alloc::Layout::from_size_align_unchecked(self.len, ALIGN),
                )
            }
        }
    }
}

/// A tensor's dimensions or strides, inline up to rank 6. Every node output is a
/// `HostTensor`: a shape and a strides vector on the heap were two allocations and two frees
/// per output, a measurable part of a small node's host time (a chain of 240 16-float `Add`s).
type Dims<T> = smallvec::SmallVec<[T; 6]>;

/// Row-major strides of `shape`, inline (as [`contiguous_strides`]).
fn strides_of(shape: &[usize]) -> Dims<isize> {
    let mut strides = smallvec::smallvec![0isize; shape.len()];
    crate::tensor::fill_contiguous_strides(shape, &mut strides);
    strides
}

/// A dense, row-major tensor in host memory, owned by the host.
pub struct HostTensor {
    dtype: DType,
    shape: Dims<usize>,
    strides: Dims<isize>,
    buf: AlignedBuf,
    /// Set when the data lives in a device's memory instead of `buf` (then empty).
    device: Option<Box<dyn DeviceBuffer>>,
}

/// Bytes `shape` elements of `dtype` take, refused when that overflows.
fn byte_size(dtype: DType, shape: &[usize]) -> Result<usize, PluginError> {
    crate::alloc::numel(shape)
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| {
            PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("tensor of shape {shape:?} is too large"),
            )
        })
}

/// Device memory the host lends a tensor: the daemon's pooled buffers (returned to their pool
/// when dropped), or the test kit's. The host never dereferences it; only the device's
/// provider (copies) and kernels of that device do.
pub trait DeviceBuffer: Send + Sync {
    /// Where it is.
    fn mem(&self) -> MemRef;
    /// Its size in bytes (at least what the tensor needs).
    fn len(&self) -> usize;
    /// True for a zero-sized buffer.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Allocates device memory for the outputs and scratch of calls on one device, and says
/// which stream and resources those calls use. Implemented by the daemon's device pools.
pub trait DeviceAlloc: Sync {
    /// `bytes` of the device's memory.
    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceBuffer>, PluginError>;
    /// The stream calls on this device enqueue on.
    fn stream(&self) -> crate::Stream;
    /// A named resource of the device and stream (see `DeviceProvider::resource`).
    fn resource(&self, key: &str) -> u64;
}

impl HostTensor {
    /// A zero-filled tensor (empty strings for `String`).
    pub fn zeroed(dtype: DType, shape: &[usize]) -> Result<Self, PluginError> {
        if !dtype.is_known() {
            return Err(PluginError::unimplemented(format!(
                "{dtype} is not an element type this host knows"
            )));
        }
        let len = byte_size(dtype, shape)?;
        let mut t = HostTensor {
            dtype,
            shape: Dims::from_slice(shape),
            strides: strides_of(shape),
            buf: AlignedBuf::zeroed(len)?,
            device: None,
        };
        if dtype == DType::String {
            for s in t.strings_mut() {
                // SAFETY: the slot holds zero bytes, not a string: write without dropping.
                unsafe { std::ptr::write(s, RString::new()) };
            }
        }
        Ok(t)
    }

    /// A fresh output in `planned`'s range, which must be exactly its size (not for `String`):
    /// zeroed (as every fresh output is) when `zero`, else holding what its last user left
    /// there (initialised bytes; poisoned with 0xFF in debug builds, so that a kernel which
    /// promised to overwrite an output and left part of it shows). A range that
    /// [holds an input](PlannedBuf::holds_input) is neither: it is that input's memory.
    fn in_planned(
        dtype: DType,
        shape: &[usize],
        planned: &PlannedBuf,
        zero: bool,
    ) -> Result<Self, PluginError> {
        let mut tensor = Self::over_planned(dtype, shape, planned)?;
        let fill = if planned.holds_input {
            None
        } else if zero {
            Some(0)
        } else {
            cfg!(debug_assertions).then_some(0xFF)
        };
        if let Some(byte) = fill {
            tensor.buf.as_mut_slice().fill(byte);
        }
        Ok(tensor)
    }

    /// A tensor over `planned`'s range as it is (not zeroed), which must be exactly its size
    /// (not for `String`): a value the host assembled there, such as a concatenation whose
    /// inputs were made end to end inside it.
    pub fn over_planned(
        dtype: DType,
        shape: &[usize],
        planned: &PlannedBuf,
    ) -> Result<Self, PluginError> {
        if dtype == DType::String || byte_size(dtype, shape)? != planned.len {
            return Err(PluginError::internal("planned value of another size"));
        }
        Ok(HostTensor {
            dtype,
            shape: Dims::from_slice(shape),
            strides: strides_of(shape),
            buf: AlignedBuf::planned(planned),
            device: None,
        })
    }

    /// A tensor holding a copy of `bytes` (not for `String`).
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Self, PluginError> {
        Self::from_bytes_in_chunks(dtype, shape, bytes, bytes.len(), |_| {})
    }

    /// [`from_bytes`](Self::from_bytes), copying in chunks of at most `chunk_len` bytes and
    /// calling `copied(range)` after each (see [`AlignedBuf::copy_in_chunks`]).
    pub fn from_bytes_in_chunks(
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
        chunk_len: usize,
        copied: impl FnMut(std::ops::Range<usize>),
    ) -> Result<Self, PluginError> {
        if dtype == DType::String {
            return Err(PluginError::invalid(
                "string tensors are built with from_strings",
            ));
        }
        let len = byte_size(dtype, shape)?;
        if len != bytes.len() {
            return Err(PluginError::invalid(format!(
                "{dtype} tensor of shape {shape:?} needs {len} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(HostTensor {
            dtype,
            shape: Dims::from_slice(shape),
            strides: strides_of(shape),
            // Copied, not zeroed first: model weights are hundreds of megabytes.
            buf: AlignedBuf::copy_in_chunks(bytes, chunk_len, copied)?,
            device: None,
        })
    }

    /// A tensor whose bytes are `parts` end to end (not for `String`), copied once each and
    /// not zeroed first: a batch's output assembled from its images' results.
    pub fn from_byte_parts(
        dtype: DType,
        shape: &[usize],
        parts: &[&[u8]],
    ) -> Result<Self, PluginError> {
        if dtype == DType::String {
            return Err(PluginError::invalid(
                "string tensors are built with from_strings",
            ));
        }
        let len = byte_size(dtype, shape)?;
        let total = parts
            .iter()
            .map(|p| p.len())
            .fold(0usize, usize::saturating_add);
        if total != len {
            return Err(PluginError::invalid(format!(
                "{dtype} tensor of shape {shape:?} needs {len} bytes, its parts hold {total}"
            )));
        }
        Ok(HostTensor {
            dtype,
            shape: Dims::from_slice(shape),
            strides: strides_of(shape),
            buf: AlignedBuf::concat(parts)?,
            device: None,
        })
    }

    /// A tensor of `T` from its elements in row-major order.
    pub fn from_vec<T: Element>(shape: &[usize], values: &[T]) -> Result<Self, PluginError> {
        // SAFETY: `Element` types are plain data; the byte view covers exactly `values`.
        let bytes = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        Self::from_bytes(T::DTYPE, shape, bytes)
    }

    /// The elements as `T` (the dtype must match).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, PluginError> {
        Ok(self.view().as_slice::<T>()?.to_vec())
    }

    /// A `String` tensor.
    pub fn from_strings(shape: &[usize], values: &[&[u8]]) -> Result<Self, PluginError> {
        let mut t = Self::zeroed(DType::String, shape)?;
        if t.len() != values.len() {
            return Err(PluginError::invalid(format!(
                "string tensor of shape {shape:?} needs {} elements, got {}",
                t.len(),
                values.len()
            )));
        }
        for (slot, v) in t.strings_mut().iter_mut().zip(values) {
            *slot = RString::from(String::from_utf8_lossy(v).into_owned());
        }
        Ok(t)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
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

    /// Raw bytes (for `String`, the string headers: use [`strings`](Self::strings)).
    pub fn bytes(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// The host bytes, writable (empty for a device tensor). Not for string tensors.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        if self.dtype == DType::String {
            return &mut [];
        }
        self.buf.as_mut_slice()
    }

    /// A tensor whose `dtype` x `shape` elements live in `buf` on `device` (uninitialised
    /// until a copy or a kernel writes them). String tensors stay on the host.
    pub fn on_device(
        dtype: DType,
        shape: &[usize],
        buf: Box<dyn DeviceBuffer>,
    ) -> Result<Self, PluginError> {
        if !dtype.is_known() || dtype == DType::String {
            return Err(PluginError::unimplemented(format!(
                "{dtype} tensors cannot live in device memory"
            )));
        }
        let need = byte_size(dtype, shape)?;
        if buf.len() < need {
            return Err(PluginError::internal(format!(
                "device buffer of {} bytes for a tensor of {need}",
                buf.len()
            )));
        }
        Ok(HostTensor {
            dtype,
            shape: Dims::from_slice(shape),
            strides: strides_of(shape),
            buf: AlignedBuf::zeroed(0)?,
            device: Some(buf),
        })
    }

    /// Where the data is: `None` for host memory, else the device buffer's place.
    pub fn device_mem(&self) -> Option<MemRef> {
        self.device.as_ref().map(|b| b.mem())
    }

    /// True when the data is in host memory ([`bytes`](Self::bytes) reads it; for a device
    /// tensor it is empty).
    pub fn on_host(&self) -> bool {
        self.device.is_none()
    }

    /// Bytes of element data (whichever memory holds them).
    pub fn byte_len(&self) -> usize {
        self.len().saturating_mul(self.dtype.size())
    }

    /// The elements of a `String` tensor (empty for other dtypes).
    pub fn strings(&self) -> &[RString] {
        if self.dtype != DType::String || self.is_empty() {
            return &[];
        }
        // SAFETY: string tensors hold `len()` initialised `RString`s, aligned to 64.
        unsafe { std::slice::from_raw_parts(self.buf.as_slice().as_ptr().cast(), self.len()) }
    }

    fn strings_mut(&mut self) -> &mut [RString] {
        if self.dtype != DType::String || self.is_empty() {
            return &mut [];
        }
        let len = self.len();
        // SAFETY: as in `strings`, exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_slice().as_mut_ptr().cast(), len) }
    }

    /// A read-only view for a kernel.
    pub fn view(&self) -> TensorView<'_> {
        let (device, memory, data) = match self.device_mem() {
            Some(m) => (m.device, m.memory, m.ptr.cast_const()),
            None => (
                Device::CPU,
                MemoryType::DEVICE,
                self.buf.as_slice().as_ptr(),
            ),
        };
        // SAFETY: the buffer holds `len()` elements of `dtype` and lives as long as `self`.
        let mut v =
            unsafe { TensorView::from_raw(self.dtype, device, &self.shape, &self.strides, data) };
        v.memory = memory;
        v
    }

    /// Replaces every string element by a copy allocated by the host. Strings a plugin wrote
    /// carry that plugin's deallocator; this must run before the plugin can be unloaded.
    pub fn adopt_strings(&mut self) {
        for s in self.strings_mut() {
            let own = RString::from(s.as_str());
            *s = own;
        }
    }
}

impl Drop for HostTensor {
    fn drop(&mut self) {
        for s in self.strings_mut() {
            // SAFETY: each element is an initialised RString, dropped exactly once here.
            unsafe { std::ptr::drop_in_place(s) };
        }
    }
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor({} {:?})", self.dtype, self.shape)
    }
}

/// Where a frame sends the log lines of plugin code.
pub type LogSink<'a> = dyn Fn(LogLevel, &str) + Sync + 'a;

/// Asked between chunks of parallel work: `true` stops the call (its deadline passed, or its
/// client went away).
pub type StopCheck<'a> = dyn Fn() -> bool + Sync + 'a;

/// What one kernel call borrows from the host.
pub struct CallFrame<'a> {
    device: Device,
    blas: Option<&'a FfiBlasBox>,
    log: &'a LogSink<'a>,
    /// Behind an `Arc` from the start: the run keeps each output as one, and a `Box` moved
    /// into a new `Arc` was another allocation, copy and free per output.
    outputs: Mutex<Vec<Option<Arc<HostTensor>>>>,
    scratch: Mutex<Vec<AlignedBuf>>,
    /// Buffers lent from [`reused`]'s pool, given back when the frame drops.
    reused: Mutex<Vec<AlignedBuf>>,
    max_tensor_bytes: usize,
    stop: Option<&'a StopCheck<'a>>,
    stopped: std::sync::atomic::AtomicBool,
    alloc: Option<&'a dyn DeviceAlloc>,
    output_memory: &'a [MemoryType],
    device_scratch: Mutex<Vec<Box<dyn DeviceBuffer>>>,
    planned: Vec<Option<PlannedBuf>>,
}

impl<'a> CallFrame<'a> {
    /// A frame for a kernel with `num_outputs` outputs on `device`.
    pub fn new(
        num_outputs: usize,
        device: Device,
        blas: Option<&'a FfiBlasBox>,
        log: &'a LogSink<'a>,
    ) -> Self {
        CallFrame {
            device,
            blas,
            log,
            outputs: Mutex::new((0..num_outputs).map(|_| None).collect()),
            scratch: Mutex::new(Vec::new()),
            reused: Mutex::new(Vec::new()),
            max_tensor_bytes: usize::MAX,
            stop: None,
            stopped: std::sync::atomic::AtomicBool::new(false),
            alloc: None,
            output_memory: &[],
            device_scratch: Mutex::new(Vec::new()),
            planned: Vec::new(),
        }
    }

    /// Host memory the host planned for the outputs, by position: an output whose size is
    /// exactly its range's is placed there (zeroed) instead of in a fresh allocation; any
    /// other goes to the heap as usual.
    pub fn with_planned_outputs(mut self, planned: Vec<Option<PlannedBuf>>) -> Self {
        self.planned = planned;
        self
    }

    /// Gives the frame the allocator of its (non-host) device: outputs and device scratch
    /// come from it, and the kernel sees its stream and resources. `output_memory` lists the
    /// memory type of each output as the kernel declared it (missing: the device's own).
    pub fn with_device(
        mut self,
        alloc: &'a dyn DeviceAlloc,
        output_memory: &'a [MemoryType],
    ) -> Self {
        self.alloc = Some(alloc);
        self.output_memory = output_memory;
        self
    }

    /// Whether output `index` goes to device memory (else host memory).
    fn output_on_device(&self, index: usize) -> bool {
        let memory = self
            .output_memory
            .get(index)
            .copied()
            .unwrap_or(MemoryType::DEVICE);
        !memory.host_accessible(self.device)
    }

    /// Checks `stop` before every chunk of [`KernelContext::parallel_for`] work: once it says
    /// stop, the remaining chunks are skipped and [`CallFrame::stopped`] turns true. This is
    /// how a long kernel call is cut short without the kernel's help; the host must then
    /// discard the call's outputs.
    pub fn with_stop_check(mut self, stop: &'a StopCheck<'a>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// True when the stop check cut the call short: its outputs are incomplete.
    pub fn stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    fn should_stop(&self) -> bool {
        if self.stopped() {
            return true;
        }
        let stop = self.stop.is_some_and(|f| f());
        if stop {
            self.stopped
                .store(true, std::sync::atomic::Ordering::Release);
        }
        stop
    }

    /// Refuses (with [`ErrorCode::ResourceExhausted`]) any output or scratch buffer larger
    /// than `bytes`: the host's per-value limit, applied where kernels allocate.
    pub fn with_max_tensor_bytes(mut self, bytes: usize) -> Self {
        self.max_tensor_bytes = bytes;
        self
    }

    /// `what` names the allocation in the error, built only on the error path: this runs for
    /// every output of every node, where formatting a label each time cost a measurable part
    /// of a small node's overhead.
    fn within_limit<W: std::fmt::Display>(
        &self,
        what: impl FnOnce() -> W,
        bytes: Option<usize>,
    ) -> Result<(), PluginError> {
        match bytes {
            Some(b) if b <= self.max_tensor_bytes => Ok(()),
            Some(b) => Err(PluginError::new(
                ErrorCode::ResourceExhausted,
                format!(
                    "{} would take {b} bytes, more than the limit of {} bytes per tensor",
                    what(),
                    self.max_tensor_bytes
                ),
            )),
            None => Err(PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("{} is larger than the address space", what()),
            )),
        }
    }

    /// Runs `f` with a kernel context backed by this frame.
    pub fn with_context<R>(&self, f: impl FnOnce(&KernelContext<'_>) -> R) -> R {
        let ctx = KernelContext::new(self);
        f(&ctx)
    }

    /// The outputs the kernel allocated, by position, with strings adopted by the host.
    /// Errors name the first output the kernel left unallocated.
    pub fn into_outputs(self) -> Result<Vec<HostTensor>, PluginError> {
        self.into_shared_outputs()?
            .into_iter()
            .map(|t| Arc::try_unwrap(t).map_err(|_| PluginError::internal("an output is shared")))
            .collect()
    }

    /// [`into_outputs`](Self::into_outputs), each output in the `Arc` it was made in.
    pub fn into_shared_outputs(mut self) -> Result<Vec<Arc<HostTensor>>, PluginError> {
        let outputs = std::mem::take(
            self.outputs
                .get_mut()
                .map_err(|_| PluginError::internal("output slots poisoned"))?,
        );
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let mut t = t.ok_or_else(|| {
                    PluginError::internal(format!("kernel did not produce output {i}"))
                })?;
                Arc::get_mut(&mut t)
                    .ok_or_else(|| PluginError::internal("an output is shared"))?
                    .adopt_strings();
                Ok(t)
            })
            .collect()
    }
}

impl CallFrame<'_> {
    /// A buffer of `bytes` from `make`, kept in `list` (and so alive) until the frame drops.
    fn lend_for_call(
        &self,
        list: &Mutex<Vec<AlignedBuf>>,
        bytes: usize,
        make: fn(usize) -> Result<AlignedBuf, PluginError>,
    ) -> Result<RSliceMut<'_, u8>, PluginError> {
        self.within_limit(|| "scratch buffer", Some(bytes))?;
        let mut buf = make(bytes)?;
        let ptr = buf.as_mut_slice().as_mut_ptr();
        list.lock()
            .map_err(|_| PluginError::internal("scratch list poisoned"))?
            .push(buf);
        // SAFETY: the buffer is kept in the frame (heap memory does not move with the Vec)
        // until the frame drops, and handed out once.
        Ok(RSliceMut::from(unsafe {
            std::slice::from_raw_parts_mut(ptr, bytes)
        }))
    }
}

impl Drop for CallFrame<'_> {
    fn drop(&mut self) {
        if let Ok(bufs) = self.reused.get_mut() {
            reused::give_back(std::mem::take(bufs));
        }
    }
}

/// The host's pool of scratch buffers lent with their old contents
/// ([`FfiHost::scratch_reused`]): process-wide, so that the buffers outlive any plugin
/// library (a plugin keeping its own would pin or leak its mapping) and serve every thread.
mod reused {
    use super::AlignedBuf;
    use crate::PluginError;
    use std::sync::Mutex;

    /// What the pool keeps between calls: the im2col columns of a ResNet-50 or MobileNetV2
    /// layer (up to ~7 MiB) for a few concurrent calls; a larger or further buffer is freed.
    const KEEP_BYTES: usize = 64 << 20;
    const KEEP_BUFFERS: usize = 64;

    static POOL: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());

    /// The smallest pooled buffer of at least `bytes`, or a fresh zeroed one.
    pub(super) fn lend(bytes: usize) -> Result<AlignedBuf, PluginError> {
        if let Ok(mut pool) = POOL.lock() {
            let fit = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= bytes)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = fit {
                return Ok(poisoned(pool.swap_remove(i)));
            }
        }
        // Zeroed, so that a lent buffer never holds uninitialised bytes.
        AlignedBuf::zeroed(bytes).map(poisoned)
    }

    /// In debug builds (the tests), every lent buffer is filled with 0xFF bytes (NaN as a
    /// float, -1 as an integer), so that a kernel reading what it did not write fails its
    /// tests instead of passing on zeros.
    fn poisoned(mut buf: AlignedBuf) -> AlignedBuf {
        if cfg!(debug_assertions) {
            buf.as_mut_slice().fill(0xFF);
        }
        buf
    }

    /// Returns `bufs` to the pool, keeping the largest within the bounds.
    pub(super) fn give_back(bufs: Vec<AlignedBuf>) {
        if bufs.is_empty() {
            return;
        }
        let Ok(mut pool) = POOL.lock() else {
            return;
        };
        pool.extend(bufs.into_iter().filter(|b| !b.is_empty()));
        pool.sort_unstable_by_key(|b| std::cmp::Reverse(b.len()));
        // The largest first, while within both bounds (a buffer alone past them is freed).
        let (mut total, mut count) = (0usize, 0usize);
        pool.retain(|b| {
            let keep = count < KEEP_BUFFERS && total.saturating_add(b.len()) <= KEEP_BYTES;
            if keep {
                total += b.len();
                count += 1;
            }
            keep
        });
    }
}

impl CallFrame<'_> {
    /// [`FfiHost::output`] (`zero`) and [`FfiHost::output_to_overwrite`] (not zeroed when the
    /// plan gives the output a range of its arena; a fresh allocation is zeroed either way).
    fn allocate_output(
        &self,
        index: usize,
        dtype: DType,
        shape: RSlice<'_, usize>,
        zero: bool,
    ) -> RResult<TensorViewMut<'_>, PluginError> {
        let result = (|| {
            let mut slots = self
                .outputs
                .lock()
                .map_err(|_| PluginError::internal("output slots poisoned"))?;
            let n = slots.len();
            let slot = slots.get_mut(index).ok_or_else(|| {
                PluginError::invalid(format!("output {index} out of range: node has {n} outputs"))
            })?;
            if slot.is_some() {
                return Err(PluginError::invalid(format!(
                    "output {index} allocated twice"
                )));
            }
            let bytes =
                crate::alloc::numel(shape.as_slice()).and_then(|n| n.checked_mul(dtype.size()));
            self.within_limit(
                || format!("output {index} ({dtype} {:?})", shape.as_slice()),
                bytes,
            )?;
            let (t, device, memory, data) = if self.output_on_device(index) {
                let alloc = self.alloc.ok_or_else(|| {
                    PluginError::unimplemented(format!(
                        "output {index} belongs in {} memory, and this host has no allocator for it",
                        self.device
                    ))
                })?;
                let buf = alloc.alloc(bytes.unwrap_or(0))?;
                let t = slot.insert(Arc::new(HostTensor::on_device(
                    dtype,
                    shape.as_slice(),
                    buf,
                )?));
                let mem = t
                    .device_mem()
                    .ok_or_else(|| PluginError::internal("device output"))?;
                (&**t, mem.device, mem.memory, mem.ptr)
            } else {
                let planned = self
                    .planned
                    .get(index)
                    .and_then(Option::as_ref)
                    .filter(|p| Some(p.len) == bytes && p.len > 0 && dtype != DType::String);
                let t = slot.insert(Arc::new(match planned {
                    Some(p) => HostTensor::in_planned(dtype, shape.as_slice(), p, zero)?,
                    None => HostTensor::zeroed(dtype, shape.as_slice())?,
                }));
                let data = Arc::get_mut(t)
                    .ok_or_else(|| PluginError::internal("a new output is shared"))?
                    .buf
                    .as_mut_slice()
                    .as_mut_ptr();
                (&**t, Device::CPU, MemoryType::DEVICE, data)
            };
            // SAFETY: the tensor behind the slot's `Arc` is neither moved nor dropped while the
            // frame lives (slots are only filled once, and taken in `into_outputs`, which
            // consumes the frame), so its shape, strides (inline in it) and buffer outlive the
            // returned borrow of `self`.
            let (shape, strides): (&[usize], &[isize]) = unsafe {
                (
                    &*(t.shape.as_slice() as *const [usize]),
                    &*(t.strides.as_slice() as *const [isize]),
                )
            };
            // SAFETY: as above; each output is handed out once, so the view aliases nothing
            // but, where the host placed it over one (`PlannedBuf::holds_input`), the input
            // the kernel declared it may reuse, which the kernel then reads by pointer.
            let mut view = unsafe { TensorViewMut::from_raw(dtype, device, shape, strides, data) };
            view.memory = memory;
            Ok(view)
        })();
        result.into()
    }
}

thread_local! {
    /// Whether this thread is running a chunk of a parallel loop (a `const` `Cell`: no
    /// destructor to register).
    static IN_PARALLEL_LOOP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread runs a chunk of a parallel loop. A loop started there (a kernel
/// calling the BLAS from its own parallel blocks) runs on that thread alone, and
/// `num_threads` answers 1 there: every other worker is busy with the outer loop's chunks and
/// spins rather than steals while it waits, so a nested split only added its spawn, its
/// atomics and a wait (MobileNetV2-QDQ's 1x1 layers at batch 8 ran 25-35 % faster as one
/// product than as blocks each calling a parallel product).
fn in_parallel_loop() -> bool {
    IN_PARALLEL_LOOP.with(|c| c.get())
}

/// Sets [`IN_PARALLEL_LOOP`] for its lifetime and restores the previous value (a panic
/// included).
struct Inside(bool);

impl Inside {
    fn enter() -> Self {
        Inside(IN_PARALLEL_LOOP.with(|c| c.replace(true)))
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        IN_PARALLEL_LOOP.with(|c| c.set(self.0));
    }
}

/// Runs `body(i)` for every `i` in `0..parts` on the calling thread and up to `workers - 1`
/// other workers of the current rayon pool, each call as a chunk of a parallel loop: the
/// kernels it calls see one thread ([`KernelContext::num_threads`](crate::KernelContext))
/// and run their own loops inline. For whole runs side by side (a batch split image by
/// image); returns when every part has run.
pub fn run_parts(workers: usize, parts: usize, body: impl Fn(usize) + Sync) {
    claim_chunks(workers, parts, body)
}

/// Runs `body(c)` for every chunk `c` in `0..chunks` on the calling thread and up to
/// `workers - 1` other workers of the current rayon pool; returns when every chunk has run.
///
/// Why not `into_par_iter().for_each`: its halves meet in `join`, and a thread waiting there
/// for a half another worker stole goes to sleep on a futex after a few rounds, to be woken by
/// a system call when the half is done (on a virtual machine an inter-processor interrupt
/// through the hypervisor). Kernels run several loops of tens of microseconds each; profiled on
/// MobileNetV2-style blocks at 2 threads, 15 % of the samples were those sleeps and wake-ups,
/// and 1x1 layers ran slower on two threads than on one. Here the caller waits for the chunks
/// others hold by spinning (they are short), and enters the scope's own wait only when every
/// chunk is done, where nothing is left to sleep on.
///
/// Each worker owns a contiguous range of the chunks, the caller the first, and takes its own
/// in order before it helps with the others' (from their fronts): as with `join`'s halves, a
/// kernel's successive loops over the same data (a gemm's depth blocks over the same tiles of
/// C) give each thread the same part every time, which stays in its core's cache. Handing the
/// chunks out one by one in order instead made ResNet-50's deep 1x1 layers read every weight
/// block on both cores.
fn claim_chunks(workers: usize, chunks: usize, body: impl Fn(usize) + Sync) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Marks this thread (and each helper below) as inside a parallel loop while it runs
    // chunks, so that a loop a chunk starts runs on its own thread ([`in_parallel_loop`]).
    let body = |c: usize| {
        let _inside = Inside::enter();
        body(c)
    };
    /// A range's next chunk, alone on its cache line (the owner takes from it all the time).
    #[repr(align(128))]
    struct Next(AtomicUsize);
    let workers = workers.clamp(1, chunks.max(1));
    // (In u128: `chunks * w` must not wrap whatever the loop's length.)
    let end = |w: usize| (chunks as u128 * w as u128 / workers as u128) as usize;
    let next: Vec<Next> = (0..workers)
        .map(|w| Next(AtomicUsize::new(end(w))))
        .collect();
    let done = AtomicUsize::new(0);
    let ids = AtomicUsize::new(1);
    /// Counts a claimed chunk as done however its body ends (a panic included, which the
    /// scope then carries on), so the waiting loop below always ends.
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Release);
        }
    }
    let work = |me: usize| {
        for r in (0..workers).map(|i| (me + i) % workers) {
            let Some(range) = next.get(r) else { continue };
            loop {
                let c = range.0.fetch_add(1, Ordering::Relaxed);
                if c >= end(r + 1) {
                    break;
                }
                let _done = Done(&done);
                body(c);
            }
        }
    };
    rayon::in_place_scope(|s| {
        for _ in 1..workers {
            s.spawn(|_| work(ids.fetch_add(1, Ordering::Relaxed)));
        }
        work(0);
        // Every chunk is claimed; wait for those still running elsewhere. A thread holding
        // one may have been descheduled: after a while, give the CPU away between looks.
        let mut spins = 0u32;
        while done.load(Ordering::Acquire) < chunks {
            if spins < 1 << 16 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    });
}

impl FfiHost for CallFrame<'_> {
    fn parallel_for(&self, len: usize, grain: usize, task: FfiTask_TO<'_, RRef<'_, ()>>) {
        let grain = grain.max(1);
        let chunks = len.div_ceil(grain);
        if self.should_stop() {
            return;
        }
        let workers = self.num_threads().min(chunks);
        if workers <= 1 {
            task.run(0, len);
            return;
        }
        claim_chunks(workers, chunks, |c| {
            if !self.should_stop() {
                let start = c * grain;
                task.run(start, (start + grain).min(len));
            }
        });
    }

    fn output(
        &self,
        index: usize,
        dtype: DType,
        shape: RSlice<'_, usize>,
    ) -> RResult<TensorViewMut<'_>, PluginError> {
        self.allocate_output(index, dtype, shape, true)
    }

    fn output_to_overwrite(
        &self,
        index: usize,
        dtype: DType,
        shape: RSlice<'_, usize>,
    ) -> RResult<TensorViewMut<'_>, PluginError> {
        self.allocate_output(index, dtype, shape, false)
    }

    fn scratch(&self, bytes: usize) -> RResult<RSliceMut<'_, u8>, PluginError> {
        self.lend_for_call(&self.scratch, bytes, AlignedBuf::zeroed)
            .into()
    }

    fn scratch_reused(&self, bytes: usize) -> RResult<RSliceMut<'_, u8>, PluginError> {
        self.lend_for_call(&self.reused, bytes, reused::lend).into()
    }

    fn blas(&self) -> ROption<FfiBlas_TO<'_, RRef<'_, ()>>> {
        self.blas.map(|b| b.sabi_reborrow()).into()
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        (self.log)(level, message.as_str());
    }

    fn device(&self) -> Device {
        self.device
    }

    fn num_outputs(&self) -> usize {
        self.outputs.lock().map(|o| o.len()).unwrap_or(0)
    }

    fn num_threads(&self) -> usize {
        if in_parallel_loop() {
            1
        } else {
            rayon::current_num_threads()
        }
    }

    fn stream(&self) -> crate::Stream {
        self.alloc.map_or(crate::Stream::DEFAULT, |a| a.stream())
    }

    fn resource(&self, key: RStr<'_>) -> u64 {
        self.alloc.map_or(0, |a| a.resource(key.as_str()))
    }

    fn cancelled(&self) -> bool {
        self.should_stop()
    }

    fn device_scratch(&self, bytes: usize) -> RResult<crate::MemRef, PluginError> {
        if !self.device.host_accessible() {
            let result = (|| {
                self.within_limit(|| "device scratch", Some(bytes))?;
                let alloc = self.alloc.ok_or_else(|| {
                    PluginError::unimplemented(format!(
                        "device {}: this host has no device scratch",
                        self.device
                    ))
                })?;
                let buf = alloc.alloc(bytes)?;
                let mem = buf.mem();
                self.device_scratch
                    .lock()
                    .map_err(|_| PluginError::internal("scratch list poisoned"))?
                    .push(buf);
                Ok(mem)
            })();
            return result.into();
        }
        self.scratch(bytes).map(|s| crate::MemRef {
            device: self.device,
            memory: crate::MemoryType::DEVICE,
            ptr: s.into_mut_slice().as_mut_ptr(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::claim_chunks;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
    }

    #[test]
    fn every_chunk_runs_once_across_the_workers() {
        let pool = pool(3);
        for chunks in [2usize, 3, 7, 1000] {
            let runs: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            let threads: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.install(|| {
                claim_chunks(3.min(chunks), chunks, |c| {
                    runs[c].fetch_add(1, Ordering::Relaxed);
                    let me = rayon::current_thread_index().expect("a pool worker");
                    threads[me].fetch_add(1, Ordering::Relaxed);
                })
            });
            assert!(
                runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                "{chunks} chunks"
            );
            let total: usize = threads.iter().map(|t| t.load(Ordering::Relaxed)).sum();
            assert_eq!(total, chunks);
        }
    }

    #[test]
    fn chunks_know_they_run_inside_a_loop_and_the_mark_is_restored() {
        let pool = pool(2);
        pool.install(|| {
            assert!(!super::in_parallel_loop());
            let inside = AtomicUsize::new(0);
            claim_chunks(2, 6, |_| {
                if super::in_parallel_loop() {
                    inside.fetch_add(1, Ordering::Relaxed);
                }
                // A loop inside a chunk: its chunks are marked too, and leaving it keeps
                // the outer chunk's mark.
                claim_chunks(1, 2, |_| assert!(super::in_parallel_loop()));
                assert!(super::in_parallel_loop());
            });
            assert_eq!(inside.load(Ordering::Relaxed), 6);
            assert!(!super::in_parallel_loop(), "the caller's mark is restored");
            let _ = std::panic::catch_unwind(|| claim_chunks(1, 1, |_| panic!("kernel bug")));
            assert!(!super::in_parallel_loop(), "restored after a panic too");
        });
    }

    #[test]
    fn a_panicking_chunk_ends_the_loop_and_reaches_the_caller() {
        let pool = pool(2);
        let ran = AtomicUsize::new(0);
        let caught = pool.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                claim_chunks(2, 50, |c| {
                    if c == 5 {
                        panic!("kernel bug");
                    }
                    ran.fetch_add(1, Ordering::Relaxed);
                })
            }))
        });
        assert!(caught.is_err());
        // Every other chunk still ran (the thread holding the panicking one stopped there, the
        // other claimed the rest), and the pool is usable afterwards.
        assert_eq!(ran.load(Ordering::Relaxed), 49);
        assert_eq!(pool.install(rayon::current_num_threads), 2);
    }

    /// A tensor made of byte parts holds them end to end in an aligned buffer, and refuses
    /// parts that do not add up to its shape, and strings.
    #[test]
    fn a_tensor_from_byte_parts_holds_them_end_to_end() {
        use super::{HostTensor, ALIGN};
        use crate::DType;
        let (a, b, c) = (
            [1u8, 2, 3, 4],
            [5u8, 6, 7, 8, 9, 10, 11, 12],
            [13u8, 14, 15, 16],
        );
        let t = HostTensor::from_byte_parts(DType::F32, &[2, 2], &[&a, &b, &c]).expect("parts");
        assert_eq!(t.bytes(), (1..=16).collect::<Vec<u8>>());
        assert_eq!(t.bytes().as_ptr() as usize % ALIGN, 0);
        assert!(HostTensor::from_byte_parts(DType::F32, &[5], &[&a, &b, &c]).is_err());
        assert!(HostTensor::from_byte_parts(DType::F32, &[3], &[&a, &b, &c]).is_err());
        assert!(HostTensor::from_byte_parts(DType::String, &[1], &[]).is_err());
        let empty = HostTensor::from_byte_parts(DType::F32, &[0, 4], &[]).expect("empty");
        assert!(empty.bytes().is_empty());
    }
}
