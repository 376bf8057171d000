//! End-to-end, as root: a real Prometheus server (Debian's `prometheus` package) on loopback
//! scrapes the daemon, and its HTTP API shows a finding counted.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{self, Daemon, run_forker, try_http_get};

/// A Prometheus server for the length of a test.
struct Prometheus {
    child: Child,
    _watched: Option<harness::Watched>,
    addr: std::net::SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second.
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("prometheus-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: forkwatch\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (cargo xtask setup installs Debian's prometheus package)");
        Prometheus {
            _watched: harness::watch(&child),
            child,
            addr,
            dir,
        }
    }

    /// The value of an instant query's first series, if any.
    fn query(&self, promql: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let (status, body) = try_http_get(self.addr, &path).ok()?;
        if status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query string value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_daemon_and_sees_a_finding_counted() {
    harness::root().run(|| {
        let daemon = Daemon::start(&[]);
        let prometheus = Prometheus::start(daemon.metrics_addr);
        let series = "forkwatch_findings_total{kind=\"mt_fork_no_exec\",severity=\"warning\"}";
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done() {
                assert!(Instant::now() < deadline, "Prometheus never showed {what}");
                std::thread::sleep(Duration::from_millis(250));
            }
        };
        wait_for("the target up", &|| {
            prometheus.query("up{job=\"forkwatch\"}") == Some(1.0)
        });
        let before = prometheus
            .query(series)
            .expect("the series is exported from the start");

        let run = run_forker("mt-fork-no-exec", &["3", "10"]);
        daemon.expect_finding(run.child(), Duration::from_secs(10));
        wait_for("the finding counted", &|| {
            prometheus.query(series).is_some_and(|now| now > before)
        });
        let build = prometheus.query("forkwatch_build_info");
        assert_eq!(build, Some(1.0));
    });
}
