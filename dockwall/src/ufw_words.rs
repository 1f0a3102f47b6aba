//! ufw's positional syntax (`allow from 10.0.0.0/8 to any port 22`) is what many operators
//! type first; a parse error over it comes with the same rule written with Dockwall's flags.

/// The words ufw takes where Dockwall takes a flag.
const UFW_WORDS: [&str; 4] = ["from", "to", "port", "proto"];

/// For `dockwall … rule add|insert …` that clap refused at `unexpected` (the argument it
/// did not expect), the command with ufw's words as flags; None when it is not ufw syntax.
pub fn did_you_mean(args: &[String], unexpected: &str) -> Option<String> {
    let edit = args
        .windows(2)
        .position(|pair| pair[0] == "rule" && (pair[1] == "add" || pair[1] == "insert"))?;
    if !UFW_WORDS.contains(&unexpected) && split_port(unexpected).is_none() {
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
            other if split_port(other).is_some() => {
                let (number, suffix) = split_port(other)?;
                port = Some(number.to_owned());
                protocol = suffix.map(str::to_owned).or(protocol);
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

/// `22`, `1000:2000` or `22/tcp`: the port and the protocol after the slash.
fn split_port(word: &str) -> Option<(&str, Option<&str>)> {
    let (number, protocol) = match word.split_once('/') {
        Some((number, protocol)) => (number, Some(protocol)),
        None => (word, None),
    };
    let is_port = !number.is_empty()
        && number
            .split(':')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    is_port.then_some((number, protocol))
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
    }

    #[test]
    fn other_mistakes_get_no_hint() {
        assert_eq!(hint("dockwall rule add allow --bogus", "--bogus"), None);
        assert_eq!(hint("dockwall nat add masquerade from x", "from"), None);
        assert_eq!(hint("dockwall rule add allow from", "from"), None);
    }
}
