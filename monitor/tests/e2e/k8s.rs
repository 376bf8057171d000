//! `--k8s-pod-names` end to end: a fake API server on loopback speaking HTTPS with a CA made
//! here (the daemon's production path: TLS verified against --k8s-ca-file, a bearer token from
//! --k8s-token-file), the real daemon, and a real multithreaded fork without exec inside a fake
//! kubepods cgroup, so that the pod UID comes from /proc/<pid>/cgroup as on a node.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::harness::{self, Background, Daemon, compiled, spawn_holding};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls::{
    ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};

const NODE: &str = "e2e-node";
/// The tests that make fake pod cgroups, one at a time: they share the kubepods slices above
/// their pods, which the last one out removes, and a test removing them while another creates
/// its pod below them makes that creation fail.
static CGROUPS: harness::Serial = harness::Serial::new();
const TOKEN: &str = "e2e-token-5f1c";
/// Where cgroup v2 is mounted on this host: /sys/fs/cgroup/unified on a hybrid host.
fn cgroup2_root() -> PathBuf {
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(root).join("cgroup.procs").exists()
            && Path::new(root).join("cgroup.controllers").exists()
        {
            return root.into();
        }
    }
    panic!("no cgroup v2 hierarchy mounted at /sys/fs/cgroup/unified or /sys/fs/cgroup");
}

/// A pod UID no other test run uses.
fn fresh_uid(salt: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
        std::process::id(),
        salt & 0xffff,
        nanos & 0xfff,
        u64::from(nanos) << 8 | u64::from(salt & 0xff)
    )
}

/// A fake pod's cgroup, systemd-driver style, removed (leaf first) when dropped.
struct PodCgroup {
    /// From the root down: kubepods.slice and the QoS slice (shared by concurrent tests), the
    /// pod's slice and the container's scope (this test's own).
    dirs: Vec<PathBuf>,
    scope: PathBuf,
    uid: String,
    container_id: String,
}

impl PodCgroup {
    fn create(uid: &str) -> PodCgroup {
        let underscored = uid.replace('-', "_");
        let container_id: String = format!("{:0>64}", uid.replace('-', ""));
        let relative = [
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            format!("kubepods-besteffort-pod{underscored}.slice"),
            format!("cri-containerd-{container_id}.scope"),
        ];
        let mut dirs = Vec::new();
        let mut dir = cgroup2_root();
        for part in relative {
            dir = dir.join(part);
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    panic!("mkdir {}: {e}", dir.display())
                }
                _ => dirs.push(dir.clone()),
            }
        }
        PodCgroup {
            dirs,
            scope: dir,
            uid: uid.to_owned(),
            container_id,
        }
    }

    /// The path as /proc/<pid>/cgroup shows it.
    fn path(&self) -> String {
        let root = cgroup2_root();
        format!("/{}", self.scope.strip_prefix(root).unwrap().display())
    }

    /// Starts `forker mt-fork-no-exec` inside this cgroup (a shell moves itself in, then execs
    /// it), its parent held until finished: the daemon reads the pod from the parent's
    /// /proc/PID/cgroup when the fork reaches it, which can be after a parent that exits at once
    /// is gone (it was, under load).
    fn spawn_forker(&self) -> Background {
        let procs = self.scope.join("cgroup.procs");
        let script = format!(
            "echo $$ > '{}' && exec '{}' mt-fork-no-exec 2 50",
            procs.display(),
            compiled("forker").display()
        );
        spawn_holding(Command::new("sh").arg("-c").arg(script))
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // rmdir only succeeds once no process is left in the cgroup: the fixture has exited,
        // its child may take a moment longer. The shared parents go with the last test using
        // them (rmdir fails while another test's pod is inside; a real node's are never empty).
        let (shared, own) = self.dirs.split_at(2);
        for dir in own.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                std::thread::panicking() || !dir.exists(),
                "cannot remove {}",
                dir.display()
            );
        }
        for dir in shared.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// What the fake API server saw.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, Option<String>)>,
}

/// A fake API server: HTTPS on 127.0.0.1 with a certificate from a CA made here, answering
/// the pod list for one pod (403 for any token but TOKEN, like an API server without RBAC).
struct FakeApi {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    dir: PathBuf,
}

impl FakeApi {
    fn start(name: &str, pods: &[(&str, &str, &str)]) -> FakeApi {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("k8s-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();

        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();
        let config = Arc::new(config);
        let items: Vec<String> = pods
            .iter()
            .map(|(uid, ns, name)| {
                format!(r#"{{"metadata":{{"uid":"{uid}","namespace":"{ns}","name":"{name}"}}}}"#)
            })
            .collect();
        let body = format!(
            r#"{{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","items":[{}]}}"#,
            items.join(",")
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let seen_by_server = seen.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming().map_while(Result::ok) {
                let conn = ServerConnection::new(config.clone()).unwrap();
                let mut tls = StreamOwned::new(conn, tcp);
                let Some((path, auth)) = read_request(&mut tls) else {
                    continue;
                };
                let authorized = auth.as_deref() == Some(&format!("Bearer {TOKEN}"));
                seen_by_server.lock().unwrap().requests.push((path, auth));
                let (status, body) = if authorized {
                    ("200 OK", body.as_str())
                } else {
                    ("403 Forbidden", r#"{"kind":"Status","reason":"Forbidden"}"#)
                };
                let _ = write!(
                    tls,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        FakeApi { addr, seen, dir }
    }

    /// The daemon's flags pointing at this server.
    fn flags(&self, token_file: &Path) -> Vec<String> {
        vec![
            "--k8s-pod-names".into(),
            "--k8s-api-url".into(),
            format!("https://{}", self.addr),
            "--k8s-ca-file".into(),
            self.dir.join("ca.crt").display().to_string(),
            "--k8s-token-file".into(),
            token_file.display().to_string(),
            "--k8s-node-name".into(),
            NODE.into(),
        ]
    }

    fn wait_for_requests(&self, count: usize, timeout: Duration) -> Vec<(String, Option<String>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.seen.lock().unwrap().requests.clone();
            if requests.len() >= count {
                return requests;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon made {} of {count} pod-list requests within {timeout:?}",
                requests.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The request line's path and the Authorization header of one HTTP/1.1 request.
fn read_request(stream: &mut impl std::io::Read) -> Option<(String, Option<String>)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_owned();
    let mut auth = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            auth = Some(value.trim().to_owned());
        }
    }
    Some((path, auth))
}

fn start_daemon(flags: &[String]) -> Daemon {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Daemon::start(&flags)
}

/// The finding about the fixture's child, which ran in the pod's cgroup.
fn finding_in_pod(daemon: &Daemon, pod: &PodCgroup) -> serde_json::Value {
    let fixture = pod.spawn_forker();
    let finding = daemon.expect_kind(
        fixture.run.child(),
        "mt_fork_no_exec",
        Duration::from_secs(10),
    );
    fixture.finish();
    assert_eq!(finding["cgroup"], pod.path(), "{finding}");
    assert_eq!(finding["pod_uid"], pod.uid, "{finding}");
    assert_eq!(finding["container"]["runtime"], "containerd", "{finding}");
    assert_eq!(finding["container"]["id"], pod.container_id, "{finding}");
    finding
}

#[test]
fn pod_names_come_from_the_api_server_over_verified_https() {
    harness::root().serial(&CGROUPS).run(|| {
        let pod = PodCgroup::create(&fresh_uid(1));
        let api = FakeApi::start(
            "names",
            &[
                ("11111111-2222-4333-8444-555555555555", "other", "db-0"),
                (&pod.uid, "shop-e2e", "web-7f9c"),
            ],
        );
        let daemon = start_daemon(&api.flags(&api.dir.join("token")));
        // The first refresh happens at start; wait for it so the finding can carry the names.
        let requests = api.wait_for_requests(1, Duration::from_secs(10));
        let (path, auth) = &requests[0];
        assert_eq!(
            path,
            &format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{NODE}"),
            "only this node's pods are listed"
        );
        assert_eq!(auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));

        let finding = finding_in_pod(&daemon, &pod);
        assert_eq!(finding["pod_namespace"], "shop-e2e", "{finding}");
        assert_eq!(finding["pod_name"], "web-7f9c", "{finding}");
        let series =
            "forkwatch_findings_by_namespace_total{kind=\"mt_fork_no_exec\",namespace=\"shop-e2e\"}";
        assert!(daemon.metric(series) >= 1.0);
        assert_eq!(daemon.metric("forkwatch_pod_lookup_errors_total"), 0.0);
    });
}

/// An API server that refuses the token: one warning, the error counted, and findings still
/// reported, with the pod UID but no names (namespace `_unknown` in the metric). The unknown pod
/// asks for an early refresh, which fails again without a second warning.
#[test]
fn an_api_failure_warns_once_and_findings_go_out_without_names() {
    harness::root().serial(&CGROUPS).run(|| {
        let pod = PodCgroup::create(&fresh_uid(2));
        let api = FakeApi::start("refused", &[(&pod.uid, "shop-e2e", "web-0")]);
        let wrong = api.dir.join("wrong-token");
        std::fs::write(&wrong, "not-the-token").unwrap();
        let daemon = start_daemon(&api.flags(&wrong));
        api.wait_for_requests(1, Duration::from_secs(10));

        let finding = finding_in_pod(&daemon, &pod);
        assert!(finding["pod_namespace"].is_null(), "{finding}");
        assert!(finding["pod_name"].is_null(), "{finding}");
        let unknown =
            "forkwatch_findings_by_namespace_total{kind=\"mt_fork_no_exec\",namespace=\"_unknown\"}";
        assert!(daemon.metric(unknown) >= 1.0);
        // The unknown pod wakes the refresher: a second request well before the 30 s period.
        api.wait_for_requests(2, Duration::from_secs(15));
        daemon.wait_metric(
            "forkwatch_pod_lookup_errors_total",
            |v| v >= 2.0,
            Duration::from_secs(5),
            "second failure not counted",
        );
        let log = daemon.log();
        let warnings = log
            .lines()
            .filter(|l| l.contains("cannot list this node's pods"))
            .collect::<Vec<_>>();
        assert_eq!(
            warnings.len(),
            1,
            "one warning for repeated failures:\n{log}"
        );
        assert!(warnings[0].contains("403 Forbidden"), "{}", warnings[0]);
    });
}

/// Off by default: no API request, no per-namespace metric, names null.
#[test]
fn without_the_flag_there_is_no_lookup_and_no_namespace_metric() {
    harness::root().serial(&CGROUPS).run(|| {
        let pod = PodCgroup::create(&fresh_uid(3));
        let daemon = Daemon::start(&[]);
        let finding = finding_in_pod(&daemon, &pod);
        assert!(finding["pod_name"].is_null(), "{finding}");
        let (_, metrics) = daemon.get("/metrics");
        assert!(metrics.contains("forkwatch_findings_total"), "{metrics}");
        assert!(
            !metrics.contains("forkwatch_findings_by_namespace_total")
                && !metrics.contains("forkwatch_pod_lookup_errors_total"),
            "{metrics}"
        );
    });
}

/// The flag outside a cluster, with no override: a usage error naming the problem and the fix,
/// before anything is loaded (so this needs no privileges).
#[test]
fn the_flag_without_an_api_server_is_a_usage_error() {
    harness::unprivileged().run(|| {
        let output = Command::new(harness::BINARY)
            .args(["run", "--k8s-pod-names", "--metrics-addr", "127.0.0.1:0"])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("FORKWATCH_K8S_API_URL")
            .env("NODE_NAME", NODE)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("KUBERNETES_SERVICE_HOST is not set")
                && stderr.contains("--k8s-api-url"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");

        // A CA file that is not there: named, with the flag.
        let output = Command::new(harness::BINARY)
            .args(["run", "--k8s-pod-names", "--metrics-addr", "127.0.0.1:0"])
            .args([
                "--k8s-api-url",
                "https://127.0.0.1:1",
                "--k8s-node-name",
                NODE,
            ])
            .args(["--k8s-ca-file", "/nonexistent/ca.crt"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--k8s-ca-file /nonexistent/ca.crt"),
            "{stderr}"
        );
    });
}
