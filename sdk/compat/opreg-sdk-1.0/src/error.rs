//! The error type that crosses the ABI.

use abi_stable::{std_types::RString, StableAbi};

/// What kind of failure a [`PluginError`] is; the daemon maps it to a gRPC status.
///
/// An open code, so that later SDKs can add kinds without breaking plugins built before: a
/// code the daemon does not know is reported as `UNKNOWN` with the plugin's message.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

#[allow(non_upper_case_globals)]
impl ErrorCode {
    /// The inputs or attributes are not acceptable (gRPC `INVALID_ARGUMENT`).
    pub const InvalidArgument: ErrorCode = ErrorCode(0);
    /// The kernel does not support this case (gRPC `UNIMPLEMENTED`).
    pub const Unimplemented: ErrorCode = ErrorCode(1);
    /// A bug or an unexpected state (gRPC `INTERNAL`).
    pub const Internal: ErrorCode = ErrorCode(2);
    /// The plugin panicked; the SDK caught it at the boundary (gRPC `INTERNAL`).
    pub const Panic: ErrorCode = ErrorCode(3);
    /// Out of memory or another resource (gRPC `RESOURCE_EXHAUSTED`).
    pub const ResourceExhausted: ErrorCode = ErrorCode(4);
    /// Called in a state that does not allow it (gRPC `FAILED_PRECONDITION`).
    pub const FailedPrecondition: ErrorCode = ErrorCode(5);

    fn name(self) -> Option<&'static str> {
        Some(match self {
            ErrorCode::InvalidArgument => "InvalidArgument",
            ErrorCode::Unimplemented => "Unimplemented",
            ErrorCode::Internal => "Internal",
            ErrorCode::Panic => "Panic",
            ErrorCode::ResourceExhausted => "ResourceExhausted",
            ErrorCode::FailedPrecondition => "FailedPrecondition",
            _ => return None,
        })
    }
}

impl std::fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "ErrorCode({})", self.0),
        }
    }
}

/// An error returned by plugin code. Owned, FFI-safe, and cheap to convert to a gRPC status.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    /// The kind of failure.
    pub code: ErrorCode,
    /// A message for humans: say which input, attribute or value is wrong.
    pub message: RString,
}

impl PluginError {
    /// An error of `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        PluginError {
            code,
            message: RString::from(message.into()),
        }
    }
    /// [`ErrorCode::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    /// [`ErrorCode::Unimplemented`].
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unimplemented, message)
    }
    /// [`ErrorCode::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for PluginError {}

/// Runs `f`, turning a panic into an [`ErrorCode::Panic`] error. Every call from the host into
/// plugin code goes through this, because unwinding across `extern "C"` aborts the process.
pub(crate) fn guard<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, PluginError>,
) -> Result<T, PluginError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(PluginError::new(
            ErrorCode::Panic,
            format!("{what} panicked: {}", panic_message(&*payload)),
        )),
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
