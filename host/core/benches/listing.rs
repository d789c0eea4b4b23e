//! Micro-benchmark of parsing a file listing (`poseidon_core::scripts::parse_listing`, the output
//! of `LIST_SCRIPT`'s `find -printf` with seven NUL-separated fields per entry).
//!
//! `cargo bench -p poseidon-core --bench listing`

mod support;

use poseidon_core::scripts::parse_listing;
use support::Bencher;

/// `find` output for `n` entries: a directory per 50 files, some links.
fn find_output(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let dir = i / 50;
        let (mode, size, link) = match i % 50 {
            0 => ("drwxr-xr-x", 4096, ""),
            7 => ("lrwxrwxrwx", 9, "target.py"),
            _ => ("-rw-r--r--", 100 + i, ""),
        };
        let fields = [
            mode.to_string(),
            size.to_string(),
            format!("1700000000.{:010}", i),
            "user".to_string(),
            "user".to_string(),
            format!("./exercise/dir-{dir}/file-{i}.py"),
            link.to_string(),
        ];
        for field in fields {
            out.extend_from_slice(field.as_bytes());
            out.push(0);
        }
    }
    out
}

fn main() {
    let b = Bencher::from_args();
    for n in [10, 1000, 10_000] {
        let output = find_output(n);
        let name = format!("parse_listing/{n} entries");
        b.run(&name, Some(output.len() as u64), || {
            let entries = parse_listing(&output);
            assert_eq!(entries.len(), n);
            entries
        });
    }
}
