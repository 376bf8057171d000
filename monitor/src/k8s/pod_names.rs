//! `--k8s-pod-names`: pod UID → namespace and name, from a cache that a background task
//! refreshes from the API server. The finding path only reads the cache (a map lookup under a
//! lock held for just that): it never waits on the network, and a finding about a pod not in the
//! cache goes out without the names and wakes the refresher instead.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use crate::{
    enrich::cgroup::Attribution,
    k8s::client::K8sClient,
    k8s::pod_list::{self, PodName},
    telemetry::{self, Telemetry},
};

/// How often this node's pod list is fetched.
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Least time between two fetches, however many unknown pods show up (new pods' first
/// findings ask for an early refresh).
const MIN_GAP: Duration = Duration::from_secs(5);
/// While the API server keeps failing, at most one warning per this long (each failure is
/// counted in `forkwatch_pod_lookup_errors_total` and logged at debug level).
const WARN_EVERY: Duration = Duration::from_secs(600);

type Cache = Arc<RwLock<HashMap<String, PodName>>>;

/// The reading side, held by the daemon's finding loop.
#[derive(Clone)]
pub struct PodNames {
    cache: Cache,
    wake: Arc<Notify>,
}

impl PodNames {
    /// Starts the refresher (its first fetch at once) and returns the cache's reading side.
    pub fn start(client: K8sClient, telemetry: Arc<Mutex<Telemetry>>) -> (Self, JoinHandle<()>) {
        let names = Self {
            cache: Cache::default(),
            wake: Arc::new(Notify::new()),
        };
        let task = tokio::spawn(refresh(
            client,
            names.cache.clone(),
            names.wake.clone(),
            telemetry,
        ));
        (names, task)
    }

    /// Fills in the pod's namespace and name when the cache has them.
    pub fn annotate(&self, attribution: &mut Attribution) {
        let Some(uid) = &attribution.pod_uid else {
            return;
        };
        let known = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned();
        match known {
            Some(pod) => {
                attribution.pod_namespace = Some(pod.namespace);
                attribution.pod_name = Some(pod.name);
            }
            // A pod newer than the last fetch, most likely: fetch again soon.
            None => self.wake.notify_one(),
        }
    }
}

async fn refresh(
    client: K8sClient,
    cache: Cache,
    wake: Arc<Notify>,
    telemetry: Arc<Mutex<Telemetry>>,
) {
    let node = client.settings().node_name.clone();
    let mut previous: HashMap<String, PodName> = HashMap::new();
    let mut warned_at: Option<Instant> = None;
    let mut failing = false;
    loop {
        let fetched_at = Instant::now();
        let result = client
            .list_pods()
            .await
            .and_then(|body| pod_list::parse(&body));
        match result {
            Ok(pods) => {
                if failing {
                    tracing::info!(
                        node,
                        pods = pods.len(),
                        "pod names: the API server answers again"
                    );
                } else {
                    tracing::debug!(node, pods = pods.len(), "pod names refreshed");
                }
                failing = false;
                // Pods gone since the previous fetch keep their names one more round: a
                // finding about a process of a pod just deleted is often decided a moment later.
                let mut merged = pods.clone();
                for (uid, pod) in previous {
                    merged.entry(uid).or_insert(pod);
                }
                previous = pods;
                *cache.write().unwrap_or_else(|e| e.into_inner()) = merged;
            }
            Err(err) => {
                failing = true;
                telemetry::lock(&telemetry).metrics.pod_lookup_error();
                if warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        node,
                        %err,
                        "cannot list this node's pods: findings carry pod_uid without pod_namespace \
                         and pod_name until it works (retried every {} s; this warning at most \
                         every {} min, failures counted in forkwatch_pod_lookup_errors_total)",
                        REFRESH_EVERY.as_secs(),
                        WARN_EVERY.as_secs() / 60
                    );
                } else {
                    tracing::debug!(node, %err, "pod list failed again");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(fetched_at + REFRESH_EVERY) => {}
            () = wake.notified() => tokio::time::sleep_until(fetched_at + MIN_GAP).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotate_reads_the_cache_and_asks_for_unknown_pods() {
        let names = PodNames {
            cache: Cache::default(),
            wake: Arc::new(Notify::new()),
        };
        names.cache.write().unwrap().insert(
            "u1".into(),
            PodName {
                namespace: "shop".into(),
                name: "web-0".into(),
            },
        );
        let mut a = Attribution {
            pod_uid: Some("u1".into()),
            ..Default::default()
        };
        names.annotate(&mut a);
        assert_eq!(
            (a.pod_namespace.as_deref(), a.pod_name.as_deref()),
            (Some("shop"), Some("web-0"))
        );
        // A host process: nothing to look up.
        let mut host = Attribution::default();
        names.annotate(&mut host);
        assert_eq!(host, Attribution::default());
        // An unknown pod: no names, and the refresher is woken (the permit is stored).
        let mut unknown = Attribution {
            pod_uid: Some("u2".into()),
            ..Default::default()
        };
        names.annotate(&mut unknown);
        assert_eq!(unknown.pod_name, None);
        let woken = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(1), names.wake.notified()).await
            });
        assert!(woken.is_ok(), "an unknown pod wakes the refresher");
    }
}
