//! Recognises connections that come from a sandbox on this machine.
//!
//! A runner with network access shares the host's network, so it could reach the gateway over
//! loopback. The kernel knows which uid owns the client's socket; runners run as host uids of their
//! own, so a connection from one of those uids is refused even with a valid token. The owner is asked
//! for with one exact `sock_diag` netlink query (microseconds); reading `/proc/net/tcp` instead
//! takes milliseconds on a large machine and is only the fallback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// Whether the TCP connection `peer → local` was opened by a process whose uid is in `uids`.
/// Only connections from this machine are looked up; others are never from a sandbox.
pub(crate) fn from_sandbox(peer: SocketAddr, local: Option<SocketAddr>, uids: &Range<u32>) -> bool {
    let peer = canonical(peer);
    let same_host =
        peer.ip().is_loopback() || local.is_some_and(|l| canonical(l).ip() == peer.ip());
    if !same_host {
        return false;
    }
    if let Some(local) = local.map(canonical) {
        // The server's side of the connection: the listening port, and an address that is the
        // listening one, or (listening on all addresses) the loopback or the peer's own.
        let mut candidates = vec![local.ip(), peer.ip()];
        candidates.push(match peer.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
        for ip in candidates.into_iter().filter(|ip| !ip.is_unspecified()) {
            if let Some(uid) = owner_via_netlink(peer, SocketAddr::new(ip, local.port())) {
                return uids.contains(&uid);
            }
        }
    }
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|table| owner_of(&table, peer).is_some_and(|uid| uids.contains(&uid)))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// The uid owning the TCP socket `src → dst` (the client's socket), by an exact inet_diag query.
fn owner_via_netlink(src: SocketAddr, dst: SocketAddr) -> Option<u32> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000)).ok()?;
    let family: u8 = if src.is_ipv4() { 2 } else { 10 };
    let mut req = Vec::with_capacity(72);
    // struct nlmsghdr
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol (TCP), extensions, pad, states (all)
    req.extend_from_slice(&[family, 6, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network order, interface, no cookie
    req.extend_from_slice(&src.port().to_be_bytes());
    req.extend_from_slice(&dst.port().to_be_bytes());
    req.extend_from_slice(&ip16(src.ip()));
    req.extend_from_slice(&ip16(dst.ip()));
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .ok()?;
    let mut buf = [0u8; 512];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
    // An answer of type SOCK_DIAG_BY_FAMILY carries struct inet_diag_msg after the 16-byte
    // header; its uid is at offset 64 (family, state, timer, retrans, sockid, expires, queues).
    if n < 16 + 72 || u16::from_ne_bytes([buf[4], buf[5]]) != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    Some(u32::from_ne_bytes([buf[80], buf[81], buf[82], buf[83]]))
}

/// The uid owning the socket whose local address is `addr`, from a `/proc/net/tcp` table.
fn owner_of(table: &str, addr: SocketAddr) -> Option<u32> {
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        if parse_address(fields[1]).is_some_and(|a| canonical(a) == addr) {
            return fields[7].parse().ok();
        }
    }
    None
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
        assert_eq!(canonical(v6), peer);
    }

    #[test]
    fn netlink_finds_the_owner_of_a_live_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(owner_via_netlink(peer, server), Some(uid));
        assert!(from_sandbox(peer, Some(server), &(uid..uid + 1)));
        assert!(!from_sandbox(peer, Some(server), &(uid + 1..uid + 2)));
    }
}
