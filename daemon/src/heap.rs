//! Handing freed heap memory back to the OS after a large release.
//!
//! glibc's allocator keeps what is freed for reuse, and raises its mmap threshold (up to
//! 32 MiB) each time a large block is freed, so that later weight-sized blocks come from its
//! heap too, and stay there when freed. A plugin swap that compiles new plans (re-reading a
//! version's freed weights, packing them anew) and drops the old ones thus left a BERT-style
//! encoder's daemon at 570 MB resident instead of 295 (measured; `malloc_trim` by hand brought
//! it back). [`release_freed`] returns those pages after such a release. Elsewhere (musl, other
//! systems) it does nothing.

/// Returns the allocator's free pages to the OS. A walk over the heap (milliseconds): call it
/// after a release of plans or models, not per request.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reads and adjusts the allocator's own state.
    unsafe {
        libc::malloc_trim(0);
    }
}
