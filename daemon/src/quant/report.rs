//! The report of a quantization run: JSON (written next to the model and returned over gRPC)
//! and one SVG histogram per calibrated tensor with the chosen threshold marked.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt::Write as _};

/// Everything one run decided and measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub model: String,
    /// The float version quantized.
    pub source_version: u64,
    /// The version written (none when the daemon has no repository folder).
    pub version: Option<u64>,
    pub strategy: String,
    pub plugin: String,
    pub options: BTreeMap<String, String>,
    pub calibration: Calibration,
    pub tensors: Vec<TensorReport>,
    /// What pruning did, per weight.
    #[serde(default)]
    pub pruning: Vec<super::prune::Layer>,
    /// The strategy's figures per layer (node), e.g. `sensitivity_db`.
    pub layers: Vec<LayerReport>,
    pub nodes: Nodes,
    /// Error of the quantized model against the float one on held-out samples.
    pub error: Error,
    /// Top-1 accuracy on the held-out samples, when they carry labels.
    pub accuracy: Option<Accuracy>,
    /// What the host noted (fallbacks, clipped values).
    pub notes: Vec<String>,
    /// What the strategy said about its choices.
    pub strategy_notes: String,
    /// SVG plots, relative to the report.
    pub plots: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Calibration {
    pub samples: u64,
    pub heldout_samples: usize,
    pub seconds: f64,
    /// Bytes the statistics held (constant in the number of samples).
    pub statistics_bytes: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorReport {
    pub name: String,
    /// `activation`, `weight`, `bias` or `dynamic`.
    pub role: String,
    pub dtype: String,
    pub axis: Option<usize>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<i32>,
    /// Observed range (activations).
    pub min: Option<f32>,
    pub max: Option<f32>,
    /// The strategy's figures: `threshold`, `kl`, ...
    pub figures: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerReport {
    pub node: String,
    pub figures: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Nodes {
    pub total: usize,
    pub quantized: Vec<String>,
    /// Kept in f32.
    pub excluded: Vec<String>,
    /// Computed in a narrower float type: node → `float16` or `bfloat16`.
    #[serde(default)]
    pub lowered: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Error {
    /// Signal-to-quantization-noise ratio in dB (`null`: identical outputs).
    pub sqnr_db: Option<f64>,
    pub max_abs: f64,
    pub cosine: f64,
    pub samples: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Accuracy {
    pub float: f64,
    pub quantized: f64,
}

impl Report {
    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data with finite floats does not fail; the fallback keeps the
        // caller's error path simple.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A summary table (`opreg report`).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model {} v{} -> v{}  strategy {} ({})",
            self.model,
            self.source_version,
            self.version.map_or("-".into(), |v| v.to_string()),
            self.strategy,
            self.plugin
        );
        let _ = writeln!(
            s,
            "calibration: {} samples, {} held out, {:.2} s, {} bytes of statistics",
            self.calibration.samples,
            self.calibration.heldout_samples,
            self.calibration.seconds,
            self.calibration.statistics_bytes
        );
        let _ = writeln!(
            s,
            "nodes: {} of {} quantized, {} lowered to f16/bf16, {} kept in f32",
            self.nodes.quantized.len(),
            self.nodes.total,
            self.nodes.lowered.len(),
            self.nodes.excluded.len()
        );
        let _ = writeln!(
            s,
            "error vs f32 on {} held-out samples: SQNR {} dB, max abs {:.4e}, cosine {:.6}",
            self.error.samples,
            self.error
                .sqnr_db
                .map_or("inf".into(), |v| format!("{v:.2}")),
            self.error.max_abs,
            self.error.cosine
        );
        if let Some(a) = &self.accuracy {
            let _ = writeln!(
                s,
                "top-1 accuracy: f32 {:.2} %, quantized {:.2} %",
                a.float * 100.0,
                a.quantized * 100.0
            );
        }
        let _ = writeln!(
            s,
            "\n{:<40} {:<10} {:<6} {:>12} {:>6} {:>12} {:>12} {:>10}",
            "tensor", "role", "type", "scale", "zp", "min", "max", "threshold"
        );
        for t in &self.tensors {
            let scale = match t.scales.as_slice() {
                [one] => format!("{one:.4e}"),
                many => format!("{} ch", many.len()),
            };
            let zp = match t.zero_points.as_slice() {
                [one] => one.to_string(),
                _ => "-".into(),
            };
            let opt = |v: Option<f32>| v.map_or("-".into(), |v| format!("{v:.4}"));
            let _ = writeln!(
                s,
                "{:<40} {:<10} {:<6} {:>12} {:>6} {:>12} {:>12} {:>10}",
                clip(&t.name, 40),
                t.role,
                t.dtype,
                scale,
                zp,
                opt(t.min),
                opt(t.max),
                t.figures
                    .get("threshold")
                    .map_or("-".into(), |v| format!("{v:.4}"))
            );
        }
        if !self.pruning.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<40} {:<10} {:>9} {:>10}",
                "pruned weight", "method", "sparsity", "effect"
            );
            for p in &self.pruning {
                let _ = writeln!(
                    s,
                    "{:<40} {:<10} {:>8.1}% {:>10}",
                    clip(&p.weight, 40),
                    p.method,
                    p.sparsity * 100.0,
                    p.effect
                );
            }
        }
        if !self.layers.is_empty() {
            let _ = writeln!(s, "\n{:<40} {:>16}", "layer", "sensitivity dB");
            for l in &self.layers {
                let _ = writeln!(
                    s,
                    "{:<40} {:>16}",
                    clip(&l.node, 40),
                    l.figures
                        .get("sensitivity_db")
                        .map_or("-".into(), |v| format!("{v:.2}"))
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        if !self.strategy_notes.is_empty() {
            let _ = writeln!(s, "strategy: {}", self.strategy_notes);
        }
        s
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

/// A file name for `tensor`'s plot.
pub fn plot_name(index: usize, tensor: &str) -> String {
    let safe: String = tensor
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("histograms/{index:03}_{safe}.svg")
}

/// An SVG histogram of |x| (`counts` over `[0, max]`) on a log scale, with `threshold` marked.
///
/// Written by hand rather than with a plotting crate: `plotters` lays out its axis text with a
/// font backend (system fonts, or a font file bundled into the daemon), and this chart is a few
/// dozen rectangles, one line and four labels.
pub fn histogram_svg(tensor: &str, counts: &[u64], max: f32, threshold: Option<f64>) -> String {
    const W: f64 = 640.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 50.0;
    const BOTTOM: f64 = 40.0;
    const TOP: f64 = 30.0;
    const BARS: usize = 128;
    let group = counts.len().div_ceil(BARS).max(1);
    let bars: Vec<u64> = counts.chunks(group).map(|c| c.iter().sum()).collect();
    let peak = bars.iter().copied().max().unwrap_or(0) as f64;
    let scale_y = |c: u64| {
        if peak <= 0.0 {
            0.0
        } else {
            (1.0 + c as f64).ln() / (1.0 + peak).ln()
        }
    };
    let plot_w = W - LEFT - 10.0;
    let plot_h = H - BOTTOM - TOP;
    let bar_w = plot_w / bars.len().max(1) as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="13">|x| of {} (log counts)</text>"#,
        xml(tensor)
    );
    for (i, &c) in bars.iter().enumerate() {
        let h = scale_y(c) * plot_h;
        let _ = write!(
            s,
            r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="#4878a8"/>"##,
            LEFT + i as f64 * bar_w,
            TOP + plot_h - h,
            bar_w.max(0.5),
            h
        );
    }
    let _ = write!(
        s,
        r#"<line x1="{LEFT}" y1="{y}" x2="{x2}" y2="{y}" stroke="black"/>"#,
        y = TOP + plot_h,
        x2 = LEFT + plot_w
    );
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="{y}">0</text><text x="{x}" y="{y}" text-anchor="end">{max:.4}</text>"#,
        y = TOP + plot_h + 15.0,
        x = LEFT + plot_w
    );
    if let Some(t) = threshold.filter(|t| t.is_finite() && max > 0.0) {
        let x = LEFT + (t / f64::from(max)).clamp(0.0, 1.0) * plot_w;
        let _ = write!(
            s,
            r##"<line x1="{x:.2}" y1="{TOP}" x2="{x:.2}" y2="{y}" stroke="#c03030" stroke-width="2"/><text x="{x:.2}" y="{ty}" fill="#c03030" text-anchor="middle">threshold {t:.4}</text>"##,
            y = TOP + plot_h,
            ty = TOP - 2.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// An SVG bar chart of each layer's sensitivity: the output SQNR (dB) when only that layer is
/// quantized; the shortest bars are the layers a mixed plan keeps in float.
pub fn sensitivity_svg(layers: &[(String, f64)]) -> String {
    const W: f64 = 640.0;
    const ROW: f64 = 16.0;
    const LEFT: f64 = 220.0;
    let h = 40.0 + ROW * layers.len() as f64;
    let top = layers
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11"><text x="10" y="18" font-size="13">output SQNR (dB) with only this layer in int8</text>"#
    );
    for (i, (name, db)) in layers.iter().enumerate() {
        let y = 30.0 + ROW * i as f64;
        let v = if db.is_finite() { db.max(0.0) } else { top };
        let w = v / top * (W - LEFT - 60.0);
        let _ = write!(
            s,
            r##"<text x="{x}" y="{ty}" text-anchor="end">{}</text><rect x="{LEFT}" y="{y}" width="{w:.2}" height="{bh}" fill="#4878a8"/><text x="{vx:.2}" y="{ty}">{db:.1}</text>"##,
            xml(name),
            x = LEFT - 6.0,
            ty = y + ROW - 5.0,
            bh = ROW - 3.0,
            vx = LEFT + w + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_plot_marks_the_threshold_where_it_lies() {
        let svg = histogram_svg("conv<1>", &[5, 0, 3, 1], 4.0, Some(2.0));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("conv&lt;1&gt;"));
        assert_eq!(svg.matches("<rect").count(), 4);
        // The threshold at half the range: halfway across the plot.
        let x = 50.0 + 0.5 * (640.0 - 50.0 - 10.0);
        assert!(svg.contains(&format!("x1=\"{x:.2}\"")), "{svg}");
        assert!(plot_name(3, "a/b:c").ends_with("003_a_b_c.svg"));
    }
}
