//! Replacing files in a state directory so that a crash leaves the old file or the new one,
//! never a mix: the bytes go to a temporary file beside it, which is renamed over it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` (file mode `mode`, before the umask) and syncs file and
/// directory: for state that must survive a power cut (rules, keys, leases).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace(path, bytes, mode, true)
}

/// Replaces `path` with `bytes` without syncing: for files rewritten every few seconds that
/// need not survive a crash (status), where an fsync would only stall the writer.
pub fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace(path, bytes, mode, false)
}

/// `value` as pretty JSON (mode 0644) through [`write_atomically`] when `durable`, else
/// [`write_replacing`]; the directory is created when missing.
pub fn write_json(path: &Path, value: &impl serde::Serialize, durable: bool) -> io::Result<()> {
    if let Some(directory) = path.parent() {
        fs::create_dir_all(directory)?;
    }
    let json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    replace(path, &json, 0o644, durable)
}

fn replace(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let temporary = temporary_path(path)?;
    // A leftover from a crash may carry another mode; `mode` applies only on creation.
    match fs::remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)?;
    file.write_all(bytes)?;
    if durable {
        file.sync_all()?;
    }
    fs::rename(&temporary, path)?;
    if durable {
        let directory = path.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(directory.unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
}

/// `.NAME.tmp` beside `path`: one per file, so files sharing a stem never share it.
fn temporary_path(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    Ok(path.with_file_name(format!(".{}.tmp", name.to_string_lossy())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_with_the_mode_even_over_a_leftover_temporary_file() {
        let dir = std::env::temp_dir().join(format!("vnf-fs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let key = dir.join("ca.key");
        // A crash left a world-readable temporary file behind.
        fs::write(dir.join(".ca.key.tmp"), "stale").unwrap();
        fs::set_permissions(dir.join(".ca.key.tmp"), fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&key, b"secret", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret");
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_replacing(&dir.join("ca.crt"), b"public", 0o644).unwrap();
        write_atomically(&key, b"secret 2", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "secret 2");
        let mut left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["ca.crt", "ca.key"], "no temporary file is left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
