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
    /// Token that management calls (LoadPlugin, UnloadPlugin) must present as
    /// `authorization: Bearer <token>`. Without one, they are accepted only on a loopback
    /// listener.
    #[arg(long, env = "OPREG_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Threads of the compute pool (0: one per core).
    #[arg(long, env = "OPREG_THREADS")]
    pub threads: Option<usize>,
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
}

/// The settings in force.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub plugin_dirs: Vec<PathBuf>,
    pub model_repo: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub threads: usize,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8001";

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
        Ok(Config {
            listen: cli.listen.or(file.listen).unwrap_or(default_listen),
            plugin_dirs: if cli.plugin_dirs.is_empty() {
                file.plugin_dirs.into_iter().map(rel).collect()
            } else {
                cli.plugin_dirs
            },
            model_repo: cli.model_repo.or(file.model_repo.map(rel)),
            runtime_dir: cli.runtime_dir.or(file.runtime_dir.map(rel)),
            admin_token: cli
                .admin_token
                .or(file.admin_token)
                .filter(|t| !t.is_empty()),
            threads: cli.threads.or(file.threads).unwrap_or(0),
        })
    }
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
            "listen = \"127.0.0.1:9000\"\nplugin_dirs = [\"plugins\"]\nthreads = 3\nadmin_token = \"s3cret\"\n",
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
    fn defaults_bind_loopback() {
        let c = Config::resolve(Cli::default()).expect("config");
        assert!(c.listen.ip().is_loopback());
        assert!(c.plugin_dirs.is_empty());
    }
}
