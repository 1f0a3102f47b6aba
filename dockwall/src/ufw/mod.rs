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
use vnf_core::firewall::{self, Action, Rule, RuleSet};
use vnf_core::side::Side;
use vnf_core::{Error, Result};

use crate::commands::{Answer, Editor};
use crate::EditArgs;
use grammar::{same_rule, same_traffic, SideNames, UfwCommand};
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
(the model has no per-source meter; adding a limit rule says so on stderr); established traffic
passes before any rule, so it counts new connections. A rule that matches the same traffic as
an existing one but differs in action, log, limit or comment replaces it in place (\"Rule
updated\"), as in ufw; adding a disabled rule again enables it.

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
    // Never read: scripts written for ufw pass --force to skip its prompts; there are none.
    #[arg(long, short = 'f')]
    force: bool,
    /// Machine-readable output (status: the table's rows with the rules; edits: the result)
    #[arg(long, help_heading = vnf_core::cli::OUTPUT)]
    json: bool,
    #[command(flatten)]
    pub edit: EditArgs,
}

pub async fn run(store: &Store, editor: Editor<'_>, args: UfwArgs) -> Result<ExitCode> {
    let read = grammar::read(&args.words)?;
    let assignment = firewall::current_assignment(&editor.selectors).await?;
    let name = |side| assignment.interface(side).map(|i| i.name.clone());
    let sides = SideNames {
        left: name(Side::Left),
        right: name(Side::Right),
        mgmt: name(Side::Management),
    };
    let command = read.resolve(&sides)?;
    let said = args.words.join(" ");
    if args.edit.dry_run && !command.edits() {
        return Err(Error::invalid(
            "--dry-run",
            &said,
            "only edits (allow, deny, reject, limit, insert, delete, default) have a dry run; \
             leave --dry-run out",
        ));
    }
    let answer = |message: &str, outcome: &firewall::EditOutcome, ids: &[u64]| {
        let answer = Answer::Ufw {
            json: args.json,
            rule_ids: ids,
        };
        editor.report(outcome, message, answer)
    };
    // What enable and reload say, in ufw's words or as JSON.
    let say = |message: &str| -> Result<ExitCode> {
        if args.json {
            println!(
                "{}",
                crate::commands::to_json(&json!({ "result": message }))?
            );
        } else {
            println!("{message}");
        }
        Ok(ExitCode::SUCCESS)
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
                let routed = status::routed_word(&rule_set);
                let report = json!({
                    "status": if active { "active" } else { "inactive" },
                    "default": { "incoming": "allow", "outgoing": "allow", "routed": routed },
                    "rules": rows,
                });
                println!("{}", crate::commands::to_json(&report)?);
            } else {
                print!(
                    "{}",
                    status::render(active, &status::routed_word(&rule_set), &rows, view)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        UfwCommand::Enable => {
            require_active()?;
            say("Firewall is active and enabled on system startup")
        }
        UfwCommand::Reload => {
            require_active()?;
            firewall::apply_stored(store, &assignment)?;
            say("Firewall reloaded")
        }
        UfwCommand::DefaultRouted(policy) => {
            let outcome =
                editor.edit_for(&assignment, |set| set.set_default_policy(policy, None))?;
            answer(
                &format!(
                    "Default routed policy changed to '{}'\n(be sure to update your rules \
                     accordingly)",
                    status::policy_word(policy)
                ),
                &outcome,
                &[],
            )
        }
        UfwCommand::Add { rules, at } => {
            let limit = rules.iter().any(|rule| rule.action == Action::Limit);
            let mut added = Added::default();
            let outcome = editor.edit_for(&assignment, |set| {
                added = add(set, rules, at)?;
                Ok(())
            })?;
            if limit && (!added.ids.is_empty() || added.updated > 0) {
                eprintln!("{SHARED_LIMIT}");
            }
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
            let outcome = editor.edit_for(&assignment, |set| {
                deleted = delete(set, &rules, &said)?;
                Ok(())
            })?;
            answer("Rule deleted", &outcome, &deleted)
        }
        UfwCommand::DeleteNumber(number) => {
            let mut deleted: Option<Rule> = None;
            let outcome = editor.edit_for(&assignment, |set| {
                if number > set.rules.len() {
                    return Err(Error::Vnf(format!(
                        "Could not find rule '{number}': there are {} (see `dockwall ufw \
                             status numbered`)",
                        set.rules.len()
                    )));
                }
                deleted = Some(set.rules.remove(number - 1));
                Ok(())
            })?;
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

/// Said on stderr when a limit rule is added: ufw limits each source, the model all together.
const SHARED_LIMIT: &str = "dockwall: note: this limit is one rate for all sources together \
(12 new connections a minute in all), not ufw's 6 in 30 s per source address: Dockwall's rule \
model has no per-source meter";

/// Adds the rules not already in the set, at the 1-based position `at` or at the end. A rule
/// matching the same traffic as an existing one replaces it in place when its action, rate,
/// log or comment differ or the existing one is disabled (ufw's "Rule updated"); a rule given
/// without a comment keeps the existing one's.
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
        if let Some(existing) = set.rules.iter_mut().find(|e| same_traffic(e, &rule)) {
            if rule.comment.is_none() {
                rule.comment = existing.comment.clone();
            }
            let unchanged =
                same_rule(existing, &rule) && existing.enabled && existing.comment == rule.comment;
            if !unchanged {
                // The rule keeps its place and identity; what it does is the new words'.
                *existing = Rule {
                    id: existing.id,
                    name: existing.name.take(),
                    external_id: existing.external_id.take(),
                    ..rule
                };
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

/// Deletes the rules that `delete <rule>` names, all of which must exist: a line that makes
/// several rules (`allow 22` is tcp and udp) deletes all or none. The ids deleted.
fn delete(set: &mut RuleSet, rules: &[Rule], said: &str) -> Result<Vec<u64>> {
    let exists = |rule: &Rule| set.rules.iter().any(|kept| same_rule(rule, kept));
    if !rules.iter().all(exists) {
        return Err(Error::Vnf(format!(
            "Could not delete non-existent rule `{said}` (see `dockwall ufw status`)"
        )));
    }
    let mut deleted = Vec::new();
    set.rules.retain(|kept| {
        let matches = rules.iter().any(|rule| same_rule(rule, kept));
        if matches {
            deleted.push(kept.id);
        }
        !matches
    });
    Ok(deleted)
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

#[cfg(test)]
mod tests;
