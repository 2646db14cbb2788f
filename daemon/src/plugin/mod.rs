//! Plugins: shared libraries with a checked, stable ABI (see `opreg-sdk`).

mod error;
mod library;
mod load;

pub use error::LoadError;
pub use load::{kernel_label, load, sha256_file, LoadedPlugin};

use opreg_sdk::LogLevel;
use std::path::{Path, PathBuf};

/// The file names the daemon loads from a plugin folder: `libopreg_*.so` (Linux),
/// `libopreg_*.dylib` (macOS), `opreg_*.dll` (Windows). Like Triton's `libtriton_*.so`
/// convention, this keeps a folder of other libraries (or a cargo target folder) loadable.
pub fn is_plugin_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    name.starts_with(&format!("{prefix}opreg_")) && name.ends_with(suffix)
}

/// The plugin files in `dir`, sorted by name so start-up is deterministic.
pub fn scan_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_plugin_file(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Writes one log line of plugin code into the daemon's `tracing` subscriber.
pub(crate) fn log_from_plugin(plugin: &str, level: LogLevel, msg: &str) {
    match level {
        LogLevel::TRACE => tracing::trace!(target: "opreg::plugin", plugin, "{msg}"),
        LogLevel::DEBUG => tracing::debug!(target: "opreg::plugin", plugin, "{msg}"),
        LogLevel::WARN => tracing::warn!(target: "opreg::plugin", plugin, "{msg}"),
        LogLevel::ERROR => tracing::error!(target: "opreg::plugin", plugin, "{msg}"),
        // INFO, and levels added after this daemon was built.
        _ => tracing::info!(target: "opreg::plugin", plugin, "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_file_names() {
        assert!(is_plugin_file(Path::new("/x/libopreg_onnx_ops.so")));
        assert!(!is_plugin_file(Path::new("/x/libfoo.so")));
        assert!(!is_plugin_file(Path::new("/x/libopreg_onnx_ops.d")));
    }

    #[test]
    fn refuses_a_file_that_is_not_a_library() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("libopreg_text.so");
        std::fs::write(&f, b"this is text, not ELF").expect("write");
        let err =
            load(&f, &dir.path().join("stage"), 1, &|_| String::new()).expect_err("must refuse");
        let msg = err.to_string();
        assert!(matches!(err, LoadError::NotALibrary { .. }), "{msg}");
        assert!(msg.contains("libopreg_text.so"), "{msg}");
        // The staged copy is removed again.
        assert_eq!(
            std::fs::read_dir(dir.path().join("stage"))
                .expect("stage")
                .count(),
            0
        );
    }
}
