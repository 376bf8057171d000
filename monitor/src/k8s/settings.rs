//! Where `--k8s-pod-names` finds the API server, its credentials and this node's name: the
//! in-cluster conventions (`KUBERNETES_SERVICE_HOST`/`_PORT`, the service account's token and CA
//! files, `NODE_NAME` from the downward API), each overridable by a flag. Pure: the environment
//! is passed in, so every error message is unit-tested.

use std::path::PathBuf;

use hyper::Uri;

use crate::cli::K8sArgs;

/// Everything needed to list this node's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sSettings {
    /// `host:port` to connect to.
    pub authority: String,
    /// The host the server's certificate must be for (an IP address or a DNS name).
    pub host: String,
    /// Path and query of the pod list: this node's pods only.
    pub pods_path: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub node_name: String,
}

/// Resolves the settings from the flags and the environment (`env` looks a variable up).
pub fn resolve(
    args: &K8sArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<K8sSettings, String> {
    let url = match &args.k8s_api_url {
        Some(url) => url.clone(),
        None => in_cluster_url(&env)?,
    };
    let uri: Uri = url.parse().map_err(|e| {
        format!("--k8s-api-url {url}: not a URL ({e}); write it as https://HOST:PORT")
    })?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "--k8s-api-url {url}: the API server is reached over HTTPS only (its CA is \
             --k8s-ca-file); write it as https://HOST:PORT"
        ));
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("--k8s-api-url {url}: no host; write it as https://HOST:PORT"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let base = uri.path().trim_end_matches('/');
    let node_name = match &args.k8s_node_name {
        Some(name) => name.clone(),
        None => env("NODE_NAME").filter(|n| !n.is_empty()).ok_or_else(|| {
            "--k8s-pod-names needs this node's name, to list only its pods: set NODE_NAME from \
             the downward API (env valueFrom fieldRef spec.nodeName, as deploy/kubernetes/\
             pod-names does) or pass --k8s-node-name (FORKWATCH_K8S_NODE_NAME)"
                .to_owned()
        })?,
    };
    // A DNS subdomain, so it goes into the query string as is.
    let valid = !node_name.is_empty()
        && node_name.len() <= 253
        && node_name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid {
        return Err(format!(
            "node name {node_name:?} is not a Kubernetes node name (lowercase letters, digits, \
             '-' and '.'); check NODE_NAME or --k8s-node-name"
        ));
    }
    Ok(K8sSettings {
        authority,
        host,
        pods_path: format!("{base}/api/v1/pods?fieldSelector=spec.nodeName%3D{node_name}"),
        token_file: args.k8s_token_file.clone(),
        ca_file: args.k8s_ca_file.clone(),
        node_name,
    })
}

/// The API server's URL inside a pod, from the variables the kubelet sets in every container.
fn in_cluster_url(env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let Some(host) = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty()) else {
        return Err(
            "--k8s-pod-names: KUBERNETES_SERVICE_HOST is not set, so the API server is \
                    unknown (not running in a Kubernetes pod?); run in the cluster \
                    (deploy/kubernetes/pod-names), pass --k8s-api-url https://HOST:PORT \
                    (FORKWATCH_K8S_API_URL), or drop --k8s-pod-names"
                .to_owned(),
        );
    };
    let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".to_owned());
    Ok(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::k8s::{CA_FILE, TOKEN_FILE};

    fn args(url: Option<&str>, node: Option<&str>) -> K8sArgs {
        K8sArgs {
            k8s_pod_names: true,
            k8s_api_url: url.map(Into::into),
            k8s_token_file: TOKEN_FILE.into(),
            k8s_ca_file: CA_FILE.into(),
            k8s_node_name: node.map(Into::into),
        }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn in_cluster_from_the_kubelets_variables() {
        let vars = [
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("NODE_NAME", "node-1.example"),
        ];
        let s = resolve(&args(None, None), env(&vars)).unwrap();
        assert_eq!(s.authority, "10.96.0.1:443");
        assert_eq!(s.host, "10.96.0.1");
        assert_eq!(
            s.pods_path,
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1.example"
        );
        assert_eq!(s.token_file, PathBuf::from(TOKEN_FILE));
        let v6 = [("KUBERNETES_SERVICE_HOST", "fd00::1"), ("NODE_NAME", "n")];
        let s = resolve(&args(None, None), env(&v6)).unwrap();
        assert_eq!(
            (s.authority.as_str(), s.host.as_str()),
            ("[fd00::1]:443", "fd00::1")
        );
    }

    #[test]
    fn overrides_win() {
        let vars = [("KUBERNETES_SERVICE_HOST", "10.96.0.1"), ("NODE_NAME", "a")];
        let s = resolve(
            &args(Some("https://localhost:6443/prefix/"), Some("b")),
            env(&vars),
        )
        .unwrap();
        assert_eq!(s.authority, "localhost:6443");
        assert_eq!(s.node_name, "b");
        assert!(
            s.pods_path.starts_with("/prefix/api/v1/pods?"),
            "{}",
            s.pods_path
        );
    }

    #[test]
    fn missing_or_bad_settings_name_the_problem_and_the_fix() {
        let err = resolve(&args(None, None), env(&[("NODE_NAME", "n")])).unwrap_err();
        assert!(
            err.contains("KUBERNETES_SERVICE_HOST is not set") && err.contains("--k8s-api-url"),
            "{err}"
        );
        let vars = [("KUBERNETES_SERVICE_HOST", "10.96.0.1")];
        let err = resolve(&args(None, None), env(&vars)).unwrap_err();
        assert!(
            err.contains("NODE_NAME") && err.contains("--k8s-node-name"),
            "{err}"
        );
        for (url, needle) in [
            ("http://127.0.0.1:8001", "HTTPS only"),
            ("not a url", "not a URL"),
            ("https://", "not a URL"),
        ] {
            let err = resolve(&args(Some(url), Some("n")), env(&[])).unwrap_err();
            assert!(err.contains(needle), "{url}: {err}");
        }
        let err = resolve(&args(Some("https://h"), Some("Node_1&x=y")), env(&[])).unwrap_err();
        assert!(err.contains("not a Kubernetes node name"), "{err}");
    }
}
