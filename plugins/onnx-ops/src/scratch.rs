//! Per-thread reusable buffers for a kernel's temporaries (the integer convolution's i32
//! products and gathered columns).
//!
//! A temporary allocated and zeroed per call costs a memset and, for the large ones (mmap'd
//! by the allocator), page faults on every run: 10 % of a QDQ MobileNetV2 run went to
//! `try_vec` and `memset` (perf). A [`Scratch`] lends this thread's buffer instead, holding
//! whatever a previous user left (valid values, never read before written by the callers:
//! they overwrite every element). The buffer is taken out of the thread's slot while in use,
//! so a nested run on the same thread (rayon work stealing) gets its own; on return the
//! larger of the two is kept, up to [`KEEP_MAX_BYTES`] (a huge one-off is freed).

use opreg_sdk::PluginError;
use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

/// The largest buffer a thread keeps between calls, per element type: the products of a
/// ResNet-50 or MobileNetV2 layer fit (3-5 MiB); a larger one-off is not held by every pool
/// thread for the process's life.
const KEEP_MAX_BYTES: usize = 16 << 20;

/// An element type with a per-thread slot.
pub(crate) trait Element: Copy + Default + 'static {
    fn slot() -> &'static LocalKey<Cell<Vec<Self>>>;
}

thread_local! {
    static I32: Cell<Vec<i32>> = const { Cell::new(Vec::new()) };
    static U8: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl Element for i32 {
    fn slot() -> &'static LocalKey<Cell<Vec<i32>>> {
        &I32
    }
}

impl Element for u8 {
    fn slot() -> &'static LocalKey<Cell<Vec<u8>>> {
        &U8
    }
}

/// `len` elements of this thread's buffer, contents unspecified; given back on drop.
pub(crate) struct Scratch<T: Element> {
    buf: Vec<T>,
    len: usize,
}

impl<T: Element> Scratch<T> {
    /// Lends at least `len` elements, growing the buffer fallibly (`len` comes from the model).
    pub(crate) fn take(len: usize) -> Result<Self, PluginError> {
        let mut buf = T::slot().with(Cell::take);
        if buf.len() < len {
            buf.try_reserve_exact(len - buf.len()).map_err(|_| {
                PluginError::invalid(format!(
                    "cannot allocate {len} elements of {} bytes",
                    std::mem::size_of::<T>()
                ))
            })?;
            buf.resize(len, T::default());
        }
        Ok(Scratch { buf, len })
    }
}

impl<T: Element> Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
}

impl<T: Element> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.buf.get_mut(..self.len).unwrap_or(&mut [])
    }
}

impl<T: Element> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() * std::mem::size_of::<T>() > KEEP_MAX_BYTES {
            return;
        }
        // `try_with`: a thread being torn down has no slot left; the buffer is just freed.
        let _ = T::slot().try_with(|slot| {
            let kept = slot.take();
            slot.set(if kept.len() >= buf.len() { kept } else { buf });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_reused_on_its_thread_and_a_nested_user_gets_its_own() {
        let first_ptr = {
            let mut a = Scratch::<i32>::take(1000).unwrap();
            a.fill(7);
            assert_eq!(a.len(), 1000);
            // Taken while `a` is out: a separate buffer.
            let b = Scratch::<i32>::take(10).unwrap();
            assert_ne!(a.as_ptr(), b.as_ptr());
            a.as_ptr()
        };
        // The larger one (a's) was kept: lent again, with the old contents.
        let again = Scratch::<i32>::take(500).unwrap();
        assert_eq!(again.as_ptr(), first_ptr);
        assert_eq!(again.len(), 500);
        assert!(again.iter().all(|&v| v == 7));
        drop(again);
        // Growing past it reallocates; the elements are there to be written.
        let mut big = Scratch::<u8>::take(4096).unwrap();
        big.fill(1);
        assert_eq!(big.len(), 4096);
        // An absurd size is an error, not an abort.
        assert!(Scratch::<i32>::take(usize::MAX / 2).is_err());
    }
}
