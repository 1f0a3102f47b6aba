//! ufw's positional syntax (`allow from 10.0.0.0/8 to any port 22`) is what many operators
//! type first, also after `dockwall rule add`; a parse error over it there comes with the same
//! rule written with Dockwall's flags (ports read by the ufw grammar's own parser).

use vnf_core::firewall::{PortRange, Protocol};

use super::grammar::parse_ports;

/// The words ufw takes where Dockwall takes a flag.
const UFW_WORDS: [&str; 4] = ["from", "to", "port", "proto"];

/// For `dockwall … rule add|insert …` that clap refused at `unexpected` (the argument it
/// did not expect), the command with ufw's words as flags; None when it is not ufw syntax.
pub fn did_you_mean(args: &[String], unexpected: &str) -> Option<String> {
    let edit = args
        .windows(2)
        .position(|pair| pair[0] == "rule" && (pair[1] == "add" || pair[1] == "insert"))?;
    if !UFW_WORDS.contains(&unexpected) && single_port(unexpected).is_none() {
        return None;
    }
    // `rule insert` takes a position first; it stays where it is.
    let kept = edit + 2 + usize::from(args[edit + 1] == "insert");
    let mut command: Vec<String> = std::iter::once("dockwall".to_owned())
        .chain(args.iter().take(kept).skip(1).cloned())
        .collect();
    let (mut port, mut protocol) = (None, None);
    let mut words = args.iter().skip(kept);
    while let Some(word) = words.next() {
        match word.as_str() {
            "from" | "to" => {
                let address = words.next()?;
                if address != "any" {
                    command.push(format!("--{word}"));
                    command.push(address.clone());
                }
            }
            "port" => port = Some(words.next()?.clone()),
            "proto" => protocol = Some(words.next()?.clone()),
            // ufw's `allow 22/tcp`.
            other if single_port(other).is_some() => {
                let (number, implied) = single_port(other)?;
                port = Some(number.to_string());
                // The protocol as typed (`22/sctp` → `--proto sctp`), or the one a service
                // name brings.
                let typed = other.split_once('/').map(|(_, typed)| typed.to_owned());
                protocol = typed
                    .or_else(|| implied.map(|p| p.to_string()))
                    .or(protocol);
            }
            other => command.push(other.to_owned()),
        }
    }
    if let Some(port) = port {
        command.push("--dport".into());
        command.push(port);
        // ufw means tcp and udp; one Dockwall rule has one protocol.
        protocol.get_or_insert_with(|| "tcp".into());
    }
    if let Some(protocol) = protocol {
        command.push("--proto".into());
        command.push(protocol);
    }
    Some(format!("did you mean: {}", command.join(" ")))
}

/// `22`, `1000:2000`, `22/tcp` or `ssh` as ufw's grammar reads it, when it is one port or range
/// (a `--dport` takes one).
fn single_port(word: &str) -> Option<(PortRange, Option<Protocol>)> {
    match parse_ports(word).ok()? {
        (ports, protocol) if ports.len() == 1 => Some((ports[0], protocol)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    fn hint(line: &str, unexpected: &str) -> Option<String> {
        let args: Vec<String> = line.split(' ').map(str::to_owned).collect();
        did_you_mean(&args, unexpected)
    }

    #[test]
    fn ufw_words_become_flags() {
        assert_eq!(
            hint(
                "dockwall rule add allow from 10.0.0.0/8 to any port 22",
                "from"
            )
            .as_deref(),
            Some("did you mean: dockwall rule add allow --from 10.0.0.0/8 --dport 22 --proto tcp")
        );
        assert_eq!(
            hint("/usr/bin/dockwall --state-dir /s rule insert 2 deny 53/udp -d left-to-right", "53/udp").as_deref(),
            Some("did you mean: dockwall --state-dir /s rule insert 2 deny -d left-to-right --dport 53 --proto udp")
        );
        assert_eq!(
            hint("dockwall rule add deny to 192.0.2.0/24 proto icmp", "to").as_deref(),
            Some("did you mean: dockwall rule add deny --to 192.0.2.0/24 --proto icmp")
        );
        assert_eq!(
            hint("dockwall rule add allow ssh", "ssh").as_deref(),
            Some("did you mean: dockwall rule add allow --dport 22 --proto tcp")
        );
        assert_eq!(
            hint("dockwall rule add allow 9899/sctp", "9899/sctp").as_deref(),
            Some("did you mean: dockwall rule add allow --dport 9899 --proto sctp")
        );
    }

    #[test]
    fn other_mistakes_get_no_hint() {
        assert_eq!(hint("dockwall rule add allow --bogus", "--bogus"), None);
        assert_eq!(hint("dockwall nat add masquerade from x", "from"), None);
        assert_eq!(hint("dockwall rule add allow from", "from"), None);
        assert_eq!(hint("dockwall rule add allow 22/", "22/"), None);
    }
}
