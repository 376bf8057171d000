//! The deployment files in deploy/ (Kubernetes, systemd, Prometheus), checked with the tools
//! that consume them. Needs no root and no cluster, but the tools `cargo xtask setup` installs:
//! the test venv's Python with `kubernetes-validate` (Kubernetes' JSON schemas, offline) and
//! PyYAML, `systemd-analyze` and `promtool`. `kubectl kustomize` is used as well when `kubectl`
//! is installed (Debian does not package it).
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
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(command)));
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

/// Every `FORKWATCH_*` environment variable the daemon reads (monitor/src/cli.rs), so that a
/// misspelt one in a manifest or unit is caught.
fn daemon_env_vars() -> BTreeSet<String> {
    let cli = std::fs::read_to_string(root().join("monitor/src/cli.rs")).unwrap();
    let vars: BTreeSet<String> = cli
        .split('"')
        .filter(|s| s.starts_with("FORKWATCH_") && s.len() > "FORKWATCH_".len())
        .map(str::to_owned)
        .collect();
    assert!(
        vars.contains("FORKWATCH_METRICS_ADDR"),
        "no env vars found in cli.rs: {vars:?}"
    );
    vars
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// Every object in deploy/kubernetes validates, strictly (unknown fields are errors), against
/// the Kubernetes JSON schemas `kubernetes-validate` ships, for the oldest supported Kubernetes
/// and the newest the package knows. The PodMonitor is a custom resource with no schema there
/// (it is checked in `podmonitor_and_service_select_the_daemonset_pods`); any other object
/// without a schema fails.
#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let files: Vec<String> = manifests()
        .iter()
        .map(|(name, _)| deploy("kubernetes").join(name).to_str().unwrap().to_owned())
        .collect();
    let mut args = vec!["validate", MIN_KUBERNETES];
    args.extend(files.iter().map(String::as_str));
    let report = python(&args, b"");
    let versions = strings(&report["versions"]);
    assert!(versions.contains(&MIN_KUBERNETES), "{report}");
    eprintln!("validated against Kubernetes {versions:?}");

    let results = report["results"].as_array().unwrap();
    assert_eq!(
        results.len(),
        files.len() * versions.len(),
        "one result per object and version: {report:#}"
    );
    let mut problems = Vec::new();
    for result in results {
        let ok = match result["result"].as_str().unwrap() {
            "valid" => true,
            "no_schema" => result["kind"] == "PodMonitor",
            _ => false,
        };
        if !ok {
            problems.push(format!(
                "{} {}/{} against {}: {} {}",
                result["file"],
                result["kind"],
                result["name"],
                result["version"],
                result["result"],
                result["error"]
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// kustomization.yaml lists every manifest in the directory (and nothing that is missing), and
/// the set renders to exactly the expected objects: one each of Namespace, ServiceAccount,
/// DaemonSet, Service and PodMonitor (no RBAC), all namespaced objects in the namespace. Checked
/// on the files themselves and, when `kubectl` is installed, on `kubectl kustomize` output
/// (validated against the schemas again, as applied).
#[test]
fn kustomization_lists_every_manifest_and_renders_the_expected_kinds() {
    let expected_kinds: BTreeSet<&str> = [
        "DaemonSet",
        "Namespace",
        "PodMonitor",
        "Service",
        "ServiceAccount",
    ]
    .into();

    let manifests = manifests();
    let listed: BTreeSet<String> = manifests.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(listed.len(), manifests.len(), "a resource listed twice");
    let on_disk: BTreeSet<String> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, on_disk, "kustomization.yaml resources vs files");

    let objects: Vec<Value> = manifests.into_iter().map(|(_, o)| o).collect();
    check_object_set(&objects, &expected_kinds);

    if !have_kubectl() {
        return;
    }
    let rendered = run_ok(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(deploy("kubernetes")),
        b"",
    );
    let rendered_objects = load_text(&rendered);
    check_object_set(&rendered_objects, &expected_kinds);
    let ds = only_of_kind(&rendered_objects, "DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"], "forkwatch:latest",
        "kustomization.yaml images: keeps the image until you set newName"
    );

    // What `kubectl apply -k` sends validates too.
    assert_valid(&rendered, "kustomize");
}

/// Whether `kubectl` can run (it renders kustomizations); says so when it cannot.
fn have_kubectl() -> bool {
    let found = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("NOTE: kubectl is not installed: `kubectl kustomize` not run");
    }
    found
}

/// Asserts every object of a rendered set validates (the PodMonitor has no schema there).
fn assert_valid(rendered: &str, what: &str) {
    let scratch = Scratch::new(what);
    let file = scratch.0.join("rendered.yaml");
    std::fs::write(&file, rendered).unwrap();
    let report = python(&["validate", MIN_KUBERNETES, file.to_str().unwrap()], b"");
    for result in report["results"].as_array().unwrap() {
        assert!(
            result["result"] == "valid"
                || (result["result"] == "no_schema" && result["kind"] == "PodMonitor"),
            "{what}: rendered {}: {result}",
            result["kind"]
        );
    }
}

/// The opt-in for pod names (deploy/kubernetes/pod-names, a Component, applied through
/// deploy/kubernetes-pod-names): its RBAC files validate on their own; the overlay renders to the
/// default set plus exactly a ClusterRole that may only read pods and its binding to the
/// forkwatch ServiceAccount; the DaemonSet gains the flag, NODE_NAME from the downward API and a
/// mounted token, and is otherwise unchanged (least privilege kept). The default set stays
/// without RBAC (`kustomization_lists_every_manifest_and_renders_the_expected_kinds`).
#[test]
fn pod_names_component_adds_read_only_rbac_and_the_flag() {
    let component = deploy("kubernetes/pod-names");
    let kustomization = load(&component.join("kustomization.yaml"));
    assert_eq!(kustomization[0]["kind"], "Component");
    let rbac: Vec<String> = strings(&kustomization[0]["resources"])
        .into_iter()
        .map(|name| component.join(name).to_str().unwrap().to_owned())
        .collect();
    assert_eq!(rbac.len(), 2, "{rbac:?}");
    let mut args = vec!["validate", MIN_KUBERNETES];
    args.extend(rbac.iter().map(String::as_str));
    let report = python(&args, b"");
    for result in report["results"].as_array().unwrap() {
        assert_eq!(result["result"], "valid", "{result}");
    }

    if !have_kubectl() {
        return;
    }
    let kustomize = |dir: &str| {
        run_ok(
            Command::new("kubectl").arg("kustomize").arg(deploy(dir)),
            b"",
        )
    };
    let base = load_text(&kustomize("kubernetes"));
    let rendered_text = kustomize("kubernetes-pod-names");
    assert_valid(&rendered_text, "pod-names");
    let rendered = load_text(&rendered_text);
    let kinds: BTreeSet<&str> = rendered
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    let base_kinds: BTreeSet<&str> = base.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    let added: BTreeSet<&str> = kinds.difference(&base_kinds).copied().collect();
    assert_eq!(added, ["ClusterRole", "ClusterRoleBinding"].into());
    assert_eq!(rendered.len(), base.len() + 2);

    // Read-only, pods only.
    let role = only_of_kind(&rendered, "ClusterRole");
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{role}");
    assert_eq!(strings(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strings(&rules[0]["resources"]), ["pods"]);
    let verbs: BTreeSet<&str> = strings(&rules[0]["verbs"]).into_iter().collect();
    assert!(verbs.contains("list"), "the daemon lists pods: {verbs:?}");
    assert!(
        verbs.is_subset(&["get", "list", "watch"].into()),
        "{verbs:?}"
    );
    let binding = only_of_kind(&rendered, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let account = only_of_kind(&rendered, "ServiceAccount");
    let subjects = binding["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], account["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], account["metadata"]["namespace"]);

    // The DaemonSet: the flag, NODE_NAME, the token; nothing else changed.
    let mut ds = only_of_kind(&rendered, "DaemonSet");
    let pod = &mut ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], true);
    let env = pod["containers"][0]["env"].as_array_mut().unwrap();
    let take = |env: &mut Vec<Value>, name: &str| {
        let i = env
            .iter()
            .position(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {env:?}"));
        env.remove(i)
    };
    assert_eq!(take(env, "FORKWATCH_K8S_POD_NAMES")["value"], "true");
    assert_eq!(
        take(env, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert!(
        daemon_env_vars().contains("FORKWATCH_K8S_POD_NAMES"),
        "the daemon reads FORKWATCH_K8S_POD_NAMES"
    );
    pod["automountServiceAccountToken"] = Value::Bool(false);
    assert_eq!(
        ds,
        only_of_kind(&base, "DaemonSet"),
        "the component changes the DaemonSet only by the flag, NODE_NAME and the token"
    );
}

fn check_object_set(objects: &[Value], expected_kinds: &BTreeSet<&str>) {
    let mut kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().expect("every object has a kind"))
        .collect();
    kinds.sort_unstable();
    let unique: BTreeSet<&str> = kinds.iter().copied().collect();
    assert_eq!(
        kinds.len(),
        unique.len(),
        "one object of each kind: {kinds:?}"
    );
    assert_eq!(&unique, expected_kinds);

    let namespace = only_of_kind(objects, "Namespace");
    let namespace = namespace["metadata"]["name"].as_str().unwrap();
    for object in objects {
        assert!(
            object["apiVersion"].is_string() && object["metadata"]["name"].is_string(),
            "apiVersion and metadata.name: {object}"
        );
        if object["kind"] != "Namespace" {
            assert_eq!(
                object["metadata"]["namespace"], namespace,
                "{} {} is in the forkwatch namespace",
                object["kind"], object["metadata"]["name"]
            );
        }
    }
    // The DaemonSet's ServiceAccount is the one in the set, and it gets no API token.
    let account = only_of_kind(objects, "ServiceAccount");
    let ds = only_of_kind(objects, "DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
    assert_eq!(account["automountServiceAccountToken"], false);
}

/// The DaemonSet runs with least privilege: nothing privileged anywhere, every capability dropped
/// and exactly the four the daemon needs added, no privilege escalation, a read-only root
/// filesystem, the host's pid namespace (but not its network or IPC), and only the kernel's BTF
/// mounted from the host, read-only.
#[test]
fn daemonset_runs_with_least_privilege() {
    for (name, object) in manifests() {
        let mut hits = Vec::new();
        find_key(&object, "privileged", &json!(true), "", &mut hits);
        assert!(hits.is_empty(), "{name}: privileged: true at {hits:?}");
    }

    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "hostPID: host pids and /proc");
    assert_ne!(
        pod["hostNetwork"], true,
        "no hostNetwork: metrics on the pod IP"
    );
    assert_ne!(pod["hostIPC"], true, "no hostIPC");
    assert_eq!(pod["automountServiceAccountToken"], false);

    let containers: Vec<&Value> = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(containers.len(), 1, "one container, no init containers");
    let container = containers[0];
    let security = &container["securityContext"];
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let added = strings(&security["capabilities"]["add"]);
    let added_set: BTreeSet<&str> = added.iter().copied().collect();
    assert_eq!(added.len(), added_set.len(), "a capability added twice");
    assert_eq!(added_set, BTreeSet::from(CAPABILITIES));
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(
        security["runAsUser"], 0,
        "root, bounded by the capabilities"
    );
    assert!(
        pod["securityContext"]["capabilities"].is_null()
            && pod["securityContext"]["sysctls"].is_null(),
        "nothing privileged at pod level"
    );

    // Host paths: the kernel's BTF only, read-only.
    let volumes = pod["volumes"].as_array().unwrap();
    let host_paths: Vec<&Value> = volumes
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .collect();
    assert_eq!(host_paths.len(), 1, "one hostPath volume: {volumes:?}");
    assert_eq!(host_paths[0]["hostPath"]["path"], "/sys/kernel/btf");
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0]["name"], host_paths[0]["name"]);
    assert_eq!(mounts[0]["mountPath"], "/sys/kernel/btf");
    assert_eq!(mounts[0]["readOnly"], true);
}

/// The DaemonSet's daemon is configured and probed the way the daemon works: metrics on the pod
/// IP (downward API) at 9571, findings and logs as JSON, liveness on /healthz and readiness on
/// /readyz of that port, resource requests and limits, every node tolerated, and only
/// environment variables the daemon knows.
#[test]
fn daemonset_configures_metrics_probes_resources_and_tolerations() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "forkwatch:latest");
    for arg in container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(container["command"].as_array().into_iter().flatten())
    {
        assert!(
            !arg.as_str().unwrap().starts_with("--k8s"),
            "no unimplemented flags: {arg}"
        );
    }

    // Environment: POD_IP from the downward API, defined before it is referenced.
    let env = container["env"].as_array().unwrap();
    let position = |name: &str| {
        env.iter()
            .position(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("env {name} missing"))
    };
    let pod_ip = &env[position("POD_IP")];
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    let metrics = position("FORKWATCH_METRICS_ADDR");
    assert!(
        position("POD_IP") < metrics,
        "$(POD_IP) expands only if defined earlier"
    );
    assert_eq!(env[metrics]["value"], format!("$(POD_IP):{METRICS_PORT}"));
    assert_eq!(env[position("FORKWATCH_FORMAT")]["value"], "json");
    assert_eq!(env[position("FORKWATCH_LOG_FORMAT")]["value"], "json");
    let known = daemon_env_vars();
    for e in env {
        let name = e["name"].as_str().unwrap();
        assert!(
            name == "POD_IP" || known.contains(name),
            "{name} is not an environment variable of the daemon (monitor/src/cli.rs)"
        );
    }

    // The metrics port, named, and both probes on it.
    let ports = container["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["containerPort"], METRICS_PORT);
    let port_name = &ports[0]["name"];
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == *port_name || get["port"] == METRICS_PORT,
            "{probe} on the metrics port: {get}"
        );
        assert!(
            get["host"].is_null(),
            "{probe}: the kubelet probes the pod IP"
        );
    }

    let resources = &container["resources"];
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                resources[bound][resource].is_string(),
                "resources.{bound}.{resource} set: {resources}"
            );
        }
    }

    let tolerations = pod["tolerations"].as_array().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "a toleration of every taint: {tolerations:?}"
    );

    let selector = ds["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "selector matches the pod template");
    }
}

/// The PodMonitor (a Prometheus Operator custom resource, which kubernetes-validate has no schema
/// for) is well formed and scrapes the DaemonSet's pods on their metrics port with
/// job="forkwatch", and the Service selects the same pods and port.
#[test]
fn podmonitor_and_service_select_the_daemonset_pods() {
    let objects: Vec<Value> = manifests().into_iter().map(|(_, o)| o).collect();
    let ds = only_of_kind(&objects, "DaemonSet");
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .clone();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let port_names: Vec<&str> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    let selects_pods = |selector: &Value, what: &str| {
        let selector = selector
            .as_object()
            .unwrap_or_else(|| panic!("{what}: selector"));
        assert!(
            !selector.is_empty(),
            "{what}: an empty selector selects everything"
        );
        for (key, value) in selector {
            assert_eq!(
                pod_labels.get(key),
                Some(value),
                "{what} selects {key}={value}, which the pods do not have"
            );
        }
    };

    let monitor = only_of_kind(&objects, "PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let spec = monitor["spec"].as_object().expect("PodMonitor spec");
    let known: BTreeSet<&str> = [
        "jobLabel",
        "selector",
        "podMetricsEndpoints",
        "namespaceSelector",
        "podTargetLabels",
        "sampleLimit",
        "targetLimit",
    ]
    .into();
    for key in spec.keys() {
        assert!(
            known.contains(key.as_str()),
            "PodMonitor spec.{key}: unknown"
        );
    }
    assert!(
        spec["selector"]["matchExpressions"].is_null(),
        "checked by matchLabels only"
    );
    selects_pods(&spec["selector"]["matchLabels"], "PodMonitor");
    // job = the value of the pod label named by jobLabel: the job the alerts select on.
    let job_label = spec["jobLabel"].as_str().expect("PodMonitor jobLabel");
    assert_eq!(pod_labels.get(job_label), Some(&json!(JOB)));
    let endpoints = spec["podMetricsEndpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let endpoint = endpoints[0].as_object().unwrap();
    assert!(
        port_names.contains(&endpoint["port"].as_str().unwrap()),
        "PodMonitor port {} is a named container port {port_names:?}",
        endpoint["port"]
    );
    assert_eq!(endpoint["path"], "/metrics");
    for key in endpoint.keys() {
        assert!(
            [
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "relabelings",
                "metricRelabelings"
            ]
            .contains(&key.as_str()),
            "PodMonitor podMetricsEndpoints[0].{key}: unknown"
        );
    }
    for relabel in endpoint["relabelings"].as_array().into_iter().flatten() {
        for key in relabel.as_object().unwrap().keys() {
            assert!(
                [
                    "sourceLabels",
                    "separator",
                    "targetLabel",
                    "regex",
                    "replacement",
                    "action"
                ]
                .contains(&key.as_str()),
                "relabeling field {key}: unknown (the operator's spelling is camelCase)"
            );
        }
    }

    let service = only_of_kind(&objects, "Service");
    selects_pods(&service["spec"]["selector"], "Service");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], METRICS_PORT);
    let target = &ports[0]["targetPort"];
    assert!(
        target.as_str().is_some_and(|t| port_names.contains(&t)) || *target == METRICS_PORT,
        "Service targetPort {target} is the container's metrics port"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd

/// `systemd-analyze verify` accepts the unit with nothing to say, and systemd parses its
/// capabilities and sandboxing the way they are meant.
///
/// verify fails when ExecStart's binary does not exist, and /usr/local/bin/forkwatch is not
/// installed here: it runs on a copy of the unit whose ExecStart is the daemon cargo just built
/// (same arguments), in a scratch directory with the same file name. PID 1 is not systemd on
/// every test machine, which verify does not need: it loads the unit with its own manager
/// instance. It also ignores capability names it does not know without a word, so the unit as
/// systemd parsed it (its debug dump) is checked too, and a broken copy must be rejected, which
/// shows verify works on this machine.
#[test]
fn systemd_unit_verifies_and_bounds_capabilities() {
    let unit = std::fs::read_to_string(deploy("systemd/forkwatch.service")).unwrap();
    let exec_lines: Vec<&str> = unit
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(
        exec_lines,
        ["ExecStart=/usr/local/bin/forkwatch run --format json"]
    );
    let binary = env!("CARGO_BIN_EXE_forkwatch");
    assert!(!binary.contains(char::is_whitespace), "{binary}");
    let copy = unit.replace(
        "ExecStart=/usr/local/bin/forkwatch ",
        &format!("ExecStart={binary} "),
    );

    let scratch = Scratch::new("systemd");
    let dir = scratch.0.clone();
    let path = dir.join("forkwatch.service");
    std::fs::write(&path, &copy).unwrap();
    let verify = |path: &Path, log_level: &str| {
        run(
            Command::new("systemd-analyze")
                .arg("verify")
                .arg(path)
                .current_dir(&dir)
                .env("SYSTEMD_LOG_LEVEL", log_level)
                .env_remove("SYSTEMD_UNIT_PATH"),
            b"",
        )
    };

    let output = verify(&path, "info");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        output.status
    );

    // The unit as systemd parsed it.
    let output = verify(&path, "debug");
    assert!(output.status.success());
    let dump = String::from_utf8_lossy(&output.stdout);
    let parsed: Vec<(String, String)> = dump
        .lines()
        .skip_while(|l| l.trim() != "-> Unit forkwatch.service:")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("-> Unit "))
        .filter_map(|l| {
            let (key, value) = l.trim().split_once(": ")?;
            Some((key.to_owned(), value.trim().to_owned()))
        })
        .collect();
    assert!(
        !parsed.is_empty(),
        "no dump of forkwatch.service in verify's debug output"
    );
    let get = |key: &str| -> Vec<&str> {
        parsed
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let caps: BTreeSet<String> = CAPABILITIES
        .iter()
        .map(|c| format!("cap_{}", c.to_lowercase()))
        .collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let values = get(key);
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        let set: BTreeSet<String> = values[0].split_whitespace().map(str::to_owned).collect();
        assert_eq!(set, caps, "{key} as systemd parsed it");
    }
    assert_eq!(get("Type"), ["simple"], "no sd_notify: Type=simple");
    assert_eq!(get("Restart"), ["on-failure"]);
    assert_eq!(get("ProtectSystem"), ["strict"]);
    assert_eq!(get("ProtectHome"), ["yes"]);
    assert_eq!(get("PrivateTmp"), ["yes"]);
    assert_eq!(
        get("ProtectProc"),
        ["default"],
        "the daemon reads every process's /proc"
    );
    assert_eq!(get("ProcSubset"), ["all"], "the daemon reads /proc/<pid>");
    let environment: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .collect();
    assert_eq!(get("Environment"), environment, "Environment= as parsed");
    assert!(environment.contains(&"FORKWATCH_METRICS_ADDR=127.0.0.1:9571"));
    let known = daemon_env_vars();
    for line in get("Environment") {
        let name = line.split('=').next().unwrap();
        assert!(known.contains(name), "{name} is not a daemon env var");
    }
    // NoNewPrivileges is not in the dump: check the file.
    assert!(unit.lines().any(|l| l == "NoNewPrivileges=yes"));
    assert!(
        get("User").first().is_some_and(|u| *u != "root") && get("DynamicUser") == ["yes"],
        "a transient non-root user holding the ambient capabilities"
    );

    // verify on this machine does reject a broken unit.
    let broken = dir.join("broken").join("forkwatch.service");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    std::fs::write(&broken, copy.replace("Type=simple", "Type=simpel")).unwrap();
    let output = verify(&broken, "info");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("simpel"),
        "systemd-analyze verify did not notice Type=simpel: {said}"
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus

fn promtool(args: &[&str], dir: &Path) -> String {
    run_ok(Command::new("promtool").args(args).current_dir(dir), b"")
}

/// Unit tests for the alerting rules, run by `promtool test rules`: synthetic series, and the
/// alerts that must (and must not) fire at given times, with their labels and rendered
/// annotations (promtool compares both exactly: a change of wording in alerts.yaml is a change
/// here too).
const RULE_TESTS: &str = r#"
rule_files:
  - ALERTS
evaluation_interval: 1m
tests:
  # A critical finding fires at the next evaluation and resolves once 5 minutes have passed
  # without another; a warning finding fires the warning alert only.
  - interval: 1m
    input_series:
      - series: 'forkwatch_findings_total{job="forkwatch",instance="node-a:9571",kind="inherited_lock_deadlock",severity="critical"}'
        values: '0 0 1 1 1 1 1 1 1 1 1 1'
      - series: 'forkwatch_findings_total{job="forkwatch",instance="node-a:9571",kind="shared_socket",severity="critical"}'
        values: '0x11'
      - series: 'forkwatch_findings_total{job="forkwatch",instance="node-a:9571",kind="mt_fork_no_exec",severity="warning"}'
        values: '0 0 0 3 3 3 3 3 3 3 3 3'
      - series: 'forkwatch_events_lost_total{job="forkwatch",instance="node-a:9571",category="fork"}'
        values: '0 0 0 0 7 7 7 7 7 7 7 7'
      - series: 'forkwatch_events_lost_total{job="forkwatch",instance="node-a:9571",category="exit"}'
        values: '0x11'
      - series: 'up{job="forkwatch",instance="node-a:9571"}'
        values: '1x11'
    alert_rule_test:
      - eval_time: 1m
        alertname: ForkwatchCriticalFinding
        exp_alerts: []
      - eval_time: 2m
        alertname: ForkwatchCriticalFinding
        exp_alerts:
          - exp_labels: {alertname: ForkwatchCriticalFinding, severity: critical, job: forkwatch, instance: "node-a:9571", kind: inherited_lock_deadlock}
            exp_annotations:
              summary: 'forkwatch: inherited_lock_deadlock on node-a:9571'
              description: '1 inherited_lock_deadlock finding(s) in the last 5 minutes on node-a:9571. The finding (pid, command, stack or socket) is in the daemon''s output: journalctl -u forkwatch, or the forkwatch pod''s log on that node.'
      - eval_time: 8m
        alertname: ForkwatchCriticalFinding
        exp_alerts: []
      - eval_time: 2m
        alertname: ForkwatchWarningFinding
        exp_alerts: []
      - eval_time: 3m
        alertname: ForkwatchWarningFinding
        exp_alerts:
          - exp_labels: {alertname: ForkwatchWarningFinding, severity: warning, job: forkwatch, instance: "node-a:9571", kind: mt_fork_no_exec}
            exp_annotations:
              summary: 'forkwatch: mt_fork_no_exec on node-a:9571'
              description: '3 mt_fork_no_exec finding(s) in the last 15 minutes on node-a:9571; details in the daemon''s output.'
      - eval_time: 3m
        alertname: ForkwatchEventsLost
        exp_alerts: []
      - eval_time: 4m
        alertname: ForkwatchEventsLost
        exp_alerts:
          - exp_labels: {alertname: ForkwatchEventsLost, severity: warning, job: forkwatch, instance: "node-a:9571", category: fork}
            exp_annotations:
              summary: 'forkwatch lost fork events on node-a:9571'
              description: '7 fork events dropped in the last 5 minutes because the kernel ring buffer was full; findings may be missing. Raise --ring-buffer-size (FORKWATCH_RING_BUFFER_SIZE).'
      - eval_time: 10m
        alertname: ForkwatchDown
        exp_alerts: []
      - eval_time: 10m
        alertname: ForkwatchAbsent
        exp_alerts: []
  # A target that stops answering: down after 5 minutes, not before.
  - interval: 1m
    input_series:
      - series: 'up{job="forkwatch",instance="node-b:9571"}'
        values: '1 1 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 6m
        alertname: ForkwatchDown
        exp_alerts: []
      - eval_time: 7m
        alertname: ForkwatchDown
        exp_alerts:
          - exp_labels: {alertname: ForkwatchDown, severity: warning, job: forkwatch, instance: "node-b:9571"}
            exp_annotations:
              summary: 'forkwatch on node-b:9571 is down'
              description: 'Prometheus has not scraped forkwatch on node-b:9571 for 5 minutes: fork hazards on that host go unseen. `forkwatch check` says what is missing.'
  # No forkwatch target at all.
  - interval: 1m
    input_series:
      - series: 'up{job="node",instance="node-c:9100"}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 4m
        alertname: ForkwatchAbsent
        exp_alerts: []
      - eval_time: 6m
        alertname: ForkwatchAbsent
        exp_alerts:
          - exp_labels: {alertname: ForkwatchAbsent, severity: warning, job: forkwatch}
            exp_annotations:
              summary: 'no forkwatch target is scraped'
              description: 'Prometheus has no target with job="forkwatch": the scrape configuration (scrape.yaml or the PodMonitor) or the daemons themselves are gone.'
  # A process that stays deadlocked keeps an alert firing after the finding's window.
  - interval: 1m
    input_series:
      - series: 'forkwatch_deadlocked_processes{job="forkwatch",instance="node-a:9571"}'
        values: '0 1x20'
    alert_rule_test:
      - eval_time: 10m
        alertname: ForkwatchProcessesStillDeadlocked
        exp_alerts: []
      - eval_time: 17m
        alertname: ForkwatchProcessesStillDeadlocked
        exp_alerts:
          - exp_labels: {alertname: ForkwatchProcessesStillDeadlocked, severity: critical, job: forkwatch, instance: "node-a:9571"}
            exp_annotations:
              summary: 'forkwatch: 1 process(es) deadlocked on an inherited lock on node-a:9571'
              description: 'Processes reported as inherited_lock_deadlock have been blocked for 15 minutes and more. Only a signal ends such a wait: restart them, and fix the fork in the parent.'
"#;

/// `promtool check rules` passes on alerts.yaml, its alerts fire as intended on synthetic series
/// (`promtool test rules`), and every forkwatch metric it names is one the daemon exports.
#[test]
fn alert_rules_pass_promtool_and_fire_as_intended() {
    let alerts = deploy("prometheus/alerts.yaml");
    let out = promtool(&["check", "rules", alerts.to_str().unwrap()], &root());
    assert!(out.contains("SUCCESS"), "{out}");

    let scratch = Scratch::new("rules");
    let dir = &scratch.0;
    let tests = dir.join("alerts_test.yaml");
    std::fs::write(
        &tests,
        RULE_TESTS.replace("ALERTS", alerts.to_str().unwrap()),
    )
    .unwrap();
    let out = promtool(&["test", "rules", tests.to_str().unwrap()], dir);
    assert!(out.contains("SUCCESS"), "{out}");

    // The alerts the brief promises exist, with the severities they are routed by.
    let rules = load(&alerts);
    assert_eq!(rules.len(), 1);
    let mut by_name = std::collections::BTreeMap::new();
    for group in rules[0]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().expect("alerting rules only");
            assert!(
                by_name.insert(name.to_owned(), rule.clone()).is_none(),
                "{name} twice"
            );
        }
    }
    let critical = &by_name["ForkwatchCriticalFinding"];
    assert_eq!(critical["labels"]["severity"], "critical");
    assert!(
        critical["for"].is_null() || critical["for"] == "0m" || critical["for"] == "0s",
        "a critical finding fires at once: {critical}"
    );
    assert_eq!(
        by_name["ForkwatchWarningFinding"]["labels"]["severity"],
        "warning"
    );
    assert_eq!(by_name["ForkwatchDown"]["for"], "5m");
    assert!(by_name.contains_key("ForkwatchEventsLost") && by_name.contains_key("ForkwatchAbsent"));

    // Metric names: a typo would make an alert that never fires, which promtool cannot see.
    let text = std::fs::read_to_string(&alerts).unwrap();
    let metrics_rs = std::fs::read_to_string(root().join("monitor/src/metrics.rs")).unwrap();
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("forkwatch_") {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    assert!(names.len() >= 3, "{names:?}");
    for name in &names {
        assert!(
            metrics_rs.contains(&format!("\"{name}\"")),
            "alerts.yaml uses {name}, which the daemon does not export (monitor/src/metrics.rs)"
        );
    }
}

/// scrape.yaml is a valid Prometheus configuration that scrapes job="forkwatch" at
/// localhost:9571 and loads alerts.yaml (`promtool check config` checks the rule file too).
#[test]
fn scrape_config_with_the_rules_passes_promtool_check_config() {
    let scrape = deploy("prometheus/scrape.yaml");
    let out = promtool(&["check", "config", scrape.to_str().unwrap()], &root());
    assert!(
        out.contains("SUCCESS: 1 rule files found") && out.contains("valid prometheus config"),
        "{out}"
    );
    let config = load(&scrape);
    assert_eq!(config.len(), 1);
    assert_eq!(strings(&config[0]["rule_files"]), ["alerts.yaml"]);
    let jobs = config[0]["scrape_configs"].as_array().unwrap();
    let job = jobs
        .iter()
        .find(|j| j["job_name"] == JOB)
        .expect("a forkwatch job");
    let targets: Vec<&str> = job["static_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| strings(&s["targets"]))
        .collect();
    assert_eq!(targets, [format!("localhost:{METRICS_PORT}")]);
}
