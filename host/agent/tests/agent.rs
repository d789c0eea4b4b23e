//! The agent binary over its standard input and output: the handshake, an execution with pipes, a
//! file round trip, and bad input that must end the connection, never hang the agent.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use poseidon_agent_protocol::{
    encode, Decoder, Frame, FrameKind, Identity, Reply, Request, PROTOCOL_VERSION,
};

struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    decoder: Decoder,
}

impl Agent {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_poseidon-agent"))
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        Self {
            child,
            stdin,
            stdout,
            decoder: Decoder::default(),
        }
    }

    fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        encode(&frame, &mut out);
        self.stdin.write_all(&out).unwrap();
    }

    fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(frame);
            }
            let mut buf = [0u8; 4096];
            let n = self.stdout.read(&mut buf).unwrap();
            if n == 0 {
                return None;
            }
            self.decoder.extend(&buf[..n]);
        }
    }

    fn hello(&mut self) {
        self.send(Frame::control(
            0,
            &Request::Hello {
                version: PROTOCOL_VERSION,
                resume: Vec::new(),
            },
        ));
        let reply: Reply = self.recv().unwrap().parse().unwrap();
        assert!(matches!(reply, Reply::Hello { version, .. } if version == PROTOCOL_VERSION));
    }

    /// Waits (bounded) for the agent to exit and returns whether it did.
    fn exits(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        false
    }
}

#[test]
fn runs_a_process_with_pipes_and_reports_its_exit() {
    let mut agent = Agent::start();
    agent.hello();
    let cwd = std::env::temp_dir().to_string_lossy().into_owned();
    let exec = Request::Exec {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "read x; echo out:$x; echo err >&2; exit 3".into(),
        ],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd,
        identity: Identity::Root,
        tty: false,
        inherit_env: false,
        stderr_on_terminal: false,
        time_limit_ms: None,
    };
    agent.send(Frame::control(7, &exec));
    agent.send(Frame::data(
        FrameKind::Stdin,
        7,
        Bytes::from_static(b"in\n"),
    ));
    let (mut out, mut err, mut code, mut taken) = (Vec::new(), Vec::new(), None, 0);
    while code.is_none() {
        let frame = agent.recv().expect("agent ended early");
        assert_eq!(frame.stream, 7);
        match frame.kind {
            FrameKind::Stdout => out.extend_from_slice(&frame.payload),
            FrameKind::Stderr => err.extend_from_slice(&frame.payload),
            FrameKind::Control => match frame.parse::<Reply>().unwrap() {
                Reply::Started { pid } => assert!(pid > 0),
                Reply::Exited { code: c } => code = Some(c),
                // What the program took of its input, for the gateway's flow control.
                Reply::InputTaken { total } => taken = total,
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "out:in\n");
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(code, Some(3));
    assert_eq!(taken, 3, "the agent reports the input it wrote");
}

#[test]
fn writes_lists_and_reads_files() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_string_lossy().into_owned();
    let mut agent = Agent::start();
    agent.hello();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1);
    header.set_cksum();
    builder
        .append_data(&mut header, "a/b.txt", &b"abc"[..])
        .unwrap();
    let archive = builder.into_inner().unwrap();
    agent.send(Frame::control(
        1,
        &Request::UpdateFiles {
            delete: vec![],
            cwd: cwd.clone(),
            archive: true,
        },
    ));
    agent.send(Frame::data(FrameKind::Data, 1, Bytes::from(archive)));
    agent.send(Frame::data(FrameKind::DataEnd, 1, Bytes::new()));
    assert_eq!(agent.recv().unwrap().parse::<Reply>().unwrap(), Reply::Done);
    agent.send(Frame::control(
        2,
        &Request::List {
            path: ".".into(),
            recursive: true,
            cwd: cwd.clone(),
            identity: Identity::Root,
        },
    ));
    match agent.recv().unwrap().parse::<Reply>().unwrap() {
        Reply::Listing { entries } => {
            let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names, ["./a", "./a/b.txt"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    agent.send(Frame::control(
        3,
        &Request::Read {
            path: "a/b.txt".into(),
            cwd: cwd.clone(),
            identity: Identity::Root,
        },
    ));
    assert_eq!(
        agent.recv().unwrap().parse::<Reply>().unwrap(),
        Reply::FileSize { size: 3 }
    );
    let data = agent.recv().unwrap();
    assert_eq!(
        (data.kind, &data.payload[..]),
        (FrameKind::Data, &b"abc"[..])
    );
    assert_eq!(agent.recv().unwrap().kind, FrameKind::DataEnd);
    agent.send(Frame::control(
        4,
        &Request::Read {
            path: "nope".into(),
            cwd,
            identity: Identity::Root,
        },
    ));
    assert_eq!(
        agent.recv().unwrap().parse::<Reply>().unwrap(),
        Reply::NotFound
    );
}

#[test]
fn malformed_input_ends_the_connection() {
    // An oversized frame.
    let mut agent = Agent::start();
    agent.hello();
    agent.stdin.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert!(agent.recv().is_none());
    assert!(agent.exits());
    // A control message that is not JSON.
    let mut agent = Agent::start();
    agent.hello();
    agent.send(Frame::data(
        FrameKind::Control,
        1,
        Bytes::from_static(b"{not json"),
    ));
    assert!(agent.recv().is_none());
    assert!(agent.exits());
    // Anything before the greeting, and another version.
    let mut agent = Agent::start();
    agent.send(Frame::control(0, &Request::Ping));
    assert!(agent.exits());
    let mut agent = Agent::start();
    agent.send(Frame::control(
        0,
        &Request::Hello {
            version: PROTOCOL_VERSION + 1,
            resume: Vec::new(),
        },
    ));
    let reply: Reply = agent.recv().unwrap().parse().unwrap();
    assert!(matches!(reply, Reply::Hello { .. }));
    assert!(agent.exits());
}

/// `--probe-bash` answers with the `SHLVL` this machine's bash leaves a program it execs — the same
/// value bash gives `env` here — or, with a bash setting in its environment that the probe's bash
/// must not see, still the clean answer (the probe clears the environment).
#[test]
fn the_bash_probe_reports_what_bash_exports() {
    if !std::path::Path::new("/bin/bash").exists() {
        eprintln!("skipped: no /bin/bash");
        return;
    }
    let probe = Command::new(env!("CARGO_BIN_EXE_poseidon-agent"))
        .arg(poseidon_agent_protocol::PROBE_BASH_ARG)
        .env("BASH_ENV", "/nonexistent")
        .env("SHLVL", "5")
        .output()
        .unwrap();
    assert!(probe.status.success(), "{probe:?}");
    let bash = Command::new("/bin/bash")
        .args(["-c", "printenv SHLVL"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        String::from_utf8_lossy(&bash.stdout).trim()
    );
}
