//! File operations: update (delete, then extract a tar archive) as root; list and read as root in
//! the agent, or as `user` in a short-lived copy of the agent running as that user, so that the
//! kernel decides what `user` may see.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bytes::Bytes;
use poseidon_agent_protocol::{Entry, Frame, FrameKind, Identity, Reply};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;

use crate::connection::reply;
use crate::users::Names;
use crate::USER_ID;

/// The first argument that selects a file operation as `user`.
pub(crate) const AS_USER_ARG: &str = "__as-user";
/// Size of the data frames of a download.
const CHUNK: usize = 64 * 1024;

/// Runs an update in the background and replies `Done` or `Failed`.
pub(crate) fn spawn_update(
    tx: mpsc::Sender<Frame>,
    stream: u32,
    delete: Vec<String>,
    cwd: String,
    archive: Bytes,
) {
    tokio::spawn(async move {
        let result =
            tokio::task::spawn_blocking(move || update(&delete, Path::new(&cwd), &archive))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        let answer = match result {
            Ok(()) => Reply::Done,
            Err(message) => Reply::Failed {
                stderr: message.clone(),
                message,
            },
        };
        reply(&tx, stream, answer);
    });
}

fn resolve(cwd: &Path, path: &str) -> PathBuf {
    if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        cwd.join(path)
    }
}

fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Whether GNU `rm` refuses to remove `path`: `/`, or a path whose last component is `.` or
/// `..` (CodeOcean sends `./` with every copy; Poseidon's `rm -rf .` leaves the workspace as it is).
fn rm_refuses(path: &str) -> bool {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        // `/` (rm's --preserve-root), or the empty path, which names nothing.
        return true;
    }
    matches!(trimmed.rsplit('/').next(), Some("." | ".."))
}

/// Deletes (failures ignored, as Poseidon's `rm -rf`), then extracts the archive.
fn update(delete: &[String], cwd: &Path, archive: &[u8]) -> Result<(), String> {
    for path in delete {
        if path == "./*" {
            // The shell's glob: every entry but the hidden ones.
            if let Ok(entries) = std::fs::read_dir(cwd) {
                for entry in entries.flatten() {
                    if !entry.file_name().as_encoded_bytes().starts_with(b".") {
                        remove_any(&entry.path());
                    }
                }
            }
        } else if !rm_refuses(path) {
            remove_any(&resolve(cwd, path));
        }
    }
    if archive.is_empty() {
        return Ok(());
    }
    let mut tar = tar::Archive::new(archive);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_overwrite(true);
    let entries = tar.entries().map_err(|e| format!("tar: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("tar: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("tar: {e}"))?
            .to_string_lossy()
            .into_owned();
        let dest = resolve(cwd, &path);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("tar: {}: Cannot mkdir: {e}", parent.display()))?;
        }
        entry
            .unpack(&dest)
            .map_err(|e| format!("tar: {path}: Cannot open: {e}"))?;
    }
    Ok(())
}

/// Lists in the background and replies `Listing` or `NotFound`.
pub(crate) fn spawn_list(
    tx: mpsc::Sender<Frame>,
    stream: u32,
    path: String,
    recursive: bool,
    cwd: String,
    identity: Identity,
) {
    tokio::spawn(async move {
        let answer = match identity {
            Identity::Root => tokio::task::spawn_blocking(move || list(&path, recursive, &cwd))
                .await
                .unwrap_or(None),
            Identity::User => {
                let args = vec![
                    "list".to_string(),
                    path,
                    if recursive { "1" } else { "0" }.to_string(),
                    cwd,
                ];
                match output_as_user(args).await {
                    Some(out) if out.status.success() => serde_json::from_slice(&out.stdout).ok(),
                    _ => None,
                }
            }
        };
        let Some(mut entries) = answer else {
            reply(&tx, stream, Reply::NotFound);
            return;
        };
        // A long listing goes in parts, each well below the protocol's frame limit.
        loop {
            let cut = part_length(&entries);
            if cut == entries.len() {
                break;
            }
            let rest = entries.split_off(cut);
            let part = Reply::ListingPart { entries };
            if tx.send(Frame::control(stream, &part)).await.is_err() {
                return;
            }
            entries = rest;
        }
        let _ = tx
            .send(Frame::control(stream, &Reply::Listing { entries }))
            .await;
    });
}

/// JSON bytes of one listing frame at most (a quarter of the protocol's frame limit).
const LISTING_PART_BYTES: usize = poseidon_agent_protocol::MAX_FRAME / 4;

/// How many of `entries` fit into one listing frame (at least one: an entry's name is at most
/// `PATH_MAX`, far below the limit).
fn part_length(entries: &[Entry]) -> usize {
    let mut bytes = 0;
    for (i, e) in entries.iter().enumerate() {
        // Escaping can double a name's bytes; the fixed fields take < 200.
        bytes += 2 * (e.name.len() + e.link_target.as_ref().map_or(0, String::len)) + 200;
        if bytes > LISTING_PART_BYTES && i > 0 {
            return i;
        }
    }
    entries.len()
}

/// Runs a helper as `user` to its end and collects its output.
async fn output_as_user(args: Vec<String>) -> Option<std::process::Output> {
    let (child, _own) = crate::orphans::spawn(&mut as_user(args)).ok()?;
    child.wait_with_output().await.ok()
}

fn as_user(args: Vec<String>) -> tokio::process::Command {
    let exe = crate::SELF_EXE;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(AS_USER_ARG)
        .args(args)
        .uid(USER_ID)
        .gid(USER_ID)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Entries of `path`; `None` if it does not exist or cannot be read.
fn list(path: &str, recursive: bool, cwd: &str) -> Option<Vec<Entry>> {
    let full = resolve(Path::new(cwd), path);
    let names = Names::load();
    let mut entries = Vec::new();
    // The path itself is followed if it is a link (`/proc/self/cwd` lists the directory).
    if std::fs::metadata(&full).is_ok_and(|m| m.is_dir()) {
        let dir = std::fs::read_dir(&full).ok()?;
        if recursive {
            walk(dir, path, &names, &mut entries);
        } else {
            for child in dir.flatten() {
                let name = child.file_name().to_string_lossy().into_owned();
                if let Some(e) = entry(name, &child.path(), &names) {
                    entries.push(e);
                }
            }
        }
    } else {
        entries.push(entry(path.to_string(), &full, &names)?);
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Some(entries)
}

fn walk(dir: std::fs::ReadDir, prefix: &str, names: &Names, out: &mut Vec<Entry>) {
    for child in dir.flatten() {
        let name = child.file_name().to_string_lossy().into_owned();
        let shown = if prefix.ends_with('/') {
            format!("{prefix}{name}")
        } else {
            format!("{prefix}/{name}")
        };
        let path = child.path();
        let Some(e) = entry(shown.clone(), &path, names) else {
            continue;
        };
        let is_dir = e.entry_type == 'd';
        out.push(e);
        if is_dir {
            if let Ok(sub) = std::fs::read_dir(&path) {
                walk(sub, &shown, names, out);
            }
        }
    }
}

fn entry(name: String, path: &Path, names: &Names) -> Option<Entry> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let kind = meta.file_type();
    use std::os::unix::fs::FileTypeExt;
    let entry_type = if kind.is_dir() {
        'd'
    } else if kind.is_symlink() {
        'l'
    } else if kind.is_fifo() {
        'p'
    } else if kind.is_socket() {
        's'
    } else if kind.is_char_device() {
        'c'
    } else if kind.is_block_device() {
        'b'
    } else {
        '-'
    };
    let link_target = kind
        .is_symlink()
        .then(|| std::fs::read_link(path).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    Some(Entry {
        name,
        entry_type,
        link_target,
        size: meta.size(),
        modification_time: meta.mtime(),
        permissions: permissions(meta.permissions().mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
    })
}

/// The nine `ls` permission characters, with set-id and sticky bits.
fn permissions(mode: u32) -> String {
    let bit = |mask: u32, c: char| if mode & mask != 0 { c } else { '-' };
    let special = |exec: bool, set: bool, lower: char, upper: char| match (exec, set) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    let mut s = String::with_capacity(9);
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(mode & 0o100 != 0, mode & 0o4000 != 0, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(mode & 0o010 != 0, mode & 0o2000 != 0, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(mode & 0o001 != 0, mode & 0o1000 != 0, 't', 'T'));
    s
}

/// Streams a regular file in the background: `FileSize`, data frames, data-end; or `NotFound`.
pub(crate) fn spawn_read(
    tx: mpsc::Sender<Frame>,
    stream: u32,
    path: String,
    cwd: String,
    identity: Identity,
) {
    tokio::spawn(async move {
        let result = match identity {
            Identity::Root => read_as_root(&tx, stream, &path, &cwd).await,
            Identity::User => read_as_user(&tx, stream, path, cwd).await,
        };
        if result.is_none() {
            let _ = tx.send(Frame::control(stream, &Reply::NotFound)).await;
        }
    });
}

async fn read_as_root(tx: &mpsc::Sender<Frame>, stream: u32, path: &str, cwd: &str) -> Option<()> {
    let full = resolve(Path::new(cwd), path);
    let file = tokio::fs::File::from_std(open_without_waiting(&full).ok()?);
    let meta = file.metadata().await.ok()?;
    if !meta.is_file() {
        return None;
    }
    send_content(tx, stream, meta.len(), file).await;
    Some(())
}

async fn read_as_user(
    tx: &mpsc::Sender<Frame>,
    stream: u32,
    path: String,
    cwd: String,
) -> Option<()> {
    let (mut child, _own) =
        crate::orphans::spawn(&mut as_user(vec!["read".to_string(), path, cwd])).ok()?;
    let stdout = child.stdout.take()?;
    let mut reader = tokio::io::BufReader::new(stdout);
    let mut first = String::new();
    reader.read_line(&mut first).await.ok()?;
    let size: u64 = first.trim().parse().ok()?;
    send_content(tx, stream, size, reader).await;
    let _ = child.wait().await;
    Some(())
}

/// Sends the size, then exactly `size` bytes (or fewer, if the file shrank: the gateway then sees
/// a short download and fails it), then data-end.
async fn send_content(
    tx: &mpsc::Sender<Frame>,
    stream: u32,
    size: u64,
    mut from: impl tokio::io::AsyncRead + Unpin,
) {
    if tx
        .send(Frame::control(stream, &Reply::FileSize { size }))
        .await
        .is_err()
    {
        return;
    }
    let mut left = size;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = buf.len().min(left as usize);
        match from.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                left -= n as u64;
                let frame = Frame::data(FrameKind::Data, stream, Bytes::copy_from_slice(&buf[..n]));
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx
        .send(Frame::data(FrameKind::DataEnd, stream, Bytes::new()))
        .await;
}

/// Opens a file for reading without waiting on it: opening a FIFO for reading waits for a
/// writer, which would hold the download (and a helper process) until the gateway gives up; a
/// FIFO is then refused as not a regular file. Reads of a regular file do not care.
fn open_without_waiting(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
}

/// `__as-user list PATH 0|1 CWD` or `__as-user read PATH CWD`, already running as `user`.
pub(crate) fn run_as_user(args: &[String]) -> i32 {
    let mut stdout = std::io::stdout().lock();
    match args {
        [op, path, recursive, cwd] if op == "list" => match list(path, recursive == "1", cwd) {
            Some(entries) => {
                let _ = serde_json::to_writer(&mut stdout, &entries);
                0
            }
            None => 2,
        },
        [op, path, cwd] if op == "read" => {
            let full = resolve(Path::new(cwd), path);
            let Ok(mut file) = open_without_waiting(&full) else {
                return 2;
            };
            let Ok(meta) = file.metadata() else { return 2 };
            if !meta.is_file() {
                return 2;
            }
            let _ = writeln!(stdout, "{}", meta.len());
            let mut out = std::io::BufWriter::with_capacity(CHUNK, stdout);
            let _ = std::io::copy(&mut (&mut file).take(meta.len()), &mut out);
            let _ = out.flush();
            0
        }
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_listings_are_cut_into_parts_below_the_frame_limit() {
        let entry = |n: usize| Entry {
            name: "x".repeat(n),
            entry_type: '-',
            link_target: None,
            size: 0,
            modification_time: 0,
            permissions: "rw-r--r--".into(),
            owner: "root".into(),
            group: "root".into(),
        };
        let many: Vec<Entry> = (0..5000).map(|_| entry(100)).collect();
        let cut = part_length(&many);
        assert!(cut > 100 && cut < 5000, "{cut}");
        let json = serde_json::to_vec(&Reply::ListingPart {
            entries: many[..cut].to_vec(),
        })
        .unwrap();
        assert!(
            json.len() < poseidon_agent_protocol::MAX_FRAME,
            "{}",
            json.len()
        );
        assert_eq!(part_length(&many[..10]), 10);
        assert_eq!(part_length(&[entry(4096), entry(4096)]), 2);
    }

    #[test]
    fn permission_strings_match_ls() {
        assert_eq!(permissions(0o755), "rwxr-xr-x");
        assert_eq!(permissions(0o1777), "rwxrwxrwt");
        assert_eq!(permissions(0o4644), "rwSr--r--");
        assert_eq!(permissions(0o2755), "rwxr-sr-x");
    }

    #[test]
    fn update_deletes_then_extracts_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        std::fs::write(cwd.join("old.txt"), "x").unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(5);
        header.set_mode(0o744);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1);
        header.set_cksum();
        builder
            .append_data(&mut header, "sub/new.txt", &b"hello"[..])
            .unwrap();
        let archive = builder.into_inner().unwrap();
        update(&["./*".to_string()], cwd, &archive).unwrap();
        let listed = list(".", true, cwd.to_str().unwrap()).unwrap();
        let names: Vec<_> = listed.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["./sub", "./sub/new.txt"]);
        assert_eq!(listed[1].size, 5);
        assert_eq!(listed[1].permissions, "rwxr--r--");
        let flat = list("sub", false, cwd.to_str().unwrap()).unwrap();
        assert_eq!(flat[0].name, "new.txt");
        assert!(list("missing", false, cwd.to_str().unwrap()).is_none());
    }

    #[test]
    fn deletes_are_what_rm_rf_would_do() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        for name in [".hidden", "a.txt", "sub/b.txt"] {
            let path = cwd.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        let names = |cwd: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(cwd)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        // What CodeOcean sends with every copy, cleaned by the API: rm refuses `.`.
        for refused in [".", "./", "sub/..", "..", "/"] {
            update(&[refused.to_string()], cwd, &[]).unwrap();
        }
        assert_eq!(names(cwd), [".hidden", "a.txt", "sub"]);
        update(&["./*".to_string()], cwd, &[]).unwrap();
        assert_eq!(names(cwd), [".hidden"], "the glob leaves hidden files");
        update(&[".hidden".to_string()], cwd, &[]).unwrap();
        assert!(names(cwd).is_empty());
    }

    #[test]
    fn a_linked_directory_is_listed_through_the_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/a"), "").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
        let listed = list("link", false, dir.path().to_str().unwrap()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "a");
    }
}
