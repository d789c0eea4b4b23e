//! Micro-benchmarks of the file model: building the tar stream of a file update
//! (`poseidon_core::files::build_tar`) and cleaning paths.
//!
//! `cargo bench -p poseidon-core --bench files`

mod support;

use poseidon_core::files::{build_tar, clean_path, FileCopy};
use support::Bencher;

fn files(count: usize, size: usize, prefix: &str) -> Vec<FileCopy> {
    (0..count)
        .map(|i| FileCopy {
            path: format!("{prefix}file-{i}.py"),
            content: vec![b'x'; size],
        })
        .collect()
}

fn main() {
    let b = Bencher::from_args();
    let long = format!("{}/", "deeply-nested-directory".repeat(6));
    let cases: Vec<(&str, Vec<FileCopy>)> = vec![
        ("build_tar/1 file of 30 B (a main.py)", files(1, 30, "")),
        (
            "build_tar/10 files of 2 KiB (an exercise)",
            files(10, 2048, "src/"),
        ),
        ("build_tar/100 files of 10 KiB", files(100, 10 * 1024, "")),
        ("build_tar/1 file of 1 MiB", files(1, 1024 * 1024, "")),
        (
            "build_tar/10 files with 150-character paths (PAX headers)",
            files(10, 2048, &long),
        ),
    ];
    for (name, copies) in &cases {
        let bytes: usize = copies.iter().map(|c| c.content.len()).sum();
        b.run(name, Some(bytes as u64), || build_tar(copies));
    }
    let paths = [
        "./src/../src/./main.py",
        "/workspace/a/b/../../c/d.txt",
        "exercise/",
    ];
    b.run("clean_path/3 paths", None, || {
        paths.iter().map(|p| clean_path(p)).collect::<Vec<_>>()
    });
}
