//! `opreg bench MODEL`: the model run in this process (no daemon, no network) as opregd would
//! run it — the standard passes, compile with fusions, the plugins of a plugin folder — on
//! inputs made from its declared shapes or given as `.npy` files; reports median and p90
//! latency, throughput and peak RSS, and with `--profile` where the time goes per node and per
//! operator. Compare with `opreg perf` against a daemon to see what serving adds.

use anyhow::{bail, Context};
use opregd::{
    app::RuntimeDir,
    exec::ComputePool,
    feeds::{self, Fill, Shapes},
    graph::{self, RunControl},
    registry::Registry,
    repo::{Feeds, ModelSettings},
};
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The ONNX file (external data next to it is read).
    pub model: PathBuf,
    /// Plugin folder (files `libopreg_*.so`); repeatable. Default: `plugins` next to this
    /// executable (what `scripts/serve` fills).
    #[arg(long = "plugin-dir", env = "OPREG_PLUGIN_DIR", value_delimiter = ':')]
    pub plugin_dirs: Vec<PathBuf>,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The value of a symbolic first dimension.
    #[arg(short = 'b', long, default_value_t = 1)]
    pub batch: usize,
    /// NAME:D1xD2x...: the whole shape of an input (needed where a dimension past the first
    /// is symbolic, e.g. a sequence length).
    #[arg(long = "shape", value_name = "NAME:DIMS")]
    pub shapes: Vec<String>,
    /// NAME=FILE.npy: this array as the input instead of made-up data (floats spread over
    /// [-1, 1), integers zero).
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    pub inputs: Vec<String>,
    /// Untimed runs first.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed runs: at least this many, and more until --min-seconds have passed.
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// Keep running until this much time has passed (at most 10 000 runs).
    #[arg(long, default_value_t = 2.0)]
    pub min_seconds: f64,
    /// Also time each node over this many extra runs and print where the time goes.
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Devices in order of preference, as a model's `backends` (e.g. `cuda,cpu`; the CPU is
    /// always the last fallback).
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    pub backends: Vec<String>,
    /// PLUGIN:KEY=VALUE: a line of that plugin's configuration, as `[plugin_config.PLUGIN]`
    /// in the daemon's config file (e.g. `cuda:tf32=true`); repeatable.
    #[arg(long = "plugin-config", value_name = "PLUGIN:KEY=VALUE")]
    pub plugin_config: Vec<String>,
}

const MAX_RUNS: usize = 10_000;
const PROFILE_RUNS: usize = 31;

/// The default plugin folder: `plugins` beside the executable.
fn default_plugin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.join("plugins");
    dir.is_dir().then_some(dir)
}

/// `NAME:DIMS` options as whole shapes.
fn parse_shapes(specs: &[String]) -> anyhow::Result<HashMap<String, Vec<usize>>> {
    specs
        .iter()
        .map(|s| {
            let (name, dims) = s
                .rsplit_once(':')
                .with_context(|| format!("--shape {s:?}: expected NAME:D1xD2x..."))?;
            let dims = dims
                .split('x')
                .filter(|d| !d.is_empty())
                .map(|d| d.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("--shape {s:?}: dimensions are whole numbers"))?;
            Ok((name.to_string(), dims))
        })
        .collect()
}

/// The `q` quantile (0..=1) of sorted `v`, nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The process's peak resident set (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn plugin_files(args: &BenchArgs) -> anyhow::Result<Vec<PathBuf>> {
    let dirs = if args.plugin_dirs.is_empty() {
        vec![default_plugin_dir().context(
            "no plugin folder: pass --plugin-dir (scripts/serve fills target/release/plugins)",
        )?]
    } else {
        args.plugin_dirs.clone()
    };
    let mut files = Vec::new();
    for dir in &dirs {
        files.extend(
            opregd::plugin::scan_dir(dir)
                .with_context(|| format!("reading plugin folder {}", dir.display()))?,
        );
    }
    if files.is_empty() {
        bail!("no plugins (libopreg_*.so) in {dirs:?}");
    }
    Ok(files)
}

/// The inputs: given `.npy` files, the rest made up from the declared shapes.
fn inputs(model: &graph::Model, args: &BenchArgs) -> anyhow::Result<Feeds> {
    let mut given: Feeds = HashMap::new();
    for spec in &args.inputs {
        let (name, path) = spec
            .split_once('=')
            .with_context(|| format!("--input {spec:?}: expected NAME=FILE.npy"))?;
        if !model.inputs.iter().any(|i| i.name == name) {
            bail!("--input {spec:?}: the model has no input '{name}'");
        }
        let t = opregd::quant::data::read_npy(Path::new(path))?;
        given.insert(name.to_string(), Arc::new(t));
    }
    let shapes = Shapes {
        batch: args.batch,
        other: None,
        given: parse_shapes(&args.shapes)?,
    };
    let missing: Vec<graph::IoSpec> = model
        .inputs
        .iter()
        .filter(|i| !given.contains_key(&i.name))
        .cloned()
        .collect();
    let mut feeds = feeds::synthesize(&missing, &shapes, Fill::Spread, usize::MAX)?;
    feeds.extend(given);
    Ok(feeds)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let stage = RuntimeDir::create(None)?;
    let mut configs: BTreeMap<String, String> = BTreeMap::new();
    for spec in &args.plugin_config {
        let (plugin, line) = spec
            .split_once(':')
            .filter(|(_, l)| l.contains('='))
            .with_context(|| format!("--plugin-config {spec:?}: expected PLUGIN:KEY=VALUE"))?;
        let text = configs.entry(plugin.to_string()).or_default();
        text.push_str(line);
        text.push('\n');
    }
    let registry = Registry::new(stage.path().join("plugins"), configs);
    let mut plugins = Vec::new();
    for (path, r) in registry.load_all(&plugin_files(&args)?) {
        let p = r.with_context(|| format!("loading plugin {}", path.display()))?;
        plugins.push(format!("{} {}", p.name, p.version));
    }
    let started = Instant::now();
    let bytes = graph::ModelBytes::read(&args.model, u64::MAX)
        .with_context(|| format!("reading {}", args.model.display()))?;
    // Owned: initializers decode as slices of the file's buffer instead of copies of it (a
    // third copy of the weights at the peak otherwise), and their pages go back as they are
    // copied, as the daemon imports.
    let mut model = graph::import_owned(bytes, args.model.parent())
        .with_context(|| format!("importing {}", args.model.display()))?;
    graph::optimize(&mut model)?;
    // This thread computes (as ONNX Runtime's caller does), so that a run's time is the
    // model's and not a hand-off to a sleeping worker and back.
    let pool = ComputePool::on_this_thread(threads)?;
    let snapshot = registry.snapshot();
    // As a model's `backends` in its config.toml: the CPU is always the last fallback.
    let devices = ModelSettings {
        backends: args.backends.iter().map(|b| b.trim().to_string()).collect(),
        ..Default::default()
    }
    .devices()
    .context("--backends")?;
    // As the daemon compiles a version read from a file: weights a kernel packed are freed.
    let (plan, _freed) = pool.install(|| {
        graph::compile_owned(&mut model, snapshot, &devices, 256 << 20, &mut |_, _| {})
    })?;
    let load_seconds = started.elapsed().as_secs_f64();
    // Where nodes run (folded ones excluded), and the copies between devices per run.
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    for p in plan.placement.iter().filter(|p| !p.folded) {
        *placed.entry(p.device.to_string()).or_default() += 1;
    }
    let feeds = inputs(&model, &args)?;
    let shapes: BTreeMap<&str, Vec<usize>> = feeds
        .iter()
        .map(|(n, t)| (n.as_str(), t.shape().to_vec()))
        .collect();
    let once = || pool.install(|| graph::run(&plan, feeds.clone()));
    for _ in 0..args.warmup {
        once()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    let min = Duration::from_secs_f64(args.min_seconds.max(0.0));
    while times.len() < args.runs.max(1) || (start.elapsed() < min && times.len() < MAX_RUNS) {
        let t = Instant::now();
        once()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let (median, p90) = (quantile(&times, 0.5), quantile(&times, 0.9));
    let profile = if args.profile {
        Some(profile(&pool, &plan, &feeds)?)
    } else {
        None
    };
    let rss = peak_rss();
    if args.json {
        let mut out = serde_json::json!({
            "model": args.model.display().to_string(),
            "plugins": plugins,
            "threads": threads,
            "batch": args.batch,
            "inputs": shapes,
            "load_seconds": load_seconds,
            "runs": times.len(),
            "median_ms": median,
            "p90_ms": p90,
            "min_ms": times.first(),
            "mean_ms": total / times.len() as f64,
            "peak_rss_bytes": rss,
            "placement": placed,
            "copies": plan.copies.len(),
        });
        if let Some(p) = &profile {
            out["profile"] = serde_json::json!(p
                .steps
                .iter()
                .map(|s| serde_json::json!({"step": s.label, "kernel": s.kernel, "ms": s.ms}))
                .collect::<Vec<_>>());
        }
        println!("{out}");
        return Ok(());
    }
    println!(
        "{}: {threads} threads, inputs {shapes:?}, plugins {}",
        args.model.display(),
        plugins.join(", ")
    );
    println!(
        "load + passes + compile {:.2} s; {} runs after {} warm-up",
        load_seconds,
        times.len(),
        args.warmup
    );
    if placed.keys().any(|d| d != "cpu") {
        println!(
            "nodes per device {placed:?}, {} copies per run",
            plan.copies.len()
        );
    }
    println!(
        "median {median:.3} ms   p90 {p90:.3} ms   min {:.3} ms   {:.1} infer/s   peak RSS {}",
        times[0],
        args.batch.max(1) as f64 * 1e3 / median,
        rss.map_or("?".into(), |b| format!(
            "{:.0} MiB",
            b as f64 / (1 << 20) as f64
        )),
    );
    if let Some(p) = profile {
        p.print();
    }
    Ok(())
}

struct StepRow {
    label: String,
    kernel: String,
    op: String,
    ms: f64,
}

struct Profile {
    steps: Vec<StepRow>,
    total_ms: f64,
}

/// Median time per step over [`PROFILE_RUNS`] profiled runs (after the timed ones, so warm):
/// on a shared machine a mean of a few runs took one preempted run's stall for a slow node
/// (a Concat "taking" 3 ms one time and 1 ms the next).
fn profile(pool: &ComputePool, plan: &graph::Plan, feeds: &Feeds) -> anyhow::Result<Profile> {
    let info = plan.steps();
    // Per step, its time in each run (a step inside a loop sums its iterations).
    let mut runs = vec![Vec::with_capacity(PROFILE_RUNS); info.len()];
    for _ in 0..PROFILE_RUNS {
        let (_, steps) =
            pool.install(|| graph::run_profiled(plan, feeds.clone(), &RunControl::unbounded()))?;
        let mut this = vec![0f64; info.len()];
        for t in steps {
            if let Some(slot) = this.get_mut(t.step) {
                *slot += t.seconds * 1e3;
            }
        }
        for (r, ms) in runs.iter_mut().zip(this) {
            r.push(ms);
        }
    }
    let ms = runs.into_iter().map(|mut r| {
        r.sort_by(f64::total_cmp);
        quantile(&r, 0.5)
    });
    let steps: Vec<StepRow> = info
        .into_iter()
        .zip(ms)
        .map(|(s, ms)| StepRow {
            // Labels are `'name' (Op)`; the operator is what is in the last parentheses.
            op: s
                .label
                .rsplit_once(" (")
                .map_or(s.label.as_str(), |(_, op)| op.trim_end_matches(')'))
                .to_string(),
            label: s.label,
            kernel: s.kernel,
            ms,
        })
        .collect();
    let total_ms = steps.iter().map(|s| s.ms).sum();
    Ok(Profile { steps, total_ms })
}

impl Profile {
    fn print(&self) {
        let share = |ms: f64| 100.0 * ms / self.total_ms.max(f64::MIN_POSITIVE);
        let mut by_op: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        for s in &self.steps {
            let e = by_op.entry(&s.op).or_default();
            e.0 += s.ms;
            e.1 += 1;
        }
        let mut ops: Vec<_> = by_op.into_iter().collect();
        ops.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        println!(
            "\nper operator (median of {PROFILE_RUNS} profiled runs per node, {:.3} ms in steps):",
            self.total_ms
        );
        println!(
            "{:>24} {:>6} {:>10} {:>7}",
            "operator", "nodes", "ms", "share"
        );
        for (op, (ms, n)) in ops {
            println!("{op:>24} {n:>6} {ms:>10.3} {:>6.1}%", share(ms));
        }
        let mut top: Vec<&StepRow> = self.steps.iter().collect();
        top.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        println!("\nslowest nodes:");
        println!("{:>10} {:>7}  {:<40} kernel", "ms", "share", "node");
        for s in top.into_iter().take(20) {
            println!(
                "{:>10.3} {:>6.1}%  {:<40} {}",
                s.ms,
                share(s.ms),
                s.label,
                s.kernel
            );
        }
    }
}
