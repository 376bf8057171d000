//! `--output`: the file findings are appended to. Its directory may be writable by others (a
//! /tmp path, a shared log directory), so what is found at the path is not trusted: a symlink
//! is not followed (it could point the daemon's writes at any file root can write), a FIFO or
//! device is refused instead of blocking the daemon or writing into it, a file someone else
//! owns is refused (they could read the findings, or chmod it back), and the mode is set on the
//! open file, whether the daemon created it or found it.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};

/// Findings name processes, users' programs and their sockets: readable by the owner and its
/// group (e.g. a log shipper's), nobody else.
pub const MODE: u32 = 0o640;

/// Opens (creating if need be) the findings file for appending.
pub fn open(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(MODE)
        // O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!(
                "--output {} is a symbolic link, which forkwatch does not follow; give the \
                 file's own path",
                path.display()
            ),
            Some(libc::ENXIO) => anyhow::anyhow!(
                "--output {} is a FIFO with no reader; give a regular file",
                path.display()
            ),
            _ => anyhow::Error::new(err).context(format!(
                "cannot open --output {} for appending; check the directory exists and is \
                 writable",
                path.display()
            )),
        })?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat --output {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!(
            "--output {} is not a regular file; give a path to a file (it is created if missing)",
            path.display()
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        bail!(
            "--output {} belongs to uid {}, not to forkwatch's user (uid {me}): whoever owns it \
             could read the findings; remove it, or choose a directory only forkwatch's user \
             can write to",
            path.display(),
            meta.uid()
        );
    }
    file.set_permissions(std::fs::Permissions::from_mode(MODE))
        .with_context(|| format!("cannot set mode {MODE:o} on --output {}", path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("forkwatch-output-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn creates_or_appends_with_mode_0640() {
        let dir = scratch("mode");
        let path = dir.join("findings.jsonl");
        // Found with a wider mode: narrowed on open.
        std::fs::write(&path, "old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        {
            use std::io::Write as _;
            let mut file = open(&path).unwrap();
            file.write_all(b"new\n").unwrap();
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(mode, MODE);
        assert_eq!(text, "old\nnew\n");
    }

    #[test]
    fn refuses_a_symlink_a_fifo_and_a_directory() {
        let dir = scratch("refuse");
        let target = dir.join("target");
        std::fs::write(&target, "").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let fifo = dir.join("fifo");
        let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        let link_err = open(&link).unwrap_err().to_string();
        // Would block forever without O_NONBLOCK: nothing reads the FIFO.
        let fifo_err = open(&fifo).unwrap_err().to_string();
        let dir_err = format!("{:#}", open(&dir).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(link_err.contains("symbolic link"), "{link_err}");
        assert!(fifo_err.contains("FIFO"), "{fifo_err}");
        assert!(dir_err.contains("--output"), "{dir_err}");
    }
}
