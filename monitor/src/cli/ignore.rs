//! The config file's `[[ignore]]` rules (report/suppress.rs applies them):
//!
//! ```toml
//! [[ignore]]
//! kind = "mt_fork_no_exec"
//! exe = "/usr/lib/postgresql/*/bin/postgres"
//! reason = "PostgreSQL backends fork from a single-threaded postmaster; its bgworkers are not ours"
//! ```
//!
//! A rule that is wrong in any way (an unknown key, a wrong type, an unknown kind, no reason,
//! nothing to match) is a usage error naming the file, the line and the key: a rule that
//! silently matched nothing, or everything, would be worse than none.

use toml::de::{DeTable, DeValue};

use super::config::ConfigError;
use crate::report::{
    finding::Kind,
    suppress::{Glob, IgnoreRule},
};

/// The table name in the file.
pub const IGNORE: &str = "ignore";

/// The keys a rule may have besides `reason`, each a string.
const MATCHERS: [&str; 7] = [
    "kind",
    "exe",
    "comm",
    "parent_comm",
    "container_id",
    "pod_namespace",
    "fork_function",
];

/// The `[[ignore]]` rules of the config file `text` (shown as `path` in errors).
pub fn parse(text: &str, path: &str) -> Result<Vec<IgnoreRule>, ConfigError> {
    // Bytes, not a str slice: no offset can split a character and panic.
    let line_of = |offset: usize| {
        let before = &text.as_bytes()[..offset.min(text.len())];
        before.iter().filter(|&&b| b == b'\n').count() + 1
    };
    let doc = DeTable::parse(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    let bad = |offset: usize, key: &str, problem: String| ConfigError::BadRule {
        path: path.to_owned(),
        line: line_of(offset),
        key: key.to_owned(),
        problem,
    };
    let Some((key, value)) = doc
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == IGNORE)
    else {
        return Ok(Vec::new());
    };
    let DeValue::Array(tables) = value.get_ref() else {
        return Err(bad(
            key.span().start,
            IGNORE,
            "must be a list of tables: write each rule as an [[ignore]] section".into(),
        ));
    };
    let mut rules = Vec::new();
    for table in tables {
        let start = table.span().start;
        let DeValue::Table(fields) = table.get_ref() else {
            return Err(bad(
                start,
                IGNORE,
                "each rule must be a table ([[ignore]])".into(),
            ));
        };
        let mut rule = IgnoreRule {
            kind: None,
            exe: None,
            comm: None,
            parent_comm: None,
            container_id: None,
            pod_namespace: None,
            fork_function: None,
            reason: String::new(),
            line: line_of(start),
        };
        for (key, value) in fields.iter() {
            let (name, at) = (key.get_ref().as_ref(), key.span().start);
            let DeValue::String(text) = value.get_ref() else {
                return Err(bad(at, name, "must be a string".into()));
            };
            let text = text.as_ref();
            match name {
                "reason" if text.trim().is_empty() => {
                    return Err(bad(at, name, "must say why (it is empty)".into()));
                }
                "reason" => rule.reason = text.to_owned(),
                "kind" => {
                    let kind = Kind::ALL.into_iter().find(|k| k.as_str() == text);
                    let Some(kind) = kind else {
                        let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                        return Err(bad(
                            at,
                            name,
                            format!(
                                "unknown kind \"{text}\"; the kinds are {}",
                                kinds.join(", ")
                            ),
                        ));
                    };
                    rule.kind = Some(kind);
                }
                "exe" => rule.exe = Some(Glob::new(text)),
                "comm" => rule.comm = Some(Glob::new(text)),
                "parent_comm" => rule.parent_comm = Some(Glob::new(text)),
                "container_id" => rule.container_id = Some(Glob::new(text)),
                "pod_namespace" => rule.pod_namespace = Some(Glob::new(text)),
                "fork_function" => rule.fork_function = Some(Glob::new(text)),
                _ => {
                    return Err(bad(
                        at,
                        name,
                        format!(
                            "unknown key; a rule's keys are {}, reason",
                            MATCHERS.join(", ")
                        ),
                    ));
                }
            }
        }
        if rule.reason.is_empty() {
            return Err(bad(
                start,
                "reason",
                "is required: say why these findings may be ignored".into(),
            ));
        }
        let matches_something = rule.kind.is_some()
            || rule.exe.is_some()
            || rule.comm.is_some()
            || rule.parent_comm.is_some()
            || rule.container_id.is_some()
            || rule.pod_namespace.is_some()
            || rule.fork_function.is_some();
        if !matches_something {
            return Err(bad(
                start,
                IGNORE,
                format!(
                    "names nothing to match, so it would silence every finding; set one of {}",
                    MATCHERS.join(", ")
                ),
            ));
        }
        rules.push(rule);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_their_lines() {
        let text = "exec_grace = \"2s\"\n\n[[ignore]]\nkind = \"mt_fork_no_exec\"\n\
                    exe = \"/usr/bin/python3*\"\nreason = \"known, tracked in JIRA-1\"\n\n\
                    [[ignore]]\nparent_comm = \"postgres\"\ncomm = \"bgworker*\"\n\
                    pod_namespace = \"batch\"\ncontainer_id = \"ab*\"\nreason = \"r\"\n\
                    fork_function = \"start_*\"\n";
        let rules = parse(text, "f.toml").unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].kind, Some(Kind::MtForkNoExec));
        assert_eq!(rules[0].exe, Some(Glob::new("/usr/bin/python3*")));
        assert_eq!(rules[0].reason, "known, tracked in JIRA-1");
        assert_eq!(rules[0].line, 3);
        assert_eq!(rules[1].line, 8);
        assert_eq!(rules[1].pod_namespace, Some(Glob::new("batch")));
        assert_eq!(rules[1].fork_function, Some(Glob::new("start_*")));
        assert!(parse("exec_grace = \"2s\"\n", "f.toml").unwrap().is_empty());
    }

    #[test]
    fn a_bad_rule_names_file_line_and_key() {
        for (text, line, key, problem) in [
            (
                "[[ignore]]\nkind = \"mt_fork_no_exec\"\n",
                1,
                "reason",
                "is required",
            ),
            (
                "[[ignore]]\nkind = \"mt_fork_no_exec\"\nreason = \"  \"\n",
                3,
                "reason",
                "must say why",
            ),
            (
                "[[ignore]]\nreason = \"x\"\nkind = \"mt_fork\"\n",
                3,
                "kind",
                "unknown kind \"mt_fork\"; the kinds are mt_fork_no_exec,",
            ),
            (
                "[[ignore]]\nreason = \"x\"\nexee = \"/bin/x\"\n",
                3,
                "exee",
                "unknown key; a rule's keys are kind, exe,",
            ),
            (
                "[[ignore]]\nreason = \"x\"\ncomm = 3\n",
                3,
                "comm",
                "must be a string",
            ),
            (
                "[[ignore]]\nreason = \"x\"\nfork_function = 7\n",
                3,
                "fork_function",
                "must be a string",
            ),
            (
                "\n[[ignore]]\nreason = \"everything\"\n",
                2,
                "ignore",
                "names nothing to match",
            ),
            ("ignore = \"all\"\n", 1, "ignore", "list of tables"),
        ] {
            let err = parse(text, "/etc/fw.toml").unwrap_err().to_string();
            let expected = format!("--config /etc/fw.toml, line {line}: [[ignore]] `{key}`");
            assert!(err.starts_with(&expected), "{text:?}: {err}");
            assert!(err.contains(problem), "{text:?}: {err}");
        }
    }
}
