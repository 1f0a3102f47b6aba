//! What each subcommand does. Edits go through `vnf_core::firewall::edit`: one locked
//! load → change → validate → apply → save, so a failed apply changes nothing anywhere.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};
use vnf_core::cli::shutdown_signal;
use vnf_core::firewall::nft::{self, Counters};
use vnf_core::firewall::store::{read_rule_set, Store};
use vnf_core::firewall::{
    self, compile, Applied, Direction, EditOutcome, NatKind, NatRule, Policy, Protocol, Rule,
    RuleSet, ServiceMode,
};
use vnf_core::metrics::MetricsListener;
use vnf_core::runtime::{OnExit, SidesObserver};
use vnf_core::side::{Assignment, SideSelectors};
use vnf_core::transparent;
use vnf_core::{Error, Result};

use crate::fwaas;
use crate::metrics::{count_edit, FirewallExporter, APPLY_SECONDS};
use crate::{
    Cli, Command, DefaultPolicy, EditArgs, NatCommand, NatSpec, RuleCommand, RuleSelector,
    RuleSpec, SelectedEdit,
};

pub async fn dispatch(cli: Cli, started: Instant) -> Result<ExitCode> {
    let store = Store::new(&cli.state_dir);
    let editor = |edit: &EditArgs| Editor {
        store: &store,
        selectors: edit.sides.selectors(&cli.state_dir),
        dry_run: edit.dry_run,
    };
    match cli.command {
        Command::Run {
            routing,
            lifecycle,
            metrics,
            api,
            verify_every,
        } => {
            let mut config = routing.runtime_config(&cli.state_dir);
            lifecycle.apply(&mut config);
            let mode = routing.mode.unwrap_or_default();
            if mode == ServiceMode::Transparent {
                transparent::validate(&config)?;
            }
            adopt_mode(&store, mode)?;
            transparent::recover(&config.state_dir).await?;
            if let Some(address) = api.api_listen {
                crate::api::spawn(address, &cli.state_dir, config.clone()).await?;
            }
            let exporter = FirewallExporter {
                store: &store,
                config: config.clone(),
                mode,
            };
            let applied = std::sync::Arc::new(AppliedSides::default());
            let mut observer = FirewallObserver {
                store: &store,
                applied: applied.clone(),
            };
            let listener = MetricsListener::bind(metrics.metrics_listen).await?;
            // Handlers installed now, not when `run` first polls: a SIGTERM right after
            // start must not kill the process with the default action.
            let signal = shutdown_signal();
            let shutdown = async {
                signal.await;
                applied.stop();
            };
            let run = async {
                match mode {
                    ServiceMode::Transparent => {
                        transparent::run(config, started, shutdown, &mut observer).await
                    }
                    _ => vnf_core::runtime::run(config, started, shutdown, &mut observer).await,
                }
            };
            let every = std::time::Duration::from_secs(verify_every);
            let repairing = repairing(&store, mode, &applied, every, run);
            listener.serve_while(&exporter, repairing).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { routing, output } => {
            status(
                &routing.runtime_config(&cli.state_dir),
                routing.mode,
                &store,
                output.json,
            )
            .await
        }
        Command::Rule(RuleCommand::List(output)) => list_rules(&store, output.json),
        Command::Rule(command) => rule(&editor, command).await,
        Command::Nat(NatCommand::List(output)) => list_nat(&store, output.json),
        Command::Nat(command) => nat(&editor, command).await,
        Command::Mirror(command) => {
            crate::mirror::run(&store, &cli.state_dir, editor, command).await
        }
        Command::Default {
            policy,
            direction,
            edit,
        } => {
            let policy = match policy {
                DefaultPolicy::Allow => Policy::Accept,
                DefaultPolicy::Deny => Policy::Drop,
            };
            editor(&edit)
                .run_described(|set| {
                    set.set_default_policy(policy, direction)?;
                    Ok(format!(
                        "default forward policy is now {}",
                        describe_defaults(set)
                    ))
                })
                .await
        }
        Command::Import { files, role, edit } => {
            let sources = files
                .iter()
                .map(|file| read_source(file))
                .collect::<Result<Vec<_>>>()?;
            let mut notes = Vec::new();
            let code = editor(&edit)
                .run_described(|set| {
                    let imported = fwaas::import(set, &sources, role)?;
                    notes = imported.notes;
                    let names: Vec<&str> = sources.iter().map(|(name, _)| name.as_str()).collect();
                    Ok(format!(
                        "imported {} FWaaS rules from {}; default forward policy is now {}",
                        imported.rules,
                        names.join(", "),
                        describe_defaults(set)
                    ))
                })
                .await?;
            // After the import's own line, and only when it succeeded.
            for note in notes {
                eprintln!("dockwall: note: {note}");
            }
            Ok(code)
        }
        Command::Export { .. } => {
            let rule_set = store.lock()?.load()?;
            let (documents, notes) = fwaas::export(&rule_set);
            for note in notes {
                eprintln!("dockwall: note: {note}");
            }
            let mut out = std::io::stdout().lock();
            for document in &documents {
                match writeln!(out, "{}", to_json(document)?) {
                    // The reader has what it wanted (`| head`): not an error.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                    Err(source) => {
                        return Err(Error::Io {
                            context: "write the FWaaS export".into(),
                            source,
                        })
                    }
                    Ok(()) => {}
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ufw(args) => {
            let editor = editor(&args.edit);
            crate::ufw::run(&store, editor, args).await
        }
        Command::Api(command) => {
            crate::api::command(&cli.state_dir, command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { file, edit } => {
            let new = read_rule_set(&file)?;
            editor(&edit)
                .run(
                    // The file replaces the whole set: say what it holds, mirrors too (a
                    // file without any drops the stored ones).
                    format!(
                        "applied {} ({} rules, {} NAT rules, {} mirrors)",
                        file.display(),
                        new.rules.len(),
                        new.nat.len(),
                        new.mirrors.len()
                    ),
                    move |set| {
                        // The mode is `run`'s, not the file's.
                        if new.mode != set.mode {
                            eprintln!(
                                "dockwall: warning: the mode in {} ({}; in-network when it names \
                                 none) is ignored: the rules compile for the mode `run` recorded \
                                 ({}); restart `run --mode {}` to change it",
                                file.display(),
                                new.mode,
                                set.mode,
                                new.mode
                            );
                        }
                        *set = RuleSet {
                            mode: set.mode,
                            ..new
                        };
                        Ok(())
                    },
                )
                .await
        }
    }
}

pub(crate) struct Editor<'a> {
    pub(crate) store: &'a Store,
    pub(crate) selectors: SideSelectors,
    dry_run: bool,
}

impl Editor<'_> {
    pub(crate) async fn edit(
        &self,
        change: impl FnOnce(&mut RuleSet) -> Result<()>,
    ) -> Result<EditOutcome> {
        let assignment = self.assignment().await?;
        self.edit_for(&assignment, change)
    }

    /// The sides as they are now (a failure to read them counts as a failed edit).
    pub(crate) async fn assignment(&self) -> Result<Assignment> {
        let assignment = firewall::current_assignment(&self.selectors).await;
        if assignment.is_err() {
            self.count(false);
        }
        assignment
    }

    /// An edit for sides the caller already read, so its own checks and the apply see the
    /// same sides.
    pub(crate) fn edit_for(
        &self,
        assignment: &Assignment,
        change: impl FnOnce(&mut RuleSet) -> Result<()>,
    ) -> Result<EditOutcome> {
        let outcome =
            firewall::Session::default().edit(self.store, assignment, self.dry_run, change);
        self.count(outcome.is_ok());
        outcome
    }

    fn count(&self, succeeded: bool) {
        if !self.dry_run {
            count_edit(self.store, succeeded);
        }
    }

    async fn run(
        &self,
        message: String,
        change: impl FnOnce(&mut RuleSet) -> Result<()>,
    ) -> Result<ExitCode> {
        self.run_described(|set| change(set).map(|()| message))
            .await
    }

    /// Like `run`, with the message written by the change from the set it left.
    async fn run_described(
        &self,
        change: impl FnOnce(&mut RuleSet) -> Result<String>,
    ) -> Result<ExitCode> {
        let assignment = self.assignment().await?;
        self.run_described_for(&assignment, change)
    }

    pub(crate) fn run_described_for(
        &self,
        assignment: &Assignment,
        change: impl FnOnce(&mut RuleSet) -> Result<String>,
    ) -> Result<ExitCode> {
        let mut message = String::new();
        let outcome = self.edit_for(assignment, |set| {
            message = change(set)?;
            Ok(())
        })?;
        self.report(&outcome, &message, Answer::Dockwall)
    }
}

/// A source of `import --fwaas`: its name and text; `-` is stdin.
fn read_source(file: &std::path::Path) -> Result<(String, String)> {
    let name = file.display().to_string();
    let text = if name == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|source| Error::Io {
        context: format!("read {name}"),
        source,
    })?;
    Ok((name, text))
}

/// The default forward policy: one word when both directions agree, else per direction.
fn describe_defaults(set: &RuleSet) -> String {
    let (left, right) = (
        set.policy_for(Direction::LeftToRight),
        set.policy_for(Direction::RightToLeft),
    );
    if left == right {
        spelled(&left)
    } else {
        format!(
            "left-to-right {}, right-to-left {}",
            spelled(&left),
            spelled(&right)
        )
    }
}

async fn rule<'a>(
    editor: &impl Fn(&EditArgs) -> Editor<'a>,
    command: RuleCommand,
) -> Result<ExitCode> {
    match command {
        RuleCommand::Add {
            spec,
            before,
            after,
            edit,
        } => {
            add_rule(editor(&edit), spec, "added", |set| match (before, after) {
                (Some(id), _) => set.position_of(id).ok_or_else(|| unknown_id("before", id)),
                (_, Some(id)) => {
                    Ok(set.position_of(id).ok_or_else(|| unknown_id("after", id))? + 1)
                }
                _ => Ok(set.rules.len()),
            })
            .await
        }
        RuleCommand::Insert {
            position,
            spec,
            edit,
        } => {
            add_rule(editor(&edit), spec, "inserted", |set| {
                if position == 0 || position > set.rules.len() + 1 {
                    return Err(out_of_range(position, set.rules.len() + 1));
                }
                Ok(position - 1)
            })
            .await
        }
        RuleCommand::Delete(SelectedEdit { selector, edit }) => {
            let mut message = String::new();
            let editor = editor(&edit);
            let outcome = editor
                .edit(|set| {
                    let index = select(&set.rules, &selector, |r| r.id)?;
                    let removed = set.rules.remove(index);
                    message = format!(
                        "rule {} deleted (was at position {})",
                        removed.id,
                        index + 1
                    );
                    Ok(())
                })
                .await?;
            editor.report(&outcome, &message, Answer::Dockwall)
        }
        RuleCommand::Enable(SelectedEdit { selector, edit }) => {
            editor(&edit).set_enabled(&selector, true).await
        }
        RuleCommand::Disable(SelectedEdit { selector, edit }) => {
            editor(&edit).set_enabled(&selector, false).await
        }
        RuleCommand::List { .. } => Err(Error::invalid(
            "command",
            "rule list",
            "listing is not an edit",
        )),
    }
}

impl Editor<'_> {
    async fn set_enabled(&self, selector: &RuleSelector, enabled: bool) -> Result<ExitCode> {
        let mut message = String::new();
        let outcome = self
            .edit(|set| {
                let index = select(&set.rules, selector, |r| r.id)?;
                set.rules[index].enabled = enabled;
                let state = if enabled { "enabled" } else { "disabled" };
                message = format!("rule {} {state}", set.rules[index].id);
                Ok(())
            })
            .await?;
        self.report(&outcome, &message, Answer::Dockwall)
    }
}

async fn nat<'a>(
    editor: &impl Fn(&EditArgs) -> Editor<'a>,
    command: NatCommand,
) -> Result<ExitCode> {
    let mut message = String::new();
    let (editor, outcome) = match command {
        NatCommand::Add(spec) => {
            let (kind, edit) = match spec {
                NatSpec::Masquerade { out, source, edit } => {
                    (NatKind::Masquerade { out, source }, edit)
                }
                NatSpec::Snat {
                    out,
                    to,
                    source,
                    edit,
                } => (NatKind::Snat { out, to, source }, edit),
                NatSpec::Dnat {
                    protocol,
                    port,
                    to,
                    inbound,
                    edit,
                } => (
                    NatKind::Dnat {
                        protocol,
                        port,
                        to,
                        inbound,
                    },
                    edit,
                ),
            };
            let editor = editor(&edit);
            let outcome = editor
                .edit(|set| {
                    let id = set.allocate_id();
                    let rule = NatRule {
                        id,
                        kind,
                        comment: None,
                    };
                    let position = set.nat.len() + 1;
                    rule.validate_as(&format!("the new NAT rule (position {position}, id {id})"))?;
                    set.nat.push(rule);
                    message = format!("NAT rule {id} added at position {position}");
                    Ok(())
                })
                .await?;
            (editor, outcome)
        }
        NatCommand::Delete(SelectedEdit { selector, edit }) => {
            let editor = editor(&edit);
            let outcome = editor
                .edit(|set| {
                    let index = select(&set.nat, &selector, |r| r.id)?;
                    let removed = set.nat.remove(index);
                    message = format!("NAT rule {} deleted", removed.id);
                    Ok(())
                })
                .await?;
            (editor, outcome)
        }
        NatCommand::List { .. } => {
            return Err(Error::invalid(
                "command",
                "nat list",
                "listing is not an edit",
            ))
        }
    };
    editor.report(&outcome, &message, Answer::Dockwall)
}

/// Adds the rule `spec` describes at the index `place` picks in the current rule set.
async fn add_rule(
    editor: Editor<'_>,
    spec: RuleSpec,
    verb: &str,
    place: impl FnOnce(&RuleSet) -> Result<usize>,
) -> Result<ExitCode> {
    let mut message = String::new();
    let outcome = editor
        .edit(|set| {
            let index = place(set)?;
            let rule = new_rule(set, spec, index + 1)?;
            message = format!("rule {} {verb} at position {}", rule.id, index + 1);
            set.rules.insert(index, rule);
            Ok(())
        })
        .await?;
    editor.report(&outcome, &message, Answer::Dockwall)
}

/// The rule `spec` describes, checked as the user typed it; errors name it by the position
/// (1 = first) and the id it would get.
fn new_rule(set: &mut RuleSet, spec: RuleSpec, position: usize) -> Result<Rule> {
    if spec.protocol.is_none() {
        let ports = [
            ("--sport", spec.source_port),
            ("--dport", spec.destination_port),
        ];
        if let Some((flag, ports)) = ports.into_iter().find_map(|(f, p)| Some((f, p?))) {
            return Err(Error::invalid(
                flag,
                String::from(ports),
                "a port needs --proto tcp, udp or sctp (without --proto the rule matches \
                 every protocol, and most have no ports)",
            ));
        }
    }
    let rule = Rule {
        id: set.allocate_id(),
        name: spec.name,
        action: spec.action,
        rate: spec.rate,
        direction: spec.direction,
        protocol: spec.protocol.unwrap_or(Protocol::Any),
        ip_version: spec.ip_version,
        source: spec.source,
        destination: spec.destination,
        source_port: spec.source_port,
        destination_port: spec.destination_port,
        enabled: !spec.disabled,
        log: spec.log,
        comment: spec.comment,
        external_id: None,
    };
    rule.validate_as(&format!(
        "the new rule (position {position}, id {})",
        rule.id
    ))?;
    Ok(rule)
}

fn unknown_id(field: &'static str, id: u64) -> Error {
    Error::invalid(field, id, "no rule has this id; see `dockwall rule list`")
}

fn out_of_range(position: usize, last: usize) -> Error {
    Error::invalid(
        "position",
        position,
        format!("use 1-{last}; see `dockwall rule list`"),
    )
}

/// The index a selector points at: a 1-based position or a stable id.
fn select<T>(items: &[T], selector: &RuleSelector, id_of: impl Fn(&T) -> u64) -> Result<usize> {
    match (selector.position, selector.id) {
        (_, Some(id)) => items
            .iter()
            .position(|item| id_of(item) == id)
            .ok_or_else(|| unknown_id("id", id)),
        (Some(position), None) if (1..=items.len()).contains(&position) => Ok(position - 1),
        (Some(position), None) => Err(out_of_range(position, items.len())),
        (None, None) => Err(Error::invalid(
            "position",
            "none",
            "give a position or --id",
        )),
    }
}

pub(crate) fn to_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| Error::Io {
        context: "render JSON".into(),
        source: e.into(),
    })
}

/// How an edit's result is told.
#[derive(Clone, Copy)]
pub(crate) enum Answer<'a> {
    /// Dockwall's sentence with what the kernel took.
    Dockwall,
    /// ufw's words as they are (`Rule added`); with `json`, a document with the ids of the
    /// rules the edit concerned.
    Ufw { json: bool, rule_ids: &'a [u64] },
}

impl Editor<'_> {
    pub(crate) fn report(
        &self,
        outcome: &EditOutcome,
        message: &str,
        answer: Answer<'_>,
    ) -> Result<ExitCode> {
        match (answer, &outcome.applied) {
            (
                Answer::Ufw {
                    json: true,
                    rule_ids,
                },
                applied,
            ) => {
                let report = json!({ "result": message, "applied": applied, "rule_ids": rule_ids });
                println!("{}", to_json(&report)?);
            }
            (_, Applied::DryRun(batch)) => println!("{batch}"),
            (Answer::Dockwall, Applied::Kernel(kind)) => {
                println!("{message} (applied: {})", spelled(kind))
            }
            (Answer::Ufw { .. }, Applied::Kernel(_)) => println!("{message}"),
            (_, Applied::StoredOnly) => println!("{message} (stored, not applied)"),
        }
        if matches!(outcome.applied, Applied::StoredOnly) {
            explain_not_applied(self.store);
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Why an edit was only stored, and what to check (stderr).
pub(crate) fn explain_not_applied(store: &Store) {
    eprintln!(
        "dockwall: not applied: this network namespace has no Dockwall table (nft inet {table}), \
         so no `dockwall run` enforces rules here. Is this the SI's namespace? For a container \
         SI run the command inside it: `docker exec <si> dockwall …`. Is `dockwall run` \
         running? The rules are stored in {file} and apply when `dockwall run` starts with \
         that state directory.",
        table = compile::TABLE,
        file = store.rules_path().display(),
    );
}

#[derive(Serialize)]
struct ListedRule<'a> {
    position: usize,
    #[serde(flatten)]
    rule: &'a Rule,
    packets: u64,
    bytes: u64,
}

fn listed_rules<'a>(rule_set: &'a RuleSet, counters: &Counters) -> Vec<ListedRule<'a>> {
    rule_set
        .rules
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            let (packets, bytes) = nft::counted(counters, &compile::rule_comment(rule.id));
            ListedRule {
                position: index + 1,
                rule,
                packets,
                bytes,
            }
        })
        .collect()
}

/// A value's name as the JSON and the CLI spell it (`left-to-right`, `reject`).
pub(crate) fn spelled<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub(crate) fn describe(rule: &Rule) -> String {
    let mut text = format!("{} {}", spelled(&rule.action), spelled(&rule.direction));
    if let Some(rate) = rule.rate {
        text += &format!(" rate {}", String::from(rate));
    }
    text += &format!(" proto {}", rule.protocol);
    if let Some(version) = rule.ip_version {
        text += &format!(" ipv{version}");
    }
    for (label, value) in [
        ("from", rule.source.map(|n| n.to_string())),
        ("to", rule.destination.map(|n| n.to_string())),
        ("sport", rule.source_port.map(String::from)),
        ("dport", rule.destination_port.map(String::from)),
        ("name", rule.name.clone()),
        ("comment", rule.comment.clone()),
    ] {
        if let Some(value) = value {
            text += &format!(" {label} {value}");
        }
    }
    if rule.log {
        text += " log";
    }
    if !rule.enabled {
        text += " (disabled)";
    }
    text
}

/// A direction's effective default policy with the counter of its verdict (after an FWaaS
/// import, the policy's implicit deny). `default_policy` in the JSON is only the policy of
/// directions without an override.
#[derive(Serialize)]
struct DirectionDefault {
    direction: Direction,
    policy: Policy,
    packets: u64,
    bytes: u64,
}

fn direction_defaults(rule_set: &RuleSet, counters: &Counters) -> Vec<DirectionDefault> {
    [Direction::LeftToRight, Direction::RightToLeft]
        .into_iter()
        .map(|direction| {
            let (packets, bytes) = nft::counted(counters, &compile::default_comment(direction));
            DirectionDefault {
                direction,
                policy: rule_set.policy_for(direction),
                packets,
                bytes,
            }
        })
        .collect()
}

fn list_rules(store: &Store, json: bool) -> Result<ExitCode> {
    let rule_set = store.lock()?.load()?;
    let counters = nft::rule_counters()?;
    let listed = listed_rules(&rule_set, &counters);
    if json {
        println!(
            "{}",
            to_json(&json!({
                "default_policy": rule_set.default_policy,
                "left_to_right_policy": rule_set.policy_for(Direction::LeftToRight),
                "right_to_left_policy": rule_set.policy_for(Direction::RightToLeft),
                "defaults": direction_defaults(&rule_set, &counters),
                "rules": listed
            }))?
        );
    } else {
        println!("default forward policy: {}", describe_defaults(&rule_set));
        for entry in &listed {
            println!(
                "{:>4}  id {:<5} {:<70} {:>10} pkts {:>12} bytes",
                entry.position,
                entry.rule.id,
                describe(entry.rule),
                entry.packets,
                entry.bytes
            );
        }
        for default in direction_defaults(&rule_set, &counters) {
            println!(
                "{:>4}  {:<78} {:>10} pkts {:>12} bytes",
                "-",
                format!(
                    "default {} {}",
                    spelled(&default.direction),
                    spelled(&default.policy)
                ),
                default.packets,
                default.bytes
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list_nat(store: &Store, json: bool) -> Result<ExitCode> {
    let rule_set = store.lock()?.load()?;
    let counters = nft::rule_counters()?;
    let listed: Vec<_> = rule_set
        .nat
        .iter()
        .enumerate()
        .map(|(index, nat)| {
            let (packets, bytes) = nft::counted(&counters, &compile::nat_comment(nat.id));
            json!({ "position": index + 1, "id": nat.id, "kind": nat.kind, "packets": packets, "bytes": bytes })
        })
        .collect();
    if json {
        println!("{}", to_json(&listed)?);
    } else {
        for (index, (nat, entry)) in rule_set.nat.iter().zip(&listed).enumerate() {
            println!(
                "{:>4}  id {:<5} {:<70} {:>10} pkts {:>12} bytes",
                index + 1,
                nat.id,
                describe_nat(&nat.kind),
                entry["packets"],
                entry["bytes"]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_nat(kind: &NatKind) -> String {
    let from =
        |source: &Option<ipnet::IpNet>| source.map(|s| format!(" from {s}")).unwrap_or_default();
    match kind {
        NatKind::Masquerade { out, source } => format!("masquerade out {out}{}", from(source)),
        NatKind::Snat { out, to, source } => format!("snat out {out}{} to {to}", from(source)),
        NatKind::Dnat {
            protocol,
            port,
            to,
            inbound,
        } => format!("dnat in {inbound} {protocol} port {port} to {to}"),
    }
}

/// Records the mode `run` starts in with the rule set, so edits compile for it; refuses a
/// mode the stored rules cannot apply in (NAT rules in transparent mode).
fn adopt_mode(store: &Store, mode: ServiceMode) -> Result<()> {
    let locked = store.lock()?;
    let mut rule_set = locked.load()?;
    if rule_set.mode == mode {
        return Ok(());
    }
    rule_set.mode = mode;
    rule_set.validate()?;
    locked.save(&rule_set)
}

/// The routing half of `status` (the CLI's and the API's): in transparent mode the bridge
/// and its legs, otherwise the sides and cross routing.
pub(crate) struct RoutingReport {
    pub json: serde_json::Value,
    pub text: String,
    pub converged: bool,
}

pub(crate) async fn routing_report(
    config: &vnf_core::runtime::RuntimeConfig,
    mode: ServiceMode,
) -> Result<RoutingReport> {
    Ok(match mode {
        ServiceMode::Transparent => {
            let bridge = transparent::status(config).await?;
            RoutingReport {
                json: json!(bridge),
                text: bridge.render(),
                converged: bridge.converged,
            }
        }
        _ => {
            let routing = vnf_core::status::collect(config).await?;
            RoutingReport {
                json: json!(routing),
                text: routing.render(),
                converged: routing.converged,
            }
        }
    })
}

async fn status(
    config: &vnf_core::runtime::RuntimeConfig,
    mode: Option<ServiceMode>,
    store: &Store,
    json: bool,
) -> Result<ExitCode> {
    let rule_set = store.lock()?.load()?;
    let mode = mode.unwrap_or(rule_set.mode);
    let RoutingReport {
        json: routing,
        text: routing_text,
        converged: routing_converged,
    } = routing_report(config, mode).await?;
    let assignment = firewall::current_assignment(&config.selectors).await?;
    let listings = firewall::Listings::read()?;
    let differences = firewall::differences_in(&listings, &rule_set, &assignment)?;
    let firewall_converged = rule_set.mode == mode && differences.is_empty();
    let counters = listings.counters()?;
    let healthy = routing_converged && firewall_converged;
    if json {
        let report = json!({
            "healthy": healthy,
            "mode": mode,
            "routing": routing,
            "firewall": {
                "converged": firewall_converged,
                "differences": differences,
                "default_policy": rule_set.default_policy,
                "left_to_right_policy": rule_set.policy_for(Direction::LeftToRight),
                "right_to_left_policy": rule_set.policy_for(Direction::RightToLeft),
                "defaults": direction_defaults(&rule_set, &counters),
                "rules": listed_rules(&rule_set, &counters),
                "nat": rule_set.nat,
                "mirrors": rule_set.mirrors,
            }
        });
        println!("{}", to_json(&report)?);
    } else {
        print!("{routing_text}");
        let state = if firewall_converged {
            "converged"
        } else if rule_set.mode != mode {
            "NOT converged (the stored rules are for another --mode; give status the mode `run` got)"
        } else {
            "NOT converged (is `run` running? Its periodic check replaces a table that differs: \
             every --verify-every, spaced further at large tables)"
        };
        println!(
            "firewall (nft table inet {}): {state}; mode {mode}; default {}; {} rules, {} NAT rules, {} mirrors",
            compile::TABLE,
            describe_defaults(&rule_set),
            rule_set.rules.len(),
            rule_set.nat.len(),
            rule_set.mirrors.len()
        );
        for default in direction_defaults(&rule_set, &counters) {
            println!(
                "  no rule decided {}: {} ({} pkts, {} bytes)",
                spelled(&default.direction),
                spelled(&default.policy),
                default.packets,
                default.bytes
            );
        }
        for difference in &differences {
            println!("  differs: {difference}");
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `run`'s periodic check learns from the observer: the sides the firewall was last
/// applied for (none before the first apply: nothing to check yet), and whether teardown began
/// (for any reason: the signal, or an error that ends `run`), after which nothing is repaired.
#[derive(Default)]
struct AppliedSides {
    /// The assignment last applied, with a count of applies to tell a newer one apart.
    last: std::sync::Mutex<Option<(u64, Assignment)>>,
    stopped: std::sync::atomic::AtomicBool,
}

impl AppliedSides {
    fn record(&self, assignment: &Assignment) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let count = last.as_ref().map_or(0, |(count, _)| count + 1);
        *last = Some((count, assignment.clone()));
    }

    fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The assignment to check against, unless teardown began.
    fn current(&self) -> Option<(u64, Assignment)> {
        if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether `count` is still the last apply and teardown has not begun.
    fn is_current(&self, count: u64) -> bool {
        self.current().is_some_and(|(last, _)| last == count)
    }
}

/// Keeps the firewall applied for the current sides while `run` runs.
struct FirewallObserver<'a> {
    store: &'a Store,
    applied: std::sync::Arc<AppliedSides>,
}

impl SidesObserver for FirewallObserver<'_> {
    fn sides_changed(&mut self, assignment: &Assignment) -> Result<()> {
        let started = Instant::now();
        let kind = firewall::apply_stored(self.store, assignment)?;
        APPLY_SECONDS.observe(started.elapsed().as_secs_f64());
        info!(applied = ?kind, "firewall applied");
        self.applied.record(assignment);
        Ok(())
    }

    fn shutdown(&mut self, on_exit: OnExit) -> Result<()> {
        self.applied.stop();
        // A repair replaces the table only under the store's lock after seeing `stop` unset:
        // taking the lock waits out one in flight, so the table removed here stays removed.
        let _no_repair_in_flight = self.store.lock()?;
        if on_exit == OnExit::Remove {
            nft::delete_table()?;
            info!("firewall table removed");
        }
        Ok(())
    }
}

/// Runs `run`, checking every `every` that the kernel's tables hold the stored rules (and in
/// transparent mode that the bridge table marks the legs), and replacing them when not (a
/// flush or a hand edit with `nft`). The check starts after the first apply, checks against
/// the sides that apply used, and runs on a blocking thread so signals and side changes are
/// never held up; it stops once teardown began. A check lists the whole table, which nft
/// makes slow with big interval sets (seconds at 100,000 rules), so the next one waits at
/// least `CHECK_SHARE` times as long as the last took (at most about 5 % of a core), and
/// twice as long again after each failure in a row.
async fn repairing<T>(
    store: &Store,
    mode: ServiceMode,
    applied: &std::sync::Arc<AppliedSides>,
    every: std::time::Duration,
    run: impl std::future::Future<Output = T>,
) -> T {
    const CHECK_SHARE: u32 = 20;
    const MAX_DOUBLINGS: u32 = 6;
    tokio::pin!(run);
    let mut next = tokio::time::Instant::now() + every;
    let mut check = None;
    let mut started = Instant::now();
    let mut failures = 0;
    loop {
        tokio::select! {
            outcome = &mut run => return outcome,
            () = tokio::time::sleep_until(next), if check.is_none() => {
                match applied.current() {
                    Some((count, assignment)) => {
                        started = Instant::now();
                        let (store, applied) = (store.clone(), applied.clone());
                        check = Some(tokio::task::spawn_blocking(move || {
                            check_and_repair(&store, mode, &applied, count, &assignment)
                        }));
                    }
                    None => next = tokio::time::Instant::now() + every,
                }
            }
            finished = async { check.as_mut().expect("polled only while a check runs").await },
                if check.is_some() => {
                check = None;
                let outcome = finished.unwrap_or_else(|error| {
                    Err(Error::Vnf(format!("the firewall check stopped: {error}")))
                });
                match outcome {
                    Ok(None) => {}
                    Ok(Some(differences)) if differences.is_empty() => failures = 0,
                    Ok(Some(differences)) => {
                        failures = 0;
                        warn!(
                            differences = %differences.join("; "),
                            "the kernel's firewall differed from the stored rules; table replaced"
                        );
                    }
                    Err(error) => {
                        failures += 1;
                        warn!(%error, failures, "could not check or repair the kernel's firewall");
                    }
                }
                let spacing = every.max(started.elapsed() * CHECK_SHARE);
                next = tokio::time::Instant::now() + spacing * 2u32.pow(failures.min(MAX_DOUBLINGS));
            }
        }
    }
}

/// One check (see [`repairing`]); None when it was skipped (an edit held the lock, the sides
/// changed, or teardown began).
fn check_and_repair(
    store: &Store,
    mode: ServiceMode,
    applied: &AppliedSides,
    count: u64,
    assignment: &Assignment,
) -> Result<Option<Vec<String>>> {
    let still_current = || applied.is_current(count);
    let Some(mut differences) = firewall::repair(store, assignment, still_current)? else {
        return Ok(None);
    };
    if mode == ServiceMode::Transparent && still_current() {
        differences.extend(transparent::repair_bridge_table(assignment)?);
    }
    Ok(Some(differences))
}
