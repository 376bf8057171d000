//! `--config FILE`: a TOML file with the same keys as the flags (`exec_grace = "2s"`,
//! `metrics_addr = "0.0.0.0:9571"`, `full_cmdline = false`; dashes or underscores).
//!
//! The file supplies defaults for the `FORKWATCH_*` environment variables before the command
//! line is parsed, so precedence is: flags > environment > config file > built-in defaults, and
//! every value goes through exactly the validation its flag has.

use std::{ffi::OsString, path::PathBuf};

/// The keys a config file may set: (key, environment variable, the TOML type it takes).
const KEYS: [(&str, &str, Kind); 16] = [
    ("format", "FORKWATCH_FORMAT", Kind::String),
    ("output", "FORKWATCH_OUTPUT", Kind::String),
    ("exec_grace", "FORKWATCH_EXEC_GRACE", Kind::String),
    ("deadlock_after", "FORKWATCH_DEADLOCK_AFTER", Kind::String),
    ("metrics_addr", "FORKWATCH_METRICS_ADDR", Kind::String),
    ("full_cmdline", "FORKWATCH_FULL_CMDLINE", Kind::Bool),
    (
        "ring_buffer_size",
        "FORKWATCH_RING_BUFFER_SIZE",
        Kind::Integer,
    ),
    ("max_tracked", "FORKWATCH_MAX_TRACKED", Kind::Integer),
    ("bpf_stats", "FORKWATCH_BPF_STATS", Kind::Bool),
    ("log_format", "FORKWATCH_LOG_FORMAT", Kind::String),
    ("btf", "FORKWATCH_BTF", Kind::String),
    ("k8s_pod_names", "FORKWATCH_K8S_POD_NAMES", Kind::Bool),
    ("k8s_api_url", "FORKWATCH_K8S_API_URL", Kind::String),
    ("k8s_token_file", "FORKWATCH_K8S_TOKEN_FILE", Kind::String),
    ("k8s_ca_file", "FORKWATCH_K8S_CA_FILE", Kind::String),
    ("k8s_node_name", "FORKWATCH_K8S_NODE_NAME", Kind::String),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    String,
    Integer,
    Bool,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Self::String => "a string (e.g. \"2s\")",
            Self::Integer => "an integer",
            Self::Bool => "true or false",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read --config {path}: {error}")]
    Unreadable { path: String, error: std::io::Error },
    #[error("--config {path}: not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error(
        "--config {path}, line {line}: unknown key `{key}`; the keys are the flags' names: {known}"
    )]
    UnknownKey {
        path: String,
        line: usize,
        key: String,
        known: String,
    },
    #[error("--config {path}, line {line}: `{key}` must be {expected}, not {found}")]
    WrongType {
        path: String,
        line: usize,
        key: String,
        expected: &'static str,
        found: &'static str,
    },
}

/// The config file named on the command line (`--config FILE`, `--config=FILE`) or in
/// FORKWATCH_CONFIG.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(value));
        }
    }
    std::env::var_os("FORKWATCH_CONFIG").map(PathBuf::from)
}

/// Reads the config file into (environment variable, value) pairs.
pub fn read(path: &std::path::Path) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Unreadable {
        path: shown.clone(),
        error,
    })?;
    parse(&text, &shown)
}

pub fn parse(text: &str, path: &str) -> Result<Vec<(&'static str, String)>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.message().to_owned() + &line_of_span(text, e.span()),
        })?;
    let mut settings = Vec::new();
    for (raw_key, value) in &table {
        let key = raw_key.replace('-', "_");
        let line = line_of_key(text, raw_key);
        let Some(&(_, env, kind)) = KEYS.iter().find(|(k, _, _)| *k == key) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                line,
                key: raw_key.clone(),
                known: KEYS.map(|(k, _, _)| k).join(", "),
            });
        };
        let text_value = match (kind, value) {
            (Kind::String, toml::Value::String(s)) => s.clone(),
            (Kind::Integer, toml::Value::Integer(i)) => i.to_string(),
            (Kind::Bool, toml::Value::Boolean(b)) => b.to_string(),
            (_, other) => {
                return Err(ConfigError::WrongType {
                    path: path.to_owned(),
                    line,
                    key: raw_key.clone(),
                    expected: kind.describe(),
                    found: other.type_str(),
                });
            }
        };
        settings.push((env, text_value));
    }
    Ok(settings)
}

/// Sets each setting as an environment variable unless the environment already has it. Must
/// run before any thread is started (it changes the process environment).
pub fn apply(settings: &[(&'static str, String)]) {
    for (env, value) in settings {
        if std::env::var_os(env).is_none() {
            // SAFETY: called from main before the runtime or any other thread exists.
            unsafe { std::env::set_var(env, value) };
        }
    }
}

/// The 1-based line where `key` is assigned (the parsed table keeps no positions).
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix(key).or_else(|| {
                l.strip_prefix('"')
                    .and_then(|r| r.strip_prefix(key))
                    .and_then(|r| r.strip_prefix('"'))
            });
            l.is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

fn line_of_span(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_key_maps_to_its_environment_variable() {
        let text = "exec-grace = \"2s\"\nmetrics_addr = \"0.0.0.0:9571\"\nfull_cmdline = true\n\
                    ring_buffer_size = 65536\nk8s-pod-names = true\n";
        let settings = parse(text, "f.toml").unwrap();
        assert_eq!(
            settings,
            [
                ("FORKWATCH_EXEC_GRACE", "2s".to_owned()),
                ("FORKWATCH_FULL_CMDLINE", "true".to_owned()),
                ("FORKWATCH_K8S_POD_NAMES", "true".to_owned()),
                ("FORKWATCH_METRICS_ADDR", "0.0.0.0:9571".to_owned()),
                ("FORKWATCH_RING_BUFFER_SIZE", "65536".to_owned()),
            ]
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key_and_line() {
        let err = parse("format = \"json\"\n\nexec_gracee = \"1s\"\n", "f.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("line 3") && text.contains("`exec_gracee`"),
            "{text}"
        );
        assert!(
            text.contains("exec_grace, deadlock_after"),
            "lists the keys: {text}"
        );

        let err = parse("max_tracked = \"many\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("must be an integer, not string"),
            "{err}"
        );
        let err = parse("full_cmdline = 1\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be true or false, not integer"), "{err}");
        let err = parse("exec_grace = 2\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("must be a string"), "{err}");
    }

    #[test]
    fn syntax_errors_say_where() {
        let err = parse("format = \"json\"\nexec_grace = \n", "f.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("--config f.toml: not valid TOML"),
            "{text}"
        );
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn the_config_path_comes_from_either_flag_form() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let path = config_path(&args(&["forkwatch", "run", "--config", "/etc/fw.toml"]));
        assert_eq!(path, Some(PathBuf::from("/etc/fw.toml")));
        let path = config_path(&args(&["forkwatch", "--config=/x.toml"]));
        assert_eq!(path, Some(PathBuf::from("/x.toml")));
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let err = read(std::path::Path::new("/nonexistent/fw.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read --config /nonexistent/fw.toml"),
            "{err}"
        );
    }
}
