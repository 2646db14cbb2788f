//! Why a plugin was refused.

use std::path::PathBuf;

/// A plugin that could not be loaded. Each message names the file and the reason; the daemon
/// logs it and answers the gRPC call with it, and keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read plugin file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot stage a private copy under the runtime folder: {source}")]
    Stage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a loadable shared library: {reason}")]
    NotALibrary { path: PathBuf, reason: String },
    #[error("{path}: not an opreg plugin: no opreg/abi_stable header symbol (was it built with opreg_sdk::export_plugin!?)")]
    NoHeader { path: PathBuf },
    #[error("{path}: built with an incompatible abi_stable runtime: {reason}")]
    AbiStableMismatch { path: PathBuf, reason: String },
    #[error("{path}: plugin ABI {found} is not compatible with this daemon's ABI {expected} (major versions differ); rebuild it against opreg-sdk {expected_major}.x")]
    AbiMajor {
        path: PathBuf,
        expected: String,
        found: String,
        expected_major: u32,
    },
    #[error("{path}: plugin was built for ABI {major}.{plugin_minor}, newer than this daemon's {major}.{host_minor}: upgrade the daemon, or rebuild the plugin against opreg-sdk {major}.{host_minor}")]
    AbiMinor {
        path: PathBuf,
        major: u32,
        plugin_minor: u32,
        host_minor: u32,
    },
    #[error("{path}: plugin ABI layout does not match this daemon's: {detail}")]
    Layout { path: PathBuf, detail: String },
    #[error("{path}: plugin root module failed to initialise: {detail}")]
    RootModule { path: PathBuf, detail: String },
    #[error("{path}: plugin '{plugin}' failed to initialise: {message}")]
    Init {
        path: PathBuf,
        plugin: String,
        message: String,
    },
    #[error("{path}: plugin '{plugin}' failed to register: {message}")]
    Register {
        path: PathBuf,
        plugin: String,
        message: String,
    },
    #[error("{path}: plugin '{plugin}': {what} failed its self-test: {message}")]
    SelfTest {
        path: PathBuf,
        plugin: String,
        what: String,
        message: String,
    },
    #[error("{path}: plugin '{plugin}' conflicts with plugin '{other}': {what}")]
    Conflict {
        path: PathBuf,
        plugin: String,
        other: String,
        what: String,
    },
    #[error("{path}: plugin has an invalid registration: {what}")]
    Invalid { path: PathBuf, what: String },
}
