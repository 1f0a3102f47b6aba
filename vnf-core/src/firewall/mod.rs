//! The nftables firewall shared by the VNFs: the rule model, its compiler to one nftables
//! table, the atomic apply, and the persistent store.

pub mod compile;
pub mod mirror;
pub mod mode;
pub mod model;
pub mod netlink;
pub mod nft;
pub mod session;
pub mod store;
pub mod verify;

pub use mode::ServiceMode;
pub use model::{
    Action, Direction, NatKind, NatRule, Policy, PortRange, Protocol, Rate, Rule, RuleSet,
};

use serde::Serialize;

use crate::error::Result;
use crate::kernel::Kernel;
use crate::side::{assign, Assignment, SideSelectors};
use compile::{compile, Sides};
use nft::ApplyKind;
pub use session::Session;
use store::Store;
pub use verify::Listings;

/// What an edit did.
#[derive(Debug, Serialize)]
pub struct EditOutcome {
    pub rule_set: RuleSet,
    pub applied: Applied,
}

/// Where an edit went.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Applied {
    /// Saved and in the kernel.
    Kernel(ApplyKind),
    /// Saved only: this namespace has no Dockwall table, so no `run` is here to enforce it.
    /// The stored rules apply when `run` starts with this state directory.
    StoredOnly,
    /// Nothing changed; the nft JSON the edit would apply.
    DryRun(String),
}

/// The sides as they are now, without waiting: rules for a missing side apply when `run`
/// sees it come up.
pub async fn current_assignment(selectors: &SideSelectors) -> Result<Assignment> {
    selectors.validate()?;
    let kernel = Kernel::connect()?;
    assign(selectors, &kernel.interfaces().await?)
}

/// One edit for the sides as they are now (a CLI edit): under the store's lock, load,
/// change, validate, apply to the kernel, then save. Any error leaves both the kernel (nft
/// transactions are atomic) and the file as they were. A process that edits again and again
/// keeps a [`Session`] instead, which skips the load and the old compile.
pub async fn edit(
    store: &Store,
    selectors: &SideSelectors,
    dry_run: bool,
    change: impl FnOnce(&mut RuleSet) -> Result<()>,
) -> Result<EditOutcome> {
    let assignment = current_assignment(selectors).await?;
    Session::default().edit(store, &assignment, dry_run, change)
}

/// Loads the stored rule set and applies it for the given sides (what `run` does at start
/// and whenever a side comes or goes).
pub fn apply_stored(store: &Store, assignment: &Assignment) -> Result<ApplyKind> {
    let applied = {
        let locked = store.lock()?;
        let rule_set = locked.load()?;
        nft::apply(
            None,
            &compile(&rule_set, Sides::from_assignment(assignment)),
        )
    };
    release_freed_memory();
    applied
}

/// A long-running process that compiled a big rule set hands the freed heap back, so its
/// idle footprint is what it keeps, not what it once needed.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether the kernel holds exactly what the stored rules compile to for these sides.
pub fn is_converged(rule_set: &RuleSet, assignment: &Assignment) -> Result<bool> {
    Ok(differences_in(&Listings::read()?, rule_set, assignment)?.is_empty())
}

/// How the kernel's tables, as `listings` read them (`status` reads counters from them too),
/// differ from what the stored rules compile to for these sides, one sentence each (see
/// `verify`); empty when they hold exactly that.
pub fn differences_in(
    listings: &Listings,
    rule_set: &RuleSet,
    assignment: &Assignment,
) -> Result<Vec<String>> {
    let compiled = compile(rule_set, Sides::from_assignment(assignment));
    let differences = verify::differences_in(listings, &compiled);
    drop(compiled);
    release_freed_memory();
    differences
}

/// `run`'s periodic check: when the kernel's table differs from the stored rules (flushed or
/// edited by hand with `nft`), replaces it whole. Returns what differed, empty when nothing
/// did, or None when the check was skipped: the store's lock was busy (an edit or an apply is
/// under way; the next check comes soon enough) or `still_current` said no under the lock
/// (the sides changed, or `run` is stopping). The table is listed without holding the lock,
/// so edits are not held up; a difference is checked again under it (an edit between its
/// apply and its save looks like one).
pub fn repair(
    store: &Store,
    assignment: &Assignment,
    still_current: impl Fn() -> bool,
) -> Result<Option<Vec<String>>> {
    let sides = Sides::from_assignment(assignment);
    let Some(rule_set) = store.try_lock()?.map(|locked| locked.load()).transpose()? else {
        return Ok(None);
    };
    let unlocked = verify::kernel_differences(&compile(&rule_set, sides))?;
    drop(rule_set);
    let repaired = if unlocked.is_empty() {
        Some(unlocked)
    } else {
        match store.try_lock()? {
            Some(locked) if still_current() => {
                let compiled = compile(&locked.load()?, sides);
                let differences = verify::kernel_differences(&compiled)?;
                if !differences.is_empty() {
                    nft::replace(&compiled)?;
                }
                Some(differences)
            }
            _ => None,
        }
    };
    release_freed_memory();
    Ok(repaired)
}
