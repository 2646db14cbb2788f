//! A mapped plugin library and its lifetime.
//!
//! `RootModule::load_from_*` caches one module per type and never unloads, so it cannot load
//! two builds of one plugin side by side or release an old one. Instead each load maps its own
//! copy of the file (unique path) with `RawLibrary`, and everything that holds a function or
//! object of the plugin also holds an `Arc<Library>`: the copy is `dlclose`d when the last
//! holder drops, which is when the last in-flight request on that generation finishes.
//!
//! Unloading Rust libraries is safe only without thread-locals that have destructors (glibc
//! then keeps the object mapped: measured, a 350 MB leak after 500 swaps). The SDK forbids
//! them; after closing, we read `/proc/self/maps` and report a copy that stayed mapped.

use abi_stable::library::RawLibrary;
use std::path::{Path, PathBuf};

/// A private, mapped copy of a plugin file.
pub struct Library {
    raw: Option<RawLibrary>,
    copy: PathBuf,
    name: String,
    /// The plugin's `shutdown`, once its `init` succeeded: called before `dlclose`.
    shutdown: Option<extern "C" fn()>,
}

impl Library {
    pub(super) fn new(raw: RawLibrary, copy: PathBuf) -> Self {
        Library {
            raw: Some(raw),
            copy,
            name: String::new(),
            shutdown: None,
        }
    }

    /// Arms the plugin's `shutdown` (after its `init` succeeded).
    pub(super) fn set_shutdown(&mut self, shutdown: extern "C" fn()) {
        self.shutdown = Some(shutdown);
    }

    pub(super) fn raw(&self) -> Option<&RawLibrary> {
        self.raw.as_ref()
    }

    pub(super) fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    /// The copy that is mapped.
    pub fn copy_path(&self) -> &Path {
        &self.copy
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // Every object of this load is gone (they hold the Arc to this library): the plugin
        // releases what `init` acquired, then it is unmapped. dlclose first, then delete the
        // copy: the file must exist while it is mapped for /proc/self/maps to show it by name.
        if let Some(shutdown) = self.shutdown.take() {
            shutdown();
        }
        drop(self.raw.take());
        match still_mapped(&self.copy) {
            Some(bytes) => tracing::warn!(
                plugin = %self.name,
                copy = %self.copy.display(),
                bytes,
                "plugin library stayed mapped after release (a thread-local with a destructor?); its memory is not reclaimed"
            ),
            None => {
                tracing::info!(plugin = %self.name, copy = %self.copy.display(), "plugin library released and unmapped")
            }
        }
        if let Err(e) = std::fs::remove_file(&self.copy) {
            tracing::warn!(copy = %self.copy.display(), error = %e, "cannot remove plugin copy");
        }
    }
}

/// Bytes of `path` still mapped into this process, if any (Linux only; elsewhere unknown).
pub fn still_mapped(path: &Path) -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let needle = path.to_string_lossy();
    let mut total = 0u64;
    for line in maps.lines().filter(|l| l.ends_with(needle.as_ref())) {
        let range = line.split_whitespace().next()?;
        let (a, b) = range.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        total += b.saturating_sub(a);
    }
    (total > 0).then_some(total)
}
