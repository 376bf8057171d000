//! The systemd unit (deploy/systemd/forkwatch.service).

use super::*;

/// `systemd-analyze verify` accepts the unit with nothing to say, and systemd parses its
/// capabilities and sandboxing the way they are meant.
///
/// verify fails when ExecStart's binary does not exist, and /usr/local/bin/forkwatch is not
/// installed here: it runs on a copy of the unit whose ExecStart is the daemon cargo just built
/// (same arguments), in a scratch directory with the same file name. PID 1 is not systemd on
/// every test machine, which verify does not need: it loads the unit with its own manager
/// instance. It also ignores capability names it does not know without a word, so the unit as
/// systemd parsed it (its debug dump) is checked too, and a broken copy must be rejected, which
/// shows verify works on this machine.
#[test]
fn systemd_unit_verifies_and_bounds_capabilities() {
    harness::unprivileged().run(|| {
        let unit = std::fs::read_to_string(deploy("systemd/forkwatch.service")).unwrap();
        let exec_lines: Vec<&str> = unit
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect();
        assert_eq!(
            exec_lines,
            ["ExecStart=/usr/local/bin/forkwatch run --format json"]
        );
        let binary = env!("CARGO_BIN_EXE_forkwatch");
        assert!(!binary.contains(char::is_whitespace), "{binary}");
        let copy = unit.replace(
            "ExecStart=/usr/local/bin/forkwatch ",
            &format!("ExecStart={binary} "),
        );

        let scratch = Scratch::new("systemd");
        let dir = scratch.0.clone();
        let path = dir.join("forkwatch.service");
        std::fs::write(&path, &copy).unwrap();
        let verify = |path: &Path, log_level: &str| {
            run(
                Command::new("systemd-analyze")
                    .arg("verify")
                    .arg(path)
                    .current_dir(&dir)
                    .env("SYSTEMD_LOG_LEVEL", log_level)
                    .env_remove("SYSTEMD_UNIT_PATH"),
                b"",
            )
        };

        let output = verify(&path, "info");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && said.trim().is_empty(),
            "systemd-analyze verify ({}):\n{said}",
            output.status
        );

        // The unit as systemd parsed it.
        let output = verify(&path, "debug");
        assert!(output.status.success());
        let dump = String::from_utf8_lossy(&output.stdout);
        let parsed: Vec<(String, String)> = dump
            .lines()
            .skip_while(|l| l.trim() != "-> Unit forkwatch.service:")
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with("-> Unit "))
            .filter_map(|l| {
                let (key, value) = l.trim().split_once(": ")?;
                Some((key.to_owned(), value.trim().to_owned()))
            })
            .collect();
        assert!(
            !parsed.is_empty(),
            "no dump of forkwatch.service in verify's debug output"
        );
        let get = |key: &str| -> Vec<&str> {
            parsed
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let caps: BTreeSet<String> = CAPABILITIES
            .iter()
            .map(|c| format!("cap_{}", c.to_lowercase()))
            .collect();
        for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
            let values = get(key);
            assert_eq!(values.len(), 1, "{key}: {values:?}");
            let set: BTreeSet<String> = values[0].split_whitespace().map(str::to_owned).collect();
            assert_eq!(set, caps, "{key} as systemd parsed it");
        }
        assert_eq!(get("Type"), ["simple"], "no sd_notify: Type=simple");
        assert_eq!(get("Restart"), ["on-failure"]);
        assert_eq!(get("ProtectSystem"), ["strict"]);
        assert_eq!(get("ProtectHome"), ["yes"]);
        assert_eq!(get("PrivateTmp"), ["yes"]);
        assert_eq!(
            get("ProtectProc"),
            ["default"],
            "the daemon reads every process's /proc"
        );
        assert_eq!(get("ProcSubset"), ["all"], "the daemon reads /proc/<pid>");
        let environment: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("Environment="))
            .collect();
        assert_eq!(get("Environment"), environment, "Environment= as parsed");
        assert!(environment.contains(&"FORKWATCH_METRICS_ADDR=127.0.0.1:9571"));
        let known = daemon_env_vars();
        for line in get("Environment") {
            let name = line.split('=').next().unwrap();
            assert!(known.contains(name), "{name} is not a daemon env var");
        }
        // NoNewPrivileges is not in the dump: check the file.
        assert!(unit.lines().any(|l| l == "NoNewPrivileges=yes"));
        assert!(
            get("User").first().is_some_and(|u| *u != "root") && get("DynamicUser") == ["yes"],
            "a transient non-root user holding the ambient capabilities"
        );

        // verify on this machine does reject a broken unit.
        let broken = dir.join("broken").join("forkwatch.service");
        std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
        std::fs::write(&broken, copy.replace("Type=simple", "Type=simpel")).unwrap();
        let output = verify(&broken, "info");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(
            said.contains("simpel"),
            "systemd-analyze verify did not notice Type=simpel: {said}"
        );
    });
}
