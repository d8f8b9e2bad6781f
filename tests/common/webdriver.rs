//! A small W3C WebDriver client over reqwest: Debian's headless Chromium, driven through its
//! chromedriver, with just what the console test needs — open a page, type, click, run a
//! script, wait for the page to show something, take a screenshot.
//!
//! Waiting is done by the browser: [`Browser::wait_until`] runs an asynchronous script that
//! checks its condition on every change to the page (a `MutationObserver`) and on every frame
//! (for what is not in the DOM, such as paint timings), and answers the moment it holds, within
//! the session's script timeout. Nothing here sleeps.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The key W3C WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a wait or a script may take before the test fails.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    /// chromedriver, leader of its own process group: Chromium and its helpers join that group,
    /// so that a test that fails before [`Browser::close`] still leaves no browser behind.
    driver: Child,
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
    _profile: tempfile::TempDir,
}

/// Where a program is on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session; the error says why
    /// Chromium cannot run here.
    pub async fn start(width: u32, height: u32) -> Result<Browser, String> {
        let chromium = which("chromium")
            .or_else(|| which("chromium-browser"))
            .ok_or("no chromium on PATH (apt-get install chromium)")?;
        let chromedriver = which("chromedriver")
            .ok_or("no chromedriver on PATH (apt-get install chromium-driver)")?;
        let mut driver = Command::new(chromedriver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start chromedriver: {e}"))?;
        let stdout = driver.stdout.take().ok_or("chromedriver has no stdout")?;
        let port = announced_port(stdout).await?;
        let profile = tempfile::tempdir().map_err(|e| format!("no temp dir: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(SCRIPT_TIMEOUT * 2)
            .build()
            .map_err(|e| e.to_string())?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let answer: Value = http
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&capabilities)
            .send()
            .await
            .map_err(|e| format!("chromedriver: {e}"))?
            .json()
            .await
            .map_err(|e| format!("chromedriver: {e}"))?;
        let id = answer["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| format!("chromium did not start: {answer}"))?;
        let browser = Browser {
            driver,
            http,
            session: format!("http://127.0.0.1:{port}/session/{id}"),
            _profile: profile,
        };
        browser
            .call(
                reqwest::Method::POST,
                "/timeouts",
                json!({"script": SCRIPT_TIMEOUT.as_millis() as u64}),
            )
            .await;
        Ok(browser)
    }

    /// One WebDriver command; its `value`. A WebDriver error fails the test, naming the command.
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let what = format!("webdriver {path} {body}");
        send(self.request(method, path, body), &what).await
    }

    fn request(&self, method: reqwest::Method, path: &str, body: Value) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.session));
        if body.is_null() {
            request
        } else {
            request.json(&body)
        }
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// Opens a new tab and switches to it.
    pub async fn new_tab(&self) {
        let tab = self
            .call(reqwest::Method::POST, "/window/new", json!({"type": "tab"}))
            .await;
        let handle = tab["handle"].as_str().expect("a window handle").to_owned();
        self.call(
            reqwest::Method::POST,
            "/window",
            json!({ "handle": handle }),
        )
        .await;
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await;
    }

    async fn element(&self, css: &str) -> String {
        let value = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        value[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {value}"))
            .to_owned()
    }

    /// Types `text` into the field `css`, after clearing it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            json!({}),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page; what it returns.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Waits until the JavaScript expression `condition` is truthy in the page (checked now, on
    /// every change to the page and every frame); its value. Fails the test after the script
    /// timeout.
    pub async fn wait_until(&self, condition: &str) -> Value {
        let script = format!(
            "const done = arguments[arguments.length - 1];
             const check = () => {{ try {{ return ({condition}); }} catch (e) {{ return null; }} }};
             let finished = false;
             const observer = new MutationObserver(() => attempt());
             const attempt = () => {{
               if (finished) return;
               const value = check();
               if (value) {{ finished = true; observer.disconnect(); done(value); }}
               else requestAnimationFrame(attempt);
             }};
             observer.observe(document, {{subtree: true, childList: true, attributes: true, characterData: true}});
             attempt();"
        );
        let request = self
            .request(
                reqwest::Method::POST,
                "/execute/async",
                json!({"script": script, "args": []}),
            )
            .timeout(SCRIPT_TIMEOUT + Duration::from_secs(10));
        send(request, &format!("the page never showed `{condition}`")).await
    }

    /// Saves a PNG of the window at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let value = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().expect("base64 PNG"))
            .expect("valid base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot folder");
        }
        std::fs::write(path, png).expect("screenshot written");
    }

    pub async fn close(self) {
        self.call(reqwest::Method::DELETE, "", Value::Null).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Killing chromedriver alone would orphan Chromium: end the whole process group.
        if let Some(group) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sends a WebDriver command; its `value`. An error fails the test with `what`.
async fn send(request: reqwest::RequestBuilder, what: &str) -> Value {
    let answer: Value = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let value = answer["value"].clone();
    assert!(value.get("error").is_none(), "{what}: {value}");
    value
}

/// The port from chromedriver's "ChromeDriver was started successfully on port N." line.
async fn announced_port(stdout: tokio::process::ChildStdout) -> Result<u16, String> {
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| format!("chromedriver: {e}"))?
    {
        if let Some(rest) = line.split("started successfully on port ").nth(1) {
            let port = rest
                .trim_end_matches('.')
                .trim()
                .parse()
                .map_err(|e| format!("chromedriver port {rest:?}: {e}"))?;
            // Keep reading what it prints, so that it never writes into a closed pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(port);
        }
    }
    Err("chromedriver exited before it was ready".to_owned())
}
