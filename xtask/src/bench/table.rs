//! report.md: the Markdown tables and paragraphs of a report (also what the terminal shows).

use serde_json::Value;

use super::latency;

fn fmt_s(v: &Value) -> String {
    v.as_f64()
        .filter(|x| x.is_finite())
        .map_or("-".to_owned(), |x| format!("{x:.3}"))
}

fn fmt_ratio(v: &Value) -> String {
    v.as_f64()
        .filter(|x| x.is_finite())
        .map_or("-".to_owned(), |x| format!("{x:.3}"))
}

/// "median ratio (min ratio)".
fn ratios(c: &Value) -> String {
    if c.is_null() {
        return "-".to_owned();
    }
    format!(
        "{} ({})",
        fmt_ratio(&c["ratio_median"]),
        fmt_ratio(&c["ratio_min"])
    )
}

/// The Markdown table of a report (also what the terminal shows).
pub(super) fn table(report: &Value) -> String {
    let mut out = intro(report);
    for (host, title) in [
        ("idle", "Idle host"),
        (
            "server",
            "Server host (PostgreSQL with open sessions and four lingering workers of a threaded \
             master, each with eight idle threads, started before the daemon, running in both \
             conditions)",
        ),
    ] {
        out.push_str(&format!("\n{title}:\n\n"));
        out.push_str(&overhead_table(report, host));
    }
    out.push_str(&targets_table(report));
    out.push_str(&daemon_paragraphs(report));
    out.push_str(&bpf_stats_table(report));
    if !report["hook_cost"].is_null() {
        out.push_str(&super::hooks::table(report));
    }
    out
}

/// How to read the overhead tables.
fn intro(report: &Value) -> String {
    let reps = report["repetitions"].as_u64().unwrap_or(0);
    let needed = report["repetitions_for_a_verdict"].as_u64().unwrap_or(0);
    let caveat = if report["smoke"] == true {
        " (smoke: tiny sizes, not a measurement)".to_owned()
    } else if reps < needed {
        format!(" (fewer than the {needed} the targets are judged over: not a verdict)")
    } else {
        String::new()
    };
    let only = match report["only_workload"].as_str() {
        Some(mode) => format!(
            " Only workload {mode} (`--workload`): no hooks table, idle CPU, finding latency or \
             sustained storm."
        ),
        None => String::new(),
    };
    format!(
        "Repetitions: {reps}{caveat}, interleaved.{only} Times in seconds of the timed part: median \
         (min–max) [samples used / all]. Each forkwatch sample is paired with a no-monitor \
         sample taken right before or after it; forkwatch's ratio is the median of the pairs' \
         ratios, bpftrace's (a pass of its own) the ratio of the medians, and in brackets the \
         ratio of the minima; targets are judged on the median ratio. Noise: half the range of \
         the pairs' ratios, in percent; an overhead no larger than it is marked \"within \
         noise\". Only samples during which another forkwatch or bpftrace ran \
         on the host are left out of the statistics; none is left out for forkwatch's own probe \
         state, which is shown per host: in how many samples the write probe and the scheduler \
         probes were attached throughout, and in how many they switched. The ping-pong \
         workloads (TCP, pipe, threads) run with all their parties on one CPU, in every \
         condition: left to the scheduler, this VM's cross-CPU wakeups cost more than the work \
         and chose each run's speed (workloads.c).\n"
    )
}

/// One row per workload on `host`: its conditions, target, noise, probe state and events.
fn overhead_table(report: &Value, host: &str) -> String {
    let bpftrace = host == "idle";
    let mut out = String::from("| workload | no monitor | forkwatch | ratio |");
    if bpftrace {
        out.push_str(" bpftrace | ratio |");
    }
    out.push_str(" target | met | noise | probes attached | events/s | lost |\n|");
    let columns = if bpftrace { 12 } else { 10 };
    out.push_str(&" --- |".repeat(columns));
    out.push('\n');
    for w in report["workloads"].as_array().into_iter().flatten() {
        let entry = &w["hosts"][host];
        let c = &entry["conditions"];
        let (target, met) = target_cells(w, entry);
        let (events, lost) = event_cells(entry);
        out.push_str(&format!(
            "| {} {} | {} | {} | {} |",
            w["id"],
            w["name"].as_str().unwrap_or(""),
            times(&c["none"]),
            times(&c["forkwatch"]),
            ratios(&c["forkwatch"]),
        ));
        if bpftrace {
            out.push_str(&format!(
                " {} | {} |",
                times(&c["bpftrace"]),
                ratios(&c["bpftrace"])
            ));
        }
        out.push_str(&format!(
            " {target} | {met} | {} | {} | {events} | {lost} |\n",
            noise_cell(entry),
            probe_cell(&entry["probe_state"]),
        ));
    }
    out
}

/// The "target" and "met" cells of a workload on one host.
fn target_cells(w: &Value, entry: &Value) -> (String, String) {
    let target = w["target_overhead_pct"]
        .as_f64()
        .map_or("report".to_owned(), |t| format!("≤ {t} %"));
    let below = if entry["below_bpftrace"] == false {
        ", NOT below bpftrace"
    } else {
        ""
    };
    let met = match entry["target_met"].as_bool() {
        Some(true) => format!("yes{below}"),
        Some(false) => format!("**MISS**{below}"),
        None => format!("-{below}"),
    };
    (target, met)
}

/// "±n %", and whether the overhead is within it.
fn noise_cell(entry: &Value) -> String {
    match entry["noise_pct"].as_f64() {
        Some(n) if entry["within_noise"] == true => format!("±{n:.1} %: within"),
        Some(n) => format!("±{n:.1} %"),
        None => "unknown".to_owned(),
    }
}

/// "write 6/6, sched 6/6 (1 switched)": samples with each probe attached throughout.
fn probe_cell(state: &Value) -> String {
    let n = state["samples"].as_u64().unwrap_or(0);
    let one = |name: &str, p: &Value| {
        let switched = p["switched"].as_u64().unwrap_or(0);
        let switched = if switched > 0 {
            format!(" ({switched} switched)")
        } else {
            String::new()
        };
        format!("{name} {}/{n}{switched}", p["throughout"])
    };
    format!(
        "{}, {}",
        one("write", &state["write_probe"]),
        one("sched", &state["scheduler_probes"])
    )
}

/// The "events/s" and "lost" cells of a workload on one host (during forkwatch's condition).
fn event_cells(entry: &Value) -> (String, String) {
    (
        entry["forkwatch_events_per_s_median"]
            .as_f64()
            .filter(|x| x.is_finite())
            .map_or("-".to_owned(), |x| format!("{x:.0}")),
        format!(
            "{:.0}",
            entry["forkwatch_events_lost"].as_f64().unwrap_or(f64::NAN)
        ),
    )
}

/// "median (min–max) [used/all]" of one condition.
fn times(v: &Value) -> String {
    if v.is_null() {
        return "-".to_owned();
    }
    let flags = v["clean"].as_array();
    let total = flags.map_or(0, Vec::len);
    let clean = flags.map_or(0, |f| f.iter().filter(|c| **c == true).count());
    let used = if clean == 0 { total } else { clean };
    format!(
        "{} ({}–{}) [{used}/{total}]",
        fmt_s(&v["median_s"]),
        fmt_s(&v["min_s"]),
        fmt_s(&v["max_s"])
    )
}

/// Every target, what was measured, and whether it was met.
fn targets_table(report: &Value) -> String {
    let mut out = String::from("\n| target | measured | met |\n| --- | --- | --- |\n");
    for t in report["targets"].as_array().into_iter().flatten() {
        let met = if t["met"] == true { "yes" } else { "**MISS**" };
        out.push_str(&format!(
            "| {} | {} | {met} |\n",
            t["target"].as_str().unwrap_or(""),
            t["measured"].as_str().unwrap_or("")
        ));
    }
    out
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The daemon's CPU, memory and idle cost, finding latency, and the sustained storm.
fn daemon_paragraphs(report: &Value) -> String {
    let d = &report["daemon"];
    let by_session: Vec<String> = d["peak_rss_kib_by_session"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(session, kib)| {
            format!(
                "{session} {:.1} MiB, {:.1} MiB resident at its end",
                num(kib) / 1024.0,
                num(&d["rss_at_end_kib_by_session"][session]) / 1024.0
            )
        })
        .collect();
    let during: Vec<String> = d["during_b"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(host, b)| {
            format!(
                "{host} host {:.2} CPU s over {:.1} s of workloads ({:.2} % of one core)",
                num(&b["cpu_seconds"]),
                num(&b["wall_seconds"]),
                num(&b["cpu_pct_of_one_core"]),
            )
        })
        .collect();
    let mut out = format!(
        "\nDaemon during (b): {}. Peak RSS (VmHWM) {:.1} MiB ({}).",
        during.join("; "),
        num(&d["peak_rss_kib"]) / 1024.0,
        by_session.join(", "),
    );
    let killed = num(&report["bpftrace_killed"]);
    if killed > 0.0 {
        out.push_str(&format!(
            " bpftrace hung on SIGINT after {killed} of its passes and was killed (after the \
             pass's samples)."
        ));
    }
    // A run of one workload (`--workload`) measures none of what follows.
    let l = &report["finding_latency"];
    if l.is_null() {
        out.push('\n');
        return out;
    }
    let idle = |i: &Value| {
        format!(
            "{:.2} % of one core by utime+stime over {:.1} s ({:.3} % by schedstat)",
            num(&i["cpu_pct_of_one_core"]),
            num(&i["seconds"]),
            num(&i["cpu_pct_of_one_core_schedstat"]),
        )
    };
    out.push_str(&format!(
        " Idle: {}; on the server host (a daemon started after it): {}.\n",
        idle(&d["idle"]),
        idle(&d["idle_server_host"]),
    ));
    out.push_str(&format!(
        "Finding latency ({} runs): a child that never execs reported {} ms past the grace \
         window, one that exits without exec {} ms after its exit (target ≤ {} ms).\n",
        l["runs"],
        latency::ms_list(&l["past_grace_ms"]),
        latency::ms_list(&l["after_exit_ms"]),
        l["target_ms"],
    ));
    let s = &report["sustained_fork_storm"];
    out.push_str(&format!(
        "Sustained fork-without-exec storm ({} multithreaded processes forking; the fastest of {} \
         attempts, {:.0} events lost in all of them): {:.0} forks in {:.1} s = {:.0} forks/s \
         (target ≥ {:.0}; this machine without a monitor, in the same run: {:.0} forks/s, ratio \
         {:.3}), {:.0} events received, {:.0} lost; daemon CPU {:.1} % of one core.\n",
        s["forker_processes"],
        s["attempts"].as_array().map_or(0, Vec::len),
        num(&s["events_lost_all_attempts"]),
        num(&s["forks_seen_by_kernel"]),
        num(&s["seconds"]),
        num(&s["forks_per_s"]),
        num(&s["target_forks_per_s"]),
        num(&s["bare_forks_per_s"]),
        num(&s["ratio_to_bare"]),
        num(&s["events_received"]),
        num(&s["events_lost"]),
        num(&s["daemon_cpu_pct_of_one_core"]),
    ));
    out
}

/// Calls × ns per call of each program during each workload, with a daemon run with
/// `--bpf-stats`.
fn bpf_stats_table(report: &Value) -> String {
    let mut out =
        String::from("\nIn-kernel cost per program call (`--bpf-stats`, separate daemon), ns:\n\n");
    let stats = report["bpf_stats"].as_object();
    let mut programs: Vec<String> = stats
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|p| p.as_object())
        .flat_map(|p| p.keys().cloned())
        .collect();
    programs.sort();
    programs.dedup();
    out.push_str("| workload | all programs |");
    for p in &programs {
        out.push_str(&format!(" {p} |"));
    }
    out.push_str("\n| --- | --- |");
    for _ in &programs {
        out.push_str(" --- |");
    }
    out.push('\n');
    for (workload, per) in stats.into_iter().flatten() {
        let total = &report["bpf_in_kernel_totals"][workload.as_str()];
        out.push_str(&format!(
            "| {workload} | {:.1} ms = {:.1} % |",
            total["seconds"].as_f64().unwrap_or(f64::NAN) * 1e3,
            total["pct_of_no_monitor_min"].as_f64().unwrap_or(f64::NAN)
        ));
        for p in &programs {
            out.push_str(&program_cell(&per[p.as_str()]));
        }
        out.push('\n');
    }
    out.push_str(
        "\n(cells: calls × ns per call during that workload; all programs: their total time, and \
         that in percent of the workload's min time without a monitor on the same host; rows \
         \"server: ...\": on the server host, with a daemon started after it)\n",
    );
    out
}

/// " calls × ns |", or " - |" for a program that did not run.
fn program_cell(cell: &Value) -> String {
    let runs = cell["runs"].as_f64().unwrap_or(0.0);
    if runs > 0.0 {
        format!(
            " {} × {:.0} |",
            runs,
            cell["ns_per_call"].as_f64().unwrap_or(f64::NAN)
        )
    } else {
        " - |".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn says_when_an_overhead_is_within_noise() {
        let within = json!({"noise_pct": 2.5, "within_noise": true});
        assert_eq!(noise_cell(&within), "±2.5 %: within");
        let beyond = json!({"noise_pct": 0.4, "within_noise": false});
        assert_eq!(noise_cell(&beyond), "±0.4 %");
        assert_eq!(noise_cell(&json!({"noise_pct": null})), "unknown");
    }

    #[test]
    fn shows_probe_state_per_host() {
        let state = json!({
            "samples": 6,
            "write_probe": {"throughout": 5, "switched": 1},
            "scheduler_probes": {"throughout": 6, "switched": 0},
        });
        assert_eq!(probe_cell(&state), "write 5/6 (1 switched), sched 6/6");
    }
}
