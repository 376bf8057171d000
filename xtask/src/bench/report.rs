//! report.json: every sample of a bench run, the statistics of each condition, and each
//! target with what was measured against it.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};

use super::{
    Bench, Condition, Host, IDLE_CPU_TARGET_PCT, REPETITIONS, RSS_TARGET_KIB, Results, Sample,
    Workload, hooks, latency, processes::bpftrace_script,
};

/// (min, median, max); NaN for no samples.
fn stats(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    (sorted[0], median, sorted[sorted.len() - 1])
}

/// The items `clean` accepts, or all of them when it accepts none: a condition whose every sample
/// was disturbed is still reported, from all of them, rather than not at all.
fn clean_or_all<T>(items: &[T], clean: impl Fn(&T) -> bool) -> Vec<&T> {
    let accepted: Vec<&T> = items.iter().filter(|item| clean(item)).collect();
    if accepted.is_empty() {
        items.iter().collect()
    } else {
        accepted
    }
}

/// The ratios of (b) to (a) sample by sample: the two conditions' samples are pairs taken back
/// to back (run.rs `pass_paired`), the i-th of one with the i-th of the other. Pairs with an
/// unclean side are left out, unless no pair is clean.
fn paired_ratios(none: &[Sample], forkwatch: &[Sample]) -> Vec<f64> {
    let pairs: Vec<(&Sample, &Sample)> = none.iter().zip(forkwatch).collect();
    clean_or_all(&pairs, |(a, b)| a.clean && b.clean)
        .into_iter()
        .map(|(a, b)| b.t / a.t)
        .collect()
}

/// The statistics of the clean samples, or of all of them when none is clean, and against
/// `baseline` (the no-monitor entry of the same host) the ratios: with `paired` (the ratios of
/// back-to-back pairs) their median, else the ratio of the medians. `spread_pct`: half the
/// range of the samples in percent of their median (None for fewer than two samples).
fn condition_json(samples: &[Sample], baseline: Option<&Value>, paired: Option<&[f64]>) -> Value {
    let all: Vec<f64> = samples.iter().map(|s| s.t).collect();
    let used: Vec<f64> = clean_or_all(samples, |s| s.clean)
        .into_iter()
        .map(|s| s.t)
        .collect();
    let any_clean = samples.iter().any(|s| s.clean);
    let (min, median, max) = stats(&used);
    let spread = (used.len() >= 2).then(|| 100.0 * (max - min) / 2.0 / median);
    let mut value = json!({
        "samples_s": all,
        "clean": samples.iter().map(|s| s.clean).collect::<Vec<_>>(),
        "stats_from": if any_clean { "clean samples" } else { "all samples (none clean)" },
        "min_s": min,
        "median_s": median,
        "max_s": max,
        "spread_pct": spread.map(nan_null),
    });
    if samples.iter().any(|s| s.probes.is_some()) {
        let pair = |p: [bool; 2]| json!({"start": p[0], "end": p[1]});
        value["probes"] = samples
            .iter()
            .map(|s| {
                s.probes.map_or(
                    Value::Null,
                    |p| json!({"write": pair(p.write), "scheduler": pair(p.scheduler)}),
                )
            })
            .collect();
    }
    if let Some(base) = baseline {
        let base_min = base["min_s"].as_f64().unwrap_or(f64::NAN);
        let base_median = base["median_s"].as_f64().unwrap_or(f64::NAN);
        let ratio = match paired {
            Some(ratios) => {
                let (low, mid, high) = stats(ratios);
                value["paired_ratios"] = json!(ratios);
                value["paired_spread_pct"] = (ratios.len() >= 2)
                    .then(|| nan_null(100.0 * (high - low) / 2.0))
                    .into();
                mid
            }
            None => median / base_median,
        };
        value["ratio_median"] = json!(ratio);
        value["ratio_min"] = json!(min / base_min);
        value["overhead_pct"] = json!(100.0 * (ratio - 1.0));
        value["overhead_pct_min"] = json!(100.0 * (min / base_min - 1.0));
    }
    value
}

/// How often a probe was attached over the samples: at their start, at their end, throughout
/// (both), and how many samples saw it switch.
fn probe_counts(samples: &[Sample], probe: fn(&super::Probes) -> [bool; 2]) -> Value {
    let states: Vec<[bool; 2]> = samples
        .iter()
        .filter_map(|s| s.probes.as_ref().map(probe))
        .collect();
    let count = |f: fn(&[bool; 2]) -> bool| states.iter().filter(|s| f(s)).count();
    json!({
        "at_start": count(|s| s[0]),
        "at_end": count(|s| s[1]),
        "throughout": count(|s| s[0] && s[1]),
        "switched": count(|s| s[0] != s[1]),
    })
}

pub(super) fn report(
    bench: &Bench,
    results: &Results,
    reps: usize,
    foreign: &[String],
    took: Duration,
) -> Value {
    let mut workloads = Vec::new();
    let mut targets = Vec::new();
    for w in bench.selected() {
        let mut hosts = serde_json::Map::new();
        for host in Host::ALL {
            let (entry, host_targets) = host_json(results, w, host);
            hosts.insert(host.key().to_owned(), entry);
            targets.extend(host_targets);
        }
        workloads.push(json!({
            "id": w.id,
            "name": w.name,
            "mode": w.mode,
            "size": bench.size(w),
            "target_overhead_pct": w.target_pct,
            "hosts": hosts,
        }));
    }
    targets.extend(daemon_targets(results));
    targets.extend(hooks::targets(results.hook_cost.as_ref()));
    let bpf_stats = bpf_stats_json(results);
    let in_kernel = in_kernel_json(results, &workloads);
    let during_b: serde_json::Map<String, Value> = Host::ALL
        .iter()
        .map(|&host| {
            let cpu = results.daemon_cpu_s.get(&host).copied().unwrap_or(0.0);
            let wall = results.daemon_wall_s.get(&host).copied().unwrap_or(0.0);
            (
                host.key().to_owned(),
                json!({
                    "cpu_seconds": cpu,
                    "wall_seconds": wall,
                    "cpu_pct_of_one_core": 100.0 * cpu / wall.max(1e-9),
                }),
            )
        })
        .collect();
    json!({
        "schema": 2,
        "smoke": bench.smoke,
        "only_workload": bench.selected().next().filter(|_| bench.only.is_some()).map(|w| w.mode),
        "repetitions": reps,
        "repetitions_for_a_verdict": REPETITIONS,
        "took_s": took.as_secs_f64(),
        "host": {
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "other_monitors_running": foreign,
        },
        "server_host": {
            "postgresql_sessions": super::server::SESSIONS,
            "lingering_workers": 1,
        },
        "bpftrace_script": bpftrace_script(),
        "workloads": workloads,
        "daemon": {
            "during_b": during_b,
            "peak_rss_kib": results.peak_rss_kib,
            "peak_rss_target_kib": RSS_TARGET_KIB,
            "peak_rss_kib_by_session": results.rss_by_session,
            "rss_at_end_kib_by_session": results.rss_now_by_session,
            "idle": results.idle,
            "idle_server_host": results.idle_server,
        },
        "finding_latency": results.latency,
        "sustained_fork_storm": results.sustained,
        "bpf_stats": bpf_stats,
        "bpf_in_kernel_totals": in_kernel,
        "hook_cost": results.hook_cost,
        "bpftrace_killed": results.bpftrace_killed,
        "targets": targets,
    })
}

/// One workload on one host, and its targets there: the overhead (when it has a target) and,
/// on the idle host, being below bpftrace. Judged on the median of the paired ratios; the noise
/// is their spread (half their range, in percent), and an overhead no larger than that is said
/// to be within noise. bpftrace, measured in a pass of its own, is compared by its medians.
fn host_json(results: &Results, w: &Workload, host: Host) -> (Value, Vec<Value>) {
    let get = |c: Condition| {
        results
            .times
            .get(&(w.id, host, c))
            .cloned()
            .unwrap_or_default()
    };
    let none_samples = get(Condition::None);
    let none = condition_json(&none_samples, None, None);
    let paired = paired_ratios(&none_samples, &get(Condition::Forkwatch));
    let mut conditions = serde_json::Map::new();
    for &c in host.conditions() {
        let entry = match c {
            Condition::None => none.clone(),
            Condition::Forkwatch => condition_json(&get(c), Some(&none), Some(&paired)),
            Condition::Bpftrace => condition_json(&get(c), Some(&none), None),
        };
        conditions.insert(c.key().to_owned(), entry);
    }
    let fw = &conditions["forkwatch"];
    let overhead = fw["overhead_pct"].as_f64().unwrap_or(f64::NAN);
    let overhead_min = fw["overhead_pct_min"].as_f64().unwrap_or(f64::NAN);
    let noise = fw["paired_spread_pct"].as_f64();
    let within_noise = noise.map(|n| overhead.abs() <= n);
    let target_met = w.target_pct.map(|t| overhead <= t);
    let bt_overhead = conditions
        .get("bpftrace")
        .and_then(|bt| bt["overhead_pct"].as_f64());
    let below_bpftrace = bt_overhead.map(|bt| overhead < bt);
    let fw_samples = get(Condition::Forkwatch);
    let probe_state = json!({
        "samples": fw_samples.iter().filter(|s| s.probes.is_some()).count(),
        "write_probe": probe_counts(&fw_samples, |p| p.write),
        "scheduler_probes": probe_counts(&fw_samples, |p| p.scheduler),
    });
    let (_, events_per_s, _) = stats(results.events_per_s.get(&(w.id, host)).map_or(&[], |v| v));
    let entry = json!({
        "conditions": conditions,
        "overhead_pct": nan_null(overhead),
        "noise_pct": noise.map(nan_null),
        "within_noise": within_noise,
        "target_met": target_met,
        "below_bpftrace": below_bpftrace,
        "probe_state": probe_state,
        "forkwatch_events_per_s_median": nan_null(events_per_s),
        "forkwatch_events_lost": results.events_lost.get(&(w.id, host)).copied().unwrap_or(0.0),
    });
    let noise_text = match noise {
        Some(n) if overhead.abs() <= n => format!(", noise ±{n:.1} %: within noise"),
        Some(n) => format!(", noise ±{n:.1} %"),
        None => ", noise unknown (fewer than two pairs used)".to_owned(),
    };
    let host_name = host.key();
    let mut targets = Vec::new();
    if let Some(t) = w.target_pct {
        targets.push(json!({
            "target": format!("workload {} overhead <= {t} % ({host_name} host)", w.id),
            "measured": format!(
                "{overhead:+.1} % by the median paired ratio \
                 (by min {overhead_min:+.1} %){noise_text}"
            ),
            "met": overhead <= t,
        }));
    }
    if let (Some(bt), Some(below)) = (bt_overhead, below_bpftrace) {
        targets.push(json!({
            "target": format!("workload {} below bpftrace ({host_name} host)", w.id),
            "measured": format!("{overhead:+.1} % vs {bt:+.1} % by median"),
            "met": below,
        }));
    }
    (entry, targets)
}

/// The daemon's own targets: peak RSS, idle CPU, finding latency, the sustained storm.
fn daemon_targets(results: &Results) -> Vec<Value> {
    let mut targets = vec![json!({
        "target": "daemon peak RSS <= 32 MiB",
        "measured": format!("{:.1} MiB", results.peak_rss_kib as f64 / 1024.0),
        "met": results.peak_rss_kib <= RSS_TARGET_KIB,
    })];
    for (host, idle) in [("idle", &results.idle), ("server", &results.idle_server)] {
        let Some(idle) = idle else { continue };
        targets.push(json!({
            "target": format!("daemon idle CPU <= {IDLE_CPU_TARGET_PCT} % of one core ({host} host)"),
            "measured": format!("{:.2} %", idle["cpu_pct_of_one_core"].as_f64().unwrap_or(f64::NAN)),
            "met": idle["met"],
        }));
    }
    if let Some(l) = &results.latency {
        targets.push(json!({
            "target": format!(
                "findings within the grace window + {} ms (exit: {} ms)",
                latency::TARGET_MS,
                latency::TARGET_MS
            ),
            "measured": format!(
                "at most {:.0} ms past the grace window, {:.0} ms after the exit ({} runs)",
                l["past_grace_ms_max"].as_f64().unwrap_or(f64::NAN),
                l["after_exit_ms_max"].as_f64().unwrap_or(f64::NAN),
                l["runs"]
            ),
            "met": l["met"],
        }));
    }
    if let Some(s) = &results.sustained {
        targets.push(json!({
            "target": "0 events lost at >= 20000 forks/s for 10 s",
            "measured": format!(
                "{:.0} forks/s for {:.1} s, {} lost (fastest of {} attempts; {} lost in all); \
                 {:.0} forks/s without a monitor in the same run",
                s["forks_per_s"].as_f64().unwrap_or(f64::NAN),
                s["seconds"].as_f64().unwrap_or(f64::NAN),
                s["events_lost"],
                s["attempts"].as_array().map_or(0, Vec::len),
                s["events_lost_all_attempts"],
                s["bare_forks_per_s"].as_f64().unwrap_or(f64::NAN),
            ),
            "met": s["met"],
        }));
    }
    targets
}

/// Workload → program → calls, seconds and ns per call, from the `--bpf-stats` daemon.
fn bpf_stats_json(results: &Results) -> BTreeMap<&String, Value> {
    results
        .bpf_stats
        .iter()
        .map(|(workload, programs)| {
            let programs: BTreeMap<&String, Value> = programs
                .iter()
                .map(|(p, &(runs, secs))| {
                    let ns = if runs > 0.0 {
                        secs * 1e9 / runs
                    } else {
                        f64::NAN
                    };
                    (
                        p,
                        json!({"runs": runs, "seconds": secs, "ns_per_call": nan_null(ns)}),
                    )
                })
                .collect();
            (workload, json!(programs))
        })
        .collect()
}

/// All programs' time during each workload, against the workload's own time without a
/// monitor on the same host: the in-kernel share of the overhead (an upper bound: the statistics cost a little
/// on every run, and on a VM the time includes the vCPU's stolen time).
fn in_kernel_json<'r>(results: &'r Results, workloads: &[Value]) -> BTreeMap<&'r String, Value> {
    results
        .bpf_stats
        .iter()
        .map(|(workload, programs)| {
            let total: f64 = programs.values().map(|&(_, secs)| secs).sum();
            // Rows are "ID MODE" (idle host) or "server: ID MODE".
            let (host, row) = match workload.strip_prefix("server: ") {
                Some(row) => (Host::Server, row),
                None => (Host::Idle, workload.as_str()),
            };
            let id: Option<usize> = row.split_whitespace().next().and_then(|i| i.parse().ok());
            let base = id
                .and_then(|id| workloads.iter().find(|w| w["id"] == id))
                .and_then(|w| w["hosts"][host.key()]["conditions"]["none"]["min_s"].as_f64())
                .unwrap_or(f64::NAN);
            (
                workload,
                json!({
                    "seconds": total,
                    "pct_of_no_monitor_min": nan_null(100.0 * total / base),
                }),
            )
        })
        .collect()
}

fn nan_null(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_median_max() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (1.0, 2.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), (1.0, 2.5, 4.0));
    }

    fn sample(t: f64) -> Sample {
        Sample {
            t,
            clean: true,
            probes: None,
        }
    }

    #[test]
    fn spread_and_ratios() {
        let none = condition_json(&[sample(1.0), sample(1.2), sample(1.1)], None, None);
        // Half the range (0.1) of the median (1.1).
        let spread = none["spread_pct"].as_f64().unwrap();
        assert!((spread - 100.0 * 0.1 / 1.1).abs() < 1e-9, "{spread}");
        let fw = condition_json(&[sample(2.2), sample(2.0), sample(2.4)], Some(&none), None);
        assert!((fw["ratio_median"].as_f64().unwrap() - 2.0).abs() < 1e-9);
        assert!((fw["ratio_min"].as_f64().unwrap() - 2.0).abs() < 1e-9);
        assert!(condition_json(&[sample(1.0)], None, None)["spread_pct"].is_null());
    }

    #[test]
    fn pairs_are_judged_by_their_own_ratios() {
        // The machine slows down threefold between the first pair and the second: the ratio of
        // the medians would read 1.5, each pair reads its own 1.1 and 1.3.
        let none = [sample(1.0), sample(3.0)];
        let fw = [sample(1.1), sample(3.9)];
        let ratios = paired_ratios(&none, &fw);
        assert_eq!(ratios.len(), 2);
        assert!((ratios[0] - 1.1).abs() < 1e-9 && (ratios[1] - 1.3).abs() < 1e-9);
        let base = condition_json(&none, None, None);
        let c = condition_json(&fw, Some(&base), Some(&ratios));
        assert!((c["ratio_median"].as_f64().unwrap() - 1.2).abs() < 1e-9);
        assert!((c["overhead_pct"].as_f64().unwrap() - 20.0).abs() < 1e-9);
        // Half the range of the ratios, in percent: (1.3 - 1.1) / 2.
        assert!((c["paired_spread_pct"].as_f64().unwrap() - 10.0).abs() < 1e-9);
        // A pair with an unclean side is left out while a clean pair is left.
        let mut foreign = sample(9.0);
        foreign.clean = false;
        assert_eq!(paired_ratios(&[foreign, sample(2.0)], &fw), vec![3.9 / 2.0]);
        assert_eq!(paired_ratios(&[foreign], &[sample(4.5)]), vec![0.5]);
    }

    #[test]
    fn unclean_samples_are_left_out_of_the_statistics_but_kept() {
        let mut foreign = sample(9.0);
        foreign.clean = false;
        let c = condition_json(&[sample(1.0), foreign, sample(3.0)], None, None);
        assert_eq!(c["median_s"], 2.0);
        assert_eq!(c["samples_s"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn probe_state_is_counted_not_excluded() {
        let with = |write: [bool; 2]| Sample {
            probes: Some(super::super::Probes {
                write,
                scheduler: [true, true],
            }),
            ..sample(1.0)
        };
        let samples = [
            with([true, true]),
            with([false, true]),
            with([false, false]),
        ];
        let counts = probe_counts(&samples, |p| p.write);
        assert_eq!(counts["at_start"], 1);
        assert_eq!(counts["at_end"], 2);
        assert_eq!(counts["throughout"], 1);
        assert_eq!(counts["switched"], 1);
        assert_eq!(
            condition_json(&samples, None, None)["samples_s"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
}
