//! Dockvpn's WireGuard client commands, run as the real binary against a running server:
//! the wg-quick profile carries the client's keys (checked with `wg pubkey`) and the routes
//! the server pushes; its QR codes decode back to it (`zbarimg`); a profile printed before
//! the pushed routes changed is marked stale until it is issued again.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use base64::Engine;
use docknfv_tests::chain::{LEFT_HOST_NET, SI_RIGHT};
use docknfv_tests::dockwall::StateDir;
use docknfv_tests::netns::output_with_stdin;
use docknfv_tests::openvpn::{dockvpn_cli, dockvpn_output, start_on_state, text};
use docknfv_tests::prereq::require_command;
use docknfv_tests::{Chain, Netns};

/// A network the second server start pushes besides the first one's.
const ADDED_ROUTE: &str = "198.51.100.0/24";

/// The `Key = value` lines of a wg-quick profile, by section (`Interface`, `Peer`).
fn profile_value<'a>(profile: &'a str, section: &str, key: &str) -> Option<&'a str> {
    let mut current = "";
    for line in profile.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name;
        } else if current == section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim());
                }
            }
        }
    }
    None
}

fn required<'a>(profile: &'a str, section: &str, key: &str) -> &'a str {
    profile_value(profile, section, key)
        .unwrap_or_else(|| panic!("no {key} in [{section}]:\n{profile}"))
}

/// A WireGuard key: 32 bytes in base64.
fn assert_key(key: &str, what: &str) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap_or_else(|e| panic!("{what} {key:?} is not base64: {e}"));
    assert_eq!(bytes.len(), 32, "{what} {key:?}");
}

/// `wg pubkey` of a private key.
fn wg_pubkey(private_key: &str) -> String {
    require_command("wg", "wireguard-tools");
    let output = output_with_stdin(
        Command::new("wg").arg("pubkey"),
        &format!("{private_key}\n"),
    );
    assert!(output.status.success(), "wg pubkey: {}", text(&output));
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

fn wg_genkey() -> String {
    require_command("wg", "wireguard-tools");
    let output = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey");
    assert!(output.status.success(), "wg genkey: {}", text(&output));
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// What `zbarimg` reads from an image: the QR code's text.
fn decode_qr(image: &Path) -> String {
    require_command("zbarimg", "zbar-tools");
    let output = Command::new("zbarimg")
        .args(["--raw", "--quiet", "-Sbinary"])
        .arg(image)
        .output()
        .expect("run zbarimg");
    assert!(
        output.status.success(),
        "zbarimg {}: {}",
        image.display(),
        text(&output)
    );
    String::from_utf8(output.stdout).expect("utf-8 QR text")
}

/// The terminal QR code (half blocks, each character two modules high) drawn as a PGM image,
/// four pixels a module, so a decoder reads what a phone camera would.
fn terminal_qr_as_pgm(qr: &str, path: &Path) {
    const SCALE: usize = 4;
    let mut rows: Vec<Vec<bool>> = Vec::new();
    for line in qr.lines() {
        // The colour escapes around each line carry no modules.
        let mut glyphs = String::new();
        let mut rest = line;
        while let Some(start) = rest.find('\x1b') {
            glyphs.push_str(&rest[..start]);
            let end = rest[start..].find('m').expect("an escape ends with m");
            rest = &rest[start + end + 1..];
        }
        glyphs.push_str(rest);
        let (top, bottom): (Vec<bool>, Vec<bool>) = glyphs
            .chars()
            .map(|glyph| match glyph {
                ' ' => (false, false),
                '▀' => (true, false),
                '▄' => (false, true),
                '█' => (true, true),
                other => panic!("unexpected character {other:?} in the QR code:\n{qr}"),
            })
            .unzip();
        rows.push(top);
        rows.push(bottom);
    }
    let width = rows.iter().map(Vec::len).max().expect("a QR code has rows");
    let mut pixels = Vec::new();
    for row in &rows {
        for _ in 0..SCALE {
            for x in 0..width {
                let dark = row.get(x).copied().unwrap_or(false);
                pixels.extend(std::iter::repeat_n(if dark { 0u8 } else { 255 }, SCALE));
            }
        }
    }
    let mut image = format!("P5\n{} {}\n255\n", width * SCALE, rows.len() * SCALE).into_bytes();
    image.extend(pixels);
    std::fs::write(path, image).expect("write the PGM");
}

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("docknfv-wg-{}-{name}", std::process::id()))
}

/// `client list --json`, by name.
fn listed(si: &Netns, state: &Path) -> serde_json::Map<String, serde_json::Value> {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&dockvpn_cli(si, state, &["client", "list", "--json"]))
            .expect("client list --json");
    list.into_iter()
        .map(|client| (client["name"].as_str().expect("name").to_owned(), client))
        .collect()
}

/// `status --json` against the state directory `state` (it exits 1 while routing is still
/// converging; the JSON is there either way).
fn status_json(si: &Netns, state: &Path) -> serde_json::Value {
    let output = dockvpn_output(si, state, &["status", "--json"]);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&output)))
}

/// The AllowedIPs of a profile as a set.
fn allowed_ips(profile: &str) -> BTreeSet<String> {
    required(profile, "Peer", "AllowedIPs")
        .split(',')
        .map(|network| network.trim().to_owned())
        .collect()
}

#[test]
fn a_wireguard_profile_carries_the_clients_keys_and_the_pushed_routes_and_its_qr_codes_decode_to_it(
) {
    let chain = Chain::new();
    let state = StateDir::new();
    let state = state.path();
    let dockvpn = start_on_state(&chain, state, &[]);
    let cli = |args: &[&str]| dockvpn_cli(&chain.si, state, args);
    cli(&["client", "add", "alice"]);
    let profile = cli(&["client", "config", "alice", "--format", "wireguard"]);

    let private_key = required(&profile, "Interface", "PrivateKey");
    assert_key(private_key, "PrivateKey");
    let clients = listed(&chain.si, state);
    let alice = &clients["alice"];
    assert_eq!(
        wg_pubkey(private_key),
        alice["wireguard"]["public_key"]
            .as_str()
            .expect("a public key"),
        "the registry holds the public key of the profile's private key"
    );
    let server_private = std::fs::read_to_string(state.join("pki/wireguard.key"))
        .expect("the server's WireGuard key");
    let server_public = required(&profile, "Peer", "PublicKey");
    assert_eq!(wg_pubkey(server_private.trim()), server_public);
    assert_key(required(&profile, "Peer", "PresharedKey"), "PresharedKey");
    assert_eq!(
        required(&profile, "Interface", "Address"),
        format!("{}/32", alice["address"].as_str().expect("address"))
    );
    assert_eq!(
        required(&profile, "Peer", "Endpoint"),
        format!("{SI_RIGHT}:51820"),
        "the right address and the default WireGuard port"
    );
    assert_eq!(required(&profile, "Peer", "PersistentKeepalive"), "25");
    // Exactly what the server pushes, and its own tunnel address.
    let status = status_json(&chain.si, state);
    let mut expected: BTreeSet<String> = status["vpn"]["routes_pushed"]
        .as_array()
        .expect("routes_pushed")
        .iter()
        .map(|route| route.as_str().expect("a route").to_owned())
        .collect();
    assert!(expected.contains(LEFT_HOST_NET), "{status}");
    expected.insert(format!(
        "{}/32",
        status["vpn"]["server_address"]
            .as_str()
            .expect("server_address")
    ));
    assert_eq!(allowed_ips(&profile), expected);
    assert_eq!(alice["wireguard_profile_stale"], false);

    // The same profile, as a PNG (private: it holds the key) and in the terminal.
    let png = temp_file("alice.png");
    let alice_profile = |extra: &[&str]| {
        let mut args = vec!["client", "config", "alice", "--format", "wireguard"];
        args.extend(extra);
        dockvpn_output(&chain.si, state, &args)
    };
    assert!(
        !alice_profile(&["--qr-png"]).status.success(),
        "--qr-png needs a file"
    );
    let written = alice_profile(&["--qr-png", png.to_str().expect("utf-8 path")]);
    assert!(written.status.success(), "{}", text(&written));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&png)
        .expect("the PNG")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(decode_qr(&png), profile);
    let _ = std::fs::remove_file(&png);
    let terminal = alice_profile(&["--qr"]);
    assert!(terminal.status.success(), "{}", text(&terminal));
    let terminal = String::from_utf8(terminal.stdout).expect("utf-8 QR");
    let pgm = temp_file("alice.pgm");
    terminal_qr_as_pgm(&terminal, &pgm);
    assert_eq!(decode_qr(&pgm), profile);
    let _ = std::fs::remove_file(&pgm);

    // A client that keeps its own private key: its profile lacks the key, and says so.
    let bob_private = wg_genkey();
    let bob_public = wg_pubkey(&bob_private);
    for bad in ["tooshort", bob_private.trim_end_matches('=')] {
        let refused = dockvpn_output(
            &chain.si,
            state,
            &["client", "add", "bob", "--wireguard-public-key", bad],
        );
        assert!(!refused.status.success(), "{bad:?} was taken");
        let said = text(&refused);
        assert!(
            said.contains("--wireguard-public-key") && said.contains("44 characters"),
            "{said}"
        );
    }
    cli(&[
        "client",
        "add",
        "bob",
        "--wireguard-public-key",
        &bob_public,
    ]);
    let bob_profile = cli(&["client", "config", "bob", "--format", "wireguard"]);
    assert_eq!(
        profile_value(&bob_profile, "Interface", "PrivateKey"),
        None,
        "{bob_profile}"
    );
    assert!(
        bob_profile.contains(&bob_public) && bob_profile.contains("# PrivateKey = "),
        "{bob_profile}"
    );
    assert_eq!(
        listed(&chain.si, state)["bob"]["wireguard"]["public_key"],
        bob_public.as_str()
    );
    let no_qr = dockvpn_output(
        &chain.si,
        state,
        &["client", "config", "bob", "--format", "wireguard", "--qr"],
    );
    assert!(!no_qr.status.success());
    assert!(text(&no_qr).contains("own private key"), "{}", text(&no_qr));
    // QR options belong to WireGuard profiles.
    let openvpn_qr = dockvpn_output(&chain.si, state, &["client", "config", "alice", "--qr"]);
    assert!(!openvpn_qr.status.success());
    assert!(
        text(&openvpn_qr).contains("--format wireguard"),
        "{}",
        text(&openvpn_qr)
    );

    // Removed, the client's keys go with it.
    cli(&["client", "remove", "alice"]);
    for file in ["alice.wg.key", "alice.wg.psk"] {
        assert!(
            !state.join("pki/clients").join(file).exists(),
            "{file} kept"
        );
    }
    drop(dockvpn);
}

#[test]
fn a_profile_printed_before_the_pushed_routes_changed_is_marked_stale_until_issued_again() {
    let chain = Chain::new();
    let state = StateDir::new();
    let state = state.path();
    let cli = |args: &[&str]| dockvpn_cli(&chain.si, state, args);
    let mut dockvpn = start_on_state(&chain, state, &[]);
    cli(&["client", "add", "alice"]);
    cli(&["client", "add", "bob"]);
    let first = cli(&["client", "config", "alice", "--format", "wireguard"]);
    assert!(!allowed_ips(&first).contains(ADDED_ROUTE));
    assert_eq!(
        listed(&chain.si, state)["alice"]["wireguard_profile_stale"],
        false
    );
    dockvpn.terminate();

    // No server: the routes are unknown, so no profile without --allowed-ips, and no mark.
    let refused = dockvpn_output(
        &chain.si,
        state,
        &["client", "config", "alice", "--format", "wireguard"],
    );
    assert!(!refused.status.success());
    let said = text(&refused);
    assert!(
        said.contains("dockvpn run") && said.contains("--allowed-ips"),
        "{said}"
    );
    assert_eq!(
        listed(&chain.si, state)["alice"]["wireguard_profile_stale"],
        serde_json::Value::Null
    );

    let dockvpn = start_on_state(&chain, state, &["--left-route", ADDED_ROUTE]);
    let clients = listed(&chain.si, state);
    assert_eq!(clients["alice"]["wireguard_profile_stale"], true);
    assert_eq!(
        clients["bob"]["wireguard_profile_stale"], false,
        "bob got no profile yet"
    );
    let list = cli(&["client", "list"]);
    let alice_line = list
        .lines()
        .find(|l| l.starts_with("alice"))
        .expect("alice listed");
    assert!(
        alice_line.contains("profile stale: routes changed"),
        "{list}"
    );
    assert!(
        !list
            .lines()
            .any(|l| l.starts_with("bob") && l.contains("stale")),
        "{list}"
    );
    let status = status_json(&chain.si, state);
    assert_eq!(
        status["wireguard_profiles_stale"],
        serde_json::json!(["alice"]),
        "{status}"
    );
    let status_text = text(&dockvpn_output(&chain.si, state, &["status"]));
    assert!(
        status_text.contains("profile stale: routes changed") && status_text.contains("alice"),
        "{status_text}"
    );

    let again = cli(&["client", "config", "alice", "--format", "wireguard"]);
    assert!(allowed_ips(&again).contains(ADDED_ROUTE), "{again}");
    assert_eq!(
        listed(&chain.si, state)["alice"]["wireguard_profile_stale"],
        false
    );
    let status = status_json(&chain.si, state);
    assert_eq!(
        status["wireguard_profiles_stale"],
        serde_json::json!([]),
        "{status}"
    );

    // An explicit --allowed-ips is what the profile holds, and compared like any other.
    let narrow = cli(&[
        "client",
        "config",
        "alice",
        "--format",
        "wireguard",
        "--allowed-ips",
        "192.0.2.0/24,10.8.0.1/32",
    ]);
    assert_eq!(
        allowed_ips(&narrow),
        BTreeSet::from(["10.8.0.1/32".to_owned(), "192.0.2.0/24".to_owned()])
    );
    assert_eq!(
        listed(&chain.si, state)["alice"]["wireguard_profile_stale"],
        true
    );
    drop(dockvpn);
}
