//! `run --auth cert+password` against the stock OpenVPN 2.6 client with `auth-user-pass`
//! from a file: the right password connects, a wrong one gets AUTH_FAILED and is counted;
//! `client passwd` takes the password on stdin and refuses one on the command line.

use std::path::PathBuf;
use std::time::Duration;

use docknfv_tests::chain::LEFT_HOST;
use docknfv_tests::netns::output_with_stdin;
use docknfv_tests::openvpn::{
    issue_profile, text, vpn_chain, wait_for_status, OpenvpnClient, CONNECTED,
};
use docknfv_tests::traffic::ping_eventually;
use docknfv_tests::{Netns, Vnf};

/// `dockvpn client passwd NAME` with `password` on its stdin.
fn set_password(si: &Netns, dockvpn: &Vnf, name: &str, password: &str) {
    let output = output_with_stdin(
        si.command(docknfv_tests::vnf::binary("dockvpn").to_str().unwrap())
            .args(["client", "passwd", name])
            .env("DOCKVPN_STATE_DIR", dockvpn.state_dir()),
        &format!("{password}\n"),
    );
    assert!(output.status.success(), "{}", text(&output));
}

/// An `auth-user-pass` file (removed on drop).
struct AuthFile(PathBuf);

impl AuthFile {
    fn new(tag: &str, username: &str, password: &str) -> AuthFile {
        let path =
            std::env::temp_dir().join(format!("docknfv-auth-{tag}-{}.txt", std::process::id()));
        std::fs::write(&path, format!("{username}\n{password}\n")).expect("write the auth file");
        AuthFile(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn with_cert_and_password_the_right_password_connects_and_a_wrong_one_gets_auth_failed() {
    let (chain, dockvpn) = vpn_chain(&["--auth", "cert+password"]);
    let profile = issue_profile(&chain.si, &dockvpn, "alice", None);
    assert!(profile.contains("\nauth-user-pass\n"), "{profile}");

    // A password on the command line: refused, nothing stored.
    let output = dockvpn.cli(
        &chain.si,
        "dockvpn",
        &["client", "passwd", "alice", "hunter2"],
    );
    assert!(!output.status.success());
    assert!(
        text(&output).contains("never taken on the command line"),
        "{}",
        text(&output)
    );
    assert!(!text(&output).contains("hunter2"), "{}", text(&output));
    let passwords = dockvpn.state_dir().join("pki/passwords.json");
    assert!(!passwords.exists());

    set_password(&chain.si, &dockvpn, "alice", "correct horse battery");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&passwords).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let stored = std::fs::read_to_string(&passwords).unwrap();
    assert!(
        stored.contains("$argon2id$") && !stored.contains("correct horse"),
        "{stored}"
    );

    let wrong = AuthFile::new("wrong", "alice", "correct horse battery staple");
    let refused = OpenvpnClient::start(
        &chain.right_host,
        &profile,
        &["--auth-user-pass", wrong.arg()],
    );
    refused
        .process
        .wait_for_log("AUTH_FAILED", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\nserver:\n{}", dockvpn.log()));
    assert!(!refused.log().contains(CONNECTED), "{}", refused.log());
    drop(refused);
    wait_for_status(&chain.si, &dockvpn, "a wrong password counted", |status| {
        status["vpn"]["refused"]["wrong_password"].as_u64() >= Some(1)
    });

    // The server takes one password guess per 2 s per certificate: the next one waits.
    std::thread::sleep(Duration::from_millis(2200));
    let right = AuthFile::new("right", "alice", "correct horse battery");
    let client = OpenvpnClient::start(
        &chain.right_host,
        &profile,
        &["--auth-user-pass", right.arg()],
    );
    client.assert_connected(&dockvpn);
    assert!(ping_eventually(&chain.right_host, LEFT_HOST, 5));
}
