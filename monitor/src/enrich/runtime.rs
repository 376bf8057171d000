//! Which language runtime a process runs, told from its executable and the files it has mapped:
//! what a finding's `hint` is chosen by (report/hint.rs).
//!
//! The executable's name decides first (`python3.11`, `ruby`, `java`, `node`): Debian's python3
//! links libpython statically, so its mappings alone would say only "glibc". Other programs
//! (an embedding server such as uWSGI, a JVM launched under another name) are told by the
//! runtime library they map; a program that maps only glibc is a C or C++ program. Nothing here
//! runs the target's code or trusts more than a file name.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// CPython (not PyPy: its locks and fork handling differ).
    Cpython,
    Ruby,
    /// A Java virtual machine (libjvm).
    Jvm,
    Node,
    /// A C or C++ program on glibc, no interpreter the other rows know.
    Glibc,
}

impl Runtime {
    pub const ALL: [Runtime; 5] = [
        Self::Cpython,
        Self::Ruby,
        Self::Jvm,
        Self::Node,
        Self::Glibc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpython => "cpython",
            Self::Ruby => "ruby",
            Self::Jvm => "jvm",
            Self::Node => "node",
            Self::Glibc => "glibc",
        }
    }
}

/// The runtime an executable's file name names: `python3`, `python3.11`, `python3.12d`;
/// `ruby`, `ruby3.1`; `java`; `node`, `nodejs`. None for any other name.
pub fn from_exe(exe: &str) -> Option<Runtime> {
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
    let name = exe.rsplit('/').next().unwrap_or(exe);
    let versioned = |prefix: &str| {
        name.strip_prefix(prefix).is_some_and(|rest| {
            rest.chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == 'd')
        })
    };
    if versioned("python") {
        Some(Runtime::Cpython)
    } else if versioned("ruby") {
        Some(Runtime::Ruby)
    } else if name == "java" {
        Some(Runtime::Jvm)
    } else if name == "node" || name == "nodejs" {
        Some(Runtime::Node)
    } else {
        None
    }
}

/// The runtime /proc/PID/maps shows: the path column (the sixth; pseudo-names such as
/// "[heap]" and anonymous maps name no file) through [`from_mapped_files`].
pub fn from_maps(maps: &str) -> Option<Runtime> {
    from_mapped_files(maps.lines().filter_map(|l| l.split_whitespace().nth(5)))
}

/// The runtime the mapped files show: an interpreter's
/// shared library wins over glibc, which every dynamically linked program maps.
pub fn from_mapped_files<'a>(paths: impl IntoIterator<Item = &'a str>) -> Option<Runtime> {
    let mut glibc = false;
    for path in paths {
        let name = path.rsplit('/').next().unwrap_or(path);
        let library = |prefix: &str| {
            name.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(".so") || rest.starts_with('-'))
        };
        if name.starts_with("libpython3") && name.contains(".so") {
            return Some(Runtime::Cpython);
        }
        if library("libruby") {
            return Some(Runtime::Ruby);
        }
        if name == "libjvm.so" {
            return Some(Runtime::Jvm);
        }
        if library("libnode") {
            return Some(Runtime::Node);
        }
        glibc |= name == "libc.so.6";
    }
    glibc.then_some(Runtime::Glibc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_name_their_runtime() {
        for (exe, runtime) in [
            ("/usr/bin/python3.11", Some(Runtime::Cpython)),
            ("/usr/bin/python3", Some(Runtime::Cpython)),
            ("/opt/venv/bin/python", Some(Runtime::Cpython)),
            ("/usr/bin/python3.12d (deleted)", Some(Runtime::Cpython)),
            ("/usr/bin/ruby3.1", Some(Runtime::Ruby)),
            (
                "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
                Some(Runtime::Jvm),
            ),
            ("/usr/bin/node", Some(Runtime::Node)),
            ("/usr/bin/pythonista", None),
            ("/usr/bin/pypy3", None),
            ("/usr/sbin/uwsgi", None),
            ("/work/target/tmp/locker", None),
        ] {
            assert_eq!(from_exe(exe), runtime, "{exe}");
        }
    }

    #[test]
    fn mapped_runtime_libraries_win_over_glibc() {
        let glibc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        for (library, runtime) in [
            (
                "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
                Runtime::Cpython,
            ),
            (
                "/usr/lib/x86_64-linux-gnu/libruby-3.1.so.3.1.2",
                Runtime::Ruby,
            ),
            ("/usr/lib/jvm/java-17/lib/server/libjvm.so", Runtime::Jvm),
            ("/usr/lib/x86_64-linux-gnu/libnode.so.108", Runtime::Node),
        ] {
            assert_eq!(from_mapped_files([glibc, library]), Some(runtime));
        }
        assert_eq!(from_mapped_files([glibc]), Some(Runtime::Glibc));
        assert_eq!(from_mapped_files(["/lib/ld-musl-x86_64.so.1"]), None);
        assert_eq!(from_mapped_files(["/usr/lib/librubyish.so"]), None);
        let maps = "55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 42 /usr/sbin/uwsgi\n\
                    7f00-7f01 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7f02-7f03 r-xp 00000000 08:01 44 /usr/lib/libpython3.11.so.1.0\n\
                    7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n";
        assert_eq!(from_maps(maps), Some(Runtime::Cpython));
    }
}
