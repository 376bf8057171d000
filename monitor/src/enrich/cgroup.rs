//! Which container, pod or systemd unit a process belongs to, from its cgroup path.
//!
//! Runtimes name cgroups by convention, not by contract, and each has a systemd-driver and a
//! cgroupfs-driver spelling; the shapes recognized here are the ones containerd, CRI-O, Docker
//! and Podman produce, under Kubernetes (`kubepods`) or not. Anything else is reported as just
//! the path.

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// The cgroup v2 path (or, on a v1-only host, the systemd hierarchy's); null when unknown.
    pub cgroup: Option<String>,
    pub container: Option<Container>,
    /// Kubernetes pod UID, from a `kubepods` cgroup.
    pub pod_uid: Option<String>,
    /// The pod's namespace and name, from the API server (`--k8s-pod-names`); null when off or
    /// not known (yet).
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// The systemd unit (service or scope) of a host process.
    pub systemd_unit: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    /// "containerd", "cri-o", "docker" or "podman".
    pub runtime: &'static str,
    /// The full container id (64 hex digits).
    pub id: String,
}

/// The cgroup path from the contents of /proc/<pid>/cgroup: the v2 line (`0::/path`), or on a
/// v1-only host the systemd hierarchy's (`N:name=systemd:/path`).
pub fn path_from_proc(contents: &str) -> Option<&str> {
    let mut v1 = None;
    for line in contents.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            return Some(path);
        }
        if controllers == "name=systemd" || (v1.is_none() && controllers.contains("pids")) {
            v1 = Some(path);
        }
    }
    v1
}

/// Reads the attribution of a cgroup path.
pub fn attribute(path: &str) -> Attribution {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let container = components.iter().rev().find_map(|c| container_of(c));
    let pod_uid = if components.iter().any(|c| c.starts_with("kubepods")) {
        components.iter().find_map(|c| pod_uid_of(c))
    } else {
        None
    };
    // A host process: the innermost unit that is not a container's own scope.
    let systemd_unit = if container.is_some() || pod_uid.is_some() {
        None
    } else {
        components
            .iter()
            .rev()
            .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
            .map(|c| (*c).to_owned())
    };
    Attribution {
        cgroup: Some(path.to_owned()),
        container,
        pod_uid,
        systemd_unit,
        ..Default::default()
    }
}

/// A container id in one cgroup path component, by runtime naming convention.
fn container_of(component: &str) -> Option<Container> {
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    let prefixes = [
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("docker-", "docker"),
        ("libpod-", "podman"),
    ];
    for (prefix, runtime) in prefixes {
        if let Some(id) = stem.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Some(Container {
                runtime,
                id: id.to_owned(),
            });
        }
    }
    // cgroupfs drivers: a bare id under /docker/ or a pod's directory. Which runtime is not in
    // the name; containerd is the Kubernetes default.
    is_container_id(stem).then(|| Container {
        runtime: "containerd",
        id: stem.to_owned(),
    })
}

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(component: &str) -> Option<String> {
    let stem = component.strip_suffix(".slice").unwrap_or(component);
    let start = stem.rfind("pod")?;
    let uid = stem[start + 3..].replace('_', "-");
    let valid = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1e5b7d4f60a8e2c4b6d8f0a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5";
    const UID: &str = "0c6f3b7e-8a1d-4e2f-9b3c-5d7e9f1a2b4c";

    fn container(runtime: &'static str) -> Option<Container> {
        Some(Container {
            runtime,
            id: ID.into(),
        })
    }

    #[test]
    fn kubernetes_with_the_systemd_driver() {
        let uid = UID.replace('-', "_");
        for (scope, runtime) in [
            (format!("cri-containerd-{ID}.scope"), "containerd"),
            (format!("crio-{ID}.scope"), "cri-o"),
            (format!("docker-{ID}.scope"), "docker"),
        ] {
            let path = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/{scope}"
            );
            let a = attribute(&path);
            assert_eq!(a.container, container(runtime), "{path}");
            assert_eq!(a.pod_uid.as_deref(), Some(UID), "{path}");
            assert_eq!(a.systemd_unit, None);
        }
        // Guaranteed QoS has no QoS slice.
        let path = format!("/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{ID}.scope");
        assert_eq!(attribute(&path).pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn kubernetes_with_the_cgroupfs_driver() {
        let a = attribute(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!(a.container, container("containerd"));
        assert_eq!(a.pod_uid.as_deref(), Some(UID));
        let a = attribute(&format!("/kubepods/burstable/pod{UID}/crio-{ID}"));
        assert_eq!(a.container, container("cri-o"));
    }

    #[test]
    fn docker_and_podman_outside_kubernetes() {
        let a = attribute(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(a.container, container("docker"));
        assert_eq!((a.pod_uid, a.systemd_unit), (None, None));
        assert_eq!(
            attribute(&format!("/docker/{ID}")).container.unwrap().id,
            ID
        );
        let a = attribute(&format!("/machine.slice/libpod-{ID}.scope/container"));
        assert_eq!(a.container, container("podman"));
    }

    #[test]
    fn host_services_and_sessions() {
        let a = attribute("/system.slice/nginx.service");
        assert_eq!(a.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!(a.container, None);
        let a = attribute("/user.slice/user-1000.slice/session-4.scope");
        assert_eq!(a.systemd_unit.as_deref(), Some("session-4.scope"));
        let a = attribute("/");
        assert_eq!(
            a,
            Attribution {
                cgroup: Some("/".into()),
                ..Default::default()
            }
        );
        // Not a pod outside kubepods, not a container id unless 64 hex digits.
        assert_eq!(attribute("/system.slice/podman.service").pod_uid, None);
        assert_eq!(attribute("/docker/abc").container, None);
    }

    #[test]
    fn proc_cgroup_files_of_v2_hybrid_and_v1_hosts() {
        assert_eq!(
            path_from_proc("0::/system.slice/a.service\n"),
            Some("/system.slice/a.service")
        );
        let hybrid =
            "12:pids:/user.slice\n1:name=systemd:/user.slice/s.scope\n0::/user.slice/s.scope\n";
        assert_eq!(path_from_proc(hybrid), Some("/user.slice/s.scope"));
        let v1 = "12:pids:/docker/x\n1:name=systemd:/docker/y\n";
        assert_eq!(path_from_proc(v1), Some("/docker/y"));
        assert_eq!(path_from_proc("garbage"), None);
        assert_eq!(path_from_proc(""), None);
    }
}
