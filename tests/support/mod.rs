//! Test support: start the real `opregd` binary on an ephemeral port, find the built plugins,
//! and open gRPC clients.
//!
//! The plugins and the daemon are built by `cargo build --workspace` (the README's test
//! command does it before `cargo test`); a missing artifact fails with that instruction.

pub mod onnx;
pub mod reference;

use opreg_proto::{
    inference::grpc_inference_service_client::GrpcInferenceServiceClient,
    opreg::v1::registry_client::RegistryClient,
};
use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};
use tonic::transport::Channel;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The folder holding this build's binaries and cdylibs (`target/debug`).
pub fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/debug/deps/<test>-<hash> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("artifact folder")
        .to_path_buf()
}

fn require(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (the README's test command does)",
        path.display()
    );
    path
}

/// The built plugin `libopreg_<name>.so`.
pub fn plugin(name: &str) -> PathBuf {
    require(artifacts().join(format!(
        "{}opreg_{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )))
}

/// The committed file that is named like a plugin but is not a shared library.
pub fn not_a_library() -> PathBuf {
    require(workspace().join("plugins/mock-not-a-library/libopreg_mock_not_a_library.so"))
}

/// The third-party example plugin, built outside the workspace.
pub fn third_party_plugin() -> PathBuf {
    let dir = workspace().join("examples/third-party-plugin/target/debug");
    let path = dir.join(format!(
        "{}opreg_example_clamp{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --manifest-path examples/third-party-plugin/Cargo.toml` (the README's test command does)",
        path.display()
    );
    path
}

/// The plugin built against the frozen ABI 1.0 SDK (`sdk/compat/plugin-1.0`), outside the
/// workspace.
pub fn compat_plugin() -> PathBuf {
    let path = workspace().join(format!(
        "sdk/compat/plugin-1.0/target/debug/{}opreg_compat_v1{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --manifest-path sdk/compat/plugin-1.0/Cargo.toml` (the README's test command does)",
        path.display()
    );
    path
}

/// A temporary plugin folder holding `files`: hard links where the file system allows (the
/// daemon stages its own private copy of each anyway, and a copy per test daemon cost CI
/// hundreds of megabytes), copies otherwise. A test that changes a plugin in this folder must
/// replace the file (write elsewhere, then rename), never write into it: a write through a
/// hard link would change the build in `target/`.
pub fn plugin_dir(files: &[PathBuf]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in files {
        let to = dir.path().join(f.file_name().expect("file name"));
        if std::fs::hard_link(f, &to).is_err() {
            std::fs::copy(f, &to).expect("copy plugin");
        }
    }
    dir
}

/// A running daemon; killed (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _runtime: Option<tempfile::TempDir>,
}

/// How to start a daemon.
#[derive(Default)]
pub struct Options {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Use the daemon's default runtime folder instead of a test-owned one.
    pub default_runtime_dir: bool,
    /// The listen address (default `127.0.0.1:0`); the tests connect over loopback anyway.
    pub listen: Option<String>,
}

impl Daemon {
    /// Starts `opregd --listen 127.0.0.1:0 <args>` and waits for `listening on ADDR`.
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with(Options {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        })
    }

    pub fn start_with(opts: Options) -> Daemon {
        let bin = require(artifacts().join(format!("opregd{}", std::env::consts::EXE_SUFFIX)));
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg(opts.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .args(&opts.args);
        // Tests run daemons in parallel: each gets its own metrics port unless it asks.
        if !opts.args.iter().any(|a| a == "--metrics-listen") {
            cmd.arg("--metrics-listen").arg("127.0.0.1:0");
        }
        if !opts.args.iter().any(|a| a == "--http-listen") {
            cmd.arg("--http-listen").arg("127.0.0.1:0");
        }
        let runtime = if opts.default_runtime_dir {
            None
        } else {
            let d = tempfile::tempdir().expect("runtime dir");
            cmd.arg("--runtime-dir").arg(d.path());
            Some(d)
        };
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn opregd");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut buf = String::new();
                while r.read_line(&mut buf).map(|n| n > 0).unwrap_or(false) {
                    eprint!("[opregd] {buf}");
                    log.lock().expect("log").push_str(&buf);
                    buf.clear();
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if let Some(addr) = line.trim().strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                line.clear();
            }
            let mut rest = String::new();
            let _ = r.read_to_string(&mut rest);
        });
        let mut daemon = Daemon {
            child: Some(child),
            addr: "0.0.0.0:0".parse().expect("addr"),
            log,
            _runtime: runtime,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => {
                let mut a: SocketAddr = addr.parse().expect("listening address");
                // A wildcard listener is reached over loopback.
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                daemon.addr = a
            }
            Err(_) => {
                let status = daemon
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "opregd did not print 'listening on' (exit: {status:?}); log:\n{}",
                    daemon.log()
                );
            }
        }
        daemon
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Waits until the log contains `needle` (logs are written asynchronously).
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never contained {needle:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Resident memory of the daemon, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// A `kB` line of the daemon's `/proc/PID/status` (`VmRSS`, `VmSize`, ...).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    /// Whether the process is still running (not exited, not killed by a signal).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL, no chance to clean up (crash tests).
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("child");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("opregd did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn registry(&self) -> RegistryClient<Channel> {
        RegistryClient::connect(self.url())
            .await
            .expect("connect registry")
    }

    /// Every model the repository knows (`RepositoryIndex`, not only the ready ones).
    pub async fn index(
        &self,
    ) -> Vec<opreg_proto::inference::repository_index_response::ModelIndex> {
        self.inference()
            .await
            .repository_index(opreg_proto::inference::RepositoryIndexRequest::default())
            .await
            .expect("index")
            .into_inner()
            .models
    }

    pub async fn inference(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::connect(self.url())
            .await
            .expect("connect inference")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Killed outright: a graceful stop would wait for this test's own client connections,
        // whose tasks cannot run while the test's runtime is blocked here. Graceful shutdown
        // has its own test.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// sha256 of a file, hex.
pub fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("read")))
}

/// f32 values as little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes as f32 values.
pub fn f32_values(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A daemon serving the workspace's operator and CPU BLAS plugins from a copy of them, with
/// `repo` as its model repository and `extra` flags; keep the folder alive with the daemon.
pub fn start_serving(repo: &Path, extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let plugins = plugin_dir(&[plugin("onnx_ops"), plugin("blas_cpu")]);
    let mut args = vec![
        "--plugin-dir",
        plugins.path().to_str().expect("utf8"),
        "--model-repo",
        repo.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    (Daemon::start(&args), plugins)
}

/// Runs the Python test client `tests/python/<script>` with `args` and returns the JSON line it
/// prints last; `None` (the test is skipped) without a Python interpreter outside CI.
pub fn run_python(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Option<String> {
    let python = python()?;
    let out = Command::new(python)
        .arg(workspace().join("tests/python").join(script))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout.lines().last().expect("json line").to_string())
}

/// The registry generation whose plugins computed an inference response (its
/// `opreg_generation` parameter).
pub fn generation_of(r: &opreg_proto::inference::ModelInferResponse) -> Option<u64> {
    use opreg_proto::inference::infer_parameter::ParameterChoice;
    match r
        .parameters
        .get("opreg_generation")?
        .parameter_choice
        .as_ref()?
    {
        ParameterChoice::Int64Param(g) => u64::try_from(*g).ok(),
        _ => None,
    }
}

/// A `RepositoryModelLoad` request carrying `bytes` as version 1 of `name`.
pub fn load_request(
    name: &str,
    bytes: Vec<u8>,
) -> opreg_proto::inference::RepositoryModelLoadRequest {
    use opreg_proto::inference as pb;
    let mut parameters = std::collections::HashMap::new();
    parameters.insert(
        "file:1/model.onnx".to_string(),
        pb::ModelRepositoryParameter {
            parameter_choice: Some(pb::model_repository_parameter::ParameterChoice::BytesParam(
                bytes,
            )),
        },
    );
    pb::RepositoryModelLoadRequest {
        model_name: name.into(),
        parameters,
        ..Default::default()
    }
}

/// The Python interpreter with `tritonclient[grpc]`, from `OPREG_TEST_PYTHON` (the README's
/// test command creates the venv and sets it). Outside CI a missing interpreter skips the test
/// with a message; in CI it fails.
pub fn python() -> Option<String> {
    match std::env::var("OPREG_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ if std::env::var_os("CI").is_some() => {
            panic!("OPREG_TEST_PYTHON must name a python with tritonclient[grpc] in CI")
        }
        _ => {
            eprintln!("SKIPPED: set OPREG_TEST_PYTHON to a python with tritonclient[grpc] (scripts/test does)");
            None
        }
    }
}

/// A private CA with a server certificate (for `localhost` and 127.0.0.1) and a client
/// certificate it signed, written as PEM files into a temporary folder.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};
        let dir = tempfile::tempdir().expect("pki dir");
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("write pem");
        };
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "opreg test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        write("ca.pem", ca_cert.pem());
        let leaf = |name: &str, sans: Vec<SanType>| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.subject_alt_names = sans;
            p.distinguished_name.push(DnType::CommonName, name);
            let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        leaf(
            "server",
            vec![
                SanType::DnsName("localhost".try_into().expect("dns")),
                SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            ],
        );
        leaf(
            "client",
            vec![SanType::DnsName("client.test".try_into().expect("dns"))],
        );
        TestPki { dir }
    }

    /// A file of the PKI: `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).expect("read pem")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
