//! Suppression: `[[ignore]]` rules of the config file (parsed in cli/ignore.rs). A finding a
//! rule names is counted (`forkwatch_findings_suppressed_total{kind}`) and not printed. Every
//! field a rule sets must match; each rule has a reason, for the next person to read it.

use crate::report::finding::{Finding, Kind};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoreRule {
    pub kind: Option<Kind>,
    /// Globs: `*` any run of characters (`/` too), `?` any one character.
    pub exe: Option<Glob>,
    pub comm: Option<Glob>,
    pub parent_comm: Option<Glob>,
    /// The container's id (`container.id`).
    pub container_id: Option<Glob>,
    /// The pod's namespace (`pod_namespace`: only known with `--k8s-pod-names`).
    pub pod_namespace: Option<Glob>,
    /// A function of the fork's stack (`fork_stack`): any frame's name may match. A finding
    /// without a fork stack matches no such rule.
    pub fork_function: Option<Glob>,
    pub reason: String,
    /// Where the rule starts in its file, for logs.
    pub line: usize,
}

impl IgnoreRule {
    pub fn matches(&self, f: &Finding) -> bool {
        let glob = |g: &Option<Glob>, value: Option<&str>| {
            g.as_ref()
                .is_none_or(|g| value.is_some_and(|v| g.matches(v)))
        };
        self.kind.is_none_or(|k| k == f.kind)
            && glob(&self.exe, f.exe.as_deref())
            && glob(&self.comm, Some(&f.comm))
            && glob(&self.parent_comm, Some(&f.parent_comm))
            && glob(
                &self.container_id,
                f.attribution.container.as_ref().map(|c| c.id.as_str()),
            )
            && glob(&self.pod_namespace, f.attribution.pod_namespace.as_deref())
            && self.fork_function.as_ref().is_none_or(|g| {
                let frames = f.fork.as_ref().and_then(|fork| fork.fork_stack.as_deref());
                frames.unwrap_or_default().iter().any(|frame| {
                    frame
                        .function
                        .as_deref()
                        .is_some_and(|name| g.matches(name))
                })
            })
    }
}

/// The rules in force.
#[derive(Clone, Debug, Default)]
pub struct Suppressor {
    rules: Vec<IgnoreRule>,
}

impl Suppressor {
    pub fn new(rules: Vec<IgnoreRule>) -> Self {
        Self { rules }
    }

    /// The first rule that names `finding`.
    pub fn rule_for(&self, finding: &Finding) -> Option<&IgnoreRule> {
        self.rules.iter().find(|r| r.matches(finding))
    }

    /// How many rules are in force.
    pub fn count(&self) -> usize {
        self.rules.len()
    }
}

/// A shell-style pattern: `*` matches any run of characters, `?` any one; nothing else is
/// special (no classes, no escapes), so no pattern is malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(Vec<char>);

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.chars().collect())
    }

    /// Iterative matching with one backtrack point: linear in practice, never exponential,
    /// whatever the pattern and the (process-chosen) text.
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let pattern = &self.0;
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
                p += 1;
                t += 1;
            } else if p < pattern.len() && pattern[p] == '*' {
                star = Some((p, t));
                p += 1;
            } else if let Some((star_p, star_t)) = star {
                p = star_p + 1;
                t = star_t + 1;
                star = Some((star_p, star_t + 1));
            } else {
                return false;
            }
        }
        pattern[p..].iter().all(|&c| c == '*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (pattern, text, expected) in [
            ("/usr/bin/python3*", "/usr/bin/python3.11", true),
            ("/usr/bin/python3*", "/usr/bin/ruby", false),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*/gunicorn", "/srv/venv/bin/gunicorn", true),
            ("*a*b*c", "xaxbxbxc", true),
            ("*a*b*c", "xaxbxbx", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(
                Glob::new(pattern).matches(text),
                expected,
                "{pattern} ~ {text}"
            );
        }
        // A pathological pattern against a long text stays fast.
        let text = "a".repeat(10_000);
        assert!(!Glob::new("*a*a*a*a*a*a*b").matches(&text));
    }

    fn rule() -> IgnoreRule {
        IgnoreRule {
            kind: None,
            exe: None,
            comm: None,
            parent_comm: None,
            container_id: None,
            pod_namespace: None,
            fork_function: None,
            reason: "r".into(),
            line: 1,
        }
    }

    fn forked_from(functions: &[&str]) -> Finding {
        let mut f = Finding::example("worker");
        let frames = functions
            .iter()
            .map(|name| crate::enrich::stack::Frame {
                address: 1,
                function: Some((*name).into()),
                module: Some("app".into()),
                offset: 0,
                file: None,
                line: None,
            })
            .collect::<Vec<_>>();
        f.fork = Some(crate::enrich::fork_stack::details(Ok(std::sync::Arc::new(
            frames,
        ))));
        f
    }

    #[test]
    fn a_fork_function_rule_matches_any_frame_of_the_fork_stack() {
        let rule = IgnoreRule {
            fork_function: Some(Glob::new("start_worker_*")),
            ..rule()
        };
        assert!(rule.matches(&forked_from(&["fork", "start_worker_process", "main"])));
        assert!(!rule.matches(&forked_from(&["fork", "spawn_helper", "main"])));
        // No fork stack (another kind of finding, or none captured): never matched.
        assert!(!rule.matches(&Finding::example("worker")));
        let mut unavailable = Finding::example("worker");
        unavailable.fork = Some(crate::enrich::fork_stack::details(Err("unwind_failed")));
        assert!(!rule.matches(&unavailable));
    }

    #[test]
    fn every_field_a_rule_sets_must_match() {
        let f = Finding::example("worker"); // mt_fork_no_exec, exe /usr/bin/python3
        let by_kind = IgnoreRule {
            kind: Some(Kind::MtForkNoExec),
            ..rule()
        };
        assert!(by_kind.matches(&f));
        let other_kind = IgnoreRule {
            kind: Some(Kind::SharedSocket),
            ..rule()
        };
        assert!(!other_kind.matches(&f));
        let both = IgnoreRule {
            kind: Some(Kind::MtForkNoExec),
            exe: Some(Glob::new("/usr/bin/python*")),
            comm: Some(Glob::new("work*")),
            parent_comm: Some(Glob::new("python3")),
            ..rule()
        };
        assert!(both.matches(&f));
        let wrong_comm = IgnoreRule {
            comm: Some(Glob::new("web*")),
            ..both.clone()
        };
        assert!(!wrong_comm.matches(&f));
        // A field the finding does not have never matches a rule that names it.
        let in_pod = IgnoreRule {
            pod_namespace: Some(Glob::new("*")),
            ..rule()
        };
        assert!(!in_pod.matches(&f));
        let mut f_in_pod = f.clone();
        f_in_pod.attribution.pod_namespace = Some("batch".into());
        assert!(in_pod.matches(&f_in_pod));
        let container = IgnoreRule {
            container_id: Some(Glob::new("abc*")),
            ..rule()
        };
        assert!(!container.matches(&f));
        let mut f_in_container = f;
        f_in_container.attribution.container = Some(crate::enrich::cgroup::Container {
            runtime: "docker",
            id: "abcdef".into(),
        });
        assert!(container.matches(&f_in_container));
        let suppressor = Suppressor::new(vec![other_kind, container]);
        assert_eq!(
            suppressor.rule_for(&f_in_container).map(|r| r.line),
            Some(1)
        );
    }
}
