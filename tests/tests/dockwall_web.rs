//! Dockwall's web page in a real browser: Debian's headless Chromium, driven over WebDriver
//! (chromedriver, fantoccini), inside the SI's namespace where the API listens. Log in with
//! the token, add a deny rule through the form, see ping blocked and the rule's counter rise
//! on the page, delete it, see ping pass.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use docknfv_tests::chain::RIGHT_HOST;
use docknfv_tests::dockwall_api::{start_with_api, token, API_ADDRESS};
use docknfv_tests::prereq::require_command;
use docknfv_tests::traffic::{ping, ping_eventually};
use docknfv_tests::Chain;
use fantoccini::{ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const DRIVER_PORT: u16 = 9515;
/// The page polls the status every 2 s; a change shows within a few polls.
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// chromedriver, killed on drop.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_driver(chain: &Chain) -> Driver {
    require_command("chromium", "chromium");
    require_command("chromedriver", "chromium-driver");
    let mut command: Command = chain.si.command("chromedriver");
    command
        .arg(format!("--port={DRIVER_PORT}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = command.spawn().expect("start chromedriver");
    chain.si.wait_listening(&mut child, "-ltn", DRIVER_PORT);
    Driver(child)
}

/// The XPath of the rules table's row whose match column names `protocol`.
fn row_of(protocol: &str) -> String {
    format!("//tbody[@id='rules']/tr[td[contains(., '{protocol}')]]")
}

#[test]
fn the_page_adds_a_deny_rule_that_blocks_traffic_shows_its_counter_and_deletes_it() {
    let chain = Chain::new();
    let dockwall = start_with_api(&chain);
    let token = token(&dockwall);
    let _driver = start_driver(&chain);
    assert!(
        ping_eventually(&chain.left_host, RIGHT_HOST, 5),
        "no rules: ping passes"
    );
    let screenshot = std::env::temp_dir().join("dockwall-web.png");

    // The browser and its driver live in the SI's namespace: so does this client's socket.
    chain.si.block_on(async {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                // As root Chromium needs --no-sandbox; /dev/shm may be small in a container.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,720"]
            }),
        );
        let browser = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
            .await
            .expect("a WebDriver session with headless Chromium");
        browser
            .goto(&format!("http://{API_ADDRESS}/#token={token}"))
            .await
            .expect("load the page with the token");
        let health = browser
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::XPath("//header/span[@id='health'][normalize-space(.)='healthy']"))
            .await;
        let Ok(health) = health else {
            let url = browser.current_url().await.map(|u| u.to_string());
            let source = browser.source().await.unwrap_or_default();
            panic!("the logged-in page shows the SI healthy ({health:?}); at {url:?}:\n{source}");
        };
        assert_eq!(health.text().await.unwrap(), "healthy");

        let form = browser.find(Locator::Id("add")).await.expect("the add form");
        for (field, value) in [("action", "deny"), ("direction", "left-to-right"), ("protocol", "icmp")] {
            form.find(Locator::Css(&format!("select[name={field}]")))
                .await
                .expect("a form field")
                .select_by_value(value)
                .await
                .expect("choose");
        }
        form.find(Locator::Css("input[name=name]"))
            .await
            .unwrap()
            .send_keys("no ping")
            .await
            .unwrap();
        form.find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .expect("submit");
        browser
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::XPath(&row_of("icmp")))
            .await
            .expect("the new rule appears in the table");

        // On a phone's width the page fits without sideways scrolling, the buttons in reach.
        browser.set_window_size(390, 844).await.expect("phone size");
        let overflow = browser
            .execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
                vec![],
            )
            .await
            .expect("measure the page");
        assert_eq!(overflow, json!(0), "the page scrolls sideways on a phone");
        let delete = browser
            .find(Locator::XPath(&format!("{}//button[.='Delete']", row_of("icmp"))))
            .await
            .expect("the delete button on a phone");
        assert!(delete.is_displayed().await.expect("displayed"), "the delete button shows on a phone");
        browser.set_window_size(1000, 720).await.expect("desktop size");

        // Blocking this thread is fine: the page and the SI run in other processes.
        for _ in 0..3 {
            assert!(!ping(&chain.left_host, RIGHT_HOST), "the page's deny rule drops ping");
        }
        let counter = format!("{}/td[contains(@class, 'packets')][number(.) >= 3]", row_of("icmp"));
        browser
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::XPath(&counter))
            .await
            .expect("the page's packet counter rises to the dropped pings");
        let png = browser.screenshot().await.expect("screenshot");
        std::fs::write(&screenshot, png).expect("write the screenshot");

        browser
            .find(Locator::XPath(&format!("{}//button[.='Delete']", row_of("icmp"))))
            .await
            .expect("the rule's delete button")
            .click()
            .await
            .expect("delete");
        let question = browser.get_alert_text().await.expect("Delete asks first");
        assert!(question.contains("Delete rule"), "{question}");
        browser.accept_alert().await.expect("confirm the delete");
        let deadline = std::time::Instant::now() + PAGE_WAIT;
        while !browser.find_all(Locator::XPath(&row_of("icmp"))).await.unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the deleted rule stays on the page");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        browser.find(Locator::Id("logout")).await.expect("the log out button").click().await.expect("log out");
        browser
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css("form[action='/login']"))
            .await
            .expect("logged out: the login form");
        browser.close().await.expect("end the session");
    });
    assert!(
        ping(&chain.left_host, RIGHT_HOST),
        "deleted on the page: ping passes again"
    );
    let rules: serde_json::Value =
        serde_json::from_str(&dockwall.ok(&["rule", "list", "--json"])).unwrap();
    assert_eq!(rules["rules"], json!([]));
    eprintln!("screenshot: {}", screenshot.display());
}
