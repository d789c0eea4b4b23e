//! Unix socket paths longer than the kernel takes (108 bytes): reached through their directory.

use std::io;
use std::path::Path;

/// Longest path handed to the kernel as it is.
const LIMIT: usize = 100;

/// Calls `f` with `path`, or, for a longer path, with its file name while the working directory
/// is the path's directory (restored afterwards). Only for a single-threaded moment of the
/// process (starting up), as the working directory is the process's.
pub(crate) fn short<T>(path: &str, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let full = Path::new(path);
    if path.len() <= LIMIT {
        return f(full);
    }
    let (Some(dir), Some(name)) = (full.parent(), full.file_name()) else {
        return f(full);
    };
    let back = std::env::current_dir()?;
    std::env::set_current_dir(dir)?;
    let result = f(Path::new(name));
    std::env::set_current_dir(back)?;
    result
}
