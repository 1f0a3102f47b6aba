//! Edits with memory: a long-running process (the daemon's REST API) keeps a [`Session`], so
//! an edit skips what a CLI process must redo every time: reading the state file and
//! compiling the rule set as it was (the base of the difference sent to the kernel). The
//! cache is used only while the state file is the one the session last saw (every save
//! replaces the file, so a CLI edit in between gives it a new inode) and the sides are the
//! same; otherwise the edit loads and compiles as a fresh one does. Either way it runs under
//! the store's lock, changes the kernel first and the file second, like every edit.

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use tracing::debug;

use super::compile::{compile, Compiled, Sides};
use super::nft;
use super::store::Store;
use super::{Applied, EditOutcome, RuleSet};
use crate::error::{Error, Result};
use crate::side::Assignment;

/// The rule set and compile of the last edit, for the next one.
#[derive(Default)]
pub struct Session {
    cached: Option<Cached>,
}

struct Cached {
    stamp: Stamp,
    assignment: Assignment,
    rule_set: RuleSet,
    compiled: Compiled,
}

/// One version of the state file: a save writes a new file and renames it over the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    size: u64,
    /// The modification time as seconds and nanoseconds (as one i64 of nanoseconds it would
    /// overflow for far-off times).
    modified: (i64, i64),
}

fn stamp(store: &Store) -> Result<Option<Stamp>> {
    let path = store.rules_path();
    match std::fs::metadata(&path) {
        Ok(meta) => Ok(Some(Stamp {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
        })),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            context: format!("read the metadata of {}", path.display()),
            source,
        }),
    }
}

impl Session {
    /// One edit for these sides: under the store's lock, change the rule set, validate it,
    /// apply the difference to the kernel, then save. Any error leaves both the kernel (nft
    /// transactions are atomic) and the file as they were, and the session as it was.
    pub fn edit(
        &mut self,
        store: &Store,
        assignment: &Assignment,
        dry_run: bool,
        change: impl FnOnce(&mut RuleSet) -> Result<()>,
    ) -> Result<EditOutcome> {
        let started = Instant::now();
        let locked = store.lock()?;
        let current = stamp(store)?;
        let cached = self
            .cached
            .as_ref()
            .filter(|c| Some(c.stamp) == current && c.assignment == *assignment);
        let loaded;
        let old = match cached {
            Some(cached) => &cached.rule_set,
            None => {
                loaded = locked.load()?;
                &loaded
            }
        };
        let mut new = old.clone();
        change(&mut new)?;
        new.validate()?;
        let sides = Sides::from_assignment(assignment);
        // Without a cached compile, the old one is compiled alongside the new one.
        let computed_old;
        let (old_compiled, compiled) = match cached {
            Some(cached) => (&cached.compiled, compile(&new, sides)),
            None => {
                let (old_compiled, compiled) = std::thread::scope(|scope| {
                    let old_compiled = scope.spawn(|| compile(old, sides));
                    (old_compiled.join(), compile(&new, sides))
                });
                computed_old = old_compiled
                    .map_err(|_| Error::Nft("compiling the previous rule set failed".into()))?;
                (&computed_old, compiled)
            }
        };
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            cached = cached.is_some(),
            rules = new.rules.len(),
            "changed and compiled"
        );
        if dry_run {
            return Ok(EditOutcome {
                applied: Applied::DryRun(nft::render(nft::full_batch(&compiled))?),
                rule_set: new,
            });
        }
        let changed = new != *old;
        // Checked under the store's lock: a `run` starting now applies what is saved here.
        let applied = if nft::kernel_fingerprint()?.is_none() {
            Applied::StoredOnly
        } else {
            Applied::Kernel(nft::apply(Some(old_compiled), &compiled)?)
        };
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            ?applied,
            "applied"
        );
        if changed {
            locked.save(&new)?;
        }
        debug!(elapsed_ms = started.elapsed().as_millis() as u64, "saved");
        // The edit is done (kernel and file): a file we cannot stat now only means no cache,
        // the next edit loads and compiles afresh.
        self.cached = stamp(store).ok().flatten().map(|stamp| Cached {
            stamp,
            assignment: assignment.clone(),
            rule_set: new.clone(),
            compiled,
        });
        Ok(EditOutcome {
            rule_set: new,
            applied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_state_file_modified_far_in_the_future_still_has_a_stamp() {
        let dir = std::env::temp_dir().join(format!("session-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::new(&dir);
        assert_eq!(stamp(&store).unwrap(), None, "no file, no stamp");
        let file = std::fs::File::create(store.rules_path()).unwrap();
        // Past what i64 nanoseconds hold (year 2262).
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000_000_000);
        file.set_modified(far).unwrap();
        let stamped = stamp(&store).unwrap().expect("a stamp");
        assert_eq!(stamped.modified, (10_000_000_000, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
