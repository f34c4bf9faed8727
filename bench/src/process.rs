//! The processes the harness starts and the machine it runs on: the tools
//! it needs (installed from Debian when missing), free loopback ports, a
//! subject pinned to CPU 0 and killed by its PID when dropped, and the
//! scratch directory. Never binds anything but 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// wrk and webhook come from Debian; installed when missing (as root).
pub fn ensure_tools() -> Result<(), String> {
    let missing: Vec<&str> = [("wrk", "wrk"), ("webhook", "webhook"), ("taskset", "util-linux")]
        .into_iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let ok = Command::new("sh")
        .args([
            "-c",
            &format!(
                "apt-get update -qq && apt-get install -y -qq {}",
                missing.join(" ")
            ),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cannot install {} (run as root, or install them)",
            missing.join(" ")
        ))
    }
}

pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

pub async fn wait_for_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("nothing listens on 127.0.0.1:{port}"))
}

/// Waits until `GET path` on 127.0.0.1:`port` answers, whatever it says.
/// relay binds its listeners before it opens the store, so a port that
/// accepts is not yet a relay that answers: connections wait in the
/// kernel's backlog while it opens the store.
pub async fn wait_for_answer(port: u16, path: &str) -> Result<(), String> {
    let client = relay::sends::http_client(Duration::from_secs(1)).map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{port}{path}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let answer = client.get(&url).send().await;
        if answer.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{url} did not answer within a minute"))
}

/// A process this harness started; killed by its PID when dropped.
pub struct Running {
    pub child: Child,
    pub port: u16,
    /// Where its stderr went.
    pub log: PathBuf,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program args…` on CPU 0 with stderr to `log`.
pub async fn start_pinned(
    program: &Path,
    args: &[String],
    port: u16,
    log: PathBuf,
    env: &[(&str, &str)],
) -> Result<Running, String> {
    let err = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut command = Command::new("taskset");
    command
        .args(["-c", "0"])
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(err);
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let running = Running { child, port, log };
    wait_for_port(port).await?;
    Ok(running)
}

/// A scratch directory, removed when the harness finishes.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Result<Scratch, String> {
        let dir = std::env::temp_dir().join(format!("relay-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(|m| m.trim().to_owned())
            })
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}")
}
