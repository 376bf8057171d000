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

/// "min ratio (median ratio)".
fn ratios(c: &Value) -> String {
    if c.is_null() {
        return "-".to_owned();
    }
    format!(
        "{} ({})",
        fmt_ratio(&c["ratio_min"]),
        fmt_ratio(&c["ratio_median"])
    )
}

/// The Markdown table of a report (also what the terminal shows).
pub(super) fn table(report: &Value) -> String {
    let mut out = intro(report);
    out.push_str(&overhead_table(report));
    out.push_str(&targets_table(report));
    out.push_str(&daemon_paragraphs(report));
    out.push_str(&bpf_stats_table(report));
    out.push_str(&super::hooks::table(report));
    out
}

/// How to read the overhead table.
fn intro(report: &Value) -> String {
    format!(
        "Repetitions: {}{}. Times in seconds of the timed part, min / median [clean samples / \
         all]; ratio = to no monitor, by min (by median); targets are judged on the min ratio. \
         A sample is not clean when another forkwatch or bpftrace ran on the host, the \
         daemon's write probe was attached for some other process's fork family, or its \
         scheduler probes were still attached from an earlier fork storm; the figures use the \
         clean samples when there are any.\n\n",
        report["repetitions"],
        if report["smoke"] == true {
            " (smoke: tiny sizes, not a measurement)"
        } else {
            ""
        }
    )
}

/// One row per workload in each condition, and one for workload 0 with a fork family tracked.
fn overhead_table(report: &Value) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | no monitor | forkwatch | ratio | bpftrace | ratio | target | met | events/s | lost |\n",
    );
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for w in report["workloads"].as_array().into_iter().flatten() {
        let name = format!("{} {}", w["id"], w["name"].as_str().unwrap_or(""));
        out.push_str(&overhead_row(&name, &w["conditions"], Some(w)));
    }
    let family = &report["workload0_family_tracked"];
    let mut conditions = family["conditions"].clone();
    conditions["none"] = report["workloads"][0]["conditions"]["none"].clone();
    out.push_str(&overhead_row(
        &format!(
            "0 cheap syscalls, a fork family tracked (write probe attached: {})",
            family["write_probe_attached"]
        ),
        &conditions,
        None,
    ));
    out
}

/// A row of the overhead table: the conditions `c`, and the workload `w`'s target and events
/// (none for the family row).
fn overhead_row(name: &str, c: &Value, w: Option<&Value>) -> String {
    let (target, met) = w.map_or(("report".to_owned(), "-".to_owned()), target_cells);
    let (events, lost) = w.map_or(("-".to_owned(), "-".to_owned()), event_cells);
    let (fw, bt) = (&c["forkwatch"], &c["bpftrace"]);
    format!(
        "| {name} | {} | {} | {} | {} | {} | {target} | {met} | {events} | {lost} |\n",
        times(&c["none"]),
        times(fw),
        ratios(fw),
        times(bt),
        ratios(bt),
    )
}

/// The "target" and "met" cells of a workload.
fn target_cells(w: &Value) -> (String, String) {
    let target = w["target_overhead_pct"]
        .as_f64()
        .map_or("report".to_owned(), |t| format!("≤ {t} %"));
    let below = if w["below_bpftrace"] == true {
        ""
    } else {
        ", NOT below bpftrace"
    };
    let met = match w["target_met"].as_bool() {
        Some(true) => format!("yes{below}"),
        Some(false) => format!("**MISS**{below}"),
        None => format!("-{below}"),
    };
    (target, met)
}

/// The "events/s" and "lost" cells of a workload (during forkwatch's condition).
fn event_cells(w: &Value) -> (String, String) {
    (
        w["forkwatch_events_per_s_median"]
            .as_f64()
            .filter(|x| x.is_finite())
            .map_or("-".to_owned(), |x| format!("{x:.0}")),
        format!(
            "{:.0}",
            w["forkwatch_events_lost"].as_f64().unwrap_or(f64::NAN)
        ),
    )
}

/// "min / median [clean/all]" of one condition.
fn times(v: &Value) -> String {
    if v.is_null() {
        return "-".to_owned();
    }
    let flags = v["clean"].as_array();
    let total = flags.map_or(0, Vec::len);
    let clean = flags.map_or(0, |f| f.iter().filter(|c| **c == true).count());
    format!(
        "{} / {} [{clean}/{total}]",
        fmt_s(&v["min_s"]),
        fmt_s(&v["median_s"])
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
    let mut out = format!(
        "\nDaemon during (b): {:.2} CPU s over {:.1} s of workloads ({:.2} % of one core). \
         Peak RSS (VmHWM) {:.1} MiB ({}). Idle: {:.2} % of one core by utime+stime over {:.1} s \
         ({:.3} % by schedstat).\n",
        num(&d["cpu_seconds_during_b"]),
        num(&d["wall_seconds_during_b"]),
        num(&d["cpu_pct_of_one_core_during_b"]),
        num(&d["peak_rss_kib"]) / 1024.0,
        by_session.join(", "),
        num(&d["idle"]["cpu_pct_of_one_core"]),
        num(&d["idle"]["seconds"]),
        num(&d["idle"]["cpu_pct_of_one_core_schedstat"]),
    );
    let l = &report["finding_latency"];
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
         (target ≥ {:.0}), {:.0} events received, {:.0} lost; daemon CPU {:.1} % of one core.\n",
        s["forker_processes"],
        s["attempts"].as_array().map_or(0, Vec::len),
        num(&s["events_lost_all_attempts"]),
        num(&s["forks_seen_by_kernel"]),
        num(&s["seconds"]),
        num(&s["forks_per_s"]),
        num(&s["target_forks_per_s"]),
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
         that in percent of the workload's min time without a monitor)\n",
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
