//! Headless Chromium driven through chromedriver (W3C WebDriver via fantoccini), one fresh
//! browser per test with a fresh profile, and the skip policy for machines without a browser.
//!
//! The WebAuthn pieces are chromedriver's implementation of the W3C WebDriver WebAuthn
//! extension (a virtual authenticator per session); fantoccini has no typed calls for them, so
//! they go through [`fantoccini::Client::issue_cmd`] with [`SessionCommand`]. Screenshots at a
//! given width use Chromium's DevTools device-metrics override (through chromedriver's
//! `goog/cdp/execute`), because a window can be narrower than Chromium's minimum window width
//! only that way, and because it lets us capture the whole page height.

use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener as StdTcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// The flags every browser starts with: headless, no sandbox (containers and CI run as root),
/// and nothing that phones home or updates itself during a test.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// How long a test waits for something to appear on a page before it fails.
pub const PAGE_WAIT: Duration = Duration::from_secs(15);

/// At most this many browsers at once, however many test threads there are: each Chromium
/// takes a few hundred MB and a core while it starts.
static BROWSER_SLOTS: Semaphore = Semaphore::const_new(2);

/// The browser binaries this machine has, or why it has none.
#[derive(Debug, Clone)]
pub struct BrowserBinaries {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

/// `STEPGATE_CHROMIUM` / `STEPGATE_CHROMEDRIVER` if set, else Debian's `chromium` and
/// `chromedriver` on the `PATH` (scripts/install-browser installs them).
pub fn find_browser() -> Result<BrowserBinaries, String> {
    Ok(BrowserBinaries {
        chromium: locate("STEPGATE_CHROMIUM", &["chromium", "chromium-browser"])?,
        chromedriver: locate("STEPGATE_CHROMEDRIVER", &["chromedriver"])?,
    })
}

fn locate(variable: &str, names: &[&str]) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(variable).filter(|value| !value.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "{variable}={} is not an executable file",
                path.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("no `{}` on the PATH (and {variable} is not set)", names[0]))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Whether this run is CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Writes straight to the process's stderr. `eprintln!` inside a test is captured by the test
/// harness and shown only for failing tests; a skip must be seen even when everything passes.
pub fn shout(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    let _ = stderr.flush();
}

/// The skip policy: without Chromium and chromedriver, a plain `cargo test` passes but says
/// loudly which browser test it skipped and why; with `CI=true` the test fails instead.
pub fn browser_or_skip(test: &str) -> Option<BrowserBinaries> {
    match find_browser() {
        Ok(binaries) => Some(binaries),
        Err(why) if in_ci() => panic!(
            "CI must run the browser test `{test}`, but {why}. Run scripts/install-browser \
             (it installs Debian's chromium and chromium-driver)."
        ),
        Err(why) => {
            shout(&format!(
                "\n*** SKIPPED browser test `{test}`: {why}.\n\
                 *** Install Debian's chromium and chromium-driver with scripts/install-browser to \
                 run it. With CI=true this is a failure, not a skip.\n"
            ));
            None
        }
    }
}

/// Runs `body` with a fresh headless Chromium (or skips, per [`browser_or_skip`]). The browser
/// is closed and chromedriver stopped whatever the body does, then a panic in the body is
/// re-raised, so a failing test leaves no Chromium behind.
pub async fn with_browser<F, Fut>(test: &'static str, body: F)
where
    F: FnOnce(Browser) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(binaries) = browser_or_skip(test) else {
        return;
    };
    let _slot = BROWSER_SLOTS
        .acquire()
        .await
        .expect("the browser slots are never closed");
    let browser = Browser::launch(&binaries).await;
    let outcome = tokio::spawn(body(browser.clone())).await;
    browser.shut_down().await;
    if let Err(error) = outcome {
        match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("the browser test `{test}` did not finish: {error}"),
        }
    }
}

/// chromedriver, the process we started; killed when the last handle goes.
struct Driver {
    child: Mutex<Option<Child>>,
    log: PathBuf,
}

impl Driver {
    fn stop(&self) {
        let child = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One headless Chromium session. Clones share it.
#[derive(Clone)]
pub struct Browser {
    pub client: Client,
    driver: Arc<Driver>,
    /// The profile directory; removed when the last handle goes.
    _profile: Arc<tempfile::TempDir>,
}

impl Browser {
    async fn launch(binaries: &BrowserBinaries) -> Browser {
        let profile = tempfile::tempdir().expect("create a browser profile directory");
        let log = profile.path().join("chromedriver.log");
        let port = free_port();
        let child = Command::new(&binaries.chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binaries.chromedriver.display()));
        let driver = Arc::new(Driver {
            child: Mutex::new(Some(child)),
            log,
        });
        wait_for_port(port, &driver);

        let profile_dir = profile.path().join("profile");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile_dir.display()));
        args.push("--window-size=1280,900".into());
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": binaries.chromium, "args": args}),
        );
        // Console messages (CSP violations among them) can then be read back per page.
        capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start Chromium: {e}\n{}",
                    driver_log(&driver)
                )
            });
        Browser {
            client,
            driver,
            _profile: Arc::new(profile),
        }
    }

    async fn shut_down(&self) {
        // Ending the session makes chromedriver quit Chromium; then chromedriver itself goes.
        let _ = self.client.clone().close().await;
        self.driver.stop();
    }

    /// A command on this session at `path` (relative to `/session/{id}/`).
    pub async fn command(&self, method: http::Method, path: &str, body: Option<Value>) -> Value {
        let command = SessionCommand {
            method,
            path: path.to_string(),
            body,
        };
        let description = format!("{command:?}");
        self.client
            .issue_cmd(command)
            .await
            .unwrap_or_else(|e| panic!("WebDriver command {description} failed: {e}"))
    }

    /// Adds a virtual platform authenticator (CTAP2, internal, resident keys, user
    /// verification that succeeds) to this tab; returns its id.
    pub async fn add_virtual_authenticator(&self) -> String {
        let id = self
            .command(
                http::Method::POST,
                "webauthn/authenticator",
                Some(json!({
                    "protocol": "ctap2",
                    "transport": "internal",
                    "hasResidentKey": true,
                    "hasUserVerification": true,
                    "isUserVerified": true,
                })),
            )
            .await;
        id.as_str()
            .unwrap_or_else(|| panic!("addVirtualAuthenticator answered {id}"))
            .to_string()
    }

    /// The credentials the virtual authenticator holds.
    pub async fn credentials(&self, authenticator: &str) -> Vec<Value> {
        let answer = self
            .command(
                http::Method::GET,
                &format!("webauthn/authenticator/{authenticator}/credentials"),
                None,
            )
            .await;
        answer.as_array().cloned().unwrap_or_default()
    }

    /// Removes every credential: the next `get()` fails at once.
    pub async fn remove_all_credentials(&self, authenticator: &str) {
        self.command(
            http::Method::DELETE,
            &format!("webauthn/authenticator/{authenticator}/credentials"),
            None,
        )
        .await;
    }

    /// Makes the authenticator report whether the user passed its PIN/biometric check.
    pub async fn set_user_verified(&self, authenticator: &str, verified: bool) {
        self.command(
            http::Method::POST,
            &format!("webauthn/authenticator/{authenticator}/uv"),
            Some(json!({"isUserVerified": verified})),
        )
        .await;
    }

    /// A Chromium DevTools command through chromedriver.
    pub async fn devtools(&self, command: &str, params: Value) -> Value {
        self.command(
            http::Method::POST,
            "goog/cdp/execute",
            Some(json!({"cmd": command, "params": params})),
        )
        .await
    }

    /// Opens `url`. The console log so far is dropped first, so what
    /// [`Browser::severe_console_messages`] reports belongs to the pages from here on.
    pub async fn goto(&self, url: &str) {
        self.severe_console_messages().await;
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    pub async fn script(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// The element, once it is on the page.
    pub async fn find(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => panic!("no `{css}` on {}: {e}", self.url().await),
        }
    }

    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|url| url.to_string())
            .unwrap_or_else(|e| format!("(no URL: {e})"))
    }

    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("cannot click `{css}`: {e}"));
    }

    /// Replaces the text in an input.
    pub async fn fill(&self, css: &str, text: &str) {
        let input = self.find(css).await;
        input
            .clear()
            .await
            .unwrap_or_else(|e| panic!("cannot clear `{css}`: {e}"));
        input
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("cannot type into `{css}`: {e}"));
    }

    /// The visible text of `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css)
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("cannot read `{css}`: {e}"))
    }

    /// Waits until the visible text of `css` satisfies `accept`; returns that text.
    pub async fn wait_for_text(
        &self,
        css: &str,
        what: &str,
        accept: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + PAGE_WAIT;
        let mut last = String::new();
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                if let Ok(text) = element.text().await {
                    if accept(&text) {
                        return text;
                    }
                    last = text;
                }
            }
            if Instant::now() > deadline {
                let page = self
                    .client
                    .source()
                    .await
                    .unwrap_or_else(|e| format!("(no page source: {e})"));
                panic!(
                    "`{css}` on {} never showed {what}; it last said: {last:?}\npage:\n{page}",
                    self.url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Presses a key, as a person at the keyboard would (W3C actions, not a synthetic event).
    pub async fn press(&self, key: fantoccini::key::Key) {
        let code = key.chars().next().expect("a WebDriver key code");
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: code })
            .then(KeyAction::Up { value: code });
        self.client
            .perform_actions(keys)
            .await
            .unwrap_or_else(|e| panic!("cannot press {key:?}: {e}"));
    }

    /// Shift+Tab: focus moves back one step.
    pub async fn press_shift_tab(&self) {
        let shift = fantoccini::key::Key::Shift
            .chars()
            .next()
            .expect("a key code");
        let tab = fantoccini::key::Key::Tab
            .chars()
            .next()
            .expect("a key code");
        let keys = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: shift })
            .then(KeyAction::Down { value: tab })
            .then(KeyAction::Up { value: tab })
            .then(KeyAction::Up { value: shift });
        self.client
            .perform_actions(keys)
            .await
            .unwrap_or_else(|e| panic!("cannot press Shift+Tab: {e}"));
    }

    /// Whether the page has an element matching `css` right now.
    pub async fn exists(&self, css: &str) -> bool {
        self.client.find(Locator::Css(css)).await.is_ok()
    }

    /// The focused element as `{id, tag, classes, name}` where `name` is its accessible
    /// label: `aria-label`, else its `<label>`, else its text.
    pub async fn focused(&self) -> Value {
        self.script(
            "const e = document.activeElement;
             if (!e || e === document.body) return null;
             const label = e.getAttribute('aria-label')
               || (e.labels && e.labels.length ? e.labels[0].textContent : '')
               || e.textContent;
             return {id: e.id, tag: e.tagName.toLowerCase(), classes: e.className,
                     name: (label || '').trim()};",
            vec![],
        )
        .await
    }

    /// Console messages of level SEVERE since the last call (CSP violations, failed loads,
    /// script errors), ignoring the favicon the gate does not serve.
    pub async fn severe_console_messages(&self) -> Vec<String> {
        let entries = self
            .command(
                http::Method::POST,
                "se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .filter_map(|entry| entry["message"].as_str().map(str::to_string))
            .filter(|message| !message.contains("favicon.ico"))
            .collect()
    }

    /// Renders the page at `width` CSS pixels (a phone is 390, a desktop 1280) as the full
    /// page height, and returns the PNG.
    pub async fn screenshot_at(&self, width: u32, mobile: bool) -> Vec<u8> {
        self.emulate_width(width, mobile).await;
        let height = self
            .script(
                "return Math.ceil(Math.max(document.documentElement.scrollHeight, \
                 document.body ? document.body.scrollHeight : 0));",
                vec![],
            )
            .await
            .as_u64()
            .unwrap_or(900)
            .clamp(600, 6000);
        let shot = self
            .devtools(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await;
        let data = shot["data"]
            .as_str()
            .unwrap_or_else(|| panic!("Page.captureScreenshot answered without data: {shot}"));
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("the screenshot is base64")
    }

    /// Makes the viewport `width` CSS pixels wide (at one device pixel per CSS pixel), as a
    /// phone (`mobile`: the viewport meta tag applies) or a desktop.
    pub async fn emulate_width(&self, width: u32, mobile: bool) {
        self.devtools(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": if mobile { 844 } else { 900 },
                   "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }
}

/// A WebDriver command fantoccini has no typed call for, on the current session.
#[derive(Debug)]
pub struct SessionCommand {
    method: http::Method,
    path: String,
    body: Option<Value>,
}

impl WebDriverCompatibleCommand for SessionCommand {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        let session = session_id.unwrap_or("no-session");
        base_url.join(&format!("session/{session}/{}", self.path))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        let body = self.body.as_ref().map(Value::to_string).or_else(|| {
            // WebDriver wants a JSON body on every POST, even an empty one.
            (self.method == http::Method::POST).then(|| "{}".to_string())
        });
        (self.method.clone(), body)
    }
}

/// A port that was free a moment ago. chromedriver cannot be asked for port 0 and report it,
/// so we pick one; the window for a clash is tiny and [`wait_for_port`] would report it.
fn free_port() -> u16 {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("find a free port for chromedriver")
}

fn wait_for_port(port: u16, driver: &Driver) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        let exited = driver
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten());
        if let Some(status) = exited {
            panic!(
                "chromedriver exited ({status}) before it listened\n{}",
                driver_log(driver)
            );
        }
        if Instant::now() > deadline {
            panic!(
                "chromedriver did not listen on port {port} within 20 s\n{}",
                driver_log(driver)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn driver_log(driver: &Driver) -> String {
    let text = std::fs::read_to_string(&driver.log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    format!(
        "chromedriver log ({}), last lines:\n{}",
        driver.log.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// The width and height of a PNG, from its header.
pub fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG"
    );
    let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
    let height = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
    (width, height)
}
