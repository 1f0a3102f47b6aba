//! Dockwall's REST API in the namespace chain: the token on every endpoint, API edits racing
//! CLI edits, a rule added over the API filtering real traffic, bad bodies changing nothing,
//! and the web page's session and CSRF checks.

use std::os::unix::fs::PermissionsExt;

use docknfv_tests::chain::RIGHT_HOST;
use docknfv_tests::dockwall::StateDir;
use docknfv_tests::dockwall_api::{
    bearer, call, request, request_raw, request_tls, start_with_api, start_with_api_in, token,
    Reply, API_ADDRESS,
};
use docknfv_tests::traffic::{ping, ping_eventually};
use docknfv_tests::Chain;
use serde_json::{json, Value};

fn expect(reply: &Reply, status: u16, what: &str) {
    assert_eq!(reply.status, status, "{what}: {reply:?}");
}

/// The CSRF token the page carries in its `<meta name="csrf">`.
fn csrf_of(page: &Reply) -> String {
    page.body
        .split(r#"<meta name="csrf" content=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("the page carries no CSRF token: {page:?}"))
        .to_string()
}

#[test]
fn every_endpoint_needs_the_token_and_works_with_it() {
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    let mode = std::fs::metadata(dockwall.state.path().join("api.token"))
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is the owner's only");
    assert_eq!(
        token,
        self::token(&dockwall),
        "the token stays until rotated"
    );
    let si = &chain.si;
    let rule = r#"{"firewall_rule": {"action": "deny", "protocol": "tcp", "destination_port": "2525", "direction": "left-to-right", "name": "smtp"}}"#;
    let nat = r#"{"nat_rule": {"kind": {"masquerade": {"out": "right"}}}}"#;
    // Each endpoint: refused without the token and with a wrong one, then answered.
    let check = |method: &str, path: &str, body: Option<&str>, status: u16| -> Reply {
        for wrong in [None, Some("0".repeat(token.len())), Some(String::new())] {
            let refused = call(si, wrong.as_deref(), method, path, body);
            expect(
                &refused,
                401,
                &format!("{method} {path} with token {wrong:?}"),
            );
            assert!(
                refused.body.contains("dockwall api token"),
                "401 says how to authenticate: {refused:?}"
            );
        }
        let reply = call(si, Some(&token), method, path, body);
        expect(&reply, status, &format!("{method} {path}"));
        reply
    };
    let neutron = r#"{"firewall_rule": {"protocol": "udp", "shared": false, "project_id": "p", "tenant_id": "p", "firewall_policy_id": null, "source_firewall_group_id": null, "destination_firewall_group_id": null}}"#;
    let defaulted = check("POST", "/v2.0/fwaas/firewall_rules", Some(neutron), 201).json();
    assert_eq!(
        defaulted["firewall_rule"]["action"], "deny",
        "Neutron's default action"
    );
    assert_eq!(
        defaulted["firewall_rule"]["firewall_policy_id"],
        json!(["both"])
    );
    let defaulted_id = defaulted["firewall_rule"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    check(
        "DELETE",
        &format!("/v2.0/fwaas/firewall_rules/{defaulted_id}"),
        None,
        204,
    );
    let created = check("POST", "/v2.0/fwaas/firewall_rules", Some(rule), 201).json();
    let id = created["firewall_rule"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(created["firewall_rule"]["position"], 1);
    let listed = check("GET", "/v2.0/fwaas/firewall_rules", None, 200).json();
    assert_eq!(listed["firewall_rules"][0]["destination_port"], "2525");
    let path = format!("/v2.0/fwaas/firewall_rules/{id}");
    let shown = check("GET", &path, None, 200).json();
    assert_eq!(shown["firewall_rule"]["name"], "smtp");
    let updated = check(
        "PUT",
        &path,
        Some(r#"{"firewall_rule": {"destination_port": "2526", "enabled": false}}"#),
        200,
    )
    .json();
    assert_eq!(updated["firewall_rule"]["destination_port"], "2526");
    assert_eq!(updated["firewall_rule"]["enabled"], false);
    let policies = check("GET", "/v2.0/fwaas/firewall_policies", None, 200).json();
    assert_eq!(
        policies["firewall_policies"].as_array().map(Vec::len),
        Some(4)
    );
    let egress = check("GET", "/v2.0/fwaas/firewall_policies/egress", None, 200).json();
    assert_eq!(egress["firewall_policy"]["firewall_rules"], json!([id]));
    let second = call(
        si,
        Some(&token),
        "POST",
        "/v2.0/fwaas/firewall_rules",
        Some(rule),
    )
    .json();
    let second_id = second["firewall_rule"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let inserted = check(
        "PUT",
        "/v2.0/fwaas/firewall_policies/ingress/insert_rule",
        Some(&format!(r#"{{"firewall_rule_id": "{second_id}"}}"#)),
        200,
    )
    .json();
    assert_eq!(inserted["firewall_rules"], json!([second_id]));
    let cli = dockwall.ok(&["rule", "list", "--json"]);
    let cli: Value = serde_json::from_str(&cli).expect("rule list --json");
    assert_eq!(
        cli["rules"][0]["direction"], "right-to-left",
        "insert_rule moved it first"
    );
    assert_eq!(
        cli["rules"][1]["enabled"], false,
        "the PUT reached the store"
    );
    // Dockwall keeps no rule outside a policy: remove_rule refuses and says what to do.
    let refused = check(
        "PUT",
        "/v2.0/fwaas/firewall_policies/ingress/remove_rule",
        Some(&format!(r#"{{"firewall_rule_id": "{second_id}"}}"#)),
        409,
    );
    assert!(
        refused.body.contains("DELETE /v2.0/fwaas/firewall_rules/")
            && refused.body.contains("insert_rule"),
        "{refused:?}"
    );
    expect(
        &call(
            si,
            Some(&token),
            "PUT",
            "/v2.0/fwaas/firewall_policies/egress/remove_rule",
            Some(&format!(r#"{{"firewall_rule_id": "{second_id}"}}"#)),
        ),
        404,
        "remove_rule from a policy the rule is not in",
    );
    // insert_before must name a rule of the target policy.
    expect(
        &call(
            si,
            Some(&token),
            "PUT",
            "/v2.0/fwaas/firewall_policies/local/insert_rule",
            Some(&format!(
                r#"{{"firewall_rule_id": "{id}", "insert_before": "{second_id}"}}"#
            )),
        ),
        409,
        "insert_before a rule of another policy",
    );
    let cli: Value = serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    assert_eq!(
        (
            cli["rules"][0]["id"]
                .to_string()
                .trim_matches('"')
                .to_string(),
            cli["rules"][1]["direction"].clone()
        ),
        (second_id.clone(), json!("left-to-right")),
        "the refused remove_rule and insert_rule changed nothing"
    );
    check(
        "DELETE",
        &format!("/v2.0/fwaas/firewall_rules/{second_id}"),
        None,
        204,
    );
    let nat_id = check("POST", "/v2.0/dockwall/nat_rules", Some(nat), 201).json()["nat_rule"]["id"]
        .as_str()
        .expect("nat id")
        .to_string();
    check("GET", "/v2.0/dockwall/nat_rules", None, 200);
    check(
        "GET",
        &format!("/v2.0/dockwall/nat_rules/{nat_id}"),
        None,
        200,
    );
    assert!(
        dockwall.table().contains("masquerade"),
        "the NAT rule is in the kernel"
    );
    check(
        "DELETE",
        &format!("/v2.0/dockwall/nat_rules/{nat_id}"),
        None,
        204,
    );
    check("GET", "/v2.0/dockwall/default_policy", None, 200);
    let set = check(
        "PUT",
        "/v2.0/dockwall/default_policy",
        Some(r#"{"default_policy": "drop"}"#),
        200,
    );
    assert_eq!(set.json()["default_policy"], "drop");
    let one_way = check(
        "PUT",
        "/v2.0/dockwall/default_policy",
        Some(r#"{"default_policy": "accept", "direction": "left-to-right"}"#),
        200,
    )
    .json();
    assert_eq!(
        (
            &one_way["default_policy"],
            &one_way["left_to_right_policy"],
            &one_way["right_to_left_policy"]
        ),
        (&"drop".into(), &"accept".into(), &"drop".into()),
        "a direction's default overrides only that direction: {one_way}"
    );
    let status = check("GET", "/v2.0/dockwall/status", None, 200).json();
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(
        status["firewall"]["defaults"]["left_to_right_policy"],
        "accept"
    );
    let both = check(
        "PUT",
        "/v2.0/dockwall/default_policy",
        Some(r#"{"default_policy": "drop"}"#),
        200,
    )
    .json();
    assert_eq!(both["left_to_right_policy"], "drop", "no direction: both");
    check("DELETE", &path, None, 204);
    check("GET", &path, None, 404);
    let page = check("GET", "/", None, 200);
    assert!(page.body.contains("<title>Dockwall</title>"));
    check("GET", "/v2.0/no/such/thing", None, 404);
    let not_allowed = check("PATCH", "/v2.0/fwaas/firewall_rules", None, 405).json();
    assert_eq!(
        not_allowed["NeutronError"]["type"], "HTTPMethodNotAllowed",
        "405 in Neutron's shape: {not_allowed}"
    );
    assert!(
        not_allowed["NeutronError"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not take this method"),
        "says what is wrong: {not_allowed}"
    );
    let cli: Value = serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    assert_eq!(cli["rules"], json!([]), "every rule the API made is gone");
    assert!(dockwall.ok(&["status"]).contains("converged"));

    let rotated = dockwall
        .ok(&["api", "token", "--rotate"])
        .trim()
        .to_string();
    assert_ne!(rotated, token);
    expect(
        &call(si, Some(&token), "GET", "/v2.0/fwaas/firewall_rules", None),
        401,
        "the old token after rotation",
    );
    expect(
        &call(
            si,
            Some(&rotated),
            "GET",
            "/v2.0/fwaas/firewall_rules",
            None,
        ),
        200,
        "the new token",
    );
}

#[test]
fn a_rule_added_over_the_api_blocks_traffic_and_counts_it() {
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    let si = &chain.si;
    assert!(
        ping_eventually(&chain.left_host, RIGHT_HOST, 5),
        "no rules: ping passes"
    );
    let created = call(
        si,
        Some(&token),
        "POST",
        "/v2.0/fwaas/firewall_rules",
        Some(
            r#"{"firewall_rule": {"action": "deny", "protocol": "icmp", "direction": "left-to-right"}}"#,
        ),
    );
    expect(&created, 201, "create");
    let id = created.json()["firewall_rule"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..3 {
        assert!(
            !ping(&chain.left_host, RIGHT_HOST),
            "the API's deny drops ping"
        );
    }
    let rules = call(si, Some(&token), "GET", "/v2.0/fwaas/firewall_rules", None).json();
    assert!(
        rules["firewall_rules"][0]["packets"].as_u64().unwrap_or(0) >= 3,
        "the counter saw the dropped pings: {rules}"
    );
    assert!(
        ping(&chain.right_host, "192.168.10.2"),
        "the other direction passes"
    );
    let deleted = call(
        si,
        Some(&token),
        "DELETE",
        &format!("/v2.0/fwaas/firewall_rules/{id}"),
        None,
    );
    expect(&deleted, 204, "delete");
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "deleted: ping passes again"
    );
}

#[test]
fn concurrent_api_and_cli_edits_lose_none() {
    const EACH: u16 = 20;
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    // Each edit's time window, to show API and CLI edits really ran at the same time.
    let timed = |run: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        let ok = run();
        (ok, start, std::time::Instant::now())
    };
    let (api, cli) = std::thread::scope(|scope| {
        let api: Vec<_> = (0..EACH)
            .map(|n| {
                let (si, token) = (&chain.si, &token);
                scope.spawn(move || {
                    let body = format!(
                        r#"{{"firewall_rule": {{"action": "deny", "protocol": "tcp", "destination_port": "{}", "name": "api-{n}"}}}}"#,
                        10000 + n
                    );
                    timed(&|| {
                        let reply = call(si, Some(token), "POST", "/v2.0/fwaas/firewall_rules", Some(&body));
                        reply.status == 201
                    })
                })
            })
            .collect();
        let cli: Vec<_> = (0..EACH)
            .map(|n| {
                let dockwall = &dockwall;
                scope.spawn(move || {
                    let port = (20000 + n).to_string();
                    let name = format!("cli-{n}");
                    timed(&|| {
                        dockwall
                            .command(&[
                                "rule", "add", "deny", "--proto", "tcp", "--dport", &port,
                                "--name", &name,
                            ])
                            .output()
                            .is_ok_and(|output| output.status.success())
                    })
                })
            })
            .collect();
        let join = |threads: Vec<std::thread::ScopedJoinHandle<'_, _>>| -> Vec<_> {
            threads
                .into_iter()
                .map(|t| t.join().expect("edit thread"))
                .collect()
        };
        (join(api), join(cli))
    });
    for (what, results) in [("API", &api), ("CLI", &cli)] {
        for (n, (ok, _, _)) in results.iter().enumerate() {
            assert!(ok, "{what} edit {n} failed");
        }
    }
    let overlapping = api.iter().any(|(_, api_start, api_end)| {
        cli.iter()
            .any(|(_, cli_start, cli_end)| api_start < cli_end && cli_start < api_end)
    });
    assert!(overlapping, "no API edit ran while a CLI edit did");
    let listed: Value = serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    let mut names: Vec<String> = listed["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|rule| rule["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    let mut expected: Vec<String> = (0..EACH)
        .flat_map(|n| [format!("api-{n}"), format!("cli-{n}")])
        .collect();
    expected.sort();
    assert_eq!(names, expected, "every edit is stored, none twice");
    assert!(
        dockwall.ok(&["status"]).contains("converged"),
        "and all are in the kernel"
    );
}

#[test]
fn bad_bodies_get_4xx_and_change_nothing() {
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    let si = &chain.si;
    let seed =
        r#"{"firewall_rule": {"action": "allow", "protocol": "udp", "destination_port": "53"}}"#;
    expect(
        &call(
            si,
            Some(&token),
            "POST",
            "/v2.0/fwaas/firewall_rules",
            Some(seed),
        ),
        201,
        "seed",
    );
    let stored = std::fs::read_to_string(dockwall.state.rules_file()).expect("rules.json");
    let table = dockwall.table();
    let huge = format!(
        r#"{{"firewall_rule": {{"action": "deny", "name": "{}"}}}}"#,
        "x".repeat(200_000)
    );
    let cases: [(&str, &str, &str, u16, &str); 8] = [
        (
            "POST",
            "/v2.0/fwaas/firewall_rules",
            r#"{"firewall_rule": {"protocol": "tcp", "source_firewall_group_id": "g1"}}"#,
            400,
            "remote firewall groups are not supported",
        ),
        (
            "POST",
            "/v2.0/fwaas/firewall_rules",
            r#"{"firewall_rule": {"action": "deny""#,
            400,
            "EOF",
        ),
        (
            "POST",
            "/v2.0/fwaas/firewall_rules",
            r#"{"firewall_rule": {"action": "deny", "colour": "red"}}"#,
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/v2.0/fwaas/firewall_rules",
            r#"{"firewall_rule": {"action": "deny", "protocol": "tcp", "destination_port": "70000"}}"#,
            400,
            "70000 is outside 1-65535",
        ),
        (
            "POST",
            "/v2.0/fwaas/firewall_rules",
            r#"{"firewall_rule": {"action": "deny", "destination_port": "22"}}"#,
            400,
            "needs protocol tcp",
        ),
        (
            "PUT",
            "/v2.0/fwaas/firewall_rules/1",
            r#"{"firewall_rule": {"source_ip_address": "10.0.0.300"}}"#,
            400,
            "source_ip_address",
        ),
        (
            "PUT",
            "/v2.0/dockwall/default_policy",
            r#"{"default_policy": "maybe"}"#,
            400,
            "unknown variant",
        ),
        (
            "POST",
            "/v2.0/fwaas/firewall_rules",
            &huge,
            413,
            "length limit",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let reply = call(si, Some(&token), method, path, Some(body));
        expect(&reply, status, &format!("{method} {path} {:.80}", body));
        let message = reply.json()["NeutronError"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains(needle),
            "{method} {path}: {message:?} lacks {needle:?}"
        );
        assert_eq!(
            std::fs::read_to_string(dockwall.state.rules_file()).unwrap(),
            stored,
            "{method} {path} changed the stored rules"
        );
    }
    assert_eq!(dockwall.table(), table, "and the kernel's table");
}

#[test]
fn the_page_logs_in_with_the_token_and_changes_need_the_csrf_token() {
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    let si = &chain.si;
    let login_form = request(si, "GET", "/", &[], None);
    expect(&login_form, 401, "the page without a session");
    assert!(login_form.body.contains("<form"), "is the login form");
    for header in [
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(
            login_form.header(header.0),
            Some(header.1),
            "{login_form:?}"
        );
    }
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let post_login = |headers: &[(&str, &str)], token: &str| {
        let body = format!("token={token}");
        request(si, "POST", "/login", headers, Some(body.as_bytes()))
    };
    expect(&post_login(&form, "wrong"), 401, "a wrong token");
    expect(
        &request(si, "GET", &format!("/login?token={token}"), &[], None),
        200,
        "a token in the URL only gets the form",
    );
    let no_cookie = request(si, "GET", &format!("/?token={token}"), &[], None);
    expect(&no_cookie, 401, "/?token= logs nobody in");
    assert!(no_cookie.header("set-cookie").is_none(), "{no_cookie:?}");
    for cross_site in [
        ("Origin", "http://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
    ] {
        let refused = post_login(&[form[0], cross_site], &token);
        expect(&refused, 403, &format!("a login POST with {cross_site:?}"));
        assert!(refused.header("set-cookie").is_none(), "{refused:?}");
    }
    let login = post_login(&[form[0], ("Sec-Fetch-Site", "same-origin")], &token);
    expect(&login, 303, "login");
    let cookie = login
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let page = request(si, "GET", "/", &[("Cookie", &session)], None);
    expect(&page, 200, "the page with the session");
    let csrf = csrf_of(&page);
    assert_eq!(csrf.len(), 64, "{csrf:?}");
    let rule = br#"{"firewall_rule": {"action": "deny", "protocol": "icmp"}}"#;
    let path = "/v2.0/fwaas/firewall_rules";
    expect(
        &request(si, "GET", path, &[("Cookie", &session)], None),
        200,
        "a read with the session",
    );
    let forged = request(si, "POST", path, &[("Cookie", &session)], Some(rule));
    expect(&forged, 403, "a change without the CSRF token");
    let wrong = request(
        si,
        "POST",
        path,
        &[("Cookie", &session), ("X-CSRF-Token", &"0".repeat(64))],
        Some(rule),
    );
    expect(&wrong, 403, "a change with another CSRF token");
    let rules: Value = serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    assert_eq!(rules["rules"], json!([]), "refused changes changed nothing");
    let made = request(
        si,
        "POST",
        path,
        &[("Cookie", &session), ("X-CSRF-Token", &csrf)],
        Some(rule),
    );
    expect(&made, 201, "a change with the session's CSRF token");
    let stale = request(
        si,
        "GET",
        path,
        &[("Cookie", "dockwall_session=feed")],
        None,
    );
    expect(&stale, 401, "an unknown session");
    let other = post_login(&form, &token);
    expect(&other, 303, "a login without browser headers (curl)");
    let other = other.header("set-cookie").expect("cookie");
    assert!(
        other.contains("Max-Age=43200"),
        "sessions last 12 h: {other}"
    );
    let other = other.split(';').next().unwrap().to_string();
    expect(
        &request(si, "POST", "/logout", &[("Cookie", &other)], None),
        403,
        "a logout without the CSRF token",
    );
    let other_page = request(si, "GET", "/", &[("Cookie", &other)], None);
    let other_csrf = csrf_of(&other_page);
    let logout = request(
        si,
        "POST",
        "/logout",
        &[("Cookie", &other), ("X-CSRF-Token", &other_csrf)],
        None,
    );
    expect(&logout, 204, "logout");
    expect(
        &request(si, "GET", path, &[("Cookie", &other)], None),
        401,
        "a logged-out session",
    );
    expect(
        &request(si, "GET", path, &[("Cookie", &session)], None),
        200,
        "another session stays",
    );
    std::fs::remove_file(dockwall.state.path().join("api.token")).expect("delete the token file");
    expect(
        &call(si, Some(&token), "GET", path, None),
        200,
        "a deleted token file keeps the token read before",
    );
    assert!(
        !dockwall.state.path().join("api.token").exists(),
        "requests never create the token file"
    );
    dockwall.ok(&["api", "token", "--rotate"]);
    let rotated = request(si, "GET", path, &[("Cookie", &session)], None);
    expect(&rotated, 401, "a session after the token was rotated");
}

#[test]
fn with_a_certificate_in_the_state_directory_the_api_speaks_https_only() {
    let chain = Chain::new();
    let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("a self-signed certificate");
    let certificate = issued.cert.pem();
    let state = StateDir::new();
    std::fs::create_dir_all(state.path()).expect("state dir");
    std::fs::write(state.path().join("api.crt"), &certificate).expect("api.crt");
    std::fs::write(
        state.path().join("api.key"),
        issued.signing_key.serialize_pem(),
    )
    .expect("api.key");
    let dockwall = start_with_api_in(&chain, state);
    let token = token(&dockwall);
    let bearer = bearer(&token);
    let path = "/v2.0/fwaas/firewall_rules";
    let listed = request_tls(
        &chain.si,
        &certificate,
        "GET",
        path,
        &[("Authorization", &bearer)],
        None,
    );
    expect(&listed, 200, "GET over HTTPS with the token");
    assert_eq!(listed.json()["firewall_rules"], json!([]));
    expect(
        &request_tls(&chain.si, &certificate, "GET", path, &[], None),
        401,
        "GET over HTTPS without the token",
    );
    let login = request_tls(
        &chain.si,
        &certificate,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(format!("token={token}").as_bytes()),
    );
    let cookie = login.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.contains("; Secure"),
        "over HTTPS the cookie is Secure: {cookie}"
    );
    let plain = request_raw(&chain.si, "GET", path, &[("Authorization", &bearer)], None);
    assert!(
        !plain.starts_with(b"HTTP/"),
        "plain HTTP gets no HTTP reply from the HTTPS listener: {:?}",
        String::from_utf8_lossy(&plain)
    );
}

#[test]
fn idle_connections_are_closed_and_do_not_starve_the_api() {
    use std::io::Read;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    // More than the server's 256 connections, none sending a byte.
    const IDLE: usize = 300;
    // The server's header timeout is 10 s: the first 256 close after it, the rest (queued in
    // the backlog until then) after twice it; give both a margin.
    let bound = Duration::from_secs(28);
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    let idle: Vec<TcpStream> = chain.si.run(|| {
        (0..IDLE)
            .map(|n| {
                TcpStream::connect(API_ADDRESS)
                    .unwrap_or_else(|e| panic!("idle connection {n}: {e}"))
            })
            .collect()
    });
    let started = Instant::now();
    let reply = call(
        &chain.si,
        Some(&token),
        "GET",
        "/v2.0/dockwall/status",
        None,
    );
    expect(&reply, 200, "a request behind the idle connections");
    assert!(
        started.elapsed() < bound,
        "answered only after {:?}",
        started.elapsed()
    );
    for (n, mut stream) in idle.into_iter().enumerate() {
        let left = bound.saturating_sub(started.elapsed());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!(
                "idle connection {n} still open after {:?}: {e}",
                started.elapsed()
            ),
        }
    }
}
