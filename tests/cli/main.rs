//! The `stepgate` command as a user runs it: the demo starts and its pages answer, and
//! `check-config` accepts a good file and names the key and line of a bad one.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPGATE: &str = env!("CARGO_BIN_EXE_stepgate");

const GOOD: &str = r#"
listen = "127.0.0.1:8080"
public_url = "http://localhost:8080"
upstream = "http://127.0.0.1:9000"
database_url = "sqlite::memory:"

[webauthn]
rp_id = "localhost"
rp_name = "Example Exchange"

[identity]
mode = "header"
header = "x-user-id"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{key_id}"
when = [{ pointer = "/permissions", contains = "withdraw" }]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {key_id}"
"#;

fn check_config(text: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("stepgate.toml");
    std::fs::write(&path, text).expect("write the config");
    let mut command = Command::new(STEPGATE);
    command.arg("check-config").arg("--config").arg(&path);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run stepgate check-config")
}

#[test]
fn check_config_accepts_a_good_file() {
    let output = check_config(GOOD, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains("enable-withdrawals"), "{stdout}");
}

#[test]
fn check_config_names_an_unknown_key_and_its_line() {
    let text = GOOD.replace(
        "rp_name = \"Example Exchange\"",
        "rp_name = \"Example Exchange\"\nrp_nmae = \"typo\"",
    );
    let output = check_config(&text, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("rp_nmae"), "{stderr}");
    assert!(stderr.contains("line 10"), "{stderr}");
}

#[test]
fn check_config_applies_and_checks_environment_overrides() {
    let output = check_config(GOOD, &[("STEPGATE_RULES__0__COOLING_OFF", "soon")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cooling_off"), "{stderr}");
    let output = check_config(GOOD, &[("STEPGATE_UPSTREAM", "http://127.0.0.1:9001")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("127.0.0.1:9001"), "{stdout}");
}

#[test]
fn check_config_lists_every_problem_and_prints_the_effective_config() {
    let text = GOOD
        .replace(
            "rp_name = \"Example Exchange\"",
            "rp_name = \"Example Exchange\"\nrp_nmae = \"typo\"",
        )
        .replace("cooling_off = \"24h\"", "cooling_off = \"one day\"");
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("stepgate.toml");
    std::fs::write(&path, text).expect("write the config");
    let output = Command::new(STEPGATE)
        .args(["check-config", "--print-effective", "--config"])
        .arg(&path)
        .env("STEPGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env(
            "STEPGATE_ADMIN_TOKEN",
            "cli-secret-token-0123456789abcdef01",
        )
        .output()
        .expect("run stepgate check-config --print-effective");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 10: `webauthn.rp_nmae`: unknown key"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`rules.0`: rule `enable-withdrawals`: cooling_off"),
        "{stderr}"
    );
    assert!(stderr.contains("(2 problems)"), "{stderr}");
    assert!(stdout.contains("admin_token = \"<redacted>\""), "{stdout}");
    assert!(!stdout.contains("cli-secret-token"), "{stdout}");
    assert!(
        stdout.contains("STEPGATE_ADMIN_LISTEN -> admin_listen"),
        "{stdout}"
    );
}

#[test]
fn help_explains_each_command() {
    let output = Command::new(STEPGATE)
        .arg("--help")
        .output()
        .expect("run --help");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for command in ["serve", "demo", "check-config", "migrate"] {
        assert!(stdout.contains(command), "--help lacks {command}: {stdout}");
    }
}

/// Kills the demo when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_demo_starts_and_its_pages_answer() {
    let mut child = Command::new(STEPGATE)
        .args(["demo", "--port", "0"])
        .env("STEPGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start stepgate demo");
    let stdout = child.stdout.take().expect("demo stdout");
    let mut demo = Running(child);

    // The demo prints the URL to open; read lines until it appears.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = loop {
        let line = receiver
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!(
                    "the demo printed no URL; exit status {:?}",
                    demo.0.try_wait()
                )
            });
        if let Some(start) = line.find("http://localhost:") {
            let rest = &line[start..];
            let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
            break rest[..end].trim_end_matches(['/', '.']).to_string();
        }
    };

    let client = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .expect("client");
    // Browsers reach it as localhost; the test connects to the same port on 127.0.0.1.
    let base = url.replace("localhost", "127.0.0.1");
    let login = client.get(format!("{base}/")).send().await.expect("GET /");
    assert_eq!(login.status(), 200);
    assert!(login
        .text()
        .await
        .expect("body")
        .to_lowercase()
        .contains("name"));

    let logged_in = client
        .post(format!("{base}/login"))
        .form(&[("name", "alice")])
        .send()
        .await
        .expect("log in");
    assert!(logged_in.status().is_success(), "{}", logged_in.status());

    let passkeys = client
        .get(format!("{base}/_stepgate/passkeys"))
        .header("accept", "text/html")
        .send()
        .await
        .expect("passkeys page");
    assert_eq!(passkeys.status(), 200);
    let page = passkeys.text().await.expect("body");
    assert!(page.contains("Your passkeys"), "{page}");
    assert!(page.contains("alice"), "{page}");

    let changes = client
        .get(format!("{base}/_stepgate/changes"))
        .send()
        .await
        .expect("changes page");
    assert_eq!(changes.status(), 200);
    let script = client
        .get(format!("{base}/_stepgate/static/stepgate.js"))
        .send()
        .await
        .expect("script");
    assert_eq!(script.status(), 200);
    assert!(
        demo.0.try_wait().expect("poll the demo").is_none(),
        "the demo exited"
    );
}
