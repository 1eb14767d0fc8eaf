//! The processes the pass-through comparison runs and measures: the upstream, the gate's
//! release binary and nginx, each a child with its own temporary files; what `/proc` says
//! about their memory and CPU; and a tiny blocking HTTP/1.1 client for start-up probes and
//! idle keep-alive connections (wrk cannot hold connections open without sending).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process that is killed (by its own pid) when dropped, so a failed run leaves
/// nothing behind.
pub struct Process {
    pub name: &'static str,
    child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has already exited: a target that died must not be measured.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory for one run (configs, databases, nginx's prefix), removed at the end.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("stepgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port (bound then released; nothing else on this machine races for it in
/// the few milliseconds before the target binds it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts this binary's `upstream` subcommand and reads the port it prints.
pub fn start_upstream() -> anyhow::Result<(Process, u16)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("upstream")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the upstream")?;
    let stdout = child.stdout.take().context("upstream stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .parse()
        .context("the upstream did not print its port")?;
    Ok((
        Process {
            name: "upstream",
            child,
        },
        port,
    ))
}

/// Writes the gate's config (SQLite file in `dir`, one withdraw rule, the defaults for
/// everything else) and starts `stepgate serve`. Returns once the process is spawned.
pub fn spawn_gate(
    stepgate: &Path,
    dir: &Path,
    tag: &str,
    upstream_port: u16,
) -> anyhow::Result<(Process, u16)> {
    let port = free_port()?;
    let db = dir.join(format!("gate-{tag}.db"));
    let config = dir.join(format!("gate-{tag}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{port}"
public_url = "http://localhost:{port}"
upstream = "http://127.0.0.1:{upstream_port}"
database_url = "sqlite://{db}"

[webauthn]
rp_id = "localhost"
rp_name = "Bench Exchange"

[identity]
mode = "header"
header = "x-user-id"

[[rules]]
name = "enable-withdrawals"
methods = ["PUT", "PATCH"]
path = "/api/v1/api-keys/{{key_id}}"
when = [{{ pointer = "/permissions", contains = "withdraw" }}]
cooling_off = "24h"
confirm_within = "10m"
summary = "Enable withdrawals on API key {{key_id}}"
"#,
            db = db.display()
        ),
    )?;
    let child = Command::new(stepgate)
        .args(["serve", "--config"])
        .arg(&config)
        // Start-up and shutdown lines only; the gate logs nothing per pass-through request.
        .env("STEPGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", stepgate.display()))?;
    Ok((
        Process {
            name: "stepgate",
            child,
        },
        port,
    ))
}

/// Polls `port` until `GET /small` is answered 200; returns how long that took from `since`.
pub fn wait_until_answering(
    process: &mut Process,
    port: u16,
    since: Instant,
) -> anyhow::Result<Duration> {
    let deadline = since + Duration::from_secs(20);
    loop {
        process.ensure_running()?;
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            if let Ok(200) = get(&mut stream, "/small") {
                return Ok(since.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not answer on port {port} within 20 s", process.name);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Writes nginx's config: a plain reverse proxy to the same upstream, keep-alive to the
/// upstream configured as the gate's pool is (HTTP/1.1, up to 256 idle connections, 90 s idle,
/// TCP_NODELAY), streaming both ways like the gate, no access log (the gate keeps none), and
/// the same X-Forwarded-* headers the gate adds. One worker per core (`auto`), as the gate's
/// tokio runtime uses every core.
pub fn spawn_nginx(dir: &Path, upstream_port: u16) -> anyhow::Result<(Process, u16)> {
    let port = free_port()?;
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = prefix.join("nginx.conf");
    let p = prefix.display();
    std::fs::write(
        &conf,
        format!(
            r#"worker_processes auto;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    tcp_nodelay on;
    keepalive_timeout 90s;
    keepalive_requests 1000000;
    client_max_body_size 0;
    upstream exchange {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_timeout 90s;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://exchange;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $proxy_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
        ),
    )?;
    let nginx = which("nginx").context(
        "nginx is not installed: run scripts/bench, which installs Debian's nginx-light",
    )?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("logs/error.log"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start nginx")?;
    Ok((
        Process {
            name: "nginx",
            child,
        },
        port,
    ))
}

/// The full path of a program on the PATH (plus the sbin directories, where Debian puts nginx).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// `pid` and its direct children (nginx's workers; the gate has none).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if stat_fields(child)
                .is_some_and(|f| f.get(1).map(String::as_str) == Some(&pid.to_string()))
            {
                pids.push(child);
            }
        }
    }
    pids
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3, the state, first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after its last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Resident memory of the processes, in bytes.
pub fn rss_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .sum()
}

/// User + system CPU time the processes have used, in seconds. `/proc` counts in USER_HZ
/// ticks, which Linux fixes at 100 per second for this interface.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| stat_fields(*pid))
        .map(|f| {
            // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name.
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (tick(11) + tick(12)) as f64 / 100.0
        })
        .sum()
}

/// Sends `GET path` on a keep-alive connection and reads the whole answer; returns the status.
pub fn get(stream: &mut TcpStream, path: &str) -> anyhow::Result<u16> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: stepgate-bench\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            bail!("connection closed before the answer's head");
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("the benchmark's upstream always sends Content-Length")?;
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(status)
}
