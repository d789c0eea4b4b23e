//! systemd as Poseidon uses it: `READY=1` once the server serves, `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while a request to the server's own `/health` over a new connection is
//! answered (healthy: it accepts connections and its runtime answers requests), `STOPPING=1` on
//! shutdown, and the listening sockets systemd passes (`server.systemdsocketactivation`).
//! Without `NOTIFY_SOCKET` every notification is a no-op.

use std::net::SocketAddr;
use std::time::Duration;

use sd_notify::NotifyState;

/// Takes the TCP sockets systemd passed (`LISTEN_FDS`, `LISTEN_PID`); at least one is required.
pub fn passed_listeners() -> Result<Vec<std::net::TcpListener>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut listeners = Vec::new();
    for index in 0..fds.len() {
        match fds.take_tcp_listener(index) {
            Ok(Some(listener)) => listeners.push(listener),
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "socket {index} passed by systemd is not a TCP socket: {e}"
                ))
            }
        }
    }
    if listeners.is_empty() {
        return Err(
            "server.systemdsocketactivation is true but systemd passed no sockets \
                    (LISTEN_FDS is not set for this process)"
                .into(),
        );
    }
    for listener in &listeners {
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot use a socket passed by systemd: {e}"))?;
    }
    Ok(listeners)
}

/// Tells systemd the server is serving.
pub fn ready() {
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd of readiness");
    }
}

/// Tells systemd the server is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// Pings the watchdog every half `WATCHDOG_USEC` as long as `GET /api/v1/health` on `address`
/// gets any HTTP answer (a 503 of a depleting pool is alive; a hung server is not).
pub fn spawn_watchdog(address: SocketAddr, tls: bool) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    let mut target = address;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{target}/api/v1/health");
    // The server's own certificate names its public host, not the loopback address. Every
    // check opens a new connection: a server that can no longer accept one (out of file
    // descriptors, accept loop stuck) is not healthy even if an old connection still answers.
    let client = match reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .pool_max_idle_per_host(0)
        .timeout(period)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the systemd watchdog");
            return;
        }
    };
    tracing::info!(period_ms = period.as_millis() as u64, %url, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match client.get(&url).send().await {
                Ok(_) => {
                    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watchdog self-check failed; not pinging systemd")
                }
            }
        }
    });
}
