//! The deployment files under `deploy/` checked against what they deploy: every flag in a
//! container's args, the Dockerfile's CMD and every `OPREG_*` variable is one `opregd --help`
//! lists (with a value where the flag takes one); the gRPC and metrics ports in the args are
//! the declared container ports, the Service's targets, the `EXPOSE`d ports and the scrape
//! annotations; every probe is a gRPC probe on the gRPC port; the plugins the Dockerfile copies
//! are exactly the workspace's production plugin crates (no mock), under the names they build
//! to; the model repository, plugin and runtime folders are where the image and volumes put
//! them. Then a daemon started with the Deployment's args (addresses and folders moved to
//! loopback and temporary folders) loads the Dockerfile's plugins and a model laid out as the
//! manifests tell users to upload it, answers SERVING on `grpc.health.v1.Health` for every
//! probe's service name, and exports the metric the HPA scales on.

use opreg_proto::inference as pb;
use opreg_tests::{onnx::*, *};
use serde_yaml_ng::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

// ------------------------------------------------------------------------------------------
// The daemon's command line.

/// What `opregd --help` accepts: each long flag and whether it takes a value; the
/// environment variables it reads.
struct Cli {
    flags: BTreeMap<String, bool>,
    env: BTreeSet<String>,
}

fn daemon_cli() -> Cli {
    let bin = artifacts().join(format!("opregd{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    let out = Command::new(&bin)
        .arg("--help")
        .output()
        .expect("run opregd --help");
    assert!(out.status.success(), "opregd --help: {out:?}");
    let help = String::from_utf8(out.stdout).expect("utf8 help");
    let mut flags = BTreeMap::new();
    for line in help.lines().map(str::trim_start) {
        if !line.starts_with('-') {
            continue;
        }
        // `-h, --help` or `--listen <LISTEN>`
        for part in line.split(", ") {
            if let Some(rest) = part.strip_prefix("--") {
                let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                flags.insert(name.to_string(), value.trim_start().starts_with('<'));
            }
        }
    }
    let env = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_string)
        .collect();
    assert!(
        flags.contains_key("listen") && flags.contains_key("metrics-listen"),
        "help not understood:\n{help}"
    );
    Cli { flags, env }
}

/// A container's command line as flag -> value ("" for a switch); fails on anything opregd
/// does not accept.
fn parse_args(cli: &Cli, args: &[String], what: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            panic!("{what}: {arg:?} is not a flag (opregd takes no positional arguments)");
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let Some(&takes_value) = cli.flags.get(name) else {
            panic!(
                "{what}: opregd has no flag --{name}; it has {:?}",
                cli.flags.keys()
            );
        };
        let value = match (takes_value, inline) {
            (true, Some(v)) => v,
            (true, None) => match it.next() {
                Some(v) if !v.starts_with("--") => v.clone(),
                _ => panic!("{what}: --{name} needs a value"),
            },
            (false, None) => String::new(),
            (false, Some(_)) => panic!("{what}: --{name} is a switch and takes no value"),
        };
        assert!(
            out.insert(name.to_string(), value).is_none(),
            "{what}: --{name} given twice"
        );
    }
    out
}

/// The port of an address flag, which must listen on every interface (a pod is reached on its
/// own IP, never on loopback).
fn public_port(args: &BTreeMap<String, String>, flag: &str, what: &str) -> u16 {
    let v = args
        .get(flag)
        .unwrap_or_else(|| panic!("{what}: no --{flag} (the default is loopback only)"));
    let addr: SocketAddr = v
        .parse()
        .unwrap_or_else(|e| panic!("{what}: --{flag} {v}: {e}"));
    assert!(
        addr.ip().is_unspecified(),
        "{what}: --{flag} {v} is not reachable from outside the pod"
    );
    addr.port()
}

// ------------------------------------------------------------------------------------------
// The manifests.

fn deploy_dir() -> PathBuf {
    workspace().join("deploy")
}

/// Every YAML document under deploy/, with its file.
fn manifests() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read deploy/") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read manifest");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.clone(), v));
            }
        }
    }
    docs
}

fn kind(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn of_kind<'a>(docs: &'a [(PathBuf, Value)], k: &str) -> Vec<&'a Value> {
    docs.iter()
        .map(|(_, d)| d)
        .filter(|d| kind(d) == k)
        .collect()
}

fn strings(v: Option<&Value>, what: &str) -> Vec<String> {
    v.and_then(Value::as_sequence)
        .map(|s| {
            s.iter()
                .map(|a| {
                    a.as_str()
                        .unwrap_or_else(|| panic!("{what}: {a:?} is not a string"))
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The pod spec of a workload (Deployment) or runtime (ServingRuntime): where `containers`
/// and `volumes` are.
fn pod_spec(doc: &Value) -> Option<&Value> {
    match kind(doc) {
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => {
            doc.get("spec")?.get("template")?.get("spec")
        }
        "ServingRuntime" | "ClusterServingRuntime" => doc.get("spec"),
        _ => None,
    }
}

/// The pod template's annotations and labels (a ServingRuntime's pod annotations are
/// `spec.annotations`).
fn pod_meta(doc: &Value, field: &str) -> BTreeMap<String, String> {
    let m = match kind(doc) {
        "ServingRuntime" | "ClusterServingRuntime" => doc.get("spec").and_then(|s| s.get(field)),
        _ => doc
            .get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("metadata"))
            .and_then(|m| m.get(field)),
    };
    m.and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().expect("string key").to_string(),
                        v.as_str()
                            .unwrap_or_else(|| panic!("{field} value {v:?} is not a string"))
                            .to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One opregd container of a manifest.
struct Container<'a> {
    what: String,
    doc: &'a Value,
    spec: &'a Value,
    args: BTreeMap<String, String>,
    listen: u16,
    metrics: Option<u16>,
}

impl Container<'_> {
    /// `name -> containerPort`.
    fn ports(&self) -> BTreeMap<String, u16> {
        self.spec
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .map(|p| {
                let port = p
                    .get("containerPort")
                    .and_then(Value::as_u64)
                    .expect("port");
                let name = p.get("name").and_then(Value::as_str).unwrap_or("");
                (name.to_string(), u16::try_from(port).expect("u16 port"))
            })
            .collect()
    }

    /// `mountPath -> (volume, readOnly)`.
    fn mounts(&self) -> BTreeMap<String, (String, bool)> {
        self.spec
            .get("volumeMounts")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m.get("mountPath")
                        .and_then(Value::as_str)
                        .expect("mountPath")
                        .to_string(),
                    (
                        m.get("name")
                            .and_then(Value::as_str)
                            .expect("name")
                            .to_string(),
                        m.get("readOnly").and_then(Value::as_bool).unwrap_or(false),
                    ),
                )
            })
            .collect()
    }

    fn volume(&self, name: &str) -> Option<&Value> {
        pod_spec(self.doc)?
            .get("volumes")?
            .as_sequence()?
            .iter()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
    }

    fn security(&self, field: &str) -> Option<&Value> {
        self.spec
            .get("securityContext")
            .and_then(|s| s.get(field))
            .or_else(|| pod_spec(self.doc)?.get("securityContext")?.get(field))
    }
}

/// Every container running opregd: those whose image runs the Dockerfile's ENTRYPOINT (no
/// `command`) or whose command is opregd.
fn daemon_containers<'a>(cli: &Cli, docs: &'a [(PathBuf, Value)]) -> Vec<Container<'a>> {
    let mut out = Vec::new();
    for (file, doc) in docs {
        let Some(spec) = pod_spec(doc) else { continue };
        for c in spec
            .get("containers")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let what = format!(
                "{} {}/{} container {}",
                file.strip_prefix(workspace()).unwrap_or(file).display(),
                kind(doc),
                name(doc),
                c.get("name").and_then(Value::as_str).unwrap_or("?")
            );
            let command = strings(c.get("command"), &what);
            assert!(
                command.is_empty() || command == ["/usr/local/bin/opregd"],
                "{what}: command {command:?} is not opregd"
            );
            let args = parse_args(cli, &strings(c.get("args"), &what), &what);
            for e in c
                .get("env")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let n = e.get("name").and_then(Value::as_str).expect("env name");
                assert!(
                    !n.starts_with("OPREG_") || cli.env.contains(n),
                    "{what}: opregd reads no {n}; it reads {:?}",
                    cli.env
                );
            }
            let listen = public_port(&args, "listen", &what);
            let metrics = (args.get("metrics-listen").map(String::as_str) != Some("off"))
                .then(|| public_port(&args, "metrics-listen", &what));
            out.push(Container {
                what,
                doc,
                spec: c,
                args,
                listen,
                metrics,
            });
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// The Dockerfile.

struct Instruction {
    stage: usize,
    op: String,
    rest: String,
}

struct Dockerfile {
    /// `(image, alias)` of each stage.
    stages: Vec<(String, Option<String>)>,
    instructions: Vec<Instruction>,
}

impl Dockerfile {
    fn read() -> Dockerfile {
        let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("Dockerfile");
        let mut logical = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
                continue;
            }
            match t.strip_suffix('\\') {
                Some(head) => {
                    cur.push_str(head);
                    cur.push(' ');
                }
                None => {
                    cur.push_str(t);
                    logical.push(std::mem::take(&mut cur));
                }
            }
        }
        assert!(cur.is_empty(), "Dockerfile ends in a continuation");
        let mut stages = Vec::new();
        let mut instructions = Vec::new();
        for l in logical.iter().filter(|l| !l.trim().is_empty()) {
            let (op, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            let op = op.to_ascii_uppercase();
            let rest = rest.trim().to_string();
            if op == "FROM" {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let alias = match words.as_slice() {
                    [_, as_, a] if as_.eq_ignore_ascii_case("as") => Some(a.to_string()),
                    [_] => None,
                    _ => panic!("FROM {rest}: not understood"),
                };
                stages.push((words[0].to_string(), alias));
            }
            assert!(!stages.is_empty(), "{op} before FROM");
            instructions.push(Instruction {
                stage: stages.len() - 1,
                op,
                rest,
            });
        }
        Dockerfile {
            stages,
            instructions,
        }
    }

    fn last_stage(&self) -> usize {
        self.stages.len() - 1
    }

    fn all<'a>(&'a self, stage: usize, op: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.instructions
            .iter()
            .filter(move |i| i.stage == stage && i.op == op)
            .map(|i| i.rest.as_str())
    }

    /// The one `op` of a stage, in exec (JSON array) form.
    fn exec_form(&self, stage: usize, op: &str) -> Vec<String> {
        let all: Vec<&str> = self.all(stage, op).collect();
        assert_eq!(all.len(), 1, "the final stage needs exactly one {op}");
        serde_json::from_str(all[0])
            .unwrap_or_else(|e| panic!("{op} {}: not exec form (a JSON array): {e}", all[0]))
    }

    /// `COPY --from=STAGE src... dest` of the final stage: `(from, sources, dest)`.
    fn copies(&self) -> Vec<(Option<String>, Vec<String>, String)> {
        self.all(self.last_stage(), "COPY")
            .map(|rest| {
                let mut from = None;
                let mut paths = Vec::new();
                for w in rest.split_whitespace() {
                    if let Some(f) = w.strip_prefix("--from=") {
                        from = Some(f.to_string());
                    } else if !w.starts_with("--") {
                        paths.push(w.to_string());
                    }
                }
                let dest = paths.pop().expect("COPY destination");
                (from, paths, dest)
            })
            .collect()
    }
}

/// The `lib*.so` names the workspace's plugin crates build to: `(file name, crate folder)`.
fn workspace_plugins() -> BTreeMap<String, String> {
    let root: toml::Value = std::fs::read_to_string(workspace().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("workspace Cargo.toml");
    let members = root["workspace"]["members"].as_array().expect("members");
    let mut out = BTreeMap::new();
    for m in members {
        let dir = m.as_str().expect("member");
        let manifest: toml::Value =
            std::fs::read_to_string(workspace().join(dir).join("Cargo.toml"))
                .expect("member Cargo.toml")
                .parse()
                .expect("member manifest");
        let Some(lib) = manifest.get("lib") else {
            continue;
        };
        let cdylib = lib
            .get("crate-type")
            .and_then(toml::Value::as_array)
            .is_some_and(|t| t.iter().any(|t| t.as_str() == Some("cdylib")));
        if !cdylib {
            continue;
        }
        let lib_name = lib
            .get("name")
            .and_then(toml::Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                manifest["package"]["name"]
                    .as_str()
                    .expect("package name")
                    .replace('-', "_")
            });
        out.insert(
            format!(
                "{}{lib_name}{}",
                std::env::consts::DLL_PREFIX,
                std::env::consts::DLL_SUFFIX
            ),
            dir.to_string(),
        );
    }
    out
}

/// The `[[bin]]` names of the daemon crate.
fn daemon_binaries() -> BTreeSet<String> {
    let manifest: toml::Value = std::fs::read_to_string(workspace().join("daemon/Cargo.toml"))
        .expect("daemon/Cargo.toml")
        .parse()
        .expect("daemon manifest");
    manifest["bin"]
        .as_array()
        .expect("[[bin]]")
        .iter()
        .map(|b| b["name"].as_str().expect("bin name").to_string())
        .collect()
}

/// Where the Dockerfile puts the plugins (without a trailing slash), after checking that it
/// copies exactly the workspace's production plugins from the builder's release folder.
fn dockerfile_plugin_dir(df: &Dockerfile) -> String {
    let plugins = workspace_plugins();
    let production: BTreeSet<&String> = plugins
        .keys()
        .filter(|f| !f.contains("opreg_mock_"))
        .collect();
    assert!(production.len() >= 2, "no plugins found: {plugins:?}");
    let copies = df.copies();
    let mut copied = BTreeSet::new();
    let mut dest_dir = None;
    for (from, srcs, dest) in &copies {
        for src in srcs {
            let file = src.rsplit('/').next().expect("file name");
            if !(file.starts_with("libopreg_") && file.ends_with(".so")) {
                continue;
            }
            assert!(
                from.is_some() && src.contains("/target/release/"),
                "{src}: plugins come from the builder's release build"
            );
            assert!(
                plugins.contains_key(file),
                "the Dockerfile copies {file}, which no workspace crate builds (they build {:?})",
                plugins.keys()
            );
            assert!(
                !file.contains("opreg_mock_"),
                "the image must not ship the test plugin {file}"
            );
            // The debug build of the same crate produces the same name.
            assert!(
                artifacts().join(file).exists(),
                "{file} was not built by `cargo build --workspace`"
            );
            copied.insert(file.to_string());
            let d = dest.trim_end_matches('/').to_string();
            assert!(
                dest.ends_with('/'),
                "COPY of several plugins needs a folder destination ending in /: {dest}"
            );
            assert!(
                dest_dir.get_or_insert(d.clone()) == &d,
                "plugins copied to two folders"
            );
        }
    }
    let missing: Vec<_> = production
        .iter()
        .filter(|p| !copied.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "production plugins missing from the image: {missing:?} (crates {:?})",
        missing
            .iter()
            .map(|m| &plugins[m.as_str()])
            .collect::<Vec<_>>()
    );
    dest_dir.expect("no plugin COPY")
}

// ------------------------------------------------------------------------------------------
// Static checks.

#[test]
fn manifests_parse_and_are_the_expected_kinds() {
    let docs = manifests();
    let kinds: BTreeSet<&str> = docs.iter().map(|(_, d)| kind(d)).collect();
    for want in [
        "ServingRuntime",
        "InferenceService",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    ] {
        assert!(kinds.contains(want), "no {want} under deploy/: {kinds:?}");
    }
    for (f, d) in &docs {
        assert!(
            d.get("apiVersion").and_then(Value::as_str).is_some() && !name(d).is_empty(),
            "{}: a document without apiVersion or metadata.name",
            f.display()
        );
    }
}

#[test]
fn the_dockerfile_ships_the_daemon_and_the_production_plugins() {
    let cli = daemon_cli();
    let df = Dockerfile::read();
    assert!(df.stages.len() >= 2, "a multi-stage build");
    let last = df.last_stage();
    let builders: Vec<&str> = df.stages[..last]
        .iter()
        .filter_map(|(_, a)| a.as_deref())
        .collect();
    assert!(
        df.instructions.iter().any(|i| i.stage < last
            && i.op == "RUN"
            && i.rest.contains("cargo build")
            && i.rest.contains("--release")
            && i.rest.contains("--workspace")),
        "the builder builds the workspace in release mode"
    );

    // Binaries: real [[bin]]s of the daemon crate, from a builder stage.
    let bins = daemon_binaries();
    let mut installed = BTreeMap::new();
    for (from, srcs, dest) in df.copies() {
        if let Some(f) = &from {
            assert!(
                builders.contains(&f.as_str()),
                "COPY --from={f}: no such stage"
            );
        }
        for src in srcs {
            let file = src.rsplit('/').next().expect("file").to_string();
            if bins.contains(&file) {
                let at = if dest.ends_with('/') {
                    format!("{dest}{file}")
                } else {
                    dest.clone()
                };
                installed.insert(file, at);
            }
        }
    }
    for b in ["opregd", "opreg"] {
        assert!(
            installed.contains_key(b),
            "{b} not installed: {installed:?}"
        );
    }

    // The entry point runs the installed daemon; CMD holds flags it accepts.
    let entry = df.exec_form(last, "ENTRYPOINT");
    assert_eq!(entry, [installed["opregd"].clone()], "ENTRYPOINT");
    let cmd = parse_args(&cli, &df.exec_form(last, "CMD"), "Dockerfile CMD");
    let listen = public_port(&cmd, "listen", "Dockerfile CMD");
    let metrics = public_port(&cmd, "metrics-listen", "Dockerfile CMD");
    let exposed: BTreeSet<u16> = df
        .all(last, "EXPOSE")
        .flat_map(|r| r.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port"))
        .collect();
    assert_eq!(exposed, BTreeSet::from([listen, metrics]), "EXPOSE");

    // The plugin folder of CMD is where the plugins are copied.
    let plugin_dir = dockerfile_plugin_dir(&df);
    assert_eq!(cmd.get("plugin-dir"), Some(&plugin_dir), "--plugin-dir");
    assert!(cmd.contains_key("model-repo"), "CMD gives no --model-repo");

    // A fixed, non-root uid.
    let user: Vec<&str> = df.all(last, "USER").collect();
    assert_eq!(user.len(), 1, "one USER");
    let uid: u32 = user[0]
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("USER is a numeric uid (runAsNonRoot can only verify a number)");
    assert_ne!(uid, 0, "runs as root");

    // The build context leaves build outputs and the virtualenv out.
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).expect(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"**/target") || lines.contains(&"target"),
        ".dockerignore: target"
    );
    assert!(lines.contains(&".venv"), ".dockerignore: .venv");
}

#[test]
fn manifests_match_the_daemon_and_the_image() {
    let cli = daemon_cli();
    let df = Dockerfile::read();
    let plugin_dir = dockerfile_plugin_dir(&df);
    let image_uid: u64 = df
        .all(df.last_stage(), "USER")
        .next()
        .and_then(|u| u.split(':').next()?.parse().ok())
        .expect("USER");
    let docs = manifests();
    let containers = daemon_containers(&cli, &docs);
    assert!(
        containers.len() >= 2,
        "expected the Deployment's and the ServingRuntime's containers"
    );
    for c in &containers {
        let what = &c.what;
        let ports = c.ports();
        let knative = matches!(kind(c.doc), "ServingRuntime" | "ClusterServingRuntime");

        // gRPC: the declared port. Knative (KServe Serverless) routes HTTP/2 only to a port
        // named h2c; elsewhere a name with grpc (or h2c) tells KServe's and Istio's routing.
        let grpc_name = ports
            .iter()
            .find(|(_, p)| **p == c.listen)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| {
                panic!(
                    "{what}: --listen port {} is not declared: {ports:?}",
                    c.listen
                )
            });
        if knative {
            assert_eq!(
                grpc_name, "h2c",
                "{what}: KServe expects the gRPC port named h2c"
            );
            assert_eq!(ports.len(), 1, "{what}: Knative allows one container port");
        } else {
            assert!(
                grpc_name.contains("grpc") || grpc_name == "h2c",
                "{what}: gRPC port named {grpc_name:?}"
            );
        }

        // Metrics: a declared port (where more than one is allowed) and the scrape annotations.
        let metrics = c
            .metrics
            .unwrap_or_else(|| panic!("{what}: metrics are off"));
        if !knative {
            assert!(
                ports.values().any(|p| *p == metrics),
                "{what}: --metrics-listen port {metrics} is not declared: {ports:?}"
            );
        }
        let annotations = pod_meta(c.doc, "annotations");
        let mut scrape_annotations = 0;
        for (k, v) in &annotations {
            if !k.starts_with("prometheus.") {
                continue;
            }
            if k.ends_with("/port") {
                assert_eq!(v, &metrics.to_string(), "{what}: annotation {k}");
                scrape_annotations += 1;
            }
            if k.ends_with("/path") {
                assert_eq!(v, "/metrics", "{what}: annotation {k}");
            }
        }
        assert!(
            scrape_annotations > 0,
            "{what}: no prometheus port annotation: {annotations:?}"
        );

        // Probes: gRPC health on the gRPC port (service names are checked on a live daemon).
        for p in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let Some(probe) = c.spec.get(p) else { continue };
            let grpc = probe
                .get("grpc")
                .unwrap_or_else(|| panic!("{what}: {p} is not a grpc probe"));
            assert_eq!(
                grpc.get("port").and_then(Value::as_u64),
                Some(u64::from(c.listen)),
                "{what}: {p} port"
            );
        }
        assert!(
            c.spec.get("readinessProbe").is_some() && c.spec.get("livenessProbe").is_some(),
            "{what}: readiness and liveness probes"
        );

        // Folders: the image's plugins, the model volume, a writable runtime folder.
        assert_eq!(
            c.args.get("plugin-dir"),
            Some(&plugin_dir),
            "{what}: --plugin-dir"
        );
        let repo = c
            .args
            .get("model-repo")
            .unwrap_or_else(|| panic!("{what}: no --model-repo"));
        let mounts = c.mounts();
        if knative {
            assert_eq!(
                repo, "/mnt/models",
                "{what}: KServe's storage initializer fills /mnt/models"
            );
        } else {
            let (volume, _) = mounts
                .get(repo)
                .unwrap_or_else(|| panic!("{what}: nothing is mounted at --model-repo {repo}"));
            assert!(c.volume(volume).is_some(), "{what}: no volume {volume}");
        }
        if c.security("readOnlyRootFilesystem")
            .and_then(Value::as_bool)
            == Some(true)
        {
            let runtime = c.args.get("runtime-dir").unwrap_or_else(|| {
                panic!("{what}: a read-only root needs --runtime-dir on a volume")
            });
            let (mount, (volume, read_only)) = mounts
                .iter()
                .filter(|(m, _)| Path::new(runtime).starts_with(m))
                .max_by_key(|(m, _)| m.len())
                .unwrap_or_else(|| panic!("{what}: --runtime-dir {runtime} is on no volume"));
            assert!(!read_only, "{what}: {mount} is mounted read-only");
            assert!(
                c.volume(volume).and_then(|v| v.get("emptyDir")).is_some(),
                "{what}: the runtime folder's volume {volume} is not an emptyDir"
            );
        }
        assert_eq!(
            c.security("runAsNonRoot").and_then(Value::as_bool),
            Some(true),
            "{what}: runAsNonRoot"
        );
        if let Some(uid) = c.security("runAsUser").and_then(Value::as_u64) {
            assert_eq!(uid, image_uid, "{what}: runAsUser is not the image's USER");
        }
    }

    // Services reach the Deployment's ports.
    let deployments = of_kind(&docs, "Deployment");
    for svc in of_kind(&docs, "Service") {
        let selector = svc["spec"]["selector"].as_mapping().expect("selector");
        let target = containers
            .iter()
            .find(|c| {
                kind(c.doc) == "Deployment" && {
                    let labels = pod_meta(c.doc, "labels");
                    selector.iter().all(|(k, v)| {
                        labels.get(k.as_str().expect("key")).map(String::as_str) == v.as_str()
                    })
                }
            })
            .unwrap_or_else(|| panic!("Service {} selects no Deployment", name(svc)));
        let ports = target.ports();
        let mut reached = BTreeSet::new();
        for p in svc["spec"]["ports"].as_sequence().expect("ports") {
            let t = &p["targetPort"];
            let port = match t.as_str() {
                Some(n) => *ports
                    .get(n)
                    .unwrap_or_else(|| panic!("Service {}: no container port {n}", name(svc))),
                None => {
                    u16::try_from(t.as_u64().or(p["port"].as_u64()).expect("port")).expect("u16")
                }
            };
            assert!(
                ports.values().any(|x| *x == port),
                "Service {}: port {port} is not the container's",
                name(svc)
            );
            reached.insert(port);
        }
        assert!(
            reached.contains(&target.listen)
                && target.metrics.is_some_and(|m| reached.contains(&m)),
            "Service {} should expose the gRPC and metrics ports",
            name(svc)
        );
    }

    // The HPA scales a Deployment of these manifests.
    for hpa in of_kind(&docs, "HorizontalPodAutoscaler") {
        let r = &hpa["spec"]["scaleTargetRef"];
        assert_eq!(r["kind"].as_str(), Some("Deployment"));
        assert!(
            deployments
                .iter()
                .any(|d| Some(name(d)) == r["name"].as_str()),
            "HPA {} scales {:?}, not one of the Deployments",
            name(hpa),
            r["name"]
        );
    }

    // KServe: the InferenceServices use a runtime defined here for a format it supports.
    for isvc in of_kind(&docs, "InferenceService") {
        let m = &isvc["spec"]["predictor"]["model"];
        let runtime = m["runtime"].as_str().expect("runtime");
        let rt = of_kind(&docs, "ServingRuntime")
            .into_iter()
            .find(|r| name(r) == runtime)
            .unwrap_or_else(|| panic!("no ServingRuntime {runtime}"));
        let format = m["modelFormat"]["name"].as_str().expect("format");
        assert!(
            rt["spec"]["supportedModelFormats"]
                .as_sequence()
                .expect("formats")
                .iter()
                .any(|f| f["name"].as_str() == Some(format)),
            "{runtime} does not support {format}"
        );
        let protocol = m["protocolVersion"].as_str().expect("protocolVersion");
        assert!(
            strings(rt["spec"].get("protocolVersions"), "protocolVersions")
                .iter()
                .any(|p| p == protocol),
            "{runtime} does not speak {protocol}"
        );
        assert!(m["storageUri"].as_str().is_some(), "storageUri");
    }
}

// ------------------------------------------------------------------------------------------
// Against a running daemon.

/// The HPA's metric names as Prometheus names: prometheus-adapter exposes a counter's rate
/// under the counter's name + `_per_second` (the rule in hpa.yaml).
fn hpa_metrics(docs: &[(PathBuf, Value)]) -> Vec<String> {
    let mut out = Vec::new();
    for hpa in of_kind(docs, "HorizontalPodAutoscaler") {
        for m in hpa["spec"]["metrics"].as_sequence().expect("metrics") {
            let t = m["type"].as_str().expect("type");
            if t == "Resource" || t == "ContainerResource" {
                continue;
            }
            let key = match t {
                "Pods" => "pods",
                "Object" => "object",
                "External" => "external",
                _ => panic!("metric type {t}"),
            };
            let n = m[key]["metric"]["name"].as_str().expect("metric name");
            out.push(n.strip_suffix("_per_second").unwrap_or(n).to_string());
        }
    }
    out
}

fn mlp() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Relu", &["h"], &["y"]),
        ],
        vec![value("x", 1, &[1, 3])],
        vec![value("y", 1, &[1, 2])],
        vec![f32_initializer("w", &[3, 2], &[1.0; 6])],
        17,
    )
}

/// `GET <path>` on the metrics listener, over plain HTTP/1.0.
fn scrape(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body
}

#[tokio::test]
async fn a_daemon_with_the_deployment_args_serves_probes_and_hpa_metric() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let cli = daemon_cli();
    let docs = manifests();
    let containers = daemon_containers(&cli, &docs);
    let deployment = containers
        .iter()
        .find(|c| kind(c.doc) == "Deployment")
        .expect("a Deployment running opregd");

    // The Dockerfile's plugins, a repository in the documented layout, a runtime folder.
    let df = Dockerfile::read();
    dockerfile_plugin_dir(&df);
    let shipped: Vec<PathBuf> = df
        .copies()
        .into_iter()
        .flat_map(|(_, srcs, _)| srcs)
        .filter_map(|s| {
            let f = s.rsplit('/').next()?.to_string();
            (f.starts_with("libopreg_") && f.ends_with(".so")).then(|| artifacts().join(f))
        })
        .collect();
    let plugins = plugin_dir(&shipped);
    let repo = tempfile::tempdir().expect("repo");
    std::fs::create_dir_all(repo.path().join("mlp/1")).expect("mkdir");
    std::fs::write(repo.path().join("mlp/1/model.onnx"), mlp()).expect("write model");
    let runtime = tempfile::tempdir().expect("runtime");

    // The Deployment's args with addresses on loopback (free ports) and folders moved here.
    let mut args = Vec::new();
    for (flag, v) in &deployment.args {
        let v = match flag.as_str() {
            "listen" => continue, // Daemon::start_with passes --listen 127.0.0.1:0
            "metrics-listen" => "127.0.0.1:0".to_string(),
            "plugin-dir" => plugins.path().to_str().expect("utf8").to_string(),
            "model-repo" => repo.path().to_str().expect("utf8").to_string(),
            "runtime-dir" => runtime
                .path()
                .join("opreg")
                .to_str()
                .expect("utf8")
                .to_string(),
            _ => v.clone(),
        };
        args.push(format!("--{flag}"));
        if cli.flags[flag.as_str()] {
            args.push(v);
        }
    }
    let d = Daemon::start_with(Options {
        args,
        default_runtime_dir: true,
        ..Options::default()
    });
    let log = d.wait_log("metrics on http://");
    assert!(
        !log.contains("refused plugin") && log.matches("plugin loaded").count() == shipped.len(),
        "the image's {} plugins should all load; log:\n{log}",
        shipped.len()
    );

    // Every probe's health service answers SERVING (kubelet calls grpc.health.v1.Health/Check,
    // as this client does).
    let mut services: BTreeSet<String> = BTreeSet::new();
    for c in &containers {
        for p in ["readinessProbe", "livenessProbe", "startupProbe"] {
            if let Some(g) = c.spec.get(p).and_then(|p| p.get("grpc")) {
                services.insert(
                    g.get("service")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .into(),
                );
            }
        }
    }
    assert!(!services.is_empty(), "no gRPC probes");
    let channel = tonic::transport::Endpoint::from_shared(d.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    for service in &services {
        let r = health
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "service {service:?}");
    }
    {
        use tokio_stream::StreamExt;
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut c = ServerReflectionClient::new(channel);
        let mut stream = c
            .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
            .expect("reflection")
            .into_inner();
        let resp = stream.next().await.expect("a response").expect("ok");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected {resp:?}")
        };
        assert!(
            list.service
                .iter()
                .any(|s| s.name == "grpc.health.v1.Health"),
            "grpc.health.v1.Health not served: {list:?}"
        );
    }

    // The model from the repository layout serves; after a request the HPA's metric is there.
    let mut c = d.inference().await;
    let out = c
        .model_infer(pb::ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 3],
                ..Default::default()
            }],
            raw_input_contents: vec![f32_bytes(&[1.0, 2.0, 3.0]).into()],
            ..Default::default()
        })
        .await
        .expect("the repository model serves")
        .into_inner();
    assert_eq!(f32_values(&out.raw_output_contents[0]), [6.0, 6.0]);

    let start = log.find("metrics on http://").expect("line") + "metrics on http://".len();
    let rest = &log[start..];
    let addr = &rest[..rest.find("/metrics").expect("path")];
    let text = scrape(addr, "/metrics");
    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let wanted = hpa_metrics(&docs);
    assert!(!wanted.is_empty(), "the HPA scales on no custom metric");
    for m in wanted {
        assert!(
            exported.contains(m.as_str()),
            "the HPA scales on {m}, which opregd does not export: {exported:?}"
        );
    }
}
