//! `nomad-emulator` binary: serves the emulated Nomad API on a loopback port and prints the
//! bound address (`127.0.0.1:PORT`) as the first line of stdout.

use nomad_emulator::{Emulator, EmulatorConfig, StreamFraming};
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

const USAGE: &str = "usage: nomad-emulator [--bind ADDR:PORT | --port PORT] [--data-dir DIR]
  [--heartbeat-ms N] [--nodes N] [--max-policy-delay-ms N] [--scheduler-delay-ms N]
  [--client-delay-ms N] [--event-buffer-size N] [--memory-oversubscription]
  [--stream-framing chunked|raw] [--test-profile]";

fn parse_args() -> Result<EmulatorConfig, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = if args.iter().any(|a| a == "--test-profile") {
        EmulatorConfig::for_tests()
    } else {
        EmulatorConfig::default()
    };
    let mut it = args.into_iter();
    let ms = |v: Option<String>| -> Result<Duration, String> {
        v.and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .ok_or_else(|| "expected milliseconds".to_string())
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bind" => {
                cfg.bind = it
                    .next()
                    .and_then(|v| v.parse::<SocketAddr>().ok())
                    .ok_or("--bind needs ADDR:PORT")?
            }
            "--port" => {
                let p: u16 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--port needs a number")?;
                cfg.bind = SocketAddr::from(([127, 0, 0, 1], p));
            }
            "--data-dir" => cfg.data_dir = Some(it.next().ok_or("--data-dir needs a path")?.into()),
            "--heartbeat-ms" => cfg.stream_heartbeat = ms(it.next())?,
            "--max-policy-delay-ms" => cfg.max_policy_delay = Some(ms(it.next())?),
            "--scheduler-delay-ms" => cfg.scheduler_delay = ms(it.next())?,
            "--client-delay-ms" => cfg.client_delay = ms(it.next())?,
            "--nodes" => {
                cfg.nodes = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--nodes needs a number")?
            }
            "--event-buffer-size" => {
                cfg.event_buffer_size = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--event-buffer-size needs a number")?
            }
            "--memory-oversubscription" => cfg.memory_oversubscription = true,
            "--stream-framing" => {
                cfg.stream_framing = match it.next().as_deref() {
                    Some("chunked") => StreamFraming::Chunked,
                    Some("raw") => StreamFraming::Raw,
                    _ => return Err("--stream-framing needs chunked or raw".into()),
                }
            }
            "--test-profile" => {}
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(cfg)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let emu = match Emulator::start(cfg).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nomad-emulator: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", emu.addr());
    let _ = std::io::stdout().flush();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nomad-emulator: cannot install SIGTERM handler: {e}");
            std::process::exit(1);
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    emu.shutdown().await;
}
