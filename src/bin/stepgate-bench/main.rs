//! `stepgate-bench`: puts the gate beside nginx in front of one upstream on loopback, drives
//! all three (and the upstream directly) with wrk, measures the protected path on SQLite and
//! PostgreSQL, and prints one table with the budgets marked met or missed. `scripts/bench`
//! installs nginx and wrk when missing, builds, and runs this; BENCHMARKS.md explains the
//! figures. Budgets are printed, never asserted: only a figure that could not be produced
//! (or is not a positive number) fails the run.

mod procs;
mod protected;
mod upstream;
mod wrk;

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use procs::{Process, ScratchDir};
use protected::{Backend, Plan, ProtectedFigures};
use wrk::{Figures, Workload};

#[derive(Parser)]
#[command(
    name = "stepgate-bench",
    about = "stepgate beside nginx on one upstream: throughput, latency, resources, budgets"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A seconds-long run that proves every figure can be produced (the numbers mean little).
    #[arg(long)]
    smoke: bool,
    /// Seconds per wrk measurement (3 rounds, default 3 s) and per protected-path phase
    /// (default 5 s); smoke: 1 round of 1 s.
    #[arg(long)]
    seconds: Option<u64>,
    /// The gate binary to measure (default: `stepgate` next to this binary).
    #[arg(long)]
    stepgate: Option<PathBuf>,
    /// A PostgreSQL database the bench may connect to in order to create and drop its own.
    #[arg(
        long,
        env = "STEPGATE_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Run one part only, for profiling a fix (the table then lacks the other part).
    #[arg(long, value_enum)]
    only: Option<Part>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Passthrough,
    Protected,
}

#[derive(Subcommand)]
enum Command {
    /// (internal) The benchmark's upstream: prints its port, serves until killed.
    Upstream,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Upstream) => upstream::run(),
        None => run(&cli),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stepgate-bench: FAILED: {error:#}");
            ExitCode::FAILURE
        }
    }
}

const TARGETS: [&str; 3] = ["direct", "nginx", "stepgate"];
const CONNECTIONS: [u32; 2] = [1, 64];
const IDLE_CONNECTIONS: usize = 1000;

/// Everything one run measured.
#[derive(Default)]
struct Results {
    /// (workload, connections, target) → figures.
    passthrough: Vec<(Workload, u32, &'static str, Figures)>,
    /// Per proxy (nginx, stepgate).
    resources: Vec<(&'static str, Resources)>,
    startup: Vec<Duration>,
    protected: Vec<(Backend, ProtectedFigures)>,
}

#[derive(Default, Clone, Copy)]
struct Resources {
    idle_rss: u64,
    idle_conns_rss: u64,
    /// Peak during the 64-connection runs, per workload.
    load_rss: [u64; 3],
    /// CPU seconds per request during the 64-connection small GET runs, and what it is from.
    cpu_per_request: f64,
    cpu_seconds: f64,
    cpu_requests: u64,
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let seconds = cli.seconds.unwrap_or(if cli.smoke { 1 } else { 3 });
    let phase = Duration::from_secs(seconds);
    let stepgate = match &cli.stepgate {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .join("stepgate"),
    };
    if !stepgate.is_file() {
        bail!(
            "no gate binary at {} (build it: cargo build --release --bin stepgate)",
            stepgate.display()
        );
    }
    for tool in ["wrk", "nginx"] {
        if procs::which(tool).is_none() {
            bail!("{tool} is not installed: run scripts/bench, which installs it with apt-get");
        }
    }
    let started = Instant::now();
    let dir = ScratchDir::new()?;
    let (_upstream, upstream_port) = procs::start_upstream()?;
    let mut results = Results::default();
    if cli.only != Some(Part::Protected) {
        passthrough(
            &mut results,
            &stepgate,
            &dir,
            upstream_port,
            phase,
            cli.smoke,
        )?;
    }
    if cli.only != Some(Part::Passthrough) {
        let plan = Plan {
            users: if cli.smoke { 4 } else { 16 },
            phase: Duration::from_secs(cli.seconds.unwrap_or(if cli.smoke { 1 } else { 5 })),
        };
        protected_path(&mut results, &dir, &cli.postgres_url, upstream_port, plan)?;
    }
    let report = report(cli, seconds, &results, started.elapsed());
    println!("{report}");
    check_every_figure(&results, cli.only)
}

/// Start-up, memory and the wrk runs against direct / nginx / stepgate.
fn passthrough(
    results: &mut Results,
    stepgate: &std::path::Path,
    dir: &ScratchDir,
    upstream_port: u16,
    phase: Duration,
    smoke: bool,
) -> anyhow::Result<()> {
    let rounds_per_figure = if smoke { 1 } else { 3 };
    let stepgate = stepgate.to_path_buf();
    // Start-up: spawn to first answered request, on a fresh SQLite database each time (so
    // migrations are included).
    let starts = if smoke { 1 } else { 5 };
    for n in 0..starts {
        let t = Instant::now();
        let (mut gate, port) =
            procs::spawn_gate(&stepgate, &dir.0, &format!("start{n}"), upstream_port)?;
        results
            .startup
            .push(procs::wait_until_answering(&mut gate, port, t)?);
    }

    let (mut gate, gate_port) = procs::spawn_gate(&stepgate, &dir.0, "load", upstream_port)?;
    procs::wait_until_answering(&mut gate, gate_port, Instant::now())?;
    let (mut nginx, nginx_port) = procs::spawn_nginx(&dir.0, upstream_port)?;
    procs::wait_until_answering(&mut nginx, nginx_port, Instant::now())?;
    // Let both settle (lazy allocations, the gate's first sweep) before the idle reading.
    std::thread::sleep(Duration::from_millis(500));
    for (name, process, port) in [
        ("nginx", &mut nginx, nginx_port),
        ("stepgate", &mut gate, gate_port),
    ] {
        let pids = procs::process_tree(process.pid());
        let idle_rss = procs::rss_bytes(&pids);
        let idle_conns_rss = with_idle_connections(port, || procs::rss_bytes(&pids))?;
        process.ensure_running()?;
        results.resources.push((
            name,
            Resources {
                idle_rss,
                idle_conns_rss,
                ..Resources::default()
            },
        ));
    }

    // Rounds interleave the targets, so a burst of other work on the machine hits all three
    // alike; each target's figures are from its median-throughput round.
    for (w, workload) in Workload::ALL.into_iter().enumerate() {
        for connections in CONNECTIONS {
            let mut rounds: Vec<(&'static str, Figures)> = Vec::new();
            for _ in 0..rounds_per_figure {
                for target in TARGETS {
                    let (port, process): (u16, Option<&mut Process>) = match target {
                        "direct" => (upstream_port, None),
                        "nginx" => (nginx_port, Some(&mut nginx)),
                        _ => (gate_port, Some(&mut gate)),
                    };
                    let pids = process
                        .as_ref()
                        .map(|p| procs::process_tree(p.pid()))
                        .unwrap_or_default();
                    let cpu_before = procs::cpu_seconds(&pids);
                    let (figures, peak_rss) = sample_rss_while(&pids, || {
                        wrk::run(&dir.0, port, workload, connections, phase)
                    })?;
                    let cpu = procs::cpu_seconds(&pids) - cpu_before;
                    if let Some(process) = process {
                        process.ensure_running()?;
                        if connections == 64 {
                            let resources = results
                                .resources
                                .iter_mut()
                                .find(|(name, _)| *name == target)
                                .map(|(_, r)| r)
                                .context("resources of a proxy")?;
                            resources.load_rss[w] = resources.load_rss[w].max(peak_rss);
                            if workload == Workload::SmallGet {
                                resources.cpu_seconds += cpu;
                                resources.cpu_requests += figures.requests;
                            }
                        }
                    }
                    eprintln!(
                        "  {:<10} c={connections:<2} {target:<8} {:>9.0} req/s  p50 {:>7.0} µs",
                        workload.label(),
                        figures.rps,
                        figures.p50
                    );
                    rounds.push((target, figures));
                }
            }
            for target in TARGETS {
                let mut mine: Vec<Figures> = rounds
                    .iter()
                    .filter(|(t, _)| *t == target)
                    .map(|(_, f)| *f)
                    .collect();
                mine.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                let median = mine.get(mine.len() / 2).copied().unwrap_or_default();
                results
                    .passthrough
                    .push((workload, connections, target, median));
            }
        }
    }
    for (_, resources) in &mut results.resources {
        resources.cpu_per_request = resources.cpu_seconds / resources.cpu_requests.max(1) as f64;
    }
    drop(nginx);
    drop(gate);
    Ok(())
}

/// Holds, confirmations and releases on each database.
fn protected_path(
    results: &mut Results,
    dir: &ScratchDir,
    postgres_url: &str,
    upstream_port: u16,
    plan: Plan,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let figures = runtime
            .block_on(protected::run(
                backend,
                &dir.0,
                postgres_url,
                upstream_port,
                plan,
            ))
            .with_context(|| format!("protected path on {}", backend.label()))?;
        eprintln!(
            "  {:<10} holds {:.0}/s confirms {:.0}/s releases {:.0}/s",
            backend.label(),
            figures.holds.per_second,
            figures.confirms.per_second,
            figures.releases.per_second
        );
        results.protected.push((backend, figures));
    }
    Ok(())
}

/// Opens `IDLE_CONNECTIONS` keep-alive connections to `port`, each having completed one
/// request, and calls `measure` while they are all open and idle.
fn with_idle_connections<T>(port: u16, measure: impl FnOnce() -> T) -> anyhow::Result<T> {
    let mut streams = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        let status = procs::get(&mut stream, "/small")?;
        if status != 200 {
            bail!("an idle connection's first request was answered {status}");
        }
        streams.push(stream);
    }
    std::thread::sleep(Duration::from_millis(200));
    let value = measure();
    drop(streams);
    Ok(value)
}

/// Runs `work` while sampling the processes' resident memory; returns its value and the peak.
fn sample_rss_while<T>(
    pids: &[u32],
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64)> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(procs::rss_bytes(pids));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        let value = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.join().unwrap_or(0);
        Ok((value?, peak))
    })
}

fn figures_of(results: &Results, workload: Workload, connections: u32, target: &str) -> Figures {
    results
        .passthrough
        .iter()
        .find(|(w, c, t, _)| *w == workload && *c == connections && *t == target)
        .map(|(_, _, _, f)| *f)
        .unwrap_or_default()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn mark(met: bool) -> &'static str {
    if met {
        "met   "
    } else {
        "MISSED"
    }
}

fn report(cli: &Cli, seconds: u64, results: &Results, took: Duration) -> String {
    let mut out = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        out,
        "stepgate-bench{}: wrk {seconds} s per run, {} interleaved round(s) per figure (median), {cpus} CPUs, wrk -t<min(conns,2)>, nginx workers = auto ({cpus}), whole run {:.0} s",
        if cli.smoke { " --smoke (figures not meaningful)" } else { "" },
        if cli.smoke { 1 } else { 3 },
        took.as_secs_f64()
    );
    if cfg!(debug_assertions) {
        let _ = writeln!(
            out,
            "DEBUG BUILD: figures are not representative; use scripts/bench"
        );
    }
    let _ = writeln!(
        out,
        "\nPass-through (latency in µs as wrk measures it; added = target p50 - direct p50)"
    );
    let _ = writeln!(
        out,
        "{:<11} {:>5}  {:<16} {:>10} {:>8} {:>8} {:>8} {:>9}",
        "workload", "conns", "target", "req/s", "p50", "p99", "p99.9", "added p50"
    );
    for workload in Workload::ALL {
        for connections in CONNECTIONS {
            let direct = figures_of(results, workload, connections, "direct");
            for target in TARGETS {
                let f = figures_of(results, workload, connections, target);
                let added = if target == "direct" {
                    String::new()
                } else {
                    format!("{:.0}", f.p50 - direct.p50)
                };
                let _ = writeln!(
                    out,
                    "{:<11} {:>5}  {:<16} {:>10.0} {:>8.0} {:>8.0} {:>8.0} {:>9}",
                    workload.label(),
                    connections,
                    target,
                    f.rps,
                    f.p50,
                    f.p99,
                    f.p999,
                    added
                );
            }
            let n = figures_of(results, workload, connections, "nginx");
            let s = figures_of(results, workload, connections, "stepgate");
            let added_ratio = (s.p50 - direct.p50) / (n.p50 - direct.p50);
            let _ = writeln!(
                out,
                "{:<11} {:>5}  {:<16} {:>10.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2}",
                workload.label(),
                connections,
                "stepgate/nginx",
                s.rps / n.rps,
                s.p50 / n.p50,
                s.p99 / n.p99,
                s.p999 / n.p999,
                added_ratio
            );
        }
    }

    let _ = writeln!(
        out,
        "\nProtected path (in-process gate, testkit software passkeys, client cost included)"
    );
    let _ = writeln!(
        out,
        "{:<11} {:<9} {:>8} {:>8} {:>9} {:>9}  durability",
        "database", "operation", "count", "per s", "p50 ms", "p99 ms"
    );
    for (backend, figures) in &results.protected {
        for (name, op) in [
            ("holds", figures.holds),
            ("confirms", figures.confirms),
            ("releases", figures.releases),
        ] {
            let _ = writeln!(
                out,
                "{:<11} {:<9} {:>8} {:>8.0} {:>9.2} {:>9.2}  {}",
                backend.label(),
                name,
                op.count,
                op.per_second,
                op.p50_ms,
                op.p99_ms,
                if name == "holds" {
                    figures.durability.as_str()
                } else {
                    ""
                }
            );
        }
    }

    let _ = writeln!(
        out,
        "\nResources (resident memory in MiB; CPU time per request at 64 connections, small GET)"
    );
    let _ = writeln!(
        out,
        "{:<9} {:>8} {:>14} {:>11} {:>11} {:>11} {:>12}",
        "process", "idle", "1000 idle ka", "c64 small", "c64 1M down", "c64 1M up", "CPU µs/req"
    );
    for (name, r) in &results.resources {
        let _ = writeln!(
            out,
            "{:<9} {:>8.1} {:>14.1} {:>11.1} {:>11.1} {:>11.1} {:>12.1}",
            name,
            mib(r.idle_rss),
            mib(r.idle_conns_rss),
            mib(r.load_rss[0]),
            mib(r.load_rss[1]),
            mib(r.load_rss[2]),
            r.cpu_per_request * 1e6
        );
    }
    let startup = median(&results.startup);
    let _ = writeln!(
        out,
        "stepgate start-up to first answered request (fresh SQLite, migrations included): median {:.1} ms of {} (max {:.1} ms)",
        startup.as_secs_f64() * 1000.0,
        results.startup.len(),
        results.startup.iter().max().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );

    let _ = writeln!(
        out,
        "\nBudgets (ratios from this run; printed, never asserted)"
    );
    for workload in Workload::ALL {
        let d = figures_of(results, workload, 64, "direct");
        let n = figures_of(results, workload, 64, "nginx");
        let s = figures_of(results, workload, 64, "stepgate");
        let _ = writeln!(
            out,
            "[{}] c64 {:<10} throughput >= nginx: {:.0} vs {:.0} req/s ({:.2}x)",
            mark(s.rps >= n.rps),
            workload.label(),
            s.rps,
            n.rps,
            s.rps / n.rps
        );
        let _ = writeln!(
            out,
            "[{}] c64 {:<10} added p50 <= nginx's: {:.0} vs {:.0} µs",
            mark(s.p50 - d.p50 <= n.p50 - d.p50),
            workload.label(),
            s.p50 - d.p50,
            n.p50 - d.p50
        );
    }
    let d = figures_of(results, Workload::SmallGet, 1, "direct");
    let s = figures_of(results, Workload::SmallGet, 1, "stepgate");
    let _ = writeln!(
        out,
        "[{}] c1 small GET added p50 <= 60 µs: {:.0} µs",
        mark(s.p50 - d.p50 <= 60.0),
        s.p50 - d.p50
    );
    if let Some((_, sqlite)) = results
        .protected
        .iter()
        .find(|(b, _)| *b == Backend::Sqlite)
    {
        let _ = writeln!(
            out,
            "[{}] holds >= 2000/s on SQLite (durable): {:.0}/s",
            mark(sqlite.holds.per_second >= 2000.0),
            sqlite.holds.per_second
        );
        let _ = writeln!(
            out,
            "[{}] confirmations >= 500/s on SQLite (durable): {:.0}/s",
            mark(sqlite.confirms.per_second >= 500.0),
            sqlite.confirms.per_second
        );
    }
    if let Some((_, r)) = results.resources.iter().find(|(n, _)| *n == "stepgate") {
        let _ = writeln!(
            out,
            "[{}] idle RSS <= 30 MB: {:.1} MB",
            mark(r.idle_rss <= 30_000_000),
            r.idle_rss as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "[{}] start-up <= 200 ms: {:.1} ms",
        mark(startup <= Duration::from_millis(200)),
        startup.as_secs_f64() * 1000.0
    );
    out
}

/// The smoke run's check: every figure exists and is a positive, finite number.
fn check_every_figure(results: &Results, only: Option<Part>) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut check = |what: String, value: f64| {
        if !(value.is_finite() && value > 0.0) {
            missing.push(format!("{what} = {value}"));
        }
    };
    let passthrough = only != Some(Part::Protected);
    for workload in Workload::ALL.into_iter().filter(|_| passthrough) {
        for connections in CONNECTIONS {
            for target in TARGETS {
                let f = figures_of(results, workload, connections, target);
                let name = format!("{} c{connections} {target}", workload.label());
                check(format!("{name} req/s"), f.rps);
                check(format!("{name} p50"), f.p50);
                check(format!("{name} p99"), f.p99);
                check(format!("{name} p99.9"), f.p999);
            }
        }
    }
    for (backend, figures) in &results.protected {
        for (name, op) in [
            ("holds", figures.holds),
            ("confirms", figures.confirms),
            ("releases", figures.releases),
        ] {
            check(format!("{} {name}/s", backend.label()), op.per_second);
            check(format!("{} {name} p50", backend.label()), op.p50_ms);
            check(format!("{} {name} p99", backend.label()), op.p99_ms);
        }
    }
    for (name, r) in &results.resources {
        check(format!("{name} idle RSS"), r.idle_rss as f64);
        check(
            format!("{name} RSS with idle connections"),
            r.idle_conns_rss as f64,
        );
        for (w, workload) in Workload::ALL.into_iter().enumerate() {
            check(
                format!("{name} RSS under c64 {}", workload.label()),
                r.load_rss[w] as f64,
            );
        }
        check(format!("{name} CPU per request"), r.cpu_per_request);
    }
    if passthrough {
        check("start-up".into(), median(&results.startup).as_secs_f64());
        check(
            "nginx and stepgate resources".into(),
            results.resources.len() as f64 - 1.0,
        );
    }
    if only != Some(Part::Passthrough) {
        check(
            "protected-path backends".into(),
            results.protected.len() as f64 - 1.0,
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("figures missing or not positive: {}", missing.join("; "))
    }
}
