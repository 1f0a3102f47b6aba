//! `dockwall ufw …`: ufw's own command grammar as a second front end to the rule set. Every
//! edit goes through the same locked edit as `dockwall rule`; the answers are ufw's words.

mod grammar;
mod hint;
mod status;

use std::process::ExitCode;

use clap::Args;
use serde_json::json;
use vnf_core::firewall::nft;
use vnf_core::firewall::store::Store;
use vnf_core::firewall::{self, Applied, Policy, Rule, RuleSet};
use vnf_core::side::Side;
use vnf_core::{Error, Result};

use crate::commands::{explain_not_applied, Editor};
use crate::EditArgs;
use grammar::{same_rule, SideNames, UfwCommand};
pub use hint::did_you_mean;

pub const HELP: &str = "\
ufw's grammar, for what Dockwall's rule model has:
  allow|deny|reject|limit PORT[/PROTO]      22/tcp, 8000:8100/udp, 80,443/tcp, ssh, http, https
  allow|deny|reject|limit [log] [proto P] [from ADDR [port P]] [to ADDR [port P]] [comment TEXT]
  route allow|deny|reject|limit [in on IF] [out on IF] … (the rest as above)
  insert N <rule> | prepend <rule> | delete N | delete <rule, the words it was added with>
  status [numbered|verbose] | default allow|deny routed | enable | reload

Rules without `route` are about traffic to the SI itself (Dockwall's `local` direction). Route
rules filter forwarded traffic: IF is the left or right side's interface as the side assignment
sees it (or the words left and right); `in on LEFT` / `out on RIGHT` is left-to-right, the
reverse right-to-left, no interface both ways. A port without a protocol means tcp and udp, as
in ufw: two Dockwall rules. ADDR is any, an address or a CIDR.

limit is ufw's 6 connections in 30 s as the model's rate: 12/minute for all sources together
(the model has no per-source meter); established traffic passes before any rule, so it counts
new connections.

Refused, naming what is not supported: `out` and `on IF` without `route` (the SI's own output is
not filtered; local rules match every interface), `app`/application profiles, log-all, other
service names, `default … incoming|outgoing` and `default reject`, disable (no off switch:
`dockwall run` enforces the rules), logging, reset, show.

enable answers whether `dockwall run` enforces the rules here; reload applies the stored rules
again. delete N asks nothing (as ufw --force).";

#[derive(Args, Debug, Clone)]
pub struct UfwArgs {
    /// The ufw command, e.g. `allow 22/tcp`, `route deny in on eth0 out on eth1 proto icmp`,
    /// `status numbered`, `delete 3`
    #[arg(required = true, value_name = "UFW COMMAND")]
    words: Vec<String>,
    /// Accepted for ufw's `--force`; nothing here asks for confirmation
    #[arg(long, short = 'f')]
    force: bool,
    /// Machine-readable output (status: the table's rows with the rules; edits: the result)
    #[arg(long, help_heading = vnf_core::cli::OUTPUT)]
    json: bool,
    #[command(flatten)]
    pub edit: EditArgs,
}

pub async fn run(store: &Store, editor: Editor<'_>, args: UfwArgs) -> Result<ExitCode> {
    let assignment = firewall::current_assignment(&editor.selectors).await?;
    let name = |side| assignment.interface(side).map(|i| i.name.clone());
    let sides = SideNames {
        left: name(Side::Left),
        right: name(Side::Right),
        mgmt: name(Side::Management),
    };
    let command = grammar::parse(&args.words, &sides)?;
    let said = args.words.join(" ");
    let answer = |message: &str, outcome: &firewall::EditOutcome, ids: &[u64]| {
        report(&editor, args.json, message, &outcome.applied, ids)
    };
    match command {
        UfwCommand::Status(view) => {
            let rule_set = store.lock()?.load()?;
            let active = nft::kernel_fingerprint()?.is_some();
            let rows: Vec<_> = rule_set
                .rules
                .iter()
                .enumerate()
                .map(|(index, rule)| status::row(rule, index + 1, &sides, view))
                .collect();
            if args.json {
                let routed = match rule_set.default_policy {
                    Policy::Accept => "allow",
                    Policy::Drop => "deny",
                };
                let report = json!({
                    "status": if active { "active" } else { "inactive" },
                    "default": { "incoming": "allow", "outgoing": "allow", "routed": routed },
                    "rules": rows,
                });
                println!("{}", crate::commands::to_json(&report)?);
            } else {
                print!(
                    "{}",
                    status::render(active, rule_set.default_policy, &rows, view)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        UfwCommand::Enable => {
            require_active()?;
            println!("Firewall is active and enabled on system startup");
            Ok(ExitCode::SUCCESS)
        }
        UfwCommand::Reload => {
            require_active()?;
            firewall::apply_stored(store, &assignment)?;
            println!("Firewall reloaded");
            Ok(ExitCode::SUCCESS)
        }
        UfwCommand::DefaultRouted(policy) => {
            let outcome = editor
                .edit(|set| {
                    set.default_policy = policy;
                    Ok(())
                })
                .await?;
            let word = if policy == Policy::Drop {
                "deny"
            } else {
                "allow"
            };
            answer(
                &format!(
                    "Default routed policy changed to '{word}'\n(be sure to update your rules accordingly)"
                ),
                &outcome,
                &[],
            )
        }
        UfwCommand::Add { rules, at } => {
            let mut added = Added::default();
            let outcome = editor
                .edit(|set| {
                    added = add(set, rules, at)?;
                    Ok(())
                })
                .await?;
            let message = match (at.is_some(), added.ids.is_empty(), added.updated) {
                (false, false, _) => "Rule added",
                (true, false, _) => "Rule inserted",
                (_, true, 1..) => "Rule updated",
                (false, true, 0) => "Skipping adding existing rule",
                (true, true, 0) => "Skipping inserting existing rule",
            };
            answer(message, &outcome, &added.ids)
        }
        UfwCommand::Delete(rules) => {
            let mut deleted = Vec::new();
            let outcome = editor
                .edit(|set| {
                    set.rules.retain(|kept| {
                        let matches = rules.iter().any(|rule| same_rule(rule, kept));
                        if matches {
                            deleted.push(kept.id);
                        }
                        !matches
                    });
                    if deleted.is_empty() {
                        return Err(Error::Vnf(format!(
                            "Could not delete non-existent rule `{said}` (see `dockwall ufw status`)"
                        )));
                    }
                    Ok(())
                })
                .await?;
            answer("Rule deleted", &outcome, &deleted)
        }
        UfwCommand::DeleteNumber(number) => {
            let mut deleted: Option<Rule> = None;
            let outcome = editor
                .edit(|set| {
                    if number > set.rules.len() {
                        return Err(Error::Vnf(format!(
                            "Could not find rule '{number}': there are {} (see `dockwall ufw \
                             status numbered`)",
                            set.rules.len()
                        )));
                    }
                    deleted = Some(set.rules.remove(number - 1));
                    Ok(())
                })
                .await?;
            let rule = deleted.expect("the edit removed the rule");
            let message = format!("Deleting:\n {}\nRule deleted", status::words(&rule, &sides));
            answer(&message, &outcome, &[rule.id])
        }
    }
}

/// What an add did, in ufw's terms.
#[derive(Debug, Default, PartialEq, Eq)]
struct Added {
    /// The ids of the rules added.
    ids: Vec<u64>,
    /// Existing rules whose comment changed (ufw's "Rule updated").
    updated: usize,
}

/// Adds the rules not already in the set, at the 1-based position `at` or at the end; an
/// existing rule given a new comment keeps its place and takes the comment.
fn add(set: &mut RuleSet, rules: Vec<Rule>, at: Option<usize>) -> Result<Added> {
    let count = set.rules.len();
    let mut index = match at {
        Some(position) if position > count + 1 => {
            return Err(Error::Vnf(format!(
                "Invalid position '{position}': use 1-{} (see `dockwall ufw status numbered`)",
                count + 1
            )))
        }
        Some(position) => position - 1,
        None => count,
    };
    let mut added = Added::default();
    for mut rule in rules {
        if let Some(existing) = set.rules.iter_mut().find(|e| same_rule(e, &rule)) {
            if rule.comment.is_some() && existing.comment != rule.comment {
                existing.comment = rule.comment;
                added.updated += 1;
            }
            continue;
        }
        rule.id = set.allocate_id();
        added.ids.push(rule.id);
        set.rules.insert(index, rule);
        index += 1;
    }
    Ok(added)
}

fn require_active() -> Result<()> {
    match nft::kernel_fingerprint()? {
        Some(_) => Ok(()),
        None => Err(Error::Vnf(
            "Firewall not enabled: no `dockwall run` in this network namespace; it enforces the \
             stored rules when it starts (for a container SI run this inside it: `docker exec \
             <si> dockwall ufw …`)"
                .into(),
        )),
    }
}

fn report(
    editor: &Editor<'_>,
    json: bool,
    message: &str,
    applied: &Applied,
    ids: &[u64],
) -> Result<ExitCode> {
    if json {
        let report = json!({ "result": message, "applied": applied, "rule_ids": ids });
        println!("{}", crate::commands::to_json(&report)?);
    } else {
        match applied {
            Applied::DryRun(batch) => println!("{batch}"),
            Applied::Kernel(_) => println!("{message}"),
            Applied::StoredOnly => println!("{message} (stored, not applied)"),
        }
    }
    if matches!(applied, Applied::StoredOnly) {
        explain_not_applied(editor.store);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
