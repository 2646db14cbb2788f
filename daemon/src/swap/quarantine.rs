//! Fault isolation: a plugin whose kernels keep failing on served models (panics, internal
//! errors; not refusals of bad input) is quarantined. Its kernels leave the kernel index, so
//! each node falls back to the next provider that has a kernel for it; the plugin stays
//! loaded, listed as quarantined, until a new build is swapped in or `ReleaseQuarantine`.
//!
//! Each failing request already got its own `INTERNAL` status; the quarantine protects the
//! requests after it. Plans are re-compiled in the background right away, so requests do
//! not pay for re-binding.

use crate::{app::App, registry::UnloadError};
use std::sync::Arc;

/// Counts a fault against `plugin`; at the threshold, quarantines it in the background.
pub fn on_fault(app: &Arc<App>, plugin: &str) {
    if !app.registry.record_fault(plugin) {
        return;
    }
    let app = app.clone();
    let plugin = plugin.to_string();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = set(&app, &plugin, true) {
            tracing::error!(plugin = %plugin, "cannot quarantine: {e}");
        }
    });
}

/// Quarantines `plugin` (`on`) or lifts its quarantine, then re-compiles every ready model
/// version against the new generation. Blocking.
pub fn set(app: &App, plugin: &str, on: bool) -> Result<u64, UnloadError> {
    let generation = app.registry.set_quarantine(plugin, on)?;
    if on {
        tracing::error!(
            plugin,
            generation,
            "plugin quarantined after repeated kernel faults: its kernels are skipped and nodes fall back to the next provider (lift with a new build or ReleaseQuarantine)"
        );
    } else {
        tracing::info!(plugin, generation, "plugin quarantine lifted");
    }
    let snapshot = app.registry.snapshot();
    for m in app.repo.ready() {
        match app.compute.install(|| m.prepare(&snapshot)) {
            Ok(p) => m.install(p),
            // Requests to this version now fail with the reason (no other provider).
            Err(e) => {
                tracing::error!(model = %m.name, version = m.version, "no plan without the quarantined plugin: {e}")
            }
        }
    }
    Ok(generation)
}
