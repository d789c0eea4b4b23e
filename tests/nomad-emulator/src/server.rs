//! Accept loop: serves HTTP/1.1 with upgrades via hyper, implements the refuse-connections
//! fault by closing and re-binding the listening socket, and the optional raw (Nomad 2.0)
//! event stream framing.

use crate::config::StreamFraming;
use crate::http::Query;
use crate::state::Shared;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Binds a listener with `SO_REUSEADDR` so it can be re-bound after a refuse fault.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Runs the accept loop until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, app: Router) {
    let mut listener = Some(listener);
    while let Some(l) = listener.as_ref() {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = shared.refuse.notified() => {
                drop(listener.take());
                let until = shared.faults().refuse_until.unwrap_or_else(Instant::now);
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
                // Re-bind the same address; retry briefly if the kernel still holds it.
                for _ in 0..100 {
                    match bind(shared.addr) {
                        Ok(l) => { listener = Some(l); break; }
                        Err(e) => {
                            tracing::warn!("re-binding {} failed: {e}", shared.addr);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            r = l.accept() => match r {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    let app = app.clone();
                    tokio::spawn(async move { connection(shared, stream, app).await });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, app: Router) {
    let _ = stream.set_nodelay(true);
    if shared.config.stream_framing == StreamFraming::Raw && is_event_stream(&stream).await {
        raw_event_stream(shared, stream).await;
        return;
    }
    let mut outage = shared.outage.subscribe();
    let svc = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::select! {
        _ = shared.shutdown.cancelled() => {}
        _ = outage.changed() => {}
        r = conn => { if let Err(e) = r { tracing::debug!("connection ended: {e}"); } }
    }
}

async fn is_event_stream(stream: &TcpStream) -> bool {
    let want = b"GET /v1/event/stream";
    let mut buf = [0u8; 20];
    for _ in 0..100 {
        if stream.readable().await.is_err() {
            return false;
        }
        match stream.peek(&mut buf).await {
            Ok(n) if n >= want.len() => return &buf[..] == want,
            Ok(n) if n == 0 || buf[..n] != want[..n] => return false,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => return false,
        }
    }
    false
}

/// Nomad 2.0 framing: hijacked connection, `Connection: close`, raw body until EOF.
async fn raw_event_stream(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let target = text.split_whitespace().nth(1).unwrap_or("");
    let raw = target.split_once('?').map(|(_, q)| q.to_string());
    let q = Query::parse(&raw);
    let sub = match crate::stream::Subscription::parse(&q) {
        Ok(s) => s,
        Err(e) => {
            let resp = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                e.status.as_u16(),
                e.status.canonical_reason().unwrap_or(""),
                e.message.len(),
                e.message
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            return;
        }
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut rx = crate::stream::open(shared, sub);
    while let Some(chunk) = rx.recv().await {
        if stream.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = stream.shutdown().await;
}
