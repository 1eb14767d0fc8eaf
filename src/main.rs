//! The `stepgate` command: parse the command line and hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stepgate::app::Migrations;
use stepgate::clock::process_clock;
use stepgate::config::Config;
use stepgate::server::Server;
use stepgate::store::Store;

#[derive(Parser)]
#[command(
    name = "stepgate",
    version,
    about = "A WebAuthn step-up gate for sensitive account changes, run as a reverse proxy"
)]
struct Cli {
    /// How log lines are written to standard error: `text` for people, `json` (one object a
    /// line, with the request's span fields) for log collectors. Levels: `STEPGATE_LOG`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gate in front of the exchange API described by the config file.
    Serve {
        /// The TOML configuration file (keys can be overridden with STEPGATE_* variables).
        #[arg(long, short)]
        config: PathBuf,
        /// Do not apply database migrations at start-up (run `stepgate migrate` separately).
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply the database migrations for the configured database and exit.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the gate in front of a built-in demo exchange on localhost and print the URL to open.
    Demo {
        /// Port for the gate on 127.0.0.1 (browse it as http://localhost:PORT); 0 picks a free one.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// How long confirmed changes cool off in the demo, e.g. 2m or 30s.
        #[arg(long, default_value = "2m")]
        cooling_off: String,
    },
    /// Check or export the tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Validate a config file (with STEPGATE_* overrides applied), report every problem with
    /// its line and key, and exit (0: valid, 2: problems).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Also print the configuration as the gate reads it (file plus STEPGATE_* overrides,
        /// secrets redacted) and which keys the environment set.
        #[arg(long)]
        print_effective: bool,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Walk the hash chain; report the first altered, removed or reordered row (exit code 2).
    Verify {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write the audit log as JSON lines, oldest first, to standard output.
    Export {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("stepgate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stepgate: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, no_migrate } => {
            let config = Config::load(&config)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let public_url = config.public_url.clone();
            let migrations = if no_migrate {
                Migrations::Skip
            } else {
                Migrations::Apply
            };
            let server = Server::bind_with(config, process_clock(), listener, migrations).await?;
            tracing::info!(listen = %server.local_addr(), %public_url, "stepgate is serving");
            server.run_until(shutdown_signal()).await?;
            Ok(())
        }
        Command::Demo { port, cooling_off } => {
            let cooling_off: Duration =
                stepgate::config::parse_duration(&cooling_off).map_err(anyhow::Error::msg)?;
            stepgate::demo::run(stepgate::demo::DemoOptions { port, cooling_off }).await
        }
        Command::Audit { action } => {
            let config_path = match &action {
                AuditAction::Verify { config } | AuditAction::Export { config } => config,
            };
            let config = Config::load(config_path)?;
            let store =
                Store::connect_with_timeout(&config.database_url, config.limits.database_timeout)
                    .await?;
            let (rows, (head_seq, head_hash)) = store.audit_log().await?;
            match action {
                AuditAction::Verify { .. } => {
                    match stepgate::audit::verify_chain(rows, (head_seq, &head_hash)) {
                        Ok(count) => {
                            println!("audit log intact: {count} rows verified");
                            Ok(())
                        }
                        Err(broken) => {
                            anyhow::bail!("audit log broken at row {}: {}", broken.seq, broken.why)
                        }
                    }
                }
                AuditAction::Export { .. } => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    for row in rows {
                        serde_json::to_writer(&mut out, &row)?;
                        out.write_all(b"\n")?;
                    }
                    Ok(())
                }
            }
        }
        Command::Migrate { config } => {
            let config = Config::load(&config)?;
            let store =
                Store::connect_with_timeout(&config.database_url, config.limits.database_timeout)
                    .await?;
            store.migrate().await?;
            println!("migrations applied to {}", redact_url(&config.database_url));
            Ok(())
        }
        Command::CheckConfig {
            config: path,
            print_effective,
        } => {
            if print_effective {
                let env: Vec<(String, String)> = std::env::vars().collect();
                print!("{}", stepgate::config::effective_report(&path, &env)?);
            }
            let config = Config::load(&path)?;
            println!(
                "{}: OK — listen {}, public_url {}, upstream {}, {} rule(s): {}",
                path.display(),
                config.listen,
                config.public_url,
                config.upstream,
                config.rules.rules().len(),
                config
                    .rules
                    .rules()
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
    }
}

/// Logs go to standard error, so `audit export` and friends keep standard output clean.
/// Nothing logs request headers, so identity, cookie, authorization and signature headers
/// never reach a log line (a test reads the JSON logs to make sure).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEPGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            // The whole span list, not only the innermost span: a library's own span
            // (sqlx's, say) would otherwise hide the request's id.
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
