//! The rule set on disk: one JSON file in the state directory, replaced atomically (temp
//! file, fsync, rename, fsync the directory) and edited under an exclusive file lock, so two
//! `docker exec … dockwall rule add` at once are serialized and neither is lost.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::model::RuleSet;
use crate::error::{Error, Result};

pub const RULES_FILE: &str = "rules.json";
const LOCK_FILE: &str = "lock";

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Holding this is holding the lock; it is released on drop.
pub struct Locked<'a> {
    store: &'a Store,
    _lock: Flock<File>,
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    pub fn rules_path(&self) -> PathBuf {
        self.dir.join(RULES_FILE)
    }

    /// Waits for the exclusive lock on the state directory, creating it if needed.
    pub fn lock(&self) -> Result<Locked<'_>> {
        self.flock(FlockArg::LockExclusive)
            .map(|locked| locked.expect("a blocking flock returns locked or an error"))
    }

    /// The lock if no one holds it now; None when someone does.
    pub fn try_lock(&self) -> Result<Option<Locked<'_>>> {
        self.flock(FlockArg::LockExclusiveNonblock)
    }

    fn flock(&self, how: FlockArg) -> Result<Option<Locked<'_>>> {
        fs::create_dir_all(&self.dir).map_err(io_error(format!(
            "create the state directory {} (pass --state-dir or DOCKWALL_STATE_DIR)",
            self.dir.display()
        )))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(format!("open {}", path.display())))?;
        let lock = match Flock::lock(file, how) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => {
                return Err(Error::Io {
                    context: format!("lock {}", path.display()),
                    source: errno.into(),
                })
            }
        };
        Ok(Some(Locked {
            store: self,
            _lock: lock,
        }))
    }
}

impl Locked<'_> {
    /// The stored rule set; an empty one when none was stored yet. A corrupt file is an
    /// error, never silently an empty (open) firewall.
    pub fn load(&self) -> Result<RuleSet> {
        let path = self.store.rules_path();
        match fs::read_to_string(&path) {
            Ok(text) => RuleSet::from_json(&text, &path.display().to_string()).map_err(|error| {
                Error::invalid(
                    "state file",
                    path.display(),
                    format!("{error}. Fix or remove the file (dockwall apply FILE replaces it)"),
                )
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(RuleSet::default()),
            Err(source) => Err(Error::Io {
                context: format!("read {}", path.display()),
                source,
            }),
        }
    }

    pub fn save(&self, rule_set: &RuleSet) -> Result<()> {
        let path = self.store.rules_path();
        let mut text = serde_json::to_string_pretty(rule_set).map_err(|e| Error::Io {
            context: "render the rule set".into(),
            source: e.into(),
        })?;
        text.push('\n');
        crate::fs::write_atomically(&path, text.as_bytes(), 0o644)
            .map_err(io_error(format!("write {}", path.display())))
    }
}

/// Reads a rule set from any file (`dockwall apply FILE`).
pub fn read_rule_set(path: &Path) -> Result<RuleSet> {
    let text = fs::read_to_string(path).map_err(io_error(format!("read {}", path.display())))?;
    RuleSet::from_json(&text, &path.display().to_string())
}
