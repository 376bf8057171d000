//! `--config FILE`: a TOML file with the same keys as the flags (`exec_grace = "2s"`,
//! `metrics_addr = "0.0.0.0:9571"`, `full_cmdline = false`; dashes or underscores).
//!
//! The file supplies defaults for the `FORKWATCH_*` environment variables before the command
//! line is parsed, so precedence is: flags > environment > config file > built-in defaults, and
//! every value goes through exactly the validation its flag has.

use std::{ffi::OsString, path::PathBuf};

/// A key a config file may set: a flag of `forkwatch run` (in clap, the one definition of every
/// flag), its environment variable and the TOML type it takes.
struct Key {
    name: String,
    env: String,
    kind: Kind,
}

/// Every flag of `forkwatch run` but `--config` itself, in the order `--help` lists them, then
/// those of `forkwatch exec` that `run` lacks: the key is the flag's name with underscores
/// (dashes are accepted too).
fn keys() -> Vec<Key> {
    all_flags()
        .iter()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env()?.to_str()?;
            (long != CONFIG_FLAG).then(|| Key {
                name: long.replace('-', "_"),
                env: env.to_owned(),
                kind: Kind::of(arg),
            })
        })
        .collect()
}

/// The flags of `run` (the top level), then those only `exec` has.
fn all_flags() -> Vec<clap::Arg> {
    let command = <super::Cli as clap::CommandFactory>::command();
    let mut flags: Vec<clap::Arg> = command.get_arguments().cloned().collect();
    if let Some(exec) = command.find_subcommand("exec") {
        for arg in exec.get_arguments() {
            if arg.get_long().is_some() && !flags.iter().any(|f| f.get_long() == arg.get_long()) {
                flags.push(arg.clone());
            }
        }
    }
    flags
}

/// The flag that names the config file: not a key of the file.
const CONFIG_FLAG: &str = "config";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    String,
    Integer,
    Bool,
}

impl Kind {
    /// The TOML type a flag's value is written as: a switch is a boolean, a number an integer,
    /// everything else (durations, addresses, paths, names) a string.
    fn of(arg: &clap::Arg) -> Self {
        use std::any::TypeId;
        let value = arg.get_value_parser().type_id();
        if !arg.get_action().takes_values() {
            Self::Bool
        } else if value == TypeId::of::<u32>() || value == TypeId::of::<u64>() {
            Self::Integer
        } else {
            Self::String
        }
    }

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
        "--config {path}, line {line}: unknown key `{key}`; the keys are the flags' names: \
         {known} (and [[ignore]] rules)"
    )]
    UnknownKey {
        path: String,
        line: usize,
        key: String,
        known: String,
    },
    #[error("--config {path}, line {line}: [[ignore]] `{key}` {problem}")]
    BadRule {
        path: String,
        line: usize,
        key: String,
        problem: String,
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
/// FORKWATCH_CONFIG. Not after `--`: that is `exec`'s CMD and its own flags.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut args = args.iter().take_while(|arg| *arg != "--");
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

/// What a config file says: flag values, and the rules for findings not to print.
#[derive(Debug, Default)]
pub struct ConfigFile {
    /// (environment variable, value) pairs: see [`apply`].
    pub settings: Vec<(String, String)>,
    /// The `[[ignore]]` rules (cli/ignore.rs).
    pub ignore: Vec<crate::report::suppress::IgnoreRule>,
}

/// Reads the config file.
pub fn read(path: &std::path::Path) -> Result<ConfigFile, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Unreadable {
        path: shown.clone(),
        error,
    })?;
    parse_file(&text, &shown)
}

/// A config file's text: its flag values and its `[[ignore]]` rules.
pub fn parse_file(text: &str, path: &str) -> Result<ConfigFile, ConfigError> {
    Ok(ConfigFile {
        settings: parse(text, path)?,
        ignore: super::ignore::parse(text, path)?,
    })
}

/// The flag values of a config file, as (environment variable, value) pairs.
pub fn parse(text: &str, path: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.message().to_owned() + &line_of_span(text, e.span()),
        })?;
    let keys = keys();
    let mut settings = Vec::new();
    for (raw_key, value) in &table {
        if raw_key == super::ignore::IGNORE {
            continue; // rules, not a flag: cli/ignore.rs
        }
        let key = raw_key.replace('-', "_");
        let line = line_of_key(text, raw_key);
        let Some(Key { env, kind, .. }) = keys.iter().find(|k| k.name == key) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                line,
                key: raw_key.clone(),
                known: keys
                    .iter()
                    .map(|k| k.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let text_value = match (*kind, value) {
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
        settings.push((env.clone(), text_value));
    }
    Ok(settings)
}

/// The variables [`apply`] set: forkwatch's own settings, which `forkwatch exec` keeps out of
/// CMD's environment (a forkwatch CMD starts must not take them for its user's).
static APPLIED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Sets each setting as an environment variable unless the environment already has it. Must
/// run before any thread is started (it changes the process environment).
pub fn apply(settings: &[(String, String)]) {
    let mut applied = Vec::new();
    for (env, value) in settings {
        if std::env::var_os(env).is_none() {
            // SAFETY: called from main before the runtime or any other thread exists.
            unsafe { std::env::set_var(env, value) };
            applied.push(env.clone());
        }
    }
    let _ = APPLIED.set(applied);
}

/// The variables the config file set (none without one).
pub fn applied() -> &'static [String] {
    APPLIED.get().map_or(&[], Vec::as_slice)
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
                ("FORKWATCH_EXEC_GRACE", "2s"),
                ("FORKWATCH_FULL_CMDLINE", "true"),
                ("FORKWATCH_K8S_POD_NAMES", "true"),
                ("FORKWATCH_METRICS_ADDR", "0.0.0.0:9571"),
                ("FORKWATCH_RING_BUFFER_SIZE", "65536"),
            ]
            .map(|(env, value)| (env.to_owned(), value.to_owned()))
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
        // exec's CMD may take a --config of its own.
        let cmd = args(&["forkwatch", "exec", "--", "eslint", "--config", "e.json"]);
        assert_eq!(
            config_path(&cmd),
            std::env::var_os("FORKWATCH_CONFIG").map(PathBuf::from)
        );
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

    /// The one definition of the flags is clap's: every flag of `forkwatch run` and `exec` has
    /// its FORKWATCH_* variable, is a config key (but --config), and is a row of the flags
    /// table in docs/configuration.md with the same variable and key; `check` and `selftest`
    /// take no flag that `run` lacks, `exec` none but its own two.
    #[test]
    fn every_flag_has_its_variable_its_key_and_its_documented_row() {
        use clap::CommandFactory;
        let command = crate::cli::Cli::command();
        let flags: Vec<(String, String)> = all_flags()
            .iter()
            .filter_map(|arg| {
                let long = arg.get_long()?.to_owned();
                let env = arg.get_env().and_then(|e| e.to_str()).map(str::to_owned);
                Some((long, env.unwrap_or_default()))
            })
            .collect();
        assert!(flags.len() >= 17, "{flags:?}");
        let docs = include_str!("../../../docs/configuration.md");
        let rows: Vec<Vec<&str>> = docs
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
            .collect();
        assert_eq!(
            rows.len(),
            flags.len(),
            "docs/configuration.md must have one row per flag"
        );
        let keys = keys();
        for (long, env) in &flags {
            let expected_env = format!("FORKWATCH_{}", long.replace('-', "_").to_uppercase());
            assert_eq!(*env, expected_env, "--{long} must read {expected_env}");
            let key = long.replace('-', "_");
            let row = rows
                .iter()
                .find(|r| r[0] == format!("`--{long}`"))
                .unwrap_or_else(|| panic!("--{long} is not in docs/configuration.md"));
            assert_eq!(
                row[1],
                format!("`{env}`"),
                "documented variable of --{long}"
            );
            if long == CONFIG_FLAG {
                assert_eq!(row[2], "—", "--config is not a key of the file");
                continue;
            }
            assert_eq!(row[2], format!("`{key}`"), "documented key of --{long}");
            let k = keys.iter().find(|k| k.name == key).expect("a key per flag");
            let sample = match k.kind {
                Kind::Bool => "true",
                Kind::Integer => "4096",
                Kind::String => "\"x\"",
            };
            let settings = parse(&format!("{key} = {sample}"), "f.toml").unwrap();
            assert_eq!(settings[0].0, *env, "key {key}");
        }
        let run_only: Vec<&str> = command
            .get_arguments()
            .filter_map(clap::Arg::get_long)
            .collect();
        assert_eq!(
            run_only.len() + 2,
            flags.len(),
            "exec adds --fail-on and --junit"
        );
        for sub in ["check", "selftest", "exec"] {
            let sub = command.find_subcommand(sub).unwrap();
            for arg in sub.get_arguments().filter_map(clap::Arg::get_long) {
                assert!(
                    run_only.contains(&arg) || ["fail-on", "junit"].contains(&arg),
                    "--{arg} of {} is not a flag of run",
                    sub.get_name()
                );
            }
        }
    }
}
