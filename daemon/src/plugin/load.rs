//! Loading one plugin file: stage a private copy, map it, check its header and layout, call
//! its registration, self-check its kernels.

use super::{error::LoadError, library::Library};
use crate::device::LoadedDevice;
use abi_stable::abi_stability::abi_checking::{
    check_layout_compatibility_with_globals, CheckingGlobals,
};
use abi_stable::library::{abi_header_from_raw_library, LibraryError, RawLibrary};
use abi_stable::{sabi_types::VersionNumber, StableAbi};
use opreg_sdk::host::CallFrame;
use opreg_sdk::module::{
    BlasRegistration, KernelRegistration, PluginAbi, PluginModRef, QuantizerRegistration,
    ABI_SYMBOL,
};
use sha2::{Digest, Sha256};
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

/// A plugin mapped into the daemon, with everything it registered.
pub struct LoadedPlugin {
    pub name: String,
    pub version: String,
    pub description: String,
    /// `MAJOR.MINOR` of the SDK ABI the plugin was built with.
    pub abi_version: String,
    pub source: PathBuf,
    pub sha256: String,
    /// Registry generation that loaded it.
    pub generation: u64,
    pub kernels: Vec<KernelRegistration>,
    pub backends: Vec<BlasRegistration>,
    pub quantizers: Vec<QuantizerRegistration>,
    /// Device providers, with their pools (drained back to the provider when this drops).
    pub devices: Vec<Arc<LoadedDevice>>,
    /// Declared last so it drops last: the objects above hold function pointers into it.
    pub library: Arc<Library>,
}

impl LoadedPlugin {
    pub fn loaded_copy(&self) -> &Path {
        self.library.copy_path()
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LoadedPlugin({} {} gen {})",
            self.name, self.version, self.generation
        )
    }
}

static COPY_SEQ: AtomicU64 = AtomicU64::new(0);

/// Opens a plugin file, refusing anything but a regular file. Opened non-blocking first: a
/// FIFO or device given as a plugin path would otherwise block the loader until a writer
/// appears.
fn open_regular_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// The sha256 (hex) of the file at `path`, read in chunks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = open_regular_file(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Loads the plugin at `path` for registry generation `generation`, staging its copy in
/// `stage_dir`; `config` gives the configuration text for a plugin name (its `init` input).
pub fn load(
    path: &Path,
    stage_dir: &Path,
    generation: u64,
    config: &dyn Fn(&str) -> String,
) -> Result<LoadedPlugin, LoadError> {
    // The hash is of the copy's bytes, so it describes what is mapped even if the source file
    // is replaced meanwhile.
    let (copy, sha256) = stage_copy(path, stage_dir, generation)?;
    if let Err(reason) = check_elf(&copy) {
        let _ = std::fs::remove_file(&copy);
        return Err(LoadError::NotALibrary {
            path: path.to_owned(),
            reason,
        });
    }
    let raw = match RawLibrary::load_at(&copy) {
        Ok(raw) => raw,
        Err(e) => {
            let _ = std::fs::remove_file(&copy);
            return Err(LoadError::NotALibrary {
                path: path.to_owned(),
                reason: describe_open_error(&e, &copy, path),
            });
        }
    };
    let mut library = Library::new(raw, copy);
    let abi = check_abi_version(path, &library)?;
    let module = init_module(path, &library, abi.minor)?;

    // Copied out at once: the plugin's `RString`s free through its own code, so none may
    // outlive the library (a failed load below unmaps it before the locals drop).
    let (name, version, description) = {
        let info = (module.info())();
        (
            info.name.to_string(),
            info.version.to_string(),
            info.description.to_string(),
        )
    };
    library.set_name(&name);
    if name.is_empty() || name.len() > 128 {
        return Err(LoadError::Invalid {
            path: path.to_owned(),
            what: format!("plugin name {name:?} must have 1 to 128 characters"),
        });
    }
    // `init` before anything is registered; from here on, whatever happens, the plugin's
    // `shutdown` runs before the library is unmapped.
    (module.init())(config(&name).as_str().into())
        .into_result()
        .map_err(|e| LoadError::Init {
            path: path.to_owned(),
            plugin: name.clone(),
            message: e.message.to_string(),
        })?;
    library.set_shutdown(module.shutdown());
    let library = Arc::new(library);
    let registration =
        opreg_sdk::module::collect(module.register()).map_err(|e| LoadError::Register {
            path: path.to_owned(),
            plugin: name.clone(),
            message: e.message.to_string(),
        })?;
    let devices = registration
        .devices
        .into_iter()
        .map(|d| LoadedDevice::new(d.provider).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LoadError::Register {
            path: path.to_owned(),
            plugin: name.clone(),
            message: format!("device provider: {}", e.message),
        })?;
    let plugin = LoadedPlugin {
        version,
        description,
        abi_version: format!("{}.{}", abi.major, abi.minor),
        source: path.to_owned(),
        sha256,
        generation,
        kernels: registration.kernels,
        backends: registration.backends,
        quantizers: registration.quantizers,
        devices,
        library,
        name,
    };
    validate(&plugin)?;
    self_test(&plugin)?;
    Ok(plugin)
}

/// Runs the self-test of everything the plugin registered; the first failure refuses it.
fn self_test(p: &LoadedPlugin) -> Result<(), LoadError> {
    let failed = |what: String, e: opreg_sdk::PluginError| LoadError::SelfTest {
        path: p.source.clone(),
        plugin: p.name.clone(),
        what,
        message: e.message.to_string(),
    };
    for k in &p.kernels {
        k.factory
            .self_test()
            .into_result()
            .map_err(|e| failed(format!("kernel {}", kernel_label(&k.desc)), e))?;
    }
    for b in &p.backends {
        let plugin = p.name.as_str();
        let log = |level, msg: &str| super::log_from_plugin(plugin, level, msg);
        let frame = CallFrame::new(0, b.desc.device, Some(&b.backend), &log);
        frame
            .with_context(|ctx| b.backend.self_test(ctx).into_result())
            .map_err(|e| failed(format!("BLAS backend '{}'", b.desc.name), e))?;
    }
    for q in &p.quantizers {
        q.quantizer
            .self_test()
            .into_result()
            .map_err(|e| failed(format!("quantizer '{}'", q.desc.name), e))?;
    }
    for d in &p.devices {
        let kind = d.info.kind;
        d.provider
            .self_test()
            .into_result()
            .map_err(|e| failed(format!("device provider for '{}'", kind.name()), e))?;
    }
    Ok(())
}

/// `domain::Op(since..end)@device` for messages.
pub fn kernel_label(d: &opreg_sdk::KernelDesc) -> String {
    let domain = if d.domain.is_empty() {
        "ai.onnx"
    } else {
        d.domain.as_str()
    };
    let end = if d.end_version == opreg_sdk::OPEN_END {
        String::from("")
    } else {
        d.end_version.to_string()
    };
    format!(
        "{domain}::{}({}..{end})@{}",
        d.op_type, d.since_version, d.device
    )
}

/// Copies the plugin file at `path` to a unique file under `stage_dir`, in chunks, hashing
/// what it copies; returns the copy and its sha256. Memory stays one buffer whatever the
/// file's size: reading the whole file first cost a transient buffer of its size per load
/// (51 MB for a release onnx-ops) and left the process's RSS a step higher.
fn stage_copy(
    path: &Path,
    stage_dir: &Path,
    generation: u64,
) -> Result<(PathBuf, String), LoadError> {
    use std::io::{Read, Write};
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let stage_err = |source| LoadError::Stage {
        path: path.to_owned(),
        source,
    };
    let mut source = open_regular_file(path).map_err(read_err)?;
    std::fs::create_dir_all(stage_dir).map_err(stage_err)?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("so");
    let seq = COPY_SEQ.fetch_add(1, Ordering::Relaxed);
    let copy = stage_dir.join(format!("{stem}.g{generation}.{seq}.{ext}"));
    let result = (|| {
        let mut out = std::fs::File::create(&copy).map_err(stage_err)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(e)),
            };
            let chunk = buf.get(..n).unwrap_or_default();
            hasher.update(chunk);
            out.write_all(chunk).map_err(stage_err)?;
        }
        out.flush().map_err(stage_err)?;
        Ok(hex::encode(hasher.finalize()))
    })();
    match result {
        Ok(sha256) => Ok((copy, sha256)),
        Err(e) => {
            let _ = std::fs::remove_file(&copy);
            Err(e)
        }
    }
}

/// Reads the plugin's ABI version symbol and refuses another major or a newer minor before
/// `abi_stable` sees any of its layouts. A plugin without the symbol predates it and is
/// taken as 1.0 (its layouts are then checked as before).
fn check_abi_version(path: &Path, library: &Library) -> Result<PluginAbi, LoadError> {
    let raw = library.raw().ok_or_else(|| LoadError::NotALibrary {
        path: path.to_owned(),
        reason: "library already closed".into(),
    })?;
    // SAFETY: the symbol, when present, is the address of a `PluginAbi` static written by
    // `export_plugin!`; it is copied out while the library is mapped.
    let abi = match unsafe { raw.get::<*const PluginAbi>(ABI_SYMBOL) } {
        Ok(symbol) if !symbol.is_null() => unsafe { **symbol },
        _ => PluginAbi { major: 1, minor: 0 },
    };
    let host = PluginAbi::CURRENT;
    if host.accepts(abi) {
        return Ok(abi);
    }
    Err(if abi.major != host.major {
        LoadError::AbiMajor {
            path: path.to_owned(),
            expected: format!("{}.{}", host.major, host.minor),
            found: format!("{}.{}", abi.major, abi.minor),
            expected_major: host.major,
        }
    } else {
        LoadError::AbiMinor {
            path: path.to_owned(),
            major: abi.major,
            plugin_minor: abi.minor,
            host_minor: host.minor,
        }
    })
}

/// Checks the plugin's layouts and initialises its root module.
///
/// `abi_stable` checks an implementation against an interface and lets the implementation have
/// *more* fields than the interface (a newer library in an older host), not fewer. A plugin of
/// this daemon's minor is checked that way. A plugin of an older minor has fewer: its own
/// layout is then the interface and this daemon's the implementation, which checks exactly
/// the contract of a minor — every type the plugin knows is unchanged, and what this daemon
/// has beyond it is appended after `last_prefix_field` (methods the host calls on an older
/// plugin's objects then answer with their default bodies). That check runs with its own
/// checking globals, dropped after it, so the plugin's layouts never enter `abi_stable`'s
/// process-wide cache, whose entries would point into the plugin after it is unloaded.
fn init_module(path: &Path, library: &Library, minor: u32) -> Result<PluginModRef, LoadError> {
    let raw = library.raw().ok_or_else(|| LoadError::NotALibrary {
        path: path.to_owned(),
        reason: "library already closed".into(),
    })?;
    // SAFETY: the header is only used while `library` is alive (it is dropped with it, and the
    // module's functions are only called through objects that hold the library's Arc).
    let header = unsafe { abi_header_from_raw_library(raw) }.map_err(|_| LoadError::NoHeader {
        path: path.to_owned(),
    })?;
    let header = header.upgrade().map_err(|e| LoadError::AbiStableMismatch {
        path: path.to_owned(),
        reason: one_line(&e.to_string()),
    })?;
    let library_version = VersionNumber::new(header.version_strings()).ok();
    let loaded = if minor < opreg_sdk::ABI_MINOR
        && library_version.is_some_and(|v| v.major == opreg_sdk::ABI_MAJOR)
    {
        let layout = header.layout().ok_or_else(|| LoadError::Layout {
            path: path.to_owned(),
            detail: "the plugin exports no root-module layout to check".into(),
        })?;
        let globals = CheckingGlobals::new();
        check_layout_compatibility_with_globals(
            layout,
            <PluginModRef as StableAbi>::LAYOUT,
            &globals,
        )
        .map_err(|e| LoadError::Layout {
            path: path.to_owned(),
            // abi_stable's "Expected" is the plugin's side here.
            detail: format!(
                "checked as ABI {}.{minor} against this daemon's {}.{}: {}",
                opreg_sdk::ABI_MAJOR,
                opreg_sdk::ABI_MAJOR,
                opreg_sdk::ABI_MINOR,
                layout_summary(&e.to_string())
            ),
        })?;
        // SAFETY: checked just above, in the direction that fits an older minor.
        unsafe { header.init_root_module_with_unchecked_layout::<PluginModRef>() }
    } else {
        // Also how another major is refused, by abi_stable's version check.
        header.init_root_module::<PluginModRef>()
    };
    loaded.map_err(|e| match e {
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadError::AbiMajor {
            path: path.to_owned(),
            expected: expected_version.to_string(),
            found: actual_version.to_string(),
            expected_major: opreg_sdk::ABI_MAJOR,
        },
        LibraryError::AbiInstability(detail) => LoadError::Layout {
            path: path.to_owned(),
            detail: layout_summary(&detail.to_string()),
        },
        other => LoadError::RootModule {
            path: path.to_owned(),
            detail: one_line(&other.to_string()),
        },
    })
}

fn validate(p: &LoadedPlugin) -> Result<(), LoadError> {
    let invalid = |what: String| LoadError::Invalid {
        path: p.source.clone(),
        what,
    };
    for k in &p.kernels {
        let d = &k.desc;
        if d.op_type.is_empty() {
            return Err(invalid("a kernel has an empty op_type".into()));
        }
        if d.since_version < 1 || d.end_version < d.since_version {
            return Err(invalid(format!(
                "kernel {}: opset range {}..={} is empty or starts below 1",
                kernel_label(d),
                d.since_version,
                d.end_version
            )));
        }
    }
    Ok(())
}

/// Checks that every part of the file the dynamic loader maps lies inside the file. The
/// loader itself does not: it maps a truncated library's segments past the end of the file,
/// and the first touch of such a page kills the process with SIGBUS (a half-copied plugin
/// would take the daemon down). Files that are not ELF are left to the loader's own error.
fn check_elf(file: &Path) -> Result<(), String> {
    use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
    use std::io::Read;
    let io = |e: std::io::Error| format!("cannot read the staged copy: {e}");
    let mut f = std::fs::File::open(file).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || magic != *b"\x7fELF" {
        return Ok(());
    }
    // Reads only the parts the parser asks for (headers), not the whole file.
    let data = object::ReadCache::new(f);
    let elf = ElfFile64::<object::Endianness, _>::parse(&data)
        .map_err(|e| format!("malformed ELF file: {e}"))?;
    let endian = elf.endian();
    let headers = elf
        .elf_header()
        .program_headers(endian, &data)
        .map_err(|e| format!("malformed ELF program headers: {e}"))?;
    for (i, ph) in headers.iter().enumerate() {
        let end = ph.p_offset(endian).checked_add(ph.p_filesz(endian));
        if end.is_none_or(|end| end > len) {
            return Err(format!(
                "segment {i} ends past the end of the file ({len} bytes): truncated or still being copied"
            ));
        }
    }
    Ok(())
}

fn describe_open_error(e: &LibraryError, copy: &Path, original: &Path) -> String {
    let msg = match e {
        LibraryError::OpenError { err, .. } => err.to_string(),
        other => other.to_string(),
    };
    one_line(&msg.replace(&*copy.to_string_lossy(), &original.to_string_lossy()))
}

/// abi_stable explains a layout mismatch with a dump of every type layout on the path to it
/// (kilobytes; too long for a gRPC status). Keep the type that differs and why.
fn layout_summary(detail: &str) -> String {
    let flat = one_line(detail);
    let why = flat.rsplit("Error:").next().unwrap_or("").trim();
    // The innermost type that differs is described last.
    let ty = flat
        .rsplit("Layout of expected type:")
        .next()
        .and_then(|s| s.split("type:").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("a type");
    let why: String = why.chars().take(200).collect();
    format!("{ty} differs: {why} (was it built against another opreg-sdk?)")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
