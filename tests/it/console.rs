//! The operator's console: its page and assets on the admin port behind the admin token, the
//! JSON it reads (`/admin/sections`, `/admin/stats`, `/admin/requests`, the windows' `reserved`),
//! and the page itself in a real browser — headless Chromium on `tollgate demo`, with a
//! screenshot of each page.

use std::path::PathBuf;
use std::time::Duration;

use mock_upstream::MockUpstream;
use serde_json::{json, Value};
use tollgate::cli::demo::{Demo, DemoOptions};

use crate::common::redis_server::RedisServer;
use crate::common::webdriver::Browser;
use crate::common::{self, key_entry, TestGateway};

const TOKEN: &str = "console-admin-token-0123456789";
const TOKEN_ENV: &str = "TOLLGATE_CONSOLE_TEST_ADMIN_TOKEN";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A gateway with the admin token set and `keys` besides the test key.
async fn gateway(upstream: &MockUpstream, keys: &str) -> TestGateway {
    std::env::set_var(TOKEN_ENV, TOKEN);
    TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
        "",
        keys,
    ))
    .await
}

async fn admin_json(gateway: &TestGateway, path: &str) -> Value {
    gateway.admin_json(TOKEN, path).await
}

#[tokio::test]
async fn the_console_is_served_under_a_strict_policy_and_its_api_needs_the_token() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = gateway(&upstream, "").await;
    let admin = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let url = |path: &str| format!("{}{path}", gateway.admin_url());

    let redirect = admin.get(url("/ui")).send().await.expect("request");
    assert_eq!(redirect.status(), 308);
    assert_eq!(redirect.headers()["location"], "/ui/");

    let mut total = 0;
    for (path, content_type) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/console.js", "text/javascript; charset=utf-8"),
        ("/ui/console.css", "text/css; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        let response = admin.get(url(path)).send().await.expect("asset");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["content-security-policy"], CSP, "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        total += response.bytes().await.expect("body").len();
    }
    assert!(total < 200 * 1024, "the console is {total} bytes");
    let page = admin
        .get(url("/ui/"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(
        page.contains("<script src=\"console.js\" defer></script>") && !page.contains("<script>"),
        "the one script is a file of its own"
    );

    for path in [
        "/admin/sections",
        "/admin/stats",
        "/admin/requests",
        "/admin/keys",
    ] {
        let refused = admin.get(url(path)).send().await.expect("request");
        assert_eq!(refused.status(), 401, "{path} without the token");
        assert_eq!(refused.headers()["cache-control"], "no-store");
        let wrong = admin
            .get(url(path))
            .bearer_auth("not-the-admin-token-000")
            .send()
            .await
            .expect("request");
        assert_eq!(wrong.status(), 401, "{path} with a wrong token");
        let allowed = admin
            .get(url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        assert_eq!(allowed.status(), 200, "{path} with the token");
        assert_eq!(allowed.headers()["cache-control"], "no-store", "{path}");
    }
    let sections = admin_json(&gateway, "/admin/sections").await;
    let ids: Vec<&str> = sections["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["overview", "keys", "upstreams", "requests"],
        "only the pages this gateway has data for"
    );
}

#[tokio::test]
async fn without_an_admin_token_the_console_is_off() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let response = reqwest::get(format!("{}/ui/", gateway.admin_url()))
        .await
        .expect("request");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "admin_disabled");
}

/// Polls `path` until `done` holds for its JSON (the stats report only seconds that are over).
async fn admin_json_until(
    gateway: &TestGateway,
    path: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let value = admin_json(gateway, path).await;
        if done(&value) || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn stats_and_recent_requests_show_what_the_gateway_answered() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = gateway(&upstream, "").await;
    let chat = format!("{}/v1/chat/completions", gateway.url());
    for _ in 0..3 {
        let (status, _, _) = common::post(&chat, &common::chat_body(false, false), &[]).await;
        assert_eq!(status, 200);
    }
    let (status, _, _) = common::post(
        &chat,
        &common::chat_body(false, false),
        &[("x-mock-status", "503")],
    )
    .await;
    assert_eq!(status, 503, "the upstream's own error passes through");
    let (status, _, _) = common::post(
        &chat,
        &common::chat_body(false, false),
        &[("authorization", "Bearer tg-nobody")],
    )
    .await;
    assert_eq!(status, 401);

    let stats = admin_json_until(&gateway, "/admin/stats?seconds=60", |s| {
        s["totals"]["requests"] == 5
    })
    .await;
    let totals = &stats["totals"];
    assert_eq!(totals["requests"], 5, "{stats}");
    assert_eq!(totals["errors"], 1, "the 503");
    assert_eq!(totals["refused"], 1, "the 401");
    // The mock: 8 prompt words ("You are terse." + "Say hello to the gateway"), 8 tokens.
    assert_eq!(totals["tokens"], 3 * (8 + 8), "tokens of the three answers");
    assert!(totals["p50_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    assert_eq!(stats["requests"].as_array().map(Vec::len), Some(60));
    let per_second: u64 = stats["requests"]
        .as_array()
        .expect("series")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(per_second, 5, "the series adds up to the totals");

    let recent = admin_json(&gateway, "/admin/requests").await;
    let text = recent.to_string();
    for secret in [common::TEST_KEY, TOKEN, "tg-nobody", "Say hello"] {
        assert!(!text.contains(secret), "no token or prompt: found {secret}");
    }
    let statuses: Vec<u64> = recent["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .filter_map(|r| r["status"].as_u64())
        .collect();
    assert_eq!(
        statuses,
        [503, 200, 200, 200],
        "newest first, as the ledger records them (a 401 never reaches it)"
    );
    assert_eq!(recent["requests"][1]["key"], "test");
    assert_eq!(recent["requests"][1]["prompt_tokens"], 8);
}

/// While a request is held upstream, its worst case shows as `reserved` in every window; once
/// it is gone, nothing is.
async fn reserved_while_in_flight(gateway: &TestGateway) {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 40});
    let held = tokio::spawn({
        let url = format!("{}/v1/chat/completions", gateway.url());
        async move {
            let _ = common::client()
                .post(url)
                .header("authorization", "Bearer tg-held")
                .header("content-type", "application/json")
                .header("x-mock-fault", "stall-headers")
                .body(body.to_string())
                .send()
                .await;
        }
    });
    let key = admin_json_until(gateway, "/admin/keys/held", |k| {
        k["windows"][0]["reserved"].as_u64().unwrap_or(0) > 0
    })
    .await;
    for window in key["windows"].as_array().expect("windows") {
        let reserved = window["reserved"].as_u64().expect("reserved");
        assert!(reserved >= 40, "the worst case is held: {key}");
        assert_eq!(window["used"], reserved, "nothing settled yet: {key}");
    }
    held.abort();
    let key = admin_json_until(gateway, "/admin/keys/held", |k| {
        k["windows"][0]["reserved"] == 0
    })
    .await;
    assert_eq!(
        key["windows"][0]["reserved"], 0,
        "given back when the client left: {key}"
    );
}

const HELD_KEY: &str = "max_tokens = 50\nquotas = [{ tokens = 10000, per = \"1h\" }, { tokens = 100000, per = \"1d\" }]";

#[tokio::test]
async fn a_window_shows_what_requests_in_flight_reserve() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = gateway(&upstream, &key_entry("held", "tg-held", HELD_KEY)).await;
    reserved_while_in_flight(&gateway).await;
}

#[tokio::test]
async fn a_window_shows_what_requests_in_flight_reserve_in_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    std::env::set_var(TOKEN_ENV, TOKEN);
    let toml = common::config_toml(
        &upstream.url(),
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
        "",
        &key_entry("held", "tg-held", HELD_KEY),
    )
    .replace(
        "[state]\n",
        &format!(
            "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nprefix = \"console:\"\n",
            redis.url()
        ),
    );
    let gateway = TestGateway::start_toml(&toml).await;
    reserved_while_in_flight(&gateway).await;
}

// === in a real browser ===

/// Where the screenshots go: test artifacts under target/, and README's copies under docs/
/// when `TOLLGATE_SCREENSHOTS=docs`.
fn screenshot_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")];
    if std::env::var("TOLLGATE_SCREENSHOTS").as_deref() == Ok("docs") {
        dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs"));
    }
    dirs
}

async fn screenshot(browser: &Browser, name: &str) {
    for dir in screenshot_dirs() {
        browser
            .screenshot(&dir.join(format!("console-{name}.png")))
            .await;
    }
}

/// Requests through the demo: `n` with `key`, each a chat answer (`stream` or not); their
/// statuses, and the tokens the JSON answers reported using.
async fn traffic(url: &str, key: &str, n: usize, stream: bool) -> (Vec<u16>, u64) {
    let client = common::client_with_key(key);
    let mut statuses = Vec::with_capacity(n);
    let mut tokens = 0;
    for _ in 0..n {
        let response = client
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(common::chat_body(stream, false))
            .send()
            .await
            .expect("request");
        statuses.push(response.status().as_u16());
        let body = response.bytes().await.expect("body");
        if let Ok(answer) = serde_json::from_slice::<Value>(&body) {
            tokens += answer["usage"]["total_tokens"].as_u64().unwrap_or(0);
        }
    }
    (statuses, tokens)
}

/// A minute of mixed traffic (answers, streams, upstream errors, refusals), for README's
/// screenshots: paced, bounded, loopback only.
async fn a_minute_of_traffic(url: &str, open: &str, tight: &str) {
    let client = common::client_with_key(open);
    for second in 0..60u64 {
        let started = tokio::time::Instant::now();
        let n = 5 + (second * 7) % 11;
        for i in 0..n {
            let mut request = client
                .post(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("x-mock-chunks", (8 + (i * 13) % 40).to_string())
                .header("x-mock-chunk-delay-ms", (i % 4).to_string())
                .body(common::chat_body(i % 2 == 0, false));
            if (second + i) % 37 == 0 {
                request = request.header("x-mock-status", "503");
            }
            let _ = request.send().await.expect("request").bytes().await;
        }
        // The tight key at its rate (one every 6 s), and once a burst past it (429s).
        if second % 6 == 3 {
            traffic(url, tight, if second == 33 { 6 } else { 1 }, false).await;
        }
        tokio::time::sleep_until(started + Duration::from_secs(1)).await;
    }
}

/// When the page first painted, and when its response and its DOM were done, in ms.
async fn paint_timing(browser: &Browser) -> String {
    let figures = concat!(
        "(() => { const p = performance.getEntriesByType('paint')[0];",
        " const n = performance.getEntriesByType('navigation')[0];",
        " return p && n.domContentLoadedEventEnd > 0 && `paint ${p.startTime.toFixed(0)} ms",
        " (response ${n.responseEnd.toFixed(0)} ms, DOM ${n.domContentLoadedEventEnd.toFixed(0)} ms)`; })()",
    );
    browser
        .wait_until(figures)
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let browser = match Browser::start(1280, 900).await {
        Ok(browser) => browser,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "\n########## SKIPPED the_console_in_a_real_browser: cannot run Chromium: {why}\n\
                 ########## (CI installs chromium and chromium-driver; this test runs there)\n"
            );
            return;
        }
        Err(why) => panic!("CI must run the browser test: cannot run Chromium: {why}"),
    };
    let demo = Demo::start(DemoOptions {
        listen: "127.0.0.1:0".parse().expect("address"),
        admin_listen: "127.0.0.1:0".parse().expect("address"),
        ..DemoOptions::default()
    })
    .await
    .expect("demo starts");
    let (url, admin) = (
        demo.url().expect("url"),
        demo.admin_url().expect("admin url"),
    );
    let keys = demo.keys().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(demo.run(async {
        let _ = stopped.await;
    }));

    // Refused without the token: the form stays, and says why.
    browser.goto(&format!("{admin}/ui/")).await;
    browser
        .wait_until(
            "!document.getElementById('login').hidden && document.getElementById('page').hidden",
        )
        .await;
    // Figures for the record, not assertions: the first paint on loopback, in a browser just
    // started and once it has loaded the page before.
    let cold = paint_timing(&browser).await;
    browser.goto(&format!("{admin}/ui/")).await;
    let warm = paint_timing(&browser).await;
    eprintln!("console first paint: {cold} (fresh browser); {warm} (loaded again)");
    screenshot(&browser, "login").await;
    browser
        .type_into("#token", "not-the-admin-token-0000")
        .await;
    browser.click("#login-form button[type=submit]").await;
    let refused = browser
        .wait_until("document.getElementById('login-error').textContent")
        .await;
    assert!(
        refused.as_str().is_some_and(|t| t.contains("401")),
        "the page says the token was refused: {refused}"
    );

    browser.type_into("#token", &keys.admin).await;
    browser.click("#login-form button[type=submit]").await;
    browser
        .wait_until("document.getElementById('login').hidden && document.getElementById('overview-requests')")
        .await;
    let stored = browser
        .script(
            "return [location.href, document.cookie, sessionStorage.length]",
            json!([]),
        )
        .await;
    assert_eq!(
        stored,
        json!([format!("{admin}/ui/"), "", 1]),
        "the token is in the tab's session only: not in the URL, not in a cookie"
    );

    // Keys: both demo keys, the tight one's quota bars; traffic moves the daily one.
    browser.click("nav a[data-section=keys]").await;
    browser
        .wait_until("document.querySelector('[data-key=demo-open]') && document.querySelector('[data-key=demo-tight] [data-window=\"1d\"]')")
        .await;
    let used = |window: &str| {
        format!("Number(document.querySelector('[data-key=demo-tight] [data-window=\"{window}\"]').dataset.used)")
    };
    let before = browser.wait_until(&format!("String({})", used("1d"))).await;
    assert_eq!(before, json!("0"), "a fresh demo has used nothing");
    let (answers, charged) = traffic(&url, &keys.tight, 2, false).await;
    assert_eq!(answers, [200, 200], "within the tight key's burst");
    assert!(charged > 0, "the answers report their usage");
    let after = browser
        .wait_until(&format!(
            "{} === {charged} && Number(document.querySelector('[data-key=demo-tight] [data-window=\"1d\"]').dataset.reserved) === 0 && {charged}",
            used("1d")
        ))
        .await;
    assert_eq!(
        after,
        json!(charged),
        "once settled, the bar shows what the answers reported"
    );
    let width = browser
        .script(
            "return Number(document.querySelector('[data-key=demo-tight] [data-window=\"10m\"] rect.used').getAttribute('width'))",
            json!([]),
        )
        .await;
    let share = (after.as_f64().expect("a number") / 600.0 * 10000.0).round() / 100.0;
    assert_eq!(
        width.as_f64(),
        Some(share),
        "the used part of the 600-token bar"
    );

    // Overview: the request rate moves with traffic.
    traffic(&url, &keys.open, 5, true).await;
    browser.click("nav a[data-section=overview]").await;
    browser
        .wait_until("Number(document.getElementById('overview-requests').textContent.replace(/,/g, '')) >= 7 && Number(document.getElementById('overview-rate').textContent) > 0")
        .await;

    if screenshot_dirs().len() > 1 {
        a_minute_of_traffic(&url, &keys.open, &keys.tight).await;
        browser
            .wait_until("Number(document.getElementById('overview-requests').textContent.replace(/,/g, '')) > 300")
            .await;
    }
    screenshot(&browser, "overview").await;
    browser.click("nav a[data-section=keys]").await;
    browser
        .wait_until("document.querySelector('[data-key=demo-tight]')")
        .await;
    screenshot(&browser, "keys").await;

    // Filtering by name.
    browser.type_into("#key-filter", "tight").await;
    browser
        .wait_until("document.querySelectorAll('.card').length === 1 && document.querySelector('[data-key=demo-tight]')")
        .await;

    // Recent requests: what the ledger recorded, never a key.
    browser.click("nav a[data-section=requests]").await;
    let rows = browser
        .wait_until("document.querySelectorAll('#requests tbody tr').length >= 7 && document.getElementById('requests').textContent")
        .await;
    let rows = rows.as_str().expect("table text");
    assert!(rows.contains("demo-open"), "{rows}");
    // (After README's minute of traffic the tight key's quota is spent and its last answers
    // are older than the last 200.)
    assert!(
        rows.contains("demo-tight") || screenshot_dirs().len() > 1,
        "{rows}"
    );
    assert!(
        !rows.contains(&keys.open) && !rows.contains(&keys.tight),
        "no token on the page"
    );
    screenshot(&browser, "requests").await;

    // Upstreams: the demo's one pool and its endpoint, up.
    browser.click("nav a[data-section=upstreams]").await;
    browser
        .wait_until("document.querySelector('[data-pool=default] tr[data-up=true]')")
        .await;
    screenshot(&browser, "upstreams").await;

    // A phone's width: nothing wider than the screen.
    browser.resize(390, 844).await;
    for page in ["overview", "keys", "upstreams", "requests"] {
        browser.click(&format!("nav a[data-section={page}]")).await;
        let fits = browser
            .wait_until(&format!(
                "document.title.startsWith(document.querySelector('nav a[data-section={page}]').textContent) && document.documentElement.scrollWidth <= window.innerWidth + 1 && 'fits'"
            ))
            .await;
        assert_eq!(fits, "fits", "{page} fits a phone's width");
    }
    screenshot(&browser, "phone").await;

    // Another tab has a session of its own: the console asks for the token again.
    browser.new_tab().await;
    browser.goto(&format!("{admin}/ui/#keys")).await;
    browser
        .wait_until("!document.getElementById('login').hidden")
        .await;
    browser.close().await;

    let _ = stop.send(());
    running
        .await
        .expect("demo task")
        .expect("the demo stops cleanly");
}
