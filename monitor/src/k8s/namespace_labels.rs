//! Bounded `namespace` label values for `forkwatch_findings_by_namespace_total`: a cluster can
//! have thousands of namespaces, and each label value is a time series in Prometheus forever,
//! so at most [`MAX_NAMESPACES`] real namespaces get their own value; later ones share
//! `_other`. The reserved values start with `_`, which no Kubernetes namespace name can.

use std::collections::HashSet;

/// Distinct real namespaces exported as label values (per daemon run).
pub const MAX_NAMESPACES: usize = 100;
/// A namespace seen after [`MAX_NAMESPACES`] others.
pub const OTHER: &str = "_other";
/// A finding from a pod whose name is not known (yet, or the API server cannot be reached).
pub const UNKNOWN: &str = "_unknown";
/// A finding not about a pod: a host process, or `events_lost`.
pub const NONE: &str = "_none";

#[derive(Debug, Default)]
pub struct NamespaceLabels {
    admitted: HashSet<String>,
}

impl NamespaceLabels {
    /// The label value for a finding's pod: `pod_uid` (is it from a pod at all) and the
    /// resolved namespace, if any.
    pub fn label<'a>(&mut self, in_pod: bool, namespace: Option<&'a str>) -> &'a str {
        match namespace {
            None if in_pod => UNKNOWN,
            None => NONE,
            Some(ns) if self.admitted.contains(ns) => ns,
            Some(ns) if self.admitted.len() < MAX_NAMESPACES => {
                self.admitted.insert(ns.to_owned());
                ns
            }
            Some(_) => OTHER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_cap_of_distinct_namespaces_then_other() {
        let mut labels = NamespaceLabels::default();
        let names: Vec<String> = (0..MAX_NAMESPACES + 5).map(|i| format!("ns-{i}")).collect();
        let values: Vec<&str> = names.iter().map(|n| labels.label(true, Some(n))).collect();
        assert_eq!(values[..MAX_NAMESPACES], names[..MAX_NAMESPACES]);
        assert!(
            values[MAX_NAMESPACES..].iter().all(|v| *v == OTHER),
            "{values:?}"
        );
        // Admitted namespaces keep their value after the cap is reached.
        assert_eq!(labels.label(true, Some("ns-0")), "ns-0");
        assert_eq!(labels.label(true, Some("ns-late")), OTHER);
        let distinct: HashSet<&str> = values.into_iter().collect();
        assert_eq!(distinct.len(), MAX_NAMESPACES + 1);
    }

    #[test]
    fn unresolved_pods_and_host_processes_have_reserved_values() {
        let mut labels = NamespaceLabels::default();
        assert_eq!(labels.label(true, None), UNKNOWN);
        assert_eq!(labels.label(false, None), NONE);
        // Reserved values do not use up the cap.
        assert!(labels.admitted.is_empty());
    }
}
