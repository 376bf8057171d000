//! A finding's `hint`: how to fix it, in a sentence or two, by finding kind and the runtime of
//! the process (enrich/runtime.rs). This table is the one definition; docs/findings.md shows it
//! row for row (a unit test holds the two together).

use crate::{enrich::runtime::Runtime, report::finding::Kind};

/// One row: the kinds it covers, the runtime it is for (None: any runtime, the fallback for
/// runtimes without a row of their own), and the hint.
pub struct Row {
    pub kinds: &'static [Kind],
    pub runtime: Option<Runtime>,
    pub hint: &'static str,
}

/// A child that runs on after a fork of a multithreaded process: it did not exec (at once).
const FORK_WITHOUT_EXEC: &[Kind] = &[
    Kind::MtForkNoExec,
    Kind::ThreadsAfterMtFork,
    Kind::InheritedLockDeadlock,
    Kind::PossibleInheritedLockWait,
];
const SHARED_CONNECTION: &[Kind] = &[Kind::SharedSocket, Kind::SharedDatagramSocket];

/// Searched in order: the first row for the kind and the exact runtime, else the kind's row
/// for any runtime.
pub static ROWS: &[Row] = &[
    Row {
        kinds: FORK_WITHOUT_EXEC,
        runtime: Some(Runtime::Cpython),
        hint: "Use the multiprocessing start method \"forkserver\" or \"spawn\" (the default on \
               Linux from Python 3.14), or fork before starting any thread; to run a program, \
               use subprocess, which execs.",
    },
    Row {
        kinds: FORK_WITHOUT_EXEC,
        runtime: Some(Runtime::Ruby),
        hint: "Start threads in the worker after the fork (Puma on_worker_boot, Unicorn \
               after_fork), not at boot in the parent; to run a program, use Process.spawn.",
    },
    Row {
        kinds: FORK_WITHOUT_EXEC,
        runtime: Some(Runtime::Jvm),
        hint: "Do not fork the JVM from native code: start processes with ProcessBuilder, \
               which execs at once (posix_spawn).",
    },
    Row {
        kinds: FORK_WITHOUT_EXEC,
        runtime: Some(Runtime::Node),
        hint: "Do not fork Node from a native addon: start processes with child_process.spawn \
               or child_process.fork, which exec a new program.",
    },
    Row {
        kinds: FORK_WITHOUT_EXEC,
        runtime: Some(Runtime::Glibc),
        hint: "Between fork() and exec call only async-signal-safe functions (or use \
               posix_spawn); to keep a forked worker, fork it before creating any thread \
               (e.g. from a fork server started first).",
    },
    Row {
        kinds: FORK_WITHOUT_EXEC,
        runtime: None,
        hint: "Exec right after the fork (or use posix_spawn), or fork before the process \
               starts its threads.",
    },
    Row {
        kinds: SHARED_CONNECTION,
        runtime: Some(Runtime::Cpython),
        hint: "Reconnect in the child: dispose of the connection pool after the fork (SQLAlchemy \
               engine.dispose(close=False)) or open connections only in the child; or close \
               the parent's copy.",
    },
    Row {
        kinds: SHARED_CONNECTION,
        runtime: Some(Runtime::Ruby),
        hint: "Reconnect in the child after the fork (Rails: \
               ActiveRecord::Base.establish_connection in on_worker_boot) and disconnect in \
               the parent before forking.",
    },
    Row {
        kinds: SHARED_CONNECTION,
        runtime: None,
        hint: "Open the connection in the child after the fork (dispose of a connection pool \
               there), or close one copy: only one process may use a connection.",
    },
    Row {
        kinds: &[Kind::SharedFileOffset],
        runtime: None,
        hint: "Open the file with O_APPEND (every write goes to the end), or reopen it in the \
               child after the fork.",
    },
    Row {
        kinds: &[Kind::EventsLost],
        runtime: None,
        hint: "Raise --ring-buffer-size; findings from the lost events may be missing.",
    },
];

/// The row for a finding of `kind` about a process of `runtime`.
pub fn row(kind: Kind, runtime: Option<Runtime>) -> Option<&'static Row> {
    let for_kind = || ROWS.iter().filter(move |r| r.kinds.contains(&kind));
    for_kind()
        .find(|r| r.runtime.is_some() && r.runtime == runtime)
        .or_else(|| for_kind().find(|r| r.runtime.is_none()))
}

/// The hint for a finding of `kind` about a process of `runtime`.
pub fn hint(kind: Kind, runtime: Option<Runtime>) -> Option<&'static str> {
    row(kind, runtime).map(|r| r.hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::runtime;

    /// A process of each runtime as the daemon would see it: its executable and mapped files.
    fn sample(runtime: Option<Runtime>) -> (&'static str, Vec<&'static str>) {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        match runtime {
            Some(Runtime::Cpython) => ("/usr/bin/python3.11", vec![libc]),
            Some(Runtime::Ruby) => ("/usr/bin/ruby3.1", vec![libc]),
            Some(Runtime::Jvm) => ("/usr/lib/jvm/java-17/bin/java", vec![libc]),
            Some(Runtime::Node) => ("/usr/bin/node", vec![libc]),
            Some(Runtime::Glibc) => ("/usr/sbin/cache-server", vec![libc]),
            None => ("/app/static-musl-server", vec!["/lib/ld-musl-x86_64.so.1"]),
        }
    }

    fn detect(exe: &str, maps: &[&str]) -> Option<Runtime> {
        runtime::from_exe(exe).or_else(|| runtime::from_mapped_files(maps.iter().copied()))
    }

    /// Every row is the one chosen for a process of its runtime (told from a sample executable
    /// and its maps, as the daemon tells it) and each of its kinds.
    #[test]
    fn each_row_is_selected_by_a_process_of_its_runtime() {
        for (i, row) in ROWS.iter().enumerate() {
            let (exe, maps) = sample(row.runtime);
            let runtime = detect(exe, &maps);
            assert_eq!(runtime, row.runtime, "{exe}");
            for &kind in row.kinds {
                let chosen = super::row(kind, runtime).map(|r| r as *const Row);
                assert_eq!(chosen, Some(row as *const Row), "row {i}, {kind:?}");
            }
        }
    }

    #[test]
    fn every_kind_has_a_hint_for_any_runtime() {
        for kind in Kind::ALL {
            for runtime in Runtime::ALL.map(Some).into_iter().chain([None]) {
                assert!(hint(kind, runtime).is_some(), "{kind:?} {runtime:?}");
            }
        }
        // A runtime without a row of its own gets the kind's fallback.
        assert_eq!(
            hint(Kind::SharedSocket, Some(Runtime::Jvm)),
            hint(Kind::SharedSocket, None)
        );
    }

    /// docs/findings.md shows this table, row for row.
    #[test]
    fn the_documented_table_is_this_table() {
        let docs = include_str!("../../../docs/findings.md");
        let section = docs
            .split("\n## Hints")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/findings.md has a Hints section");
        let documented: Vec<String> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(str::to_owned)
            .collect();
        let expected: Vec<String> = ROWS
            .iter()
            .map(|r| {
                let kinds: Vec<String> = r
                    .kinds
                    .iter()
                    .map(|k| format!("`{}`", k.as_str()))
                    .collect();
                let runtime = r.runtime.map_or("any", Runtime::as_str);
                format!("| {} | `{runtime}` | {} |", kinds.join(", "), r.hint)
            })
            .collect();
        assert_eq!(documented, expected, "docs/findings.md's Hints table");
    }
}
