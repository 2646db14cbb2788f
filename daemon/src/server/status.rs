//! Mapping daemon errors to gRPC statuses.

use crate::{
    exec::ExecError,
    plugin::LoadError,
    registry::{SwapError, UnloadError},
};
use opreg_sdk::ErrorCode;
use tonic::{Code, Status};

pub fn code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::Unimplemented => Code::Unimplemented,
        ErrorCode::Internal | ErrorCode::Panic => Code::Internal,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        // A kind from a newer SDK: the plugin's message still says what happened.
        _ => Code::Unknown,
    }
}

impl From<LoadError> for Status {
    fn from(e: LoadError) -> Status {
        Status::new(load_code(&e), bounded(e.to_string()))
    }
}

fn load_code(e: &LoadError) -> Code {
    match e {
        LoadError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Code::NotFound
        }
        LoadError::Read { .. } => Code::InvalidArgument,
        LoadError::Stage { .. } => Code::Internal,
        LoadError::NotALibrary { .. }
        | LoadError::NoHeader { .. }
        | LoadError::AbiStableMismatch { .. }
        | LoadError::AbiMajor { .. }
        | LoadError::AbiMinor { .. }
        | LoadError::Layout { .. }
        | LoadError::RootModule { .. }
        | LoadError::Invalid { .. } => Code::InvalidArgument,
        LoadError::Init { .. }
        | LoadError::Register { .. }
        | LoadError::SelfTest { .. }
        | LoadError::Conflict { .. } => Code::FailedPrecondition,
    }
}

impl From<SwapError> for Status {
    fn from(e: SwapError) -> Status {
        let code = match &e {
            SwapError::Load(l) => load_code(l),
            SwapError::WrongName { .. } => Code::InvalidArgument,
            SwapError::NotLoaded { .. } | SwapError::NothingToRollBack(_) => Code::NotFound,
            SwapError::NoPrevious(_) | SwapError::Verification(_) => Code::FailedPrecondition,
        };
        Status::new(code, bounded(e.to_string()))
    }
}

/// Status messages travel in HTTP/2 trailers: keep them well under header size limits.
pub fn bounded(mut message: String) -> String {
    const MAX: usize = 4096;
    if message.len() > MAX {
        let mut cut = MAX;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" …");
    }
    message
}

impl From<UnloadError> for Status {
    fn from(e: UnloadError) -> Status {
        match e {
            UnloadError::NotLoaded(_) => Status::not_found(e.to_string()),
        }
    }
}

impl From<ExecError> for Status {
    fn from(e: ExecError) -> Status {
        let code = match &e {
            ExecError::Resolve(_) => Code::Unimplemented,
            ExecError::Kernel(k) => kernel_code(k),
            ExecError::Invalid(_) => Code::InvalidArgument,
            ExecError::Lost | ExecError::Panicked(_) => Code::Internal,
            ExecError::DeadlineExceeded => Code::DeadlineExceeded,
        };
        Status::new(code, bounded(e.to_string()))
    }
}

fn kernel_code(e: &crate::exec::KernelError) -> Code {
    match e.code() {
        Some(code) => code_of(code),
        // A stopped call is reported by its caller (deadline or cancellation); on its own it
        // means the deadline.
        None => Code::DeadlineExceeded,
    }
}

fn graph_code(e: &crate::graph::GraphError) -> Code {
    use crate::graph::GraphError as G;
    match e {
        G::Decode(_) | G::Invalid(_) | G::Input { .. } => Code::InvalidArgument,
        G::Unsupported(_) | G::NoKernel { .. } => Code::Unimplemented,
        G::Kernel(k) => kernel_code(k),
        G::Cancelled { .. } => Code::Cancelled,
        G::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        G::Limit { .. } => Code::ResourceExhausted,
    }
}

impl From<crate::graph::GraphError> for Status {
    fn from(e: crate::graph::GraphError) -> Status {
        Status::new(graph_code(&e), bounded(e.to_string()))
    }
}

impl From<crate::repo::RepoError> for Status {
    fn from(e: crate::repo::RepoError) -> Status {
        repo_status(&e)
    }
}

fn repo_status(e: &crate::repo::RepoError) -> Status {
    {
        use crate::repo::RepoError as R;
        let code = match e {
            R::UnknownModel(_) | R::NoVersions(_) => Code::NotFound,
            R::NotReady { .. } => Code::Unavailable,
            R::BadName(_) | R::BadRequest(_) | R::Config(_) => Code::InvalidArgument,
            R::TooLarge(_) | R::Busy { .. } => Code::ResourceExhausted,
            R::Graph { source, .. } => graph_code(source),
            R::NoRepository | R::Changed { .. } => Code::FailedPrecondition,
            R::Io { .. } => Code::Internal,
        };
        // Clients see where in the repository, not where the repository is on the host.
        let message = match e {
            R::Io { path, source } => {
                tracing::error!(path = %path.display(), "repository I/O error: {source}");
                let tail: Vec<_> = path.iter().rev().take(3).collect();
                let shown: std::path::PathBuf = tail.into_iter().rev().collect();
                format!("repository I/O error on {}: {source}", shown.display())
            }
            _ => e.to_string(),
        };
        Status::new(code, bounded(message))
    }
}

impl From<crate::quant::QuantError> for Status {
    fn from(e: crate::quant::QuantError) -> Status {
        use crate::quant::QuantError as Q;
        let code = match &e {
            Q::UnknownStrategy(_) => Code::NotFound,
            Q::Data(_) | Q::EmptyCalibration => Code::InvalidArgument,
            Q::Strategy { code, .. } => code_of(*code),
            // A malformed plan is the plugin's fault, not the caller's.
            Q::BadPlan { .. } => Code::Internal,
            Q::Unimplemented { .. } => Code::Unimplemented,
            Q::Model { .. } => Code::FailedPrecondition,
            Q::Graph(g) => graph_code(g),
            Q::Repo(r) => return repo_status(r),
            Q::Io { path, source } => {
                tracing::error!(path = %path.display(), "quantization I/O error: {source}");
                let name = path.file_name().map(|n| n.to_string_lossy().to_string());
                return Status::new(
                    if source.kind() == std::io::ErrorKind::NotFound {
                        Code::NotFound
                    } else {
                        Code::Internal
                    },
                    bounded(format!(
                        "I/O error on {}: {source}",
                        name.unwrap_or_default()
                    )),
                );
            }
            Q::Cancelled => Code::Cancelled,
        };
        Status::new(code, bounded(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_io_errors_do_not_reveal_where_the_repository_is() {
        let e = crate::repo::RepoError::Io {
            path: "/srv/secret/place/models/m/1/model.onnx".into(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("m/1/model.onnx"), "{}", s.message());
        assert!(!s.message().contains("/srv/secret"), "{}", s.message());
    }

    #[test]
    fn long_messages_are_bounded() {
        let m = bounded("é".repeat(10_000));
        assert!(m.len() <= 4096 + 4, "{}", m.len());
    }
}
