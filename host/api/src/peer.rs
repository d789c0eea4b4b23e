//! Recognises connections that come from a sandbox on this machine.
//!
//! A runner with network access shares the host's network, so it could reach the gateway over
//! loopback. The kernel knows which uid owns the client's socket (`/proc/net/tcp{,6}`); runners run as
//! host uids of their own, so a connection from one of those uids is refused even with a valid token.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

/// Whether the TCP connection `peer → local` was opened by a process whose uid is in `uids`.
/// Only connections from this machine are looked up; others are never from a sandbox.
pub(crate) fn from_sandbox(peer: SocketAddr, local: Option<SocketAddr>, uids: &Range<u32>) -> bool {
    let same_host = peer.ip().is_loopback() || local.is_some_and(|l| l.ip() == peer.ip());
    if !same_host {
        return false;
    }
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|table| owner_of(&table, peer).is_some_and(|uid| uids.contains(&uid)))
}

/// The uid owning the socket whose local address is `addr`, from a `/proc/net/tcp` table.
fn owner_of(table: &str, addr: SocketAddr) -> Option<u32> {
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        if parse_address(fields[1]).is_some_and(|a| same(a, addr)) {
            return fields[7].parse().ok();
        }
    }
    None
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// Parses `0100007F:1F90` (IPv4) or 32 hex digits plus port (IPv6); words are little-endian.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes().to_be_bytes()),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, word) in bytes.chunks_mut(4).enumerate() {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                word.copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::from(bytes)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_owners_from_the_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000 200001        0 123 1\n";
        let peer: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(owner_of(table, peer), Some(200_001));
        assert_eq!(owner_of(table, "127.0.0.1:8081".parse().unwrap()), None);
        let v6 = parse_address("0000000000000000FFFF00000100007F:1F90").unwrap();
        assert!(same(v6, peer));
    }
}
