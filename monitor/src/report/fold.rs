//! Folding repeated findings (`--repeat-window`): a prefork server or a fork storm makes the same
//! finding thousands of times, and thousands of lines hide the one that matters. The first
//! finding of a kind from one parent executable is printed at once; the same finding again
//! within the window is counted, and the count goes out as one `repeated` record when the window
//! ends (or the daemon stops). Metrics count every finding before it gets here.
//!
//! No clock is read here: every call takes `now`, so the tests decide time.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::report::finding::{Finding, Kind, Repeated, SCHEMA_VERSION};

/// Pids a `repeated` record names, as samples.
const SAMPLE_PIDS: usize = 5;
/// Most windows open at once: one per (kind, executable), which processes choose. Past it a
/// finding is printed on its own rather than tracked: nothing is lost, only not folded.
const MAX_WINDOWS: usize = 4096;

/// What findings are folded by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FoldKey {
    kind: Kind,
    /// The parent's executable; its comm when /proc no longer had the executable.
    program: Program,
    /// Where in the parent the fork was called (`fork_site`: its first frames outside the C
    /// library): a parent forking from two places gets two windows. None when the finding has
    /// no fork stack (then every such fork of one executable is one site).
    fork_site: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Program {
    Exe(String),
    Comm(String),
}

impl FoldKey {
    fn of(f: &Finding) -> Self {
        Self {
            kind: f.kind,
            program: match &f.exe {
                Some(exe) => Program::Exe(exe.clone()),
                None => Program::Comm(f.parent_comm.clone()),
            },
            fork_site: f.fork.as_ref().and_then(|fork| fork.fork_site.clone()),
        }
    }
}

/// A window: opened by a printed finding, counting the ones folded into it.
struct Window {
    ends: Instant,
    folded: Option<Repeated>,
}

pub struct Folder {
    window: Duration,
    open: HashMap<FoldKey, Window>,
}

impl Folder {
    /// A window of zero folds nothing.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            open: HashMap::new(),
        }
    }

    /// Whether `finding`, seen at `now`, is to be printed; if not, it was folded. Call
    /// [`Folder::due`] first, so that an ended window is closed before a finding reopens it.
    pub fn offer(&mut self, finding: &Finding, now: Instant) -> bool {
        // events_lost is rate-limited at its source and says something of its own each time.
        if self.window.is_zero() || finding.kind == Kind::EventsLost {
            return true;
        }
        let key = FoldKey::of(finding);
        if let Some(window) = self.open.get_mut(&key)
            && now < window.ends
        {
            fold_into(&mut window.folded, finding);
            return false;
        }
        if self.open.len() < MAX_WINDOWS || self.open.contains_key(&key) {
            self.open.insert(
                key,
                Window {
                    ends: now + self.window,
                    folded: None,
                },
            );
        }
        true
    }

    /// Closes the windows that ended by `now`: the `repeated` records of those that folded
    /// anything.
    pub fn due(&mut self, now: Instant) -> Vec<Repeated> {
        let mut records = Vec::new();
        self.open.retain(|_, window| {
            if now < window.ends {
                return true;
            }
            records.extend(window.folded.take());
            false
        });
        records.sort_by(|a, b| a.first_time.cmp(&b.first_time));
        records
    }

    /// When the next window ends.
    pub fn next_due(&self) -> Option<Instant> {
        self.open.values().map(|w| w.ends).min()
    }

    /// Closes every window (the daemon is stopping): the records of all that folded anything.
    pub fn flush(&mut self) -> Vec<Repeated> {
        let mut records: Vec<Repeated> = self.open.drain().filter_map(|(_, w)| w.folded).collect();
        records.sort_by(|a, b| a.first_time.cmp(&b.first_time));
        records
    }
}

fn fold_into(folded: &mut Option<Repeated>, f: &Finding) {
    let record = folded.get_or_insert_with(|| Repeated {
        schema: SCHEMA_VERSION,
        kind: "repeated",
        severity: f.severity,
        time: f.time.clone(),
        of_kind: f.kind,
        exe: f.exe.clone(),
        parent_comm: f.parent_comm.clone(),
        fork_site: FoldKey::of(f).fork_site,
        count: 0,
        first_time: f.time.clone(),
        last_time: f.time.clone(),
        sample_pids: Vec::new(),
    });
    record.count += 1;
    record.time.clone_from(&f.time);
    record.last_time.clone_from(&f.time);
    if record.sample_pids.len() < SAMPLE_PIDS {
        record.sample_pids.push(f.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(pid: u32, exe: &str, second: u32) -> Finding {
        let mut f = Finding::example("w");
        f.pid = pid;
        f.exe = Some(exe.into());
        f.time = format!("2026-11-27T10:00:{second:02}.000Z");
        f
    }

    #[test]
    fn the_first_is_printed_the_rest_counted_until_the_window_ends() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut folder = Folder::new(Duration::from_secs(60));
        assert!(folder.offer(&finding(100, "/usr/bin/app", 0), at(0)));
        for i in 1..=20_000u32 {
            assert!(!folder.offer(&finding(100 + i, "/usr/bin/app", 1), at(1)));
        }
        // Another executable, and another kind, have windows of their own.
        assert!(folder.offer(&finding(1, "/usr/bin/other", 2), at(2)));
        let mut socket = finding(2, "/usr/bin/app", 2);
        socket.kind = Kind::SharedSocket;
        assert!(folder.offer(&socket, at(2)));
        assert!(!folder.offer(&finding(200_000, "/usr/bin/app", 30), at(30)));

        assert_eq!(folder.next_due(), Some(at(60)));
        assert!(folder.due(at(59)).is_empty());
        let records = folder.due(at(60));
        assert_eq!(
            records.len(),
            1,
            "only windows that folded something: {records:?}"
        );
        let r = &records[0];
        assert_eq!((r.of_kind, r.count), (Kind::MtForkNoExec, 20_001));
        assert_eq!(r.first_time, "2026-11-27T10:00:01.000Z");
        assert_eq!(r.last_time, "2026-11-27T10:00:30.000Z");
        assert_eq!(r.time, r.last_time);
        assert_eq!(r.sample_pids, [101, 102, 103, 104, 105]);
        let json: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
        assert_eq!(json["kind"], "repeated");
        assert_eq!(json["of_kind"], "mt_fork_no_exec");
        assert_eq!(json["exe"], "/usr/bin/app");
        // After the window the next one is printed at once again.
        assert!(folder.offer(&finding(300_000, "/usr/bin/app", 61), at(61)));
    }

    #[test]
    fn counts_add_up_and_shutdown_flushes() {
        let t0 = Instant::now();
        let mut folder = Folder::new(Duration::from_secs(60));
        let mut printed = 0u64;
        for i in 0..1000u32 {
            let exe = if i % 3 == 0 { "/a" } else { "/b" };
            printed += u64::from(folder.offer(&finding(i, exe, 0), t0));
        }
        let folded: u64 = folder.flush().iter().map(|r| r.count).sum();
        assert_eq!(printed, 2);
        assert_eq!(printed + folded, 1000);
        assert_eq!(folder.next_due(), None);
    }

    #[test]
    fn a_zero_window_folds_nothing_and_events_lost_is_never_folded() {
        let t0 = Instant::now();
        let mut off = Folder::new(Duration::ZERO);
        assert!((0..10).all(|i| off.offer(&finding(i, "/a", 0), t0)));
        assert_eq!(off.next_due(), None);
        let mut folder = Folder::new(Duration::from_secs(60));
        let mut lost = finding(0, "/a", 0);
        lost.kind = Kind::EventsLost;
        assert!((0..3).all(|_| folder.offer(&lost, t0)));
    }

    #[test]
    fn two_fork_sites_of_one_executable_fold_apart() {
        let t0 = Instant::now();
        let mut folder = Folder::new(Duration::from_secs(60));
        let from = |pid: u32, site: &str| {
            let mut f = finding(pid, "/usr/bin/app", 0);
            f.fork = Some(crate::report::finding::ForkStackDetails {
                fork_site: Some(site.into()),
                fork_stack: Some(Vec::new()),
                fork_stack_unavailable_reason: None,
            });
            f
        };
        assert!(folder.offer(&from(1, "start_worker ← main"), t0));
        assert!(folder.offer(&from(2, "run_backup ← main"), t0));
        assert!(!folder.offer(&from(3, "start_worker ← main"), t0));
        assert!(!folder.offer(&from(4, "run_backup ← main"), t0));
        assert!(!folder.offer(&from(5, "run_backup ← main"), t0));
        let mut records = folder.flush();
        records.sort_by_key(|r| r.count);
        let sites: Vec<(Option<&str>, u64)> = records
            .iter()
            .map(|r| (r.fork_site.as_deref(), r.count))
            .collect();
        assert_eq!(
            sites,
            [
                (Some("start_worker ← main"), 1),
                (Some("run_backup ← main"), 2)
            ]
        );
    }

    #[test]
    fn findings_without_an_executable_fold_by_parent_comm() {
        let t0 = Instant::now();
        let mut folder = Folder::new(Duration::from_secs(60));
        let mut a = finding(1, "/x", 0);
        a.exe = None;
        let mut b = a.clone();
        b.parent_comm = "other".into();
        assert!(folder.offer(&a, t0));
        assert!(folder.offer(&b, t0));
        assert!(!folder.offer(&a, t0));
    }
}
