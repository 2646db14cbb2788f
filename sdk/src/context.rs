//! The kernel context: what the host lends a kernel for one call.
//!
//! Plugins start no threads and own no long-lived memory of their own: parallelism comes from
//! the host's rayon pool through [`KernelContext::parallel_for`], outputs and scratch memory
//! from the host's allocator, the BLAS backend from the registry, and logs go to the host's
//! `tracing` subscriber. One pool for the whole process, and a plugin that can be unloaded.

use crate::{
    blas::{BlasRef, FfiBlas_TO},
    error::panic_message,
    tensor::TensorViewMut,
    DType, Device, Element, ErrorCode, MemRef, PluginError, Stream,
};
use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{ROption, RResult, RSlice, RSliceMut, RStr},
    RRef, StableAbi,
};
use std::sync::Mutex;

/// Severity of a log line; mapped onto `tracing` levels by the host. An open code: a level
/// the host does not know is logged as `INFO`.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogLevel(pub u32);

impl LogLevel {
    /// Very verbose.
    pub const TRACE: LogLevel = LogLevel(0);
    /// For developers.
    pub const DEBUG: LogLevel = LogLevel(1);
    /// Normal operation.
    pub const INFO: LogLevel = LogLevel(2);
    /// Something looks wrong.
    pub const WARN: LogLevel = LogLevel(3);
    /// Something failed.
    pub const ERROR: LogLevel = LogLevel(4);
}

/// A range of work items handed to a task by [`FfiHost::parallel_for`].
#[sabi_trait]
pub trait FfiTask: Sync {
    /// Processes items `start..end`. Must not unwind.
    #[sabi(last_prefix_field)]
    fn run(&self, start: usize, end: usize);
}

/// What a host provides to kernels. Implemented by the daemon and by the [test kit]; plugin
/// code uses it through [`KernelContext`].
///
/// [test kit]: crate::testkit
#[sabi_trait]
pub trait FfiHost: Send + Sync {
    /// Calls `task.run` over `0..len` in chunks of at least `grain` items, possibly in
    /// parallel, and returns when every chunk is done.
    fn parallel_for(&self, len: usize, grain: usize, task: FfiTask_TO<'_, RRef<'_, ()>>);

    /// Allocates output `index` with `dtype` and `shape`; the memory lives until the call
    /// returns to the host. Allocating an output twice is an error.
    fn output(
        &self,
        index: usize,
        dtype: DType,
        shape: RSlice<'_, usize>,
    ) -> RResult<TensorViewMut<'_>, PluginError>;

    /// `bytes` of 64-byte aligned scratch memory, valid until the call returns to the host.
    fn scratch(&self, bytes: usize) -> RResult<RSliceMut<'_, u8>, PluginError>;

    /// The BLAS backend chosen for the node's device, if any.
    fn blas(&self) -> ROption<FfiBlas_TO<'_, RRef<'_, ()>>>;

    /// Writes one log line into the host's `tracing` subscriber.
    fn log(&self, level: LogLevel, message: RStr<'_>);

    /// The device the node runs on.
    fn device(&self) -> Device;

    /// Number of outputs the node has.
    fn num_outputs(&self) -> usize;

    /// Number of threads `parallel_for` may use.
    fn num_threads(&self) -> usize;

    /// The stream the node's work is enqueued on (devices with streams).
    fn stream(&self) -> Stream;

    /// A named resource of the node's device and stream (see
    /// [`DeviceProvider::resource`](crate::DeviceProvider::resource)); 0 when none.
    fn resource(&self, key: RStr<'_>) -> u64;

    /// True once the request was cancelled or ran past its deadline: stop early with any
    /// error (the host reports the cancellation, not the error).
    fn cancelled(&self) -> bool;

    /// `bytes` of scratch in the node's device memory, valid until the call returns.
    #[sabi(last_prefix_field)]
    fn device_scratch(&self, bytes: usize) -> RResult<MemRef, PluginError>;

    /// `bytes` of 64-byte aligned host scratch memory, valid until the call returns, holding
    /// whatever an earlier call left there (always initialised bytes). Since ABI 1.5.
    fn scratch_reused(&self, bytes: usize) -> RResult<RSliceMut<'_, u8>, PluginError>;

    /// As [`output`](Self::output), for a kernel that writes every element before it returns
    /// successfully: the host need not zero the buffer, which may hold what an earlier use of
    /// its memory left (always initialised bytes). Since ABI 1.6.
    fn output_to_overwrite(
        &self,
        index: usize,
        dtype: DType,
        shape: RSlice<'_, usize>,
    ) -> RResult<TensorViewMut<'_>, PluginError>;
}

/// The context a kernel receives for one call.
#[repr(C)]
#[derive(StableAbi)]
pub struct KernelContext<'a> {
    host: FfiHost_TO<'a, RRef<'a, ()>>,
}

impl<'a> KernelContext<'a> {
    /// For hosts: a context backed by `host`.
    pub fn new<H: FfiHost + 'a>(host: &'a H) -> Self {
        KernelContext {
            host: FfiHost_TO::from_ptr(RRef::new(host), TD_Opaque),
        }
    }

    /// The same context, borrowed for a shorter lifetime.
    pub fn reborrow(&self) -> KernelContext<'_> {
        KernelContext {
            host: self.host.sabi_reborrow(),
        }
    }

    /// Runs `f` over `0..len` split into ranges of at least `grain` items, on the host's
    /// thread pool. A panic or error in any range is returned (the first one); the other
    /// ranges still run to completion.
    pub fn parallel_for<F>(&self, len: usize, grain: usize, f: F) -> Result<(), PluginError>
    where
        F: Fn(std::ops::Range<usize>) -> Result<(), PluginError> + Sync,
    {
        if len == 0 {
            return Ok(());
        }
        let task = Task {
            f,
            failure: Mutex::new(None),
        };
        self.host.parallel_for(
            len,
            grain.max(1),
            FfiTask_TO::from_ptr(RRef::new(&task), TD_Opaque),
        );
        match task.failure.into_inner() {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(_) => Err(PluginError::internal("parallel_for: failure slot poisoned")),
        }
    }

    /// A grain for [`parallel_for`](Self::parallel_for) over `len` items near `grain` (the
    /// least work worth a task) whose chunks share out evenly over this context's threads
    /// ([`even_grain`]).
    pub fn even_grain(&self, len: usize, grain: usize) -> usize {
        even_grain(len, grain, self.num_threads())
    }

    /// Splits `out` into chunks of `grain` elements and fills them in parallel:
    /// `f(offset_of_chunk, chunk)`.
    pub fn parallel_chunks<T, F>(
        &self,
        out: &mut [T],
        grain: usize,
        f: F,
    ) -> Result<(), PluginError>
    where
        T: Send,
        F: Fn(usize, &mut [T]) + Sync,
    {
        let grain = grain.max(1);
        let len = out.len();
        let base = SendPtr(out.as_mut_ptr());
        let chunks = len.div_ceil(grain);
        self.parallel_for(chunks, 1, |range| {
            for c in range {
                let start = c * grain;
                let end = (start + grain).min(len);
                // SAFETY: chunks are disjoint sub-slices of `out`, which outlives this call.
                let chunk =
                    unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
                f(start, chunk);
            }
            Ok(())
        })
    }

    /// Allocates output `index`.
    pub fn output(
        &self,
        index: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<TensorViewMut<'_>, PluginError> {
        self.host.output(index, dtype, shape.into()).into_result()
    }

    /// Allocates output `index` as a typed, contiguous host slice.
    pub fn output_slice<T: Element>(
        &self,
        index: usize,
        shape: &[usize],
    ) -> Result<&mut [T], PluginError> {
        self.output(index, T::DTYPE, shape)?.into_slice::<T>()
    }

    /// Allocates output `index` like [`output`](Self::output) for a kernel that writes every
    /// element of it before returning `Ok`: the host skips zeroing it (a pass over the whole
    /// output, 3-7 % of a CNN's run), so its elements start as whatever an earlier use of the
    /// memory left there (initialised, but meaningless; debug builds of the host fill it with
    /// 0xFF bytes, so that an element left unwritten shows up as NaN or -1 in tests). An
    /// element left unwritten would leak stale data into the result: use [`output`](Self::output)
    /// unless every success path writes everything (an error discards the outputs).
    ///
    /// Since ABI 1.6: a plugin built with this SDK needs a 1.6 host, which the loader checks.
    pub fn output_to_overwrite(
        &self,
        index: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<TensorViewMut<'_>, PluginError> {
        self.host
            .output_to_overwrite(index, dtype, shape.into())
            .into_result()
    }

    /// [`output_to_overwrite`](Self::output_to_overwrite) as a typed, contiguous host slice.
    pub fn output_slice_to_overwrite<T: Element>(
        &self,
        index: usize,
        shape: &[usize],
    ) -> Result<&mut [T], PluginError> {
        self.output_to_overwrite(index, T::DTYPE, shape)?
            .into_slice::<T>()
    }

    /// Scratch memory for `len` elements of `T`, zeroed, valid for this call.
    // Each call returns a fresh host buffer, so the `&mut` never aliases.
    #[allow(clippy::mut_from_ref)]
    pub fn scratch<T: Element>(&self, len: usize) -> Result<&mut [T], PluginError> {
        if len == 0 {
            // No call: the host's empty buffer need not be aligned for `T`.
            return Ok(&mut []);
        }
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            PluginError::new(ErrorCode::ResourceExhausted, "scratch size overflows")
        })?;
        let raw = self.host.scratch(bytes).into_result()?;
        let raw = raw.into_mut_slice();
        if raw.len() < bytes || !(raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(PluginError::internal(
                "host returned misaligned or short scratch",
            ));
        }
        raw.fill(0);
        // SAFETY: length and alignment checked; zero bytes are valid for every `Element`.
        Ok(unsafe { std::slice::from_raw_parts_mut(raw.as_mut_ptr().cast::<T>(), len) })
    }

    /// Scratch memory for `len` elements of `T`, valid for this call, holding whatever an
    /// earlier call left there: for temporaries the kernel overwrites before reading (im2col
    /// columns, packed panels, partial products). The host lends these from buffers it keeps
    /// across calls, so unlike [`scratch`](Self::scratch) there is no zeroing pass and no page
    /// fault of fresh memory on every call; plugins keep no buffers of their own (a
    /// thread-local with a destructor would keep the library mapped after unloading).
    ///
    /// Since ABI 1.5: a plugin built with this SDK needs a 1.5 host, which the loader checks.
    // Each call returns a distinct host buffer, so the `&mut` never aliases.
    #[allow(clippy::mut_from_ref)]
    pub fn scratch_reused<T: Element>(&self, len: usize) -> Result<&mut [T], PluginError> {
        if len == 0 {
            // No call: the host's empty buffer need not be aligned for `T`.
            return Ok(&mut []);
        }
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            PluginError::new(ErrorCode::ResourceExhausted, "scratch size overflows")
        })?;
        let raw = self.host.scratch_reused(bytes).into_result()?;
        let raw = raw.into_mut_slice();
        if raw.len() < bytes || !(raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(PluginError::internal(
                "host returned misaligned or short scratch",
            ));
        }
        // SAFETY: length and alignment checked; the bytes are initialised and every `Element`
        // accepts any bit pattern (numbers, and `Bool` as a byte).
        Ok(unsafe { std::slice::from_raw_parts_mut(raw.as_mut_ptr().cast::<T>(), len) })
    }

    /// The BLAS backend for this node's device, if the host has one.
    pub fn blas(&self) -> Option<BlasRef<'_>> {
        self.host.blas().into_option().map(BlasRef::new)
    }

    /// Number of outputs the node has (for variadic outputs, as in `Split`).
    pub fn num_outputs(&self) -> usize {
        self.host.num_outputs()
    }

    /// The device this call runs on.
    pub fn device(&self) -> Device {
        self.host.device()
    }

    /// Number of threads [`parallel_for`](Self::parallel_for) may use.
    pub fn num_threads(&self) -> usize {
        self.host.num_threads()
    }

    /// Logs into the host's `tracing` subscriber.
    pub fn log(&self, level: LogLevel, message: &str) {
        self.host.log(level, message.into());
    }

    /// The stream this call's device work goes on.
    pub fn stream(&self) -> Stream {
        self.host.stream()
    }

    /// A named resource of the node's device and stream (e.g. a BLAS handle); 0 when none.
    pub fn resource(&self, key: &str) -> u64 {
        self.host.resource(key.into())
    }

    /// True once the request was cancelled or ran past its deadline.
    pub fn cancelled(&self) -> bool {
        self.host.cancelled()
    }

    /// Scratch in the node's device memory, valid for this call (not zeroed).
    pub fn device_scratch(&self, bytes: usize) -> Result<MemRef, PluginError> {
        self.host.device_scratch(bytes).into_result()
    }
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: used only to hand disjoint chunks of one slice to worker threads.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

struct Task<F> {
    f: F,
    failure: Mutex<Option<PluginError>>,
}

impl<F> FfiTask for Task<F>
where
    F: Fn(std::ops::Range<usize>) -> Result<(), PluginError> + Sync,
{
    fn run(&self, start: usize, end: usize) {
        // Unwinding out of here would cross the host's `extern "C"` frames: catch it.
        let result =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(start..end))) {
                Ok(r) => r,
                Err(p) => Err(PluginError::new(
                    ErrorCode::Panic,
                    format!("parallel task panicked: {}", panic_message(&*p)),
                )),
            };
        if let Err(e) = result {
            if let Ok(mut slot) = self.failure.lock() {
                slot.get_or_insert(e);
            }
        }
    }
}

/// Formats a message and logs it through a [`KernelContext`] at a [`LogLevel`] constant:
/// `ctx_log!(ctx, WARN, "clamped {n} values")`.
#[macro_export]
macro_rules! ctx_log {
    ($ctx:expr, $level:ident, $($arg:tt)*) => {
        $ctx.log($crate::context::LogLevel::$level, &format!($($arg)*))
    };
}

/// A grain near `grain` for a parallel loop over `len` items on `threads` threads whose
/// chunks share out evenly. Chunks are claimed one at a time, so the loop lasts as long as
/// the thread with the most items: 14 rows in chunks of 5 (5, 5, 4) ran 10 rows on one of
/// two threads and 4 on the other (a 14x14 depthwise layer took 0.037 ms at two threads
/// against 0.041 at one). Of `grain`, and of the grains up to twice as large or just below it
/// that make the number of chunks a multiple of `threads`, this is the one whose busiest
/// thread has the fewest items (`grain` where none has fewer, else the largest grain of
/// equals: fewer hand-offs).
pub fn even_grain(len: usize, grain: usize, threads: usize) -> usize {
    let grain = grain.max(1);
    if threads <= 1 || len <= grain {
        return grain;
    }
    // The items of the busiest thread with chunks of `g` (the last chunk may be short).
    let busiest = |g: usize| {
        let chunks = len.div_ceil(g);
        let rounds = chunks.div_ceil(threads);
        // The first thread takes chunks 0, threads, 2 * threads, ...: all full but maybe the
        // last of the loop.
        let last_short = (chunks - 1).is_multiple_of(threads);
        rounds * g - if last_short { chunks * g - len } else { 0 }
    };
    // Chunk counts that are multiples of `threads`, from half as many chunks as `grain` gives
    // (grains up to twice as large) to the next multiple above.
    let chunks = len.div_ceil(grain);
    let above = (chunks.div_ceil(threads) * threads).min(len);
    let fewest = (chunks / 2).div_ceil(threads).max(1) * threads;
    let best = (fewest..=above)
        .step_by(threads)
        .map(|c| len.div_ceil(c))
        .min_by_key(|&g| (busiest(g), std::cmp::Reverse(g)))
        .unwrap_or(grain);
    // `grain` where it does as well: its smaller chunks share out better when a thread is
    // late (another process on its core).
    if busiest(best) < busiest(grain) {
        best
    } else {
        grain
    }
}

#[cfg(test)]
mod tests {
    use super::even_grain;

    #[test]
    fn even_grains_share_out_the_items() {
        // 14 rows, chunks of at least 5 (or 3) on two threads: 7 and 7.
        assert_eq!(even_grain(14, 5, 2), 7);
        assert_eq!(even_grain(14, 3, 2), 7);
        // Already even, or one thread, or fewer items than a grain: unchanged.
        assert_eq!(even_grain(20, 5, 2), 5);
        assert_eq!(even_grain(14, 5, 1), 5);
        assert_eq!(even_grain(4, 5, 2), 5);
        // 7 rows of 1 on 2 threads: 4 and 3 whatever the grain, so the grain asked for.
        assert_eq!(even_grain(7, 1, 2), 1);
        // Never a thread with more items than with the grain asked for.
        for len in 1..200 {
            for grain in 1..40 {
                for threads in 1..6 {
                    let g = even_grain(len, grain, threads);
                    assert!(g >= 1);
                    let most = |g: usize| {
                        let mut load = vec![0; threads];
                        for c in 0..len.div_ceil(g) {
                            load[c % threads] += g.min(len - c * g);
                        }
                        load.into_iter().max().unwrap_or(0)
                    };
                    assert!(most(g) <= most(grain), "{len} {grain} {threads}: {g}");
                }
            }
        }
    }
}
