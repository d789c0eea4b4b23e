//! File updates, listings, and the tar stream that carries an update into a sandbox.

use std::time::{SystemTime, UNIX_EPOCH};

/// One file (or directory, when the path ends in `/`) to copy into a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCopy {
    /// Path relative to the working directory, or absolute.
    pub path: String,
    /// Decoded content (ignored for directories).
    pub content: Vec<u8>,
}

/// `PATCH /runners/{id}/files`: delete these paths, then copy these files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileUpdate {
    /// Paths to delete recursively (already normalised with [`clean_path`]).
    pub delete: Vec<String>,
    /// Files to write, in order; later ones overwrite earlier ones.
    pub copy: Vec<FileCopy>,
}

/// One entry of a file listing: the agent protocol's entry, so that a listing passes from a
/// runner's agent to the API without a copy of the type.
pub use poseidon_agent_protocol::Entry as FileEntry;

/// Lexically cleans a path like Go's `path.Clean`: `./a/../b` → `b`, `dir/` → `dir`, `` → `.`.
pub fn clean_path(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// Builds a POSIX tar archive (ustar, with PAX headers for long names) of the files to copy.
///
/// Regular files get mode 0744, directories (paths ending in `/`) mode 01777, owner root, and the
/// current time as modification time.
pub fn build_tar(copies: &[FileCopy]) -> Vec<u8> {
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let total: usize = copies.iter().map(|c| c.content.len() + 1536).sum();
    let mut out = Vec::with_capacity(total + 1024);
    for copy in copies {
        let is_dir = copy.path.ends_with('/');
        let mut name = clean_path(&copy.path);
        if is_dir {
            name.push('/');
        }
        let content: &[u8] = if is_dir { &[] } else { &copy.content };
        if name.len() > 100 {
            let record = pax_record("path", &name);
            write_header(
                &mut out,
                "././@PaxHeader",
                0o644,
                record.len() as u64,
                mtime,
                b'x',
            );
            write_data(&mut out, &record);
            name = name
                .chars()
                .rev()
                .take(99)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
        }
        let (mode, kind) = if is_dir {
            (0o1777, b'5')
        } else {
            (0o744, b'0')
        };
        write_header(&mut out, &name, mode, content.len() as u64, mtime, kind);
        write_data(&mut out, content);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    // A record is "<len> <key>=<value>\n" where <len> counts the whole record including itself.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

fn write_header(out: &mut Vec<u8>, name: &str, mode: u32, size: u64, mtime: u64, kind: u8) {
    let mut header = [0u8; 512];
    let name_bytes = name.as_bytes();
    let n = name_bytes.len().min(100);
    header[..n].copy_from_slice(&name_bytes[..n]);
    put_octal(&mut header[100..108], u64::from(mode));
    put_octal(&mut header[108..116], 0);
    put_octal(&mut header[116..124], 0);
    put_octal(&mut header[124..136], size);
    put_octal(&mut header[136..148], mtime);
    header[156] = kind;
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    put_octal(&mut header[148..155], u64::from(sum));
    header[155] = b' ';
    out.extend_from_slice(&header);
}

fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    let bytes = text.as_bytes();
    let start = bytes.len().saturating_sub(digits);
    field[..digits].copy_from_slice(&bytes[start..]);
    field[digits] = 0;
}

fn write_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_matches_go() {
        assert_eq!(clean_path("./a/../b"), "b");
        assert_eq!(clean_path("dir/"), "dir");
        assert_eq!(clean_path("./"), ".");
        assert_eq!(clean_path(""), ".");
        assert_eq!(clean_path("/x/../../y"), "/y");
        assert_eq!(clean_path("../a"), "../a");
        assert_eq!(clean_path("./*"), "*");
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record("path", "abc");
        let text = String::from_utf8(r.clone()).unwrap();
        let len: usize = text.split(' ').next().unwrap().parse().unwrap();
        assert_eq!(len, r.len());
    }

    #[test]
    fn tar_has_headers_and_padding() {
        let tar = build_tar(&[
            FileCopy {
                path: "a.txt".into(),
                content: b"hi".to_vec(),
            },
            FileCopy {
                path: "d/".into(),
                content: vec![],
            },
        ]);
        assert_eq!(tar.len() % 512, 0);
        assert_eq!(&tar[..5], b"a.txt");
        assert_eq!(&tar[512..514], b"hi");
        assert_eq!(&tar[1024..1026], b"d/");
        assert_eq!(tar[1024 + 156], b'5');
    }
}
