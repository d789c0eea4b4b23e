//! Preprocessor: guards what students submit and run.
//!
//! Configuration (all optional):
//!
//! | key | meaning |
//! |---|---|
//! | `maxFiles` | most files one update may copy |
//! | `maxTotalBytes` | most bytes one update may copy, all files together |
//! | `maxFileBytes` | most bytes of a single file |
//! | `forbiddenPaths` | comma-separated glob patterns of paths that may not be written or deleted |
//! | `allowParentDirs` | `true` to allow `..` path components (refused by default) |
//! | `forbiddenCommands` | `;`-separated glob patterns of commands to refuse |
//! | `maxTimeLimit` | upper bound in seconds for an execution's time limit (also replaces "no limit") |
//! | `denyPrivileged` | `true` to refuse privileged executions |
//! | `env.NAME` | environment variable `NAME` to set on every execution (overrides the client) |
//!
//! Patterns are globs in the syntax of the `fast-glob` crate. Path patterns: `*` and `?`
//! match within one path segment, `**` matches any number of whole segments (`**/*.so`
//! matches `x.so` and `lib/x.so`), `{a,b}` and `[ab]` work as in a shell; a leading
//! `./` of paths is ignored. Command patterns: `*` matches any text, `?` one character.
//! A leading `!` is a literal character, not a negation. An invalid pattern (an unclosed
//! `[` or `{`, a trailing `\`) refuses every request it is checked against, with a message
//! naming it.

use std::borrow::Cow;

use poseidon_plugin_api::{
    config, export_preprocessor, info, ExecuteRequest, FileUpdate, Preprocessor,
};

/// Stands in for `/` in commands, so that `*` and `?` match across it (the matcher's
/// wildcards stop at `/`, which is right for paths only).
const COMMAND_SEPARATOR: char = '\u{7f}';

/// Matches `text` against a glob `pattern` (the `fast-glob` crate's syntax). With
/// `segments`, `*` and `?` do not match `/`, and `**` matches any number of whole path
/// segments, none included: `**/*.so` matches `x.so` as well as `lib/x.so`. Without
/// `segments` (commands), `*` matches any text.
///
/// An invalid pattern is an error naming it, so a typo in the configuration refuses
/// requests visibly instead of letting everything pass.
pub fn glob_match(pattern: &str, text: &str, segments: bool) -> Result<bool, String> {
    let patterns = [pattern.to_string()];
    Ok(Globs::new(&patterns, segments)?.first_match(text).is_some())
}

/// Patterns checked and prepared once per call, then matched against each path or the
/// command. They are matched in place: `fast-glob` has no compile step, which matters
/// because a plugin instance lives for one call, so the guard would otherwise compile its
/// patterns anew in every call (`globset`: 1–16 µs for one or two patterns).
struct Globs<'p> {
    /// (as configured, as matched): a leading `!` escaped (fast-glob would negate), and for
    /// commands every `/` replaced by [`COMMAND_SEPARATOR`].
    patterns: Vec<(&'p String, Cow<'p, str>)>,
    segments: bool,
}

impl<'p> Globs<'p> {
    /// `patterns` with path (`segments`) or command semantics; an error names the first
    /// invalid one.
    fn new(patterns: &'p [String], segments: bool) -> Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|p| {
                fast_glob::validate(p).map_err(|e| format!("invalid pattern {p:?}: {e}"))?;
                let literal = match p.starts_with('!') {
                    true => Cow::Owned(format!("\\{p}")),
                    false => Cow::Borrowed(p.as_str()),
                };
                let matched = match segments {
                    true => literal,
                    false => Cow::Owned(without_slashes(&literal)),
                };
                Ok((p, matched))
            })
            .collect::<Result<_, String>>()?;
        Ok(Globs { patterns, segments })
    }

    /// The first pattern (as configured) that matches `text`.
    fn first_match(&self, text: &str) -> Option<&'p String> {
        let text = match self.segments {
            true => Cow::Borrowed(text),
            false => Cow::Owned(without_slashes(text)),
        };
        self.patterns
            .iter()
            .find(|(_, matched)| fast_glob::glob_match(matched.as_ref(), text.as_ref()))
            .map(|(p, _)| *p)
    }
}

/// `text` with every `/` replaced by [`COMMAND_SEPARATOR`].
fn without_slashes(text: &str) -> String {
    text.replace('/', COMMAND_SEPARATOR.encode_utf8(&mut [0; 4]))
}

/// The guard's settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Most files per update.
    pub max_files: Option<usize>,
    /// Most bytes per update.
    pub max_total_bytes: Option<u64>,
    /// Most bytes per file.
    pub max_file_bytes: Option<u64>,
    /// Forbidden path patterns.
    pub forbidden_paths: Vec<String>,
    /// Whether `..` components are allowed.
    pub allow_parent_dirs: bool,
    /// Forbidden command patterns.
    pub forbidden_commands: Vec<String>,
    /// Upper bound for time limits.
    pub max_time_limit: Option<i64>,
    /// Whether privileged executions are refused.
    pub deny_privileged: bool,
    /// Environment variables to inject.
    pub inject_env: Vec<(String, String)>,
}

impl Settings {
    /// Reads the settings from the plugin configuration.
    pub fn from_config() -> Self {
        let config = config::Snapshot::read();
        Self::for_execute(&config).with_files_from(Self::for_files(&config))
    }

    /// What a file update is checked against. The configuration is read with one host call
    /// per plugin call ([`config::Snapshot`]): each host call copies its strings across.
    pub fn for_files(config: &config::Snapshot) -> Self {
        Settings {
            max_files: config.parse("maxFiles"),
            max_total_bytes: config.parse("maxTotalBytes"),
            max_file_bytes: config.parse("maxFileBytes"),
            forbidden_paths: config.list("forbiddenPaths"),
            allow_parent_dirs: config.parse("allowParentDirs").unwrap_or(false),
            ..Settings::default()
        }
    }

    /// What an execute request is checked against and given.
    pub fn for_execute(config: &config::Snapshot) -> Self {
        let commands = config
            .get("forbiddenCommands")
            .map(|v| {
                v.split(';')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Settings {
            forbidden_commands: commands,
            max_time_limit: config.parse("maxTimeLimit"),
            deny_privileged: config.parse("denyPrivileged").unwrap_or(false),
            inject_env: config
                .with_prefix("env.")
                .filter(|(n, _)| !n.is_empty())
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            ..Settings::default()
        }
    }

    /// These settings with the file settings of `files`.
    fn with_files_from(self, files: Settings) -> Self {
        Settings {
            max_files: files.max_files,
            max_total_bytes: files.max_total_bytes,
            max_file_bytes: files.max_file_bytes,
            forbidden_paths: files.forbidden_paths,
            allow_parent_dirs: files.allow_parent_dirs,
            ..self
        }
    }

    /// Checks one path against `..` and the forbidden patterns (prepared once per update;
    /// an invalid one refuses the path after the `..` check, as before).
    fn check_path(&self, forbidden: &Result<Globs<'_>, String>, path: &str) -> Result<(), String> {
        let normalized = path.trim_start_matches("./");
        if !self.allow_parent_dirs && normalized.split('/').any(|c| c == "..") {
            return Err(format!("path {path:?} leaves the working directory"));
        }
        let forbidden = forbidden.as_ref().map_err(String::clone)?;
        if let Some(p) = forbidden.first_match(normalized) {
            return Err(format!("path {path:?} is forbidden (matches {p:?})"));
        }
        Ok(())
    }

    /// Checks a file update.
    pub fn check_files(&self, update: FileUpdate) -> Result<FileUpdate, String> {
        if let Some(max) = self.max_files {
            if update.copy.len() > max {
                return Err(format!(
                    "too many files: {} (at most {max})",
                    update.copy.len()
                ));
            }
        }
        if let Some(max) = self.max_file_bytes {
            if let Some(f) = update.copy.iter().find(|f| f.content.len() as u64 > max) {
                return Err(format!(
                    "file {:?} is too large: {} bytes (at most {max})",
                    f.path,
                    f.content.len()
                ));
            }
        }
        if let Some(max) = self.max_total_bytes {
            let total = update.total_size();
            if total > max {
                return Err(format!("files too large: {total} bytes (at most {max})"));
            }
        }
        let forbidden = Globs::new(&self.forbidden_paths, true);
        for path in update
            .copy
            .iter()
            .map(|f| f.path.as_str())
            .chain(update.delete.iter().map(String::as_str))
        {
            self.check_path(&forbidden, path)?;
        }
        Ok(update)
    }

    /// Checks and rewrites an execute request.
    pub fn check_execute(&self, mut request: ExecuteRequest) -> Result<ExecuteRequest, String> {
        if self.deny_privileged && request.privileged {
            return Err("privileged execution is not allowed".to_string());
        }
        if let Some(p) = Globs::new(&self.forbidden_commands, false)?.first_match(&request.command)
        {
            return Err(format!("command refused (matches {p:?})"));
        }
        if let Some(max) = self.max_time_limit {
            if request.time_limit <= 0 || request.time_limit > max {
                request.time_limit = max;
            }
        }
        for (name, value) in &self.inject_env {
            request.set_env_var(name.clone(), value.clone());
        }
        Ok(request)
    }
}

/// The exported plugin.
pub struct SubmissionGuard;

impl Preprocessor for SubmissionGuard {
    fn preprocess_execute(request: ExecuteRequest) -> Result<ExecuteRequest, String> {
        Settings::for_execute(&config::Snapshot::read())
            .check_execute(request)
            .inspect_err(|e| info!("rejected execute: {e}"))
    }

    fn preprocess_files(update: FileUpdate) -> Result<FileUpdate, String> {
        Settings::for_files(&config::Snapshot::read())
            .check_files(update)
            .inspect_err(|e| info!("rejected files: {e}"))
    }
}

export_preprocessor!(SubmissionGuard);

#[cfg(test)]
mod tests {
    use super::*;
    use poseidon_plugin_api::{testing::set_config, File};

    fn update(files: &[(&str, usize)], delete: &[&str]) -> FileUpdate {
        FileUpdate {
            copy: files
                .iter()
                .map(|(p, n)| File {
                    path: p.to_string(),
                    content: vec![b'x'; *n],
                })
                .collect(),
            delete: delete.iter().map(|s| s.to_string()).collect(),
            environment_id: 1,
            principal: None,
        }
    }

    fn exec(command: &str) -> ExecuteRequest {
        ExecuteRequest {
            command: command.into(),
            env: vec![("LANG".into(), "C".into())],
            time_limit: 0,
            privileged: false,
            environment_id: 1,
            principal: Some("t".into()),
        }
    }

    #[test]
    fn globs() {
        let m = |p: &str, t: &str, seg: bool| glob_match(p, t, seg).unwrap();
        assert!(m("*.so", "x.so", true));
        assert!(!m("*.so", "lib/x.so", true));
        assert!(m("**/*.so", "lib/x.so", true));
        assert!(m("**/*.so", "a/b/x.so", true));
        assert!(m(".git/**", ".git/config", true));
        assert!(m("?.py", "a.py", true));
        assert!(!m("?.py", "ab.py", true));
        assert!(!m("?", "/", true));
        assert!(m("*.{so,dll}", "x.dll", true));
        assert!(m("*curl *", "cd x && curl http://h", false));
        assert!(m("*/bin/rm *", "cd /tmp && /bin/rm -rf x", false));
        assert!(m("a?b", "a/b", false));
        assert!(!m("a?b", "a/b", true));
        assert!(m("[/]x", "/x", false));
        // A leading `!` is literal, as in globset, not a negation.
        assert!(m("!x", "!x", true));
        assert!(!m("!x", "y", true));
        assert!(!m("!x", "y", false));
        assert!(!m(".git/**", ".git", true));
        assert!(!m("*curl *", "make", false));
        assert!(m("", "", true));
        assert!(!m("", "a", true));
        for bad in ["[a", "{a,b", "a\\"] {
            let e = glob_match(bad, "a", true).unwrap_err();
            assert!(e.contains(&format!("invalid pattern {bad:?}")), "{e}");
        }
    }

    /// The bug of the hand-written matcher: `**/` had to match at least one directory,
    /// so a shared library at the top level passed `**/*.so`.
    #[test]
    fn double_star_slash_matches_top_level_files() {
        assert!(glob_match("**/*.so", "x.so", true).unwrap());
        assert!(glob_match("**/secret/**", "secret/key", true).unwrap());
        let s = Settings {
            forbidden_paths: vec!["**/*.so".into()],
            ..Settings::default()
        };
        let e = s.check_files(update(&[("x.so", 1)], &[])).unwrap_err();
        assert!(e.contains("path \"x.so\" is forbidden"), "{e}");
        assert!(s.check_files(update(&[("./x.so", 1)], &[])).is_err());
        assert!(s.check_files(update(&[], &["x.so"])).is_err());
    }

    #[test]
    fn invalid_patterns_refuse_with_a_message() {
        let s = Settings {
            forbidden_paths: vec!["src/[".into()],
            ..Settings::default()
        };
        let e = s.check_files(update(&[("a.py", 1)], &[])).unwrap_err();
        assert!(e.contains("invalid pattern"), "{e}");
    }

    #[test]
    fn limits_on_files() {
        let s = Settings {
            max_files: Some(2),
            max_total_bytes: Some(10),
            max_file_bytes: Some(6),
            ..Settings::default()
        };
        assert!(s.check_files(update(&[("a", 5), ("b", 5)], &[])).is_ok());
        let e = s
            .check_files(update(&[("a", 1), ("b", 1), ("c", 1)], &[]))
            .unwrap_err();
        assert!(e.contains("too many files"), "{e}");
        let e = s.check_files(update(&[("a", 7)], &[])).unwrap_err();
        assert!(e.contains("\"a\" is too large"), "{e}");
        let e = s
            .check_files(update(&[("a", 6), ("b", 6)], &[]))
            .unwrap_err();
        assert!(e.contains("files too large: 12 bytes"), "{e}");
    }

    #[test]
    fn forbidden_paths_and_parent_dirs() {
        let s = Settings {
            forbidden_paths: vec!["**/*.so".into(), ".git/**".into()],
            ..Settings::default()
        };
        assert!(s.check_files(update(&[("src/main.py", 1)], &[])).is_ok());
        assert!(s.check_files(update(&[("./lib/x.so", 1)], &[])).is_err());
        assert!(s.check_files(update(&[], &[".git/HEAD"])).is_err());
        let e = s
            .check_files(update(&[("../etc/passwd", 1)], &[]))
            .unwrap_err();
        assert!(e.contains("leaves the working directory"), "{e}");
    }

    #[test]
    fn commands_env_and_limits() {
        let s = Settings {
            forbidden_commands: vec!["*curl *".into(), "sudo*".into()],
            max_time_limit: Some(30),
            deny_privileged: true,
            inject_env: vec![("LANG".into(), "C.UTF-8".into()), ("X".into(), "1".into())],
            ..Settings::default()
        };
        assert!(s.check_execute(exec("sudo ls")).is_err());
        assert!(s.check_execute(exec("curl http://x")).is_err());
        let mut privileged = exec("ls");
        privileged.privileged = true;
        assert!(s.check_execute(privileged).is_err());
        let out = s.check_execute(exec("python main.py")).unwrap();
        assert_eq!(out.time_limit, 30);
        assert_eq!(out.env_var("LANG"), Some("C.UTF-8"));
        assert_eq!(out.env_var("X"), Some("1"));
        let mut short = exec("ls");
        short.time_limit = 5;
        assert_eq!(s.check_execute(short).unwrap().time_limit, 5);
    }

    #[test]
    fn reads_configuration() {
        set_config([
            ("maxFiles", "1"),
            ("forbiddenPaths", "*.exe, secret/**"),
            ("forbiddenCommands", "rm -rf *; *:(){*"),
            ("env.PYTHONDONTWRITEBYTECODE", "1"),
        ]);
        let s = Settings::from_config();
        assert_eq!(s.max_files, Some(1));
        assert_eq!(s.forbidden_paths, vec!["*.exe", "secret/**"]);
        assert_eq!(s.forbidden_commands, vec!["rm -rf *", "*:(){*"]);
        assert_eq!(
            s.inject_env,
            vec![("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string())]
        );
        // Each kind of call reads only its own part; together they are the whole.
        let config = poseidon_plugin_api::config::Snapshot::read();
        let (files, execute) = (Settings::for_files(&config), Settings::for_execute(&config));
        assert_eq!((files.max_files, execute.max_files), (Some(1), None));
        assert!(files.forbidden_commands.is_empty() && files.inject_env.is_empty());
        assert!(execute.forbidden_paths.is_empty());
        assert_eq!(execute.with_files_from(files), s);
        assert!(SubmissionGuard::preprocess_execute(exec("rm -rf /")).is_err());
        assert!(SubmissionGuard::preprocess_files(update(&[("a.exe", 1)], &[])).is_err());
    }
}
