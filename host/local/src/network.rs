//! Networks of runners. Every runner has a network namespace of its own (loopback only). A runner
//! of an environment with `networkAccess` gets outbound access through `pasta` (Debian's `passt`),
//! a user-mode network that reaches the internet like the host does but never the host's own
//! loopback services (`--no-map-gw`, no forwarding from the runner to host ports); `exposedPorts`
//! become ports of the host forwarded into the runner.

use std::path::PathBuf;

use crate::config::LocalConfig;
use crate::state::ForwardedPort;

/// The user-mode network, if the machine has one.
pub(crate) struct Network {
    pasta: Option<PathBuf>,
    /// Why there is no user-mode network, when there is none.
    missing: String,
    /// Address forwarded ports are bound to on the host.
    bind_address: String,
}

impl Network {
    /// Finds `pasta`.
    pub(crate) fn detect(config: &LocalConfig) -> Self {
        let pasta = ["/usr/bin/pasta", "/usr/local/bin/pasta", "/bin/pasta"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        let (pasta, missing) = match pasta {
            None => (None, "pasta is missing (apt-get install passt)".to_string()),
            // pasta runs as the runner's own uid and must open the tun device, which standard
            // distributions leave open to everyone (0666).
            Some(_) if !tun_usable() => (
                None,
                "/dev/net/tun is not accessible to unprivileged users (standard mode: 0666)"
                    .to_string(),
            ),
            Some(p) => (Some(p), String::new()),
        };
        Self {
            pasta,
            missing,
            bind_address: config.portaddress.clone(),
        }
    }

    /// Whether runners can get outbound network access and forwarded ports.
    pub(crate) fn available(&self) -> bool {
        self.pasta.is_some()
    }

    /// For the log.
    pub(crate) fn describe(&self) -> String {
        match &self.pasta {
            Some(p) => format!("own network namespace per runner; networkAccess through {}", p.display()),
            None => format!("own network namespace per runner; {}, so runners with networkAccess get NO network (loopback only) and exposedPorts are refused", self.missing),
        }
    }

    /// Connects the network namespace of `init_pid` to the outside and forwards `exposed` ports;
    /// returns the network process's pid and the forwarded ports.
    pub(crate) async fn attach(
        &self,
        init_pid: u32,
        uid: u32,
        exposed: &[u16],
    ) -> Result<(u32, Vec<ForwardedPort>), String> {
        self.start(init_pid, uid, exposed).await
    }

    async fn start(
        &self,
        init_pid: u32,
        uid: u32,
        exposed: &[u16],
    ) -> Result<(u32, Vec<ForwardedPort>), String> {
        let pasta = self.pasta.as_ref().ok_or("pasta is not installed")?;
        let mut ports = Vec::new();
        let mut tcp = Vec::new();
        for &port in exposed {
            let host_port = free_port(&self.bind_address)?;
            tcp.push(format!("{}/{host_port}:{port}", self.bind_address));
            ports.push(ForwardedPort {
                exposed: port,
                host_address: format!("{}:{host_port}", self.bind_address),
            });
        }
        let pid_file =
            std::env::temp_dir().join(format!("poseidon-pasta-{init_pid}-{}.pid", uuid_like()));
        let mut cmd = tokio::process::Command::new(pasta);
        cmd.args([
            "--quiet",
            "--config-net",
            "--no-map-gw",
            "-T",
            "none",
            "-U",
            "none",
            "-u",
            "none",
        ]);
        if tcp.is_empty() {
            cmd.args(["-t", "none"]);
        } else {
            cmd.arg("-t").arg(tcp.join(","));
        }
        cmd.arg("--pid")
            .arg(&pid_file)
            .arg(init_pid.to_string())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .uid(uid)
            .gid(uid)
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // pasta returns once the namespace is configured, leaving its daemon behind.
        let out = cmd
            .output()
            .await
            .map_err(|e| format!("starting pasta: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pasta failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or("pasta wrote no pid")?;
        let _ = std::fs::remove_file(&pid_file);
        Ok((pid, ports))
    }
}

fn uuid_like() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A port that is free on the host right now.
fn free_port(address: &str) -> Result<u16, String> {
    let listener = std::net::TcpListener::bind((address, 0))
        .map_err(|e| format!("finding a free port on {address}: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// Whether `/dev/net/tun` may be opened by anyone.
fn tun_usable() -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata("/dev/net/tun").is_ok_and(|m| m.permissions().mode() & 0o006 == 0o006)
}
