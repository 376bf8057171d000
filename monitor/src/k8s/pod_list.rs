//! The API server's pod list (`GET /api/v1/pods`, as a `PodList` or, metadata only, a
//! `PartialObjectMetadataList`) → pod UID → namespace and name. Pure: no I/O, so it is
//! unit-tested here and fuzzable like the other parsers of untrusted input.

use std::collections::HashMap;

use serde::Deserialize;

/// A pod's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

#[derive(Deserialize)]
struct PodList {
    kind: Option<String>,
    #[serde(default)]
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    #[serde(default)]
    metadata: Metadata,
}

#[derive(Default, Deserialize)]
struct Metadata {
    uid: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

/// Longest namespace or pod name Kubernetes allows (a DNS subdomain); anything longer is not
/// a real pod and is skipped rather than carried into findings.
const MAX_NAME: usize = 253;

/// Parses a `PodList` into uid → name. Items without a uid, namespace or name, or with
/// impossible values, are skipped: one odd item must not hide every other pod's name.
pub fn parse(body: &[u8]) -> Result<HashMap<String, PodName>, String> {
    let list: PodList = serde_json::from_slice(body)
        .map_err(|e| format!("the pod list is not the JSON the API server sends: {e}"))?;
    if let Some(kind) = &list.kind
        && kind != "PodList"
        && kind != "PartialObjectMetadataList"
    {
        return Err(format!("expected a PodList, got a {kind}"));
    }
    Ok(list
        .items
        .into_iter()
        .filter_map(|pod| {
            let Metadata {
                uid,
                namespace,
                name,
            } = pod.metadata;
            let (uid, namespace, name) = (uid?, namespace?, name?);
            let plausible = |s: &str| !s.is_empty() && s.len() <= MAX_NAME;
            (plausible(&uid) && plausible(&namespace) && plausible(&name))
                .then(|| (uid.to_ascii_lowercase(), PodName { namespace, name }))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0c6f3b7e-8a1d-4e2f-9b3c-5d7e9f1a2b4c";

    #[test]
    fn a_pod_list_maps_uids_to_names() {
        let body = format!(
            r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{"resourceVersion":"42"}},
               "items":[{{"metadata":{{"name":"web-0","namespace":"shop","uid":"{UID}",
                          "labels":{{"app":"web"}}}},"spec":{{"nodeName":"n1"}},"status":{{}}}},
                        {{"metadata":{{"name":"db-0","namespace":"data","uid":"AB-CD"}}}}]}}"#
        );
        let pods = parse(body.as_bytes()).unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(
            pods[UID],
            PodName {
                namespace: "shop".into(),
                name: "web-0".into()
            }
        );
        // UIDs are compared lowercase, the way cgroup paths spell them.
        assert_eq!(pods["ab-cd"].name, "db-0");
    }

    #[test]
    fn incomplete_items_are_skipped_not_fatal() {
        let long = "x".repeat(254);
        let body = format!(
            r#"{{"kind":"PodList","items":[{{"metadata":{{"name":"a","namespace":"n"}}}},
               {{"metadata":{{"name":"","namespace":"n","uid":"u1"}}}},
               {{"metadata":{{"name":"{long}","namespace":"n","uid":"u2"}}}},
               {{}},{{"metadata":{{"name":"ok","namespace":"n","uid":"u3"}}}}]}}"#
        );
        let pods = parse(body.as_bytes()).unwrap();
        assert_eq!(pods.keys().collect::<Vec<_>>(), ["u3"]);
        assert!(parse(br#"{"kind":"PodList"}"#).unwrap().is_empty());
        let metadata_only = br#"{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1",
            "items":[{"kind":"PartialObjectMetadata","metadata":{"name":"p","namespace":"n","uid":"u"}}]}"#;
        assert_eq!(parse(metadata_only).unwrap()["u"].namespace, "n");
    }

    #[test]
    fn errors_say_what_was_wrong() {
        let err = parse(b"<html>502 Bad Gateway</html>").unwrap_err();
        assert!(err.contains("not the JSON"), "{err}");
        let err = parse(br#"{"kind":"Status","status":"Failure"}"#).unwrap_err();
        assert!(err.contains("expected a PodList, got a Status"), "{err}");
        assert!(parse(br#"{"items":{}}"#).is_err());
    }
}
