//! `stepgate demo`: the real gate in front of a small pretend exchange, both on localhost, so
//! a newcomer can walk through the whole story in a browser: log in, register a passkey, try
//! to give an API key the withdraw permission, confirm it with the passkey, wait out the
//! cooling-off, finish. The demo uses only product features: the gate is configured from
//! ordinary config text and started through [`Server`], exactly as `stepgate run` would.

pub mod exchange;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::server::Server;

/// What `stepgate demo` can be told.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The gate's port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// How long a confirmed change waits before it can be finished.
    pub cooling_off: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            port: 8080,
            // Long enough to feel the point of it, short enough to sit through.
            cooling_off: Duration::from_secs(120),
        }
    }
}

/// A started demo. Dropping it stops both servers.
pub struct RunningDemo {
    /// Where the browser goes: `http://localhost:PORT` (WebAuthn refuses 127.0.0.1).
    pub gate_url: String,
    /// Where the gate listens.
    pub gate_addr: SocketAddr,
    /// Where the pretend exchange listens; only the gate talks to it.
    pub exchange_addr: SocketAddr,
    /// Used by the walkthrough text.
    pub cooling_off: Duration,
    gate_task: JoinHandle<std::io::Result<()>>,
    exchange_task: JoinHandle<std::io::Result<()>>,
}

/// Starts the demo exchange and the gate; returns once both are listening.
pub async fn start(options: DemoOptions) -> anyhow::Result<RunningDemo> {
    start_with_clock(options, Arc::new(SystemClock)).await
}

/// [`start`] with the time source as a parameter, so tests can move through a cooling-off
/// instead of sleeping through it.
async fn start_with_clock(
    options: DemoOptions,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<RunningDemo> {
    let exchange_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .context("cannot open a local port for the demo exchange")?;
    let exchange_addr = exchange_listener.local_addr()?;

    let gate_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, options.port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on 127.0.0.1:{} (is something else using that port? \
                 choose another port, or 0 for any free one)",
                options.port
            )
        })?;
    let gate_addr = gate_listener.local_addr()?;

    // A fresh secret per run: sessions from an earlier demo never carry over, and nothing
    // from the user's environment or files is read, so the demo behaves the same everywhere.
    let secret = random_secret();
    let config_text = demo_config(gate_addr, exchange_addr, &secret, options.cooling_off);
    let config = Config::from_toml_str(&config_text, "stepgate demo configuration", &[])
        .context("the built-in demo configuration was refused")?;

    let exchange_app = exchange::router(&secret, clock.clone());
    let exchange_task =
        tokio::spawn(async move { axum::serve(exchange_listener, exchange_app).await });

    let server = match Server::bind(config, clock, gate_listener).await {
        Ok(server) => server,
        Err(error) => {
            exchange_task.abort();
            return Err(error.context("cannot start the gate for the demo"));
        }
    };
    let gate_addr = server.local_addr();
    let gate_task = tokio::spawn(server.run());

    Ok(RunningDemo {
        gate_url: format!("http://localhost:{}", gate_addr.port()),
        gate_addr,
        exchange_addr,
        cooling_off: options.cooling_off,
        gate_task,
        exchange_task,
    })
}

impl RunningDemo {
    /// Waits until Ctrl-C, then returns (and the servers stop). Returns an error at once if
    /// either server stops by itself.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        tokio::select! {
            signal = tokio::signal::ctrl_c() => signal.context("cannot listen for Ctrl-C"),
            ended = &mut self.gate_task => Err(stopped("the gate", ended)),
            ended = &mut self.exchange_task => Err(stopped("the demo exchange", ended)),
        }
        // Dropping `self` here aborts whatever is still running.
    }

    /// The numbered steps `stepgate demo` prints.
    pub fn walkthrough(&self) -> String {
        let url = &self.gate_url;
        let wait = describe_duration(self.cooling_off);
        format!(
            "stepgate demo is running. Open {url}/ in your browser.\n\
             \n  \
             1. Log in with any name (this is a pretend exchange: no password).\n  \
             2. Open \"Your passkeys\" ({url}/_stepgate/passkeys) and register a passkey.\n  \
             3. Back on the API keys page, tick \"withdraw\" on a key and press Save:\n     \
                stepgate holds the change instead of passing it to the exchange.\n  \
             4. Follow the link to the gate's page and confirm the change with your passkey.\n  \
             5. Wait out the cooling-off ({wait}). Meanwhile \"Pending changes\"\n     \
                ({url}/_stepgate/changes) shows the change and lets you cancel it.\n  \
             6. Press \"Finish the change\": the exchange applies it, exactly once.\n\
             \n\
             The gate listens on {gate} and forwards to the demo exchange on {exchange}.\n\
             Everything is kept in memory. Press Ctrl-C to stop.\n",
            gate = self.gate_addr,
            exchange = self.exchange_addr,
        )
    }
}

impl Drop for RunningDemo {
    fn drop(&mut self) {
        self.gate_task.abort();
        self.exchange_task.abort();
    }
}

/// What `stepgate demo` calls: start, print the walkthrough, wait.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let demo = start(options).await?;
    println!("{}", demo.walkthrough());
    demo.wait().await?;
    println!("stepgate demo stopped.");
    Ok(())
}

fn stopped(
    what: &str,
    ended: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> anyhow::Error {
    match ended {
        Ok(Ok(())) => anyhow::anyhow!("{what} stopped unexpectedly"),
        Ok(Err(error)) => anyhow::Error::new(error).context(format!("{what} stopped")),
        Err(error) => anyhow::Error::new(error).context(format!("{what} crashed")),
    }
}

/// 64 alphanumeric characters: well above the 32 the config asks of an HS256 secret, and
/// nothing that would need escaping in TOML.
fn random_secret() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(64)
        .map(char::from)
        .collect()
}

/// A humantime duration the config parser reads back exactly.
fn config_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis().max(1))
    }
}

fn describe_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    if seconds >= 60 && seconds.is_multiple_of(60) {
        plural(seconds / 60, "minute")
    } else if seconds == 0 {
        format!("{} ms", duration.as_millis())
    } else {
        plural(seconds, "second")
    }
}

/// The gate's configuration for the demo, as a user would write it: the exchange's session
/// JWT identifies the user, and one rule holds any API-key update that grants `withdraw`.
fn demo_config(
    gate: SocketAddr,
    exchange: SocketAddr,
    secret: &str,
    cooling_off: Duration,
) -> String {
    let gate_port = gate.port();
    let cooling_off = config_duration(cooling_off);
    let cookie = exchange::SESSION_COOKIE;
    format!(
        r#"listen = "{gate}"
# Browsers allow WebAuthn on http://localhost but not on http://127.0.0.1.
public_url = "http://localhost:{gate_port}"
upstream = "http://{exchange}"
database_url = "sqlite::memory:"

[webauthn]
rp_id = "localhost"
rp_name = "Demo Exchange"

[identity]
mode = "jwt"
algorithm = "HS256"
secret = "{secret}"
cookie = "{cookie}"
claim = "sub"

# The demo shortens every wait to the same cooling-off, so the walkthrough takes minutes:
# a passkey registered during the demo is in quarantine for that long, and a second one
# waits that long after its confirmation.
[passkeys]
quarantine = "{cooling_off}"
add_cooling_off = "{cooling_off}"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "{cooling_off}"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn the_demo_configuration_is_accepted_by_the_real_parser() {
        let secret = random_secret();
        assert_eq!(secret.len(), 64);
        assert!(secret.bytes().all(|b| b.is_ascii_alphanumeric()));
        let text = demo_config(addr(8080), addr(4321), &secret, Duration::from_secs(120));
        let config = Config::from_toml_str(&text, "test", &[]).unwrap();
        assert_eq!(config.public_url.as_str(), "http://localhost:8080/");
        assert_eq!(config.upstream.as_str(), "http://127.0.0.1:4321/");
        assert_eq!(config.webauthn.rp_id, "localhost");
    }

    #[test]
    fn durations_are_written_so_they_read_back_exactly() {
        for duration in [
            Duration::from_secs(120),
            Duration::from_secs(1),
            Duration::from_millis(1500),
        ] {
            let text = config_duration(duration);
            assert_eq!(
                crate::config::parse_duration(&text).unwrap(),
                duration,
                "{text}"
            );
        }
        assert_eq!(describe_duration(Duration::from_secs(120)), "2 minutes");
        assert_eq!(describe_duration(Duration::from_secs(60)), "1 minute");
        assert_eq!(describe_duration(Duration::from_secs(90)), "90 seconds");
    }

    #[tokio::test]
    async fn the_gate_serves_the_exchange_and_holds_enabling_withdrawals() {
        let demo = start(DemoOptions {
            port: 0,
            cooling_off: Duration::from_secs(120),
        })
        .await
        .unwrap();
        assert_eq!(
            demo.gate_url,
            format!("http://localhost:{}", demo.gate_addr.port())
        );
        assert!(demo
            .walkthrough()
            .contains(&format!("Open {}/", demo.gate_url)));

        // Talk to 127.0.0.1 directly: the gate only listens there, and "localhost" may
        // resolve to ::1 first on the test machine.
        let base = format!("http://{}", demo.gate_addr);
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap();

        let login_page = client.get(format!("{base}/")).send().await.unwrap();
        assert_eq!(login_page.status(), 200);
        assert!(login_page.text().await.unwrap().contains("Your name"));

        let keys_page = client
            .post(format!("{base}/login"))
            .form(&[("name", "demo-user")])
            .send()
            .await
            .unwrap();
        assert_eq!(keys_page.status(), 200);
        assert!(keys_page.text().await.unwrap().contains("trading-bot"));

        let keys: serde_json::Value = client
            .get(format!("{base}/api/v1/api-keys"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key_id = keys["keys"][0]["id"].as_str().unwrap().to_string();

        // Tightening passes straight through.
        let tightened = client
            .put(format!("{base}/api/v1/api-keys/{key_id}"))
            .header("content-type", "application/json")
            .body(r#"{"permissions":["read"]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(tightened.status(), 200);

        // Granting withdraw is held by the gate and never reaches the exchange.
        let held = client
            .put(format!("{base}/api/v1/api-keys/{key_id}"))
            .header("content-type", "application/json")
            .body(r#"{"permissions":["read","withdraw"]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(held.status(), 403);
        let answer: serde_json::Value = held.json().await.unwrap();
        assert_eq!(answer["error"], "step_up_required");
        assert!(answer["summary"].as_str().unwrap().contains(&key_id));

        let keys: serde_json::Value = client
            .get(format!("{base}/api/v1/api-keys"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(keys["keys"][0]["permissions"], serde_json::json!(["read"]));
    }

    /// The walkthrough the demo prints, done by a program: log in at the exchange, register a
    /// soft passkey at the gate, get the change held, confirm it, wait out the cooling-off on
    /// a manual clock, finish. Proves the exchange and the gate agree on sessions, and that the
    /// release reaches the exchange with the user's cookie, once.
    #[tokio::test]
    async fn the_whole_walkthrough_works_end_to_end() {
        use crate::clock::ManualClock;
        use serde_json::{json, Value};
        use webauthn_authenticator_rs::softpasskey::SoftPasskey;
        use webauthn_authenticator_rs::WebauthnAuthenticator;
        use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

        let clock = ManualClock::starting_now();
        let cooling_off = Duration::from_secs(120);
        let demo = start_with_clock(
            DemoOptions {
                port: 0,
                cooling_off,
            },
            Arc::new(clock.clone()),
        )
        .await
        .unwrap();
        let base = format!("http://{}", demo.gate_addr);
        let origin = Url::parse(&demo.gate_url).unwrap();
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .build()
            .unwrap();
        let mut passkey = SoftPasskey::new(true);

        // 1. Log in at the exchange (through the gate).
        let login = client
            .post(format!("{base}/login"))
            .form(&[("name", "walker")])
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), 200);

        // 2. Register a passkey at the gate, which knows the user from the exchange's cookie.
        let options: Value = client
            .post(format!("{base}/_stepgate/api/passkeys/register/start"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let creation: CreationChallengeResponse = serde_json::from_value(options.clone()).unwrap();
        let credential = passkey.do_registration(origin.clone(), creation).unwrap();
        let registered = client
            .post(format!("{base}/_stepgate/api/passkeys/register/finish"))
            .json(&json!({
                "ceremony_id": options["ceremony_id"],
                "credential": credential,
                "name": "Demo key",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(registered.status(), 200);

        // 3. Tick withdraw and save: held.
        let keys: Value = client
            .get(format!("{base}/api/v1/api-keys"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let key_id = keys["keys"][0]["id"].as_str().unwrap().to_string();
        let url = format!("{base}/api/v1/api-keys/{key_id}");
        let body = r#"{"permissions":["read","trade","withdraw"]}"#;
        let put = |change: Option<&str>| {
            let mut request = client
                .put(&url)
                .header("content-type", "application/json")
                .body(body);
            if let Some(change) = change {
                request = request.header("stepgate-change", change);
            }
            request.send()
        };
        let held: Value = put(None).await.unwrap().json().await.unwrap();
        assert_eq!(held["error"], "step_up_required", "{held}");
        assert_eq!(
            held["summary"],
            format!("Enable withdrawals on API key {key_id}")
        );
        assert_eq!(held["cooling_off_seconds"], 120);
        let change_id = held["change_id"].as_str().unwrap().to_string();

        // Finishing before confirming is refused.
        let early = put(Some(&change_id)).await.unwrap();
        assert_eq!(early.status(), 403);
        let early: Value = early.json().await.unwrap();
        assert_eq!(early["error"], "not_confirmed");

        // 4. Confirm with the passkey.
        let options: Value = client
            .post(format!(
                "{base}/_stepgate/api/changes/{change_id}/confirm/start"
            ))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let request: RequestChallengeResponse = serde_json::from_value(options.clone()).unwrap();
        let assertion = passkey.do_authentication(origin, request).unwrap();
        let confirmed: Value = client
            .post(format!(
                "{base}/_stepgate/api/changes/{change_id}/confirm/finish"
            ))
            .json(&json!({"ceremony_id": options["ceremony_id"], "credential": assertion}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(confirmed["state"], "cooling_off", "{confirmed}");

        // 5. Still cooling off.
        let cooling = put(Some(&change_id)).await.unwrap();
        assert_eq!(cooling.status(), 403);
        assert!(cooling.headers().contains_key("retry-after"));
        let cooling: Value = cooling.json().await.unwrap();
        assert_eq!(cooling["error"], "cooling_off");
        assert!(cooling["release_at"].is_string());

        // 6. After the cooling-off, "Finish the change" goes through, once.
        clock.advance(cooling_off);
        let finished = put(Some(&change_id)).await.unwrap();
        assert_eq!(finished.status(), 200);
        let key: Value = finished.json().await.unwrap();
        assert_eq!(key["permissions"], json!(["read", "trade", "withdraw"]));
        let again = put(Some(&change_id)).await.unwrap();
        assert_eq!(again.status(), 409);

        let keys: Value = client
            .get(format!("{base}/api/v1/api-keys"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            keys["keys"][0]["permissions"],
            json!(["read", "trade", "withdraw"])
        );
    }

    #[tokio::test]
    async fn a_busy_port_is_reported_plainly() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = taken.local_addr().unwrap().port();
        let error = start(DemoOptions {
            port,
            ..DemoOptions::default()
        })
        .await
        .err()
        .unwrap();
        assert!(format!("{error:#}").contains(&format!("127.0.0.1:{port}")));
    }
}
