//! File operations as shell scripts run inside a runner (by every backend), so paths mean what they
//! mean to the learner's program and nothing outside the runner can be reached; and the parsing of
//! their output. Both backends use these, so they list and download identically.

use crate::files::FileEntry;

/// Deletes the paths given as arguments (`./*` clears the working directory), then extracts the
/// tar archive on stdin. The exit status is tar's; `rm` failures are ignored as in Poseidon.
pub const UPDATE_SCRIPT: &str = r#"for p in "$@"; do
  if [ "$p" = "./*" ]; then rm -rf -- ./* 2>/dev/null; else rm -rf -- "$p"; fi
done
exec tar --extract --absolute-names --file=-"#;

/// Deletes the paths given as arguments without extracting anything.
pub const DELETE_SCRIPT: &str = r#"for p in "$@"; do
  if [ "$p" = "./*" ]; then rm -rf -- ./* 2>/dev/null; else rm -rf -- "$p"; fi
done
exit 0"#;

/// Lists `$1` (recursively when `$2` is 1) as NUL-separated fields, seven per entry. A path that
/// is a symbolic link to a directory (`/proc/self/cwd`) lists that directory, as the local
/// backend's agent does.
pub const LIST_SCRIPT: &str = r#"p="$1"
fmt='%M\0%s\0%T@\0%u\0%g\0%p\0%l\0'
if [ -d "$p" ]; then
  if [ "$2" = 1 ]; then exec find -H "$p" -mindepth 1 -printf "$fmt"; fi
  exec find -H "$p" -mindepth 1 -maxdepth 1 -printf '%M\0%s\0%T@\0%u\0%g\0%f\0%l\0'
elif [ -e "$p" ] || [ -L "$p" ]; then
  exec find "$p" -maxdepth 0 -printf "$fmt"
fi
exit 2"#;

/// Prints the size of the regular file `$1` on a line of its own, then its content.
pub const DOWNLOAD_SCRIPT: &str = r#"p="$1"
[ -f "$p" ] && [ -r "$p" ] || exit 2
size=$(stat -L -c %s -- "$p") || exit 2
printf '%s\n' "$size"
exec cat -- "$p""#;

/// Parses the output of [`LIST_SCRIPT`].
pub fn parse_listing(output: &[u8]) -> Vec<FileEntry> {
    let fields: Vec<&[u8]> = output.split(|b| *b == 0).collect();
    let mut entries = Vec::new();
    for chunk in fields.chunks_exact(7) {
        let text = |i: usize| String::from_utf8_lossy(chunk[i]).into_owned();
        let mode = text(0);
        let mut chars = mode.chars();
        let entry_type = chars.next().unwrap_or('?');
        let permissions: String = chars.collect();
        let size = text(1).parse().unwrap_or(0);
        let modification_time = text(2)
            .split('.')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let link = text(6);
        entries.push(FileEntry {
            name: text(5),
            entry_type,
            link_target: (entry_type == 'l' && !link.is_empty()).then_some(link),
            size,
            modification_time,
            permissions,
            owner: text(3),
            group: text(4),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_find_output() {
        let out = b"-rw-r--r--\x003\x001660764366.123\x00user\x00user\x00./a.txt\x00\x00lrwxrwxrwx\x001\x005.0\x00root\x00root\x00./l\x00a.txt\x00";
        let entries = parse_listing(out);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, "./a.txt");
        assert_eq!(entries[0].entry_type, '-');
        assert_eq!(entries[0].permissions, "rw-r--r--");
        assert_eq!(entries[0].size, 3);
        assert_eq!(entries[0].modification_time, 1660764366);
        assert_eq!(entries[0].link_target, None);
        assert_eq!(entries[1].link_target.as_deref(), Some("a.txt"));
    }
}
