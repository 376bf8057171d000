//! Kubernetes: pod namespace and name for findings from a pod's cgroup (`--k8s-pod-names`), and
//! the cap on the namespace label of the per-namespace metric. Nothing here runs unless asked.

pub mod client;
pub mod namespace_labels;
pub mod pod_list;
pub mod pod_names;
pub mod settings;
