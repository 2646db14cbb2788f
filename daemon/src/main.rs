//! opregd: serves ONNX models over gRPC; every kernel, BLAS backend and quantizer is a plugin.
//! The binary is a thin edge over the `opregd` library (flags, logging, signals).

use opregd::{app, config, plugin, server, swap};

use anyhow::Context;
use clap::Parser;
use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let cli = config::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object per line, the request's span (model, request id) included.
        config::LogFormat::Json => logs.json().with_current_span(true).init(),
        config::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let config = config::Config::resolve(cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("opreg-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config, started))
}

async fn run(config: config::Config, started: Instant) -> anyhow::Result<()> {
    let app = Arc::new(app::App::new(config)?);
    if let Some(repo) = &app.config.model_repo {
        std::fs::create_dir_all(repo)
            .with_context(|| format!("creating model repository {}", repo.display()))?;
        tracing::info!(repo = %repo.display(), "model repository");
        let removed = app.repo.remove_stale_uploads();
        if removed > 0 {
            tracing::info!(removed, "removed temporary files of interrupted uploads");
        }
    }
    load_plugin_dirs(&app).await?;
    load_models(&app).await?;
    let listener = tokio::net::TcpListener::bind(app.config.listen)
        .await
        .with_context(|| format!("binding {}", app.config.listen))?;
    let addr = listener.local_addr()?;
    if let Some(metrics_addr) = app.config.metrics_listen {
        let l = opregd::metrics::bind(metrics_addr).await?;
        let app = Arc::downgrade(&app);
        tokio::spawn(async move {
            if let Err(e) = opregd::metrics::serve(app, l).await {
                tracing::error!("metrics listener stopped: {e}");
            }
        });
    }
    if let Some(http_addr) = app.config.http_listen {
        let l = tokio::net::TcpListener::bind(http_addr)
            .await
            .with_context(|| format!("binding the HTTP listener {http_addr} (--http-listen)"))?;
        let bound = l.local_addr()?;
        tracing::info!(addr = %bound, "KServe v2 REST on http://{bound}/v2");
        let policy = opregd::server::auth::Policy::for_listener(&app.config, bound);
        let app = Arc::downgrade(&app);
        tokio::spawn(async move {
            if let Err(e) = opregd::server::http::serve(app, policy, l).await {
                tracing::error!("HTTP listener stopped: {e}");
            }
        });
    }
    let shutdown = shutdown_signal()?;
    app.set_ready(true);
    let snapshot = app.registry.snapshot();
    let kernels: usize = snapshot.plugins.values().map(|p| p.kernels.len()).sum();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    {
        // Tests and scripts wait for this line; stdout carries nothing else.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    tracing::info!(
        %addr,
        plugins = snapshot.plugins.len(),
        kernels,
        compute_threads = app.compute.threads(),
        "serving after {elapsed_ms:.1} ms"
    );
    drop(snapshot);
    // Background work holds the app weakly: it ends when the app does, at shutdown.
    if app.config.swap.watch {
        tokio::spawn(swap::watch::run(
            Arc::downgrade(&app),
            app.config.swap.settle,
        ));
    }
    if app.config.model_control == config::ModelControl::Poll && app.config.model_repo.is_some() {
        tokio::spawn(opregd::repo::poll::run(
            Arc::downgrade(&app),
            app.config.poll_interval,
        ));
    }
    // Replaced builds past their rollback grace period are released even when no swap
    // happens for a while.
    tokio::spawn({
        let app = Arc::downgrade(&app);
        async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                match app.upgrade() {
                    Some(app) => app.registry.expire_previous(),
                    None => return,
                }
            }
        }
    });
    server::serve(app.clone(), listener, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads every plugin of the configured folders in one registry generation. A broken plugin is
/// logged and skipped; a missing folder is a configuration error.
async fn load_plugin_dirs(app: &Arc<app::App>) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in &app.config.plugin_dirs {
        files.extend(
            plugin::scan_dir(dir)
                .with_context(|| format!("reading plugin folder {}", dir.display()))?,
        );
    }
    let app2 = app.clone();
    let results = tokio::task::spawn_blocking(move || app2.registry.load_all(&files)).await?;
    for (path, r) in results {
        match r {
            Ok(p) => tracing::info!(
                plugin = %p.name,
                version = %p.version,
                abi = %p.abi_version,
                kernels = p.kernels.len(),
                backends = p.backends.len(),
                quantizers = p.quantizers.len(),
                source = %path.display(),
                "plugin loaded"
            ),
            Err(e) => tracing::error!("refused plugin: {e}"),
        }
    }
    Ok(())
}

/// Loads every model of the repository. A model that fails is logged and listed as
/// UNAVAILABLE with the reason; the others serve.
async fn load_models(app: &Arc<app::App>) -> anyhow::Result<()> {
    for name in app.repo.on_disk()? {
        let a = app.clone();
        let n = name.clone();
        match app
            .compute
            .run(move || a.repo.load(&n, Default::default(), &a.registry))
            .await?
        {
            Ok(versions) => tracing::info!(model = %name, ?versions, "model loaded"),
            Err(e) => tracing::error!(model = %name, "model not loaded: {e}"),
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal sent right after `listening on` is not lost.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        })
    }
}
