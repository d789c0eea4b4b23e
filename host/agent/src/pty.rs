//! A pseudo-terminal whose master side is read and written asynchronously.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster as RawMaster};
use tokio::io::unix::AsyncFd;

/// The master side of a terminal.
pub(crate) struct PtyMaster {
    fd: AsyncFd<RawMaster>,
}

/// A new terminal: the master for us and its slave side (both close-on-exec, neither our
/// controlling terminal); the slave becomes the standard input and output of the process.
pub(crate) fn open() -> io::Result<(PtyMaster, std::fs::File)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(io::Error::from)?;
    grantpt(&master).map_err(io::Error::from)?;
    unlockpt(&master).map_err(io::Error::from)?;
    let slave_path = ptsname_r(&master).map_err(io::Error::from)?;
    // Held until the process ends: a master whose slave was never opened reads as closed.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
        .open(&slave_path)?;
    let flags = fcntl(master.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(master.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    // The AsyncFd owns the descriptor for its whole registration, which is the I/O-safety
    // condition the deprecation of `AsyncFd::new` is about.
    #[allow(deprecated)]
    let fd = AsyncFd::new(master)?;
    Ok((PtyMaster { fd }, slave))
}

impl PtyMaster {
    /// Reads output; `Ok(0)` once every slave side is closed.
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => return Ok(n),
                // EIO: the slave side is closed (the process and its children are gone).
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` as terminal input.
    pub(crate) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}
