//! Drives one target with Debian's `wrk` for a bounded time and reads back throughput and
//! latency percentiles, which a small Lua `done()` hook prints in a line we parse. Any error
//! wrk counts (connect, read, write, timeout, non-2xx status) fails the run: a proxy that
//! answers 502 quickly must not look fast.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::upstream::MIB;

/// What one wrk run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `GET /small`: a few bytes back.
    SmallGet,
    /// `GET /mib`: 1 MiB back.
    MibDown,
    /// `POST /upload` with a 1 MiB body: a few bytes back.
    MibUp,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::SmallGet, Workload::MibDown, Workload::MibUp];

    pub fn label(self) -> &'static str {
        match self {
            Workload::SmallGet => "small GET",
            Workload::MibDown => "1 MiB down",
            Workload::MibUp => "1 MiB up",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Workload::SmallGet => "/small",
            Workload::MibDown => "/mib",
            Workload::MibUp => "/upload",
        }
    }

    fn script(self) -> String {
        let request = match self {
            Workload::SmallGet | Workload::MibDown => String::new(),
            Workload::MibUp => format!(
                "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {MIB})\n\
                 wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"
            ),
        };
        format!(
            "{request}done = function(summary, latency, requests)\n\
             \x20 local e = summary.errors\n\
             \x20 io.write(string.format(\"BENCH %d %d %d %d %d %d\\n\", summary.requests, \
             summary.duration, e.connect + e.read + e.write + e.status + e.timeout, \
             latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))\n\
             end\n"
        )
    }
}

/// One run's figures. Latencies in microseconds, as wrk measures them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub requests: u64,
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// Runs wrk against `127.0.0.1:port` with `connections` connections for `duration`.
pub fn run(
    dir: &Path,
    port: u16,
    workload: Workload,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let script = dir.join(format!("wrk-{workload:?}.lua"));
    std::fs::write(&script, workload.script())?;
    // One wrk thread per connection up to the cores: wrk shares the machine with the targets.
    let threads = connections.min(2);
    let output = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(["--timeout", "10s", "-s"])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}{}", workload.path()))
        .output()
        .context("run wrk (scripts/bench installs Debian's wrk when it is missing)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("BENCH "))
        .with_context(|| format!("wrk printed no figures: {stdout}"))?;
    let numbers: Vec<f64> = line
        .split_whitespace()
        .map(|n| n.parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("wrk's figures are not numbers: {line}"))?;
    let [requests, micros, errors, p50, p99, p999] = numbers[..] else {
        bail!("wrk printed {} figures, not 6: {line}", numbers.len());
    };
    if errors > 0.0 {
        bail!(
            "{} of {requests} requests failed on port {port} ({}, {connections} connections): {stdout}",
            errors,
            workload.label()
        );
    }
    if requests < 1.0 {
        bail!("wrk completed no request: {stdout}");
    }
    let seconds = micros / 1e6;
    Ok(Figures {
        requests: requests as u64,
        rps: requests / seconds,
        p50,
        p99,
        p999,
    })
}
