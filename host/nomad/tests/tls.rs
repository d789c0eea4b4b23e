//! TLS towards Nomad: the configured CA is trusted, an unknown certificate is not.
//! A TLS HTTP server (`openssl s_server -www`) stands in for Nomad's HTTPS listener.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use poseidon_nomad::api::{NomadClient, NomadError};
use poseidon_nomad::config::TlsConfig;
use poseidon_nomad::NomadConfig;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn https_with_the_configured_ca_and_only_with_it() {
    let dir = std::env::temp_dir().join(format!("poseidon-nomad-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args([
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed for this test")
        .success();
    assert!(ok);
    let port = free_port();
    let _server = Server(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(port.to_string())
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s_server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = |cafile: &str| {
        NomadClient::new(&NomadConfig {
            address: "127.0.0.1".into(),
            port,
            tls: TlsConfig {
                active: true,
                cafile: cafile.into(),
                ..TlsConfig::default()
            },
            ..NomadConfig::default()
        })
        .unwrap()
    };
    // Trusted: the TLS handshake succeeds and an HTTP answer arrives (not Nomad's JSON, so it
    // cannot be decoded: anything but "unreachable" proves the connection).
    let trusted = client(cert.to_str().unwrap()).list_jobs("x").await;
    assert!(
        !matches!(trusted, Err(NomadError::Unreachable(_))),
        "{trusted:?}"
    );
    // Not trusted (public roots only): the handshake fails.
    let untrusted = client("").list_jobs("x").await;
    assert!(
        matches!(untrusted, Err(NomadError::Unreachable(_))),
        "{untrusted:?}"
    );
    // A missing CA file is a configuration error naming the key.
    let missing = NomadClient::new(&NomadConfig {
        tls: TlsConfig {
            active: true,
            cafile: "/nonexistent.pem".into(),
            ..TlsConfig::default()
        },
        ..NomadConfig::default()
    });
    assert!(matches!(&missing, Err(e) if e.to_string().contains("nomad.tls.cafile")));
    let _ = std::fs::remove_dir_all(&dir);
}
