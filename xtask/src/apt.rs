//! apt for `cargo xtask vmtest`: the host's own package lists for a kernel of the host's Debian
//! release, and a private set of lists (under target/vmtest/apt/<suite>) for another release's,
//! e.g. bullseye's 5.10 on a bookworm host. The private lists use the mirror the host is
//! configured with and Debian's archive keyring, so no address is written here and the packages
//! are verified as apt verifies the host's own.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::cmd;

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// How apt is run for one Debian suite.
pub struct Apt {
    /// `-o` options that point apt at private lists; empty for the host's own suite.
    options: Vec<String>,
}

impl Apt {
    /// apt for `suite`: the host's if the host runs it, else private lists in `dir`, created and
    /// updated on first use (root only; apt's own error says why otherwise).
    pub fn for_suite(suite: &str, dir: &Path) -> anyhow::Result<Self> {
        if host_codename().as_deref() == Some(suite) {
            return Ok(Apt {
                options: Vec::new(),
            });
        }
        let root = dir.join(suite);
        let lists = root.join("lists");
        let parts = root.join("sources.list.d");
        for d in [
            lists.join("partial"),
            root.join("cache/archives/partial"),
            parts.clone(),
        ] {
            fs::create_dir_all(&d).with_context(|| d.display().to_string())?;
        }
        let mirror = host_mirror().context(
            "vmtest: cannot tell which Debian mirror this host uses (no `URIs:` or `deb` line for \
             its release in /etc/apt/sources.list{,.d}): add one to fetch other releases' kernels",
        )?;
        let sources = root.join("sources.list");
        fs::write(
            &sources,
            format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n"),
        )?;
        let options = vec![
            format!("Dir::Etc::SourceList={}", sources.display()),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", root.join("cache").display()),
        ];
        let apt = Apt { options };
        let fetched = fs::read_dir(&lists)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"));
        if !fetched {
            apt.update()?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        for option in &self.options {
            command.args(["-o", option]);
        }
        command
    }

    /// `apt-get update` of these lists (the host's own: all of them).
    pub fn update(&self) -> anyhow::Result<()> {
        cmd::run_with(
            self.command("apt-get")
                .arg("update")
                .stdout(std::io::stderr()),
        )
    }

    /// Package names matching `pattern` (`apt-cache search --names-only`).
    pub fn search(&self, pattern: &str) -> Vec<String> {
        let out = self
            .command("apt-cache")
            .args(["search", "--names-only", pattern])
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| line.split_whitespace().next())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// `apt-get download package` into `into`.
    pub fn download(&self, package: &str, into: &Path) -> anyhow::Result<()> {
        eprintln!(
            "xtask: $ apt-get download {package} (in {})",
            into.display()
        );
        let status = self
            .command("apt-get")
            // apt drops to its own user to download, which cannot write to target/.
            .args(["-o", "APT::Sandbox::User=root", "download", package])
            .current_dir(into)
            // Its progress goes with xtask's own (stderr): stdout is the table's.
            .stdout(std::io::stderr())
            .status()
            .context("cannot start apt-get")?;
        if !status.success() {
            bail!("apt-get download {package} failed ({status})");
        }
        Ok(())
    }

    /// Whether these are the host's own lists.
    pub fn is_host(&self) -> bool {
        self.options.is_empty()
    }
}

fn host_codename() -> Option<String> {
    let release = fs::read_to_string("/etc/os-release").ok()?;
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
}

/// The URI of the host's Debian source for its own release (deb822 `.sources` or a one-line
/// `deb` entry), e.g. what the image was set up with.
fn host_mirror() -> Option<String> {
    let codename = host_codename()?;
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|dir| dir.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.push(PathBuf::from("/etc/apt/sources.list"));
    files
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .find_map(|text| mirror_in(&text, &codename))
}

/// The mirror of `codename` in one sources file, deb822 stanzas or one-line entries.
fn mirror_in(text: &str, codename: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:"))
            && suites.split_whitespace().any(|s| s == codename)
        {
            return uris.split_whitespace().next().map(str::to_owned);
        }
    }
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
        (words.next()? == "deb").then_some(())?;
        let uri = words.next()?;
        (words.next()? == codename).then(|| uri.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::mirror_in;

    #[test]
    fn the_mirror_of_the_host_release_is_found_in_either_format() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm \
                      bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: \
                      http://security.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in(deb822, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_in(deb822, "trixie"), None);
        let one_line = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_in(one_line, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
    }
}
