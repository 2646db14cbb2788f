//! Configuration: flags, then `OPREG_*` environment variables, then a TOML file, then
//! defaults — the first that sets a value wins.

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// opregd: serves ONNX models over gRPC (KServe v2); every kernel, BLAS backend and
/// quantizer is a plugin.
#[derive(Parser, Debug, Default)]
#[command(version, about)]
pub struct Cli {
    /// gRPC address. `127.0.0.1:0` picks a free port; the bound address is printed on stdout
    /// as `listening on ADDR`.
    #[arg(long, env = "OPREG_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Folder of plugins to load at start-up (files named `libopreg_*.so`). Repeatable; in the
    /// environment, separate folders with ':'.
    #[arg(long = "plugin-dir", env = "OPREG_PLUGIN_DIR", value_delimiter = ':')]
    pub plugin_dirs: Vec<PathBuf>,
    /// Model repository folder (`<repo>/<model>/<version>/model.onnx`).
    #[arg(long, env = "OPREG_MODEL_REPO")]
    pub model_repo: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long, env = "OPREG_CONFIG")]
    pub config: Option<PathBuf>,
    /// Folder for private copies of loaded plugins (default: a new folder under the system
    /// temporary folder, removed at shutdown).
    #[arg(long, env = "OPREG_RUNTIME_DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Token that mutating calls (model load/unload, plugin load/unload) must present as
    /// `authorization: Bearer <token>`. Without one, they are accepted only on a loopback
    /// listener.
    #[arg(long, env = "OPREG_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Threads of the compute pool (0: one per core).
    #[arg(long, env = "OPREG_THREADS")]
    pub threads: Option<usize>,
    /// Let idle compute workers sleep during a run instead of polling for its next parallel
    /// loop (less CPU burnt on a shared machine; each loop then waits for a wake-up).
    #[arg(long, env = "OPREG_NO_SPIN")]
    pub no_spin: bool,
    /// Require the admin token for inference and read-only calls too (health stays open).
    #[arg(long, env = "OPREG_REQUIRE_TOKEN_FOR_INFERENCE")]
    pub require_token_for_inference: bool,
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "OPREG_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OPREG_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: require clients to present a certificate they signed (mutual TLS).
    #[arg(long, env = "OPREG_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Swap in (or load) a new or replaced plugin file in a plugin folder once it is
    /// completely written, verified like SwapPlugin.
    #[arg(long, env = "OPREG_WATCH_PLUGINS")]
    pub watch_plugins: bool,
    /// How long a plugin file's size and modification time must stay unchanged before the
    /// watcher takes it (default 2000).
    #[arg(long, env = "OPREG_WATCH_SETTLE_MS")]
    pub watch_settle_ms: Option<u64>,
    /// How long a replaced plugin build stays loaded for RollbackPlugin, in seconds (default
    /// 600; 0: released at once).
    #[arg(long, env = "OPREG_SWAP_GRACE_S")]
    pub swap_grace_s: Option<f64>,
    /// A verified swap accepts outputs with |new - old| <= abs + rel * |old| (default 1e-4);
    /// the watcher uses this, a SwapPlugin call may give its own.
    #[arg(long, env = "OPREG_SWAP_ABS_TOLERANCE")]
    pub swap_abs_tolerance: Option<f64>,
    /// The relative part of the swap tolerance (default 1e-3).
    #[arg(long, env = "OPREG_SWAP_REL_TOLERANCE")]
    pub swap_rel_tolerance: Option<f64>,
    /// Kernel faults (panics, internal errors) on served models within the quarantine window
    /// that quarantine a plugin (default 5; 0: never).
    #[arg(long, env = "OPREG_QUARANTINE_FAULTS")]
    pub quarantine_faults: Option<usize>,
    /// The quarantine window in seconds (default 60).
    #[arg(long, env = "OPREG_QUARANTINE_WINDOW_S")]
    pub quarantine_window_s: Option<f64>,
    /// HTTP address of the Prometheus metrics (`GET /metrics`), or `off` (default
    /// 127.0.0.1:8002, Triton's metrics port, loopback only).
    #[arg(long, env = "OPREG_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Log lines as `text` (default) or `json` (one object per line, with the request's
    /// model and id on lines logged while serving it).
    #[arg(long, env = "OPREG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// HTTP address of the KServe v2 REST protocol, or `off` (default 127.0.0.1:8000,
    /// Triton's HTTP port, loopback only).
    #[arg(long, env = "OPREG_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// How models come and go (Triton's modes): `explicit` (default) loads the repository at
    /// start-up and takes RepositoryModelLoad/Unload calls; `poll` also loads, reloads and
    /// unloads model folders that change on disk; `none` loads at start-up only and refuses
    /// load/unload calls.
    #[arg(long, env = "OPREG_MODEL_CONTROL_MODE", value_enum)]
    pub model_control_mode: Option<ModelControl>,
    /// Seconds between repository scans in poll mode (default 15, Triton's).
    #[arg(long, env = "OPREG_REPOSITORY_POLL_SECS")]
    pub repository_poll_secs: Option<f64>,
    #[command(flatten)]
    pub limits: LimitFlags,
}

/// Limits on what a request or a model may cost (see [`Limits`] for the defaults).
#[derive(clap::Args, Debug, Default)]
pub struct LimitFlags {
    /// Largest tensor (input, output or intermediate value) in bytes.
    #[arg(long, env = "OPREG_MAX_TENSOR_BYTES")]
    pub max_tensor_bytes: Option<u64>,
    /// Largest total of a request's live values (inputs, intermediates, outputs) in bytes.
    #[arg(long, env = "OPREG_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<u64>,
    /// Largest total of the gRPC messages and REST bodies of 1 MiB or more being received at
    /// once, in bytes (each reserved whole when its header arrives); a message past it is
    /// refused with RESOURCE_EXHAUSTED (REST: 429).
    #[arg(long, env = "OPREG_MAX_RECEIVING_BYTES")]
    pub max_receiving_bytes: Option<u64>,
    /// Seconds a message counted against --max-receiving-bytes may go without a byte before
    /// its call fails with DEADLINE_EXCEEDED and its share is given back; 0: no limit.
    #[arg(long, env = "OPREG_RECEIVE_IDLE_TIMEOUT_S")]
    pub receive_idle_timeout_s: Option<f64>,
    /// Largest total of the constants folded at model load, in bytes; nodes past it run at
    /// request time instead.
    #[arg(long, env = "OPREG_MAX_FOLDED_BYTES")]
    pub max_folded_bytes: Option<u64>,
    /// Largest model file (uploaded or on disk, with its external data), in bytes.
    #[arg(long, env = "OPREG_MAX_MODEL_BYTES")]
    pub max_model_bytes: Option<u64>,
    /// Model loads that may run at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "OPREG_MAX_CONCURRENT_LOADS")]
    pub max_concurrent_loads: Option<usize>,
    /// Models whose last load failed that the index remembers (oldest forgotten first).
    #[arg(long, env = "OPREG_MAX_FAILED_MODELS")]
    pub max_failed_models: Option<usize>,
    /// Deadline of an inference request without a client deadline (`grpc-timeout`), in
    /// seconds; 0: none. A client's shorter deadline wins.
    #[arg(long, env = "OPREG_INFER_TIMEOUT_S")]
    pub infer_timeout_s: Option<f64>,
}

/// The limits in force. Every size that comes from a client or a model is checked against one
/// of these, so no request or model can take the daemon's memory or its compute pool.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_tensor_bytes: u64,
    pub max_request_bytes: u64,
    pub max_receiving_bytes: u64,
    pub receive_idle_timeout_s: f64,
    pub max_folded_bytes: u64,
    pub max_model_bytes: u64,
    pub max_concurrent_loads: usize,
    pub max_failed_models: usize,
    pub infer_timeout_s: f64,
}

impl Default for Limits {
    /// Sized for a server that runs real models (a ResNet-50 request holds ~100 MB of live
    /// values) and stays inside a machine of a few GiB: one value up to 2 GiB (the gRPC
    /// message limit), 4 GiB live per request, 4 GiB of messages being received (two of the
    /// largest at once), 256 MiB of folded constants per model.
    fn default() -> Self {
        Limits {
            max_tensor_bytes: 2 << 30,
            max_request_bytes: 4 << 30,
            max_receiving_bytes: 4 << 30,
            receive_idle_timeout_s: 30.0,
            max_folded_bytes: 256 << 20,
            max_model_bytes: 2 << 30,
            max_concurrent_loads: 2,
            max_failed_models: 256,
            infer_timeout_s: 300.0,
        }
    }
}

impl Limits {
    /// The server's inference deadline, if any.
    pub fn infer_timeout(&self) -> Option<std::time::Duration> {
        (self.infer_timeout_s > 0.0)
            .then(|| std::time::Duration::try_from_secs_f64(self.infer_timeout_s).ok())
            .flatten()
    }

    /// How long a counted message may go without a byte, if limited.
    pub fn receive_idle_timeout(&self) -> Option<std::time::Duration> {
        (self.receive_idle_timeout_s > 0.0)
            .then(|| std::time::Duration::try_from_secs_f64(self.receive_idle_timeout_s).ok())
            .flatten()
    }

    /// The timeout of a call whose client asked for `client` (its `grpc-timeout`): the
    /// earlier of the client's and the server's.
    pub fn call_timeout(&self, client: Option<std::time::Duration>) -> Option<std::time::Duration> {
        match (client, self.infer_timeout()) {
            (Some(c), Some(s)) => Some(c.min(s)),
            (c, s) => c.or(s),
        }
    }

    fn merge(mut self, f: LimitFlags) -> anyhow::Result<Self> {
        macro_rules! take {
            ($($k:ident),*) => { $( if let Some(v) = f.$k { self.$k = v; } )* };
        }
        take!(
            max_tensor_bytes,
            max_request_bytes,
            max_receiving_bytes,
            receive_idle_timeout_s,
            max_folded_bytes,
            max_model_bytes,
            max_concurrent_loads,
            max_failed_models,
            infer_timeout_s
        );
        anyhow::ensure!(
            self.max_receiving_bytes > 0,
            "max_receiving_bytes must be at least 1"
        );
        anyhow::ensure!(
            self.receive_idle_timeout_s >= 0.0 && self.receive_idle_timeout_s.is_finite(),
            "receive_idle_timeout_s must be a number of seconds >= 0"
        );
        anyhow::ensure!(
            self.max_concurrent_loads > 0,
            "max_concurrent_loads must be at least 1"
        );
        anyhow::ensure!(
            self.infer_timeout_s >= 0.0 && self.infer_timeout_s.is_finite(),
            "infer_timeout_s must be a number of seconds >= 0"
        );
        Ok(self)
    }
}

/// TLS for the gRPC listener.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With a client CA, clients must present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The TOML file: the same settings as the flags.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    pub model_repo: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub threads: Option<usize>,
    #[serde(default)]
    pub no_spin: bool,
    #[serde(default)]
    pub require_token_for_inference: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    #[serde(default)]
    pub watch_plugins: bool,
    pub watch_settle_ms: Option<u64>,
    pub swap_grace_s: Option<f64>,
    pub swap_abs_tolerance: Option<f64>,
    pub swap_rel_tolerance: Option<f64>,
    pub quarantine_faults: Option<usize>,
    pub quarantine_window_s: Option<f64>,
    pub metrics_listen: Option<String>,
    pub http_listen: Option<String>,
    pub model_control_mode: Option<ModelControl>,
    pub repository_poll_secs: Option<f64>,
    #[serde(default)]
    pub limits: Limits,
    /// `[plugin_config.<plugin name>]`: a table handed to that plugin's `init` as TOML text.
    #[serde(default)]
    pub plugin_config: std::collections::BTreeMap<String, toml::Table>,
}

/// The settings in force.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where the Prometheus metrics are served (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Where the KServe v2 REST protocol is served (`None`: off).
    pub http_listen: Option<SocketAddr>,
    pub model_control: ModelControl,
    /// Between repository scans in poll mode.
    pub poll_interval: std::time::Duration,
    pub plugin_dirs: Vec<PathBuf>,
    pub model_repo: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub threads: usize,
    /// Idle compute workers sleep during a run (see `exec::with_workers_awake`).
    pub no_spin: bool,
    pub require_token_for_inference: bool,
    pub tls: Option<Tls>,
    pub limits: Limits,
    /// Plugin swaps: the folder watcher and the rollback grace period.
    pub swap: SwapSettings,
    /// Configuration text per plugin name (TOML), for the plugin's `init`.
    pub plugin_config: std::collections::BTreeMap<String, String>,
}

/// The log format (`--log-format`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How models come and go (`--model-control-mode`, Triton's names).
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// The repository loads at start-up; nothing changes afterwards (load/unload refused).
    None,
    /// The repository loads at start-up, then RepositoryModelLoad/Unload change it. (Triton's
    /// explicit mode loads nothing at start-up; opreg loads the repository, as users of its
    /// README demo and earlier releases expect.)
    #[default]
    Explicit,
    /// As explicit, and model folders that change on disk are (re)loaded or unloaded.
    Poll,
}

/// Plugin swap settings.
#[derive(Debug, Clone)]
pub struct SwapSettings {
    /// Watch the plugin folders (`--watch-plugins`).
    pub watch: bool,
    /// How long a file must stay unchanged before the watcher takes it.
    pub settle: std::time::Duration,
    /// How long a replaced build stays loaded for rollback.
    pub grace: std::time::Duration,
    /// The default tolerance of a verified swap: absolute and relative.
    pub abs_tolerance: f64,
    pub rel_tolerance: f64,
    /// Faults within a window that quarantine a plugin (`None`: never).
    pub quarantine: Option<(usize, std::time::Duration)>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8001";
/// Triton's metrics port, on loopback: metrics are opt-in beyond the machine.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:8002";
/// Triton's HTTP port, on loopback.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8000";

/// An address flag's value: `HOST:PORT`, or `off`/`none`.
fn optional_addr(
    flag: &str,
    value: Option<String>,
    default: &str,
) -> anyhow::Result<Option<SocketAddr>> {
    match value.as_deref().unwrap_or(default) {
        "off" | "none" => Ok(None),
        a => Ok(Some(a.parse::<SocketAddr>().with_context(|| {
            format!("{flag} {a}: not an address (HOST:PORT) or 'off'")
        })?)),
    }
}

/// A verified swap's default tolerance, absolute and relative: loose enough for a kernel that
/// sums in another order or uses FMA (f32 round-off over thousands of terms), tight enough
/// that a wrong kernel shows.
pub const DEFAULT_SWAP_TOLERANCE: (f64, f64) = (1e-4, 1e-3);

impl Config {
    /// Merges the command line (with its environment variables) over the file it names.
    pub fn resolve(cli: Cli) -> anyhow::Result<Config> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        // Relative paths in the file are relative to the file, not to the working folder.
        let base = cli
            .config
            .as_deref()
            .and_then(Path::parent)
            .unwrap_or(Path::new(""));
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let default_listen: SocketAddr = DEFAULT_LISTEN.parse()?;
        let tls = match (
            cli.tls_cert.or(file.tls_cert.map(rel)),
            cli.tls_key.or(file.tls_key.map(rel)),
            cli.tls_client_ca.or(file.tls_client_ca.map(rel)),
        ) {
            (Some(cert), Some(key), client_ca) => Some(Tls {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            (None, None, Some(_)) => {
                anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key")
            }
            _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key"),
        };
        let admin_token = cli
            .admin_token
            .or(file.admin_token)
            .filter(|t| !t.is_empty());
        let require_token_for_inference =
            cli.require_token_for_inference || file.require_token_for_inference;
        anyhow::ensure!(
            !require_token_for_inference || admin_token.is_some(),
            "--require-token-for-inference needs --admin-token"
        );
        let metrics_listen = optional_addr(
            "--metrics-listen",
            cli.metrics_listen.or(file.metrics_listen),
            DEFAULT_METRICS_LISTEN,
        )?;
        let http_listen = optional_addr(
            "--http-listen",
            cli.http_listen.or(file.http_listen),
            DEFAULT_HTTP_LISTEN,
        )?;
        let poll_secs = cli
            .repository_poll_secs
            .or(file.repository_poll_secs)
            .unwrap_or(15.0);
        anyhow::ensure!(
            poll_secs.is_finite() && (0.05..=86400.0).contains(&poll_secs),
            "--repository-poll-secs {poll_secs}: must be within 0.05..=86400"
        );
        Ok(Config {
            listen: cli.listen.or(file.listen).unwrap_or(default_listen),
            metrics_listen,
            http_listen,
            model_control: cli
                .model_control_mode
                .or(file.model_control_mode)
                .unwrap_or_default(),
            poll_interval: std::time::Duration::from_secs_f64(poll_secs),
            plugin_dirs: if cli.plugin_dirs.is_empty() {
                file.plugin_dirs.into_iter().map(rel).collect()
            } else {
                cli.plugin_dirs
            },
            model_repo: cli.model_repo.or(file.model_repo.map(rel)),
            runtime_dir: cli.runtime_dir.or(file.runtime_dir.map(rel)),
            admin_token,
            threads: cli.threads.or(file.threads).unwrap_or(0),
            no_spin: cli.no_spin || file.no_spin,
            require_token_for_inference,
            tls,
            limits: file.limits.merge(cli.limits)?,
            swap: SwapSettings {
                watch: cli.watch_plugins || file.watch_plugins,
                settle: std::time::Duration::from_millis(
                    cli.watch_settle_ms.or(file.watch_settle_ms).unwrap_or(2000),
                ),
                grace: {
                    let s = cli.swap_grace_s.or(file.swap_grace_s).unwrap_or(600.0);
                    anyhow::ensure!(
                        s.is_finite() && (0.0..=1e7).contains(&s),
                        "--swap-grace-s must be between 0 and 1e7 seconds, not {s}"
                    );
                    std::time::Duration::from_secs_f64(s)
                },
                abs_tolerance: tolerance(
                    cli.swap_abs_tolerance.or(file.swap_abs_tolerance),
                    DEFAULT_SWAP_TOLERANCE.0,
                    "--swap-abs-tolerance",
                )?,
                rel_tolerance: tolerance(
                    cli.swap_rel_tolerance.or(file.swap_rel_tolerance),
                    DEFAULT_SWAP_TOLERANCE.1,
                    "--swap-rel-tolerance",
                )?,
                quarantine: {
                    let faults = cli
                        .quarantine_faults
                        .or(file.quarantine_faults)
                        .unwrap_or(5);
                    let window = cli
                        .quarantine_window_s
                        .or(file.quarantine_window_s)
                        .unwrap_or(60.0);
                    anyhow::ensure!(
                        window.is_finite() && (0.0..=1e7).contains(&window),
                        "--quarantine-window-s must be between 0 and 1e7 seconds, not {window}"
                    );
                    (faults > 0).then(|| (faults, std::time::Duration::from_secs_f64(window)))
                },
            },
            plugin_config: file
                .plugin_config
                .into_iter()
                .map(|(name, table)| (name, table.to_string()))
                .collect(),
        })
    }
}

/// A tolerance setting: a finite number, zero or more.
fn tolerance(v: Option<f64>, default: f64, flag: &str) -> anyhow::Result<f64> {
    let v = v.unwrap_or(default);
    anyhow::ensure!(
        v.is_finite() && v >= 0.0,
        "{flag} must be a finite number, zero or more, not {v}"
    );
    Ok(v)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("opreg.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nplugin_dirs = [\"plugins\"]\nthreads = 3\nno_spin = true\nadmin_token = \"s3cret\"\n",
        )
        .expect("write");
        let cli = Cli {
            config: Some(file.clone()),
            threads: Some(5),
            ..Cli::default()
        };
        let c = Config::resolve(cli).expect("config");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.threads, 5);
        assert!(c.no_spin, "the file's no_spin");
        assert_eq!(c.plugin_dirs, vec![dir.path().join("plugins")]);
        assert_eq!(c.admin_token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("opreg.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:9000\"\n").expect("write");
        let err = Config::resolve(Cli {
            config: Some(file),
            ..Cli::default()
        })
        .expect_err("typo must be refused");
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
    }

    #[test]
    fn limits_merge_file_then_flags_and_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("opreg.toml");
        std::fs::write(
            &file,
            "[limits]\nmax_tensor_bytes = 1000\nmax_concurrent_loads = 4\nmax_receiving_bytes = 7\nreceive_idle_timeout_s = 2.5\n",
        )
        .expect("write");
        let cli = Cli {
            config: Some(file.clone()),
            limits: LimitFlags {
                max_concurrent_loads: Some(1),
                ..LimitFlags::default()
            },
            ..Cli::default()
        };
        let c = Config::resolve(cli).expect("config");
        assert_eq!(c.limits.max_tensor_bytes, 1000);
        assert_eq!(c.limits.max_concurrent_loads, 1);
        assert_eq!(
            c.limits.max_receiving_bytes, 7,
            "the file's receiving budget"
        );
        assert_eq!(
            c.limits.receive_idle_timeout(),
            Some(std::time::Duration::from_millis(2500))
        );
        assert_eq!(Limits::default().receive_idle_timeout_s, 30.0);
        assert_eq!(
            c.limits.max_request_bytes,
            Limits::default().max_request_bytes
        );
        let zero = Cli {
            limits: LimitFlags {
                max_concurrent_loads: Some(0),
                ..LimitFlags::default()
            },
            ..Cli::default()
        };
        assert!(Config::resolve(zero).is_err());
        let no_receiving = Cli {
            limits: LimitFlags {
                max_receiving_bytes: Some(0),
                ..LimitFlags::default()
            },
            ..Cli::default()
        };
        let err = Config::resolve(no_receiving).expect_err("a budget of nothing");
        assert!(
            format!("{err:#}").contains("max_receiving_bytes"),
            "{err:#}"
        );
        let negative_idle = Cli {
            limits: LimitFlags {
                receive_idle_timeout_s: Some(-1.0),
                ..LimitFlags::default()
            },
            ..Cli::default()
        };
        assert!(Config::resolve(negative_idle).is_err());
        let half_tls = Cli {
            tls_cert: Some("cert.pem".into()),
            ..Cli::default()
        };
        let err = Config::resolve(half_tls).expect_err("a cert without a key");
        assert!(format!("{err:#}").contains("--tls-key"), "{err:#}");
        let open_inference = Cli {
            require_token_for_inference: true,
            ..Cli::default()
        };
        assert!(Config::resolve(open_inference).is_err());
    }

    #[test]
    fn defaults_bind_loopback() {
        let c = Config::resolve(Cli::default()).expect("config");
        assert!(c.listen.ip().is_loopback());
        assert!(!c.no_spin, "workers poll by default");
        assert!(c.plugin_dirs.is_empty());
    }
}
