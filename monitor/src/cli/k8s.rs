//! The flags of `--k8s-pod-names`. Their defaults are where Kubernetes mounts a pod's service
//! account, so that a DaemonSet needs no flag but the switch.

use std::path::PathBuf;

use clap::Args;

pub const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// `--k8s-pod-names` and where it finds the API server. Off by default: without it the daemon
/// makes no API request and needs no RBAC.
#[derive(Debug, Clone, Args)]
pub struct K8sArgs {
    /// Add pod_namespace and pod_name to findings from Kubernetes pods, from the API server
    /// (lists this node's pods every 30 s; needs RBAC `list` on pods), and export
    /// forkwatch_findings_by_namespace_total.
    #[arg(long, env = "FORKWATCH_K8S_POD_NAMES")]
    pub k8s_pod_names: bool,
    /// The API server [default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, env = "FORKWATCH_K8S_API_URL", value_name = "URL")]
    pub k8s_api_url: Option<String>,
    /// Bearer token file, re-read for every request (tokens rotate).
    #[arg(long, env = "FORKWATCH_K8S_TOKEN_FILE", default_value = TOKEN_FILE, value_name = "PATH")]
    pub k8s_token_file: PathBuf,
    /// CA certificate(s) (PEM) the API server's certificate must chain to.
    #[arg(long, env = "FORKWATCH_K8S_CA_FILE", default_value = CA_FILE, value_name = "PATH")]
    pub k8s_ca_file: PathBuf,
    /// This node's name, to list only its pods [default: $NODE_NAME, from the downward API].
    #[arg(long, env = "FORKWATCH_K8S_NODE_NAME", value_name = "NAME")]
    pub k8s_node_name: Option<String>,
}
