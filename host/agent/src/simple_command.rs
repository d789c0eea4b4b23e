//! Running `bash -c COMMAND` without bash when COMMAND is one simple command of plain words.
//!
//! bash itself runs such a command by replacing itself with the program (a `-c` string's last
//! simple command is exec'd, not forked), so the program runs exactly as it would under bash; what
//! bash adds is its own start-up, which is most of a short execution's time. The agent does
//! bash's part instead, and only where bash's part is known:
//!
//! - COMMAND is plain words (letters, digits and `_ . / , : @ % + - =`, separated by spaces or
//!   tabs; no `=` in the first word), so bash would neither expand nor redirect anything, and its
//!   first word is no bash keyword or builtin;
//! - the environment holds nothing that changes how bash starts or finds programs (`BASH_ENV`,
//!   `SHELLOPTS`, `BASHOPTS`, exported functions, an inherited `SHLVL`, ...) and only valid
//!   names, `PATH` holds only absolute directories, and the working directory is a physical path;
//! - the program is found on `PATH` the way bash finds it (the first existing file, which must be
//!   executable for the identity);
//! - the runner's bash was seen to give a program exactly the variables this module adds (`PWD`,
//!   `SHLVL`, `_`): the backend runs [`probe_bash`] once with the same bash and passes what it
//!   printed to every agent that may take the shortcut ([`enable`]).
//!
//! Anything else, and a program that then cannot be started (a script without `#!`, a missing
//! interpreter), is run by bash as asked.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The agent's argument that prints its environment (for [`probe_bash`]).
pub(crate) const ENV_PROBE_ARG: &str = "__env-probe";

/// The shell the gateway asks for.
const BASH: &str = "/bin/bash";

/// bash's reserved words and builtins (bash 5): a command starting with one is bash's own.
const BASH_WORDS: &str = "! . : [ [[ ]] { } alias bg bind break builtin caller case cd command \
    compgen complete compopt continue coproc declare dirs disown do done echo elif else enable \
    esac eval exec exit export false fc fg fi for function getopts hash help history if in jobs \
    kill let local logout mapfile popd printf pushd pwd read readarray readonly return select set \
    shift shopt source suspend test then time times trap true type typeset ulimit umask unalias \
    unset until wait while";

/// Variables that change how bash starts, what it runs or where it finds programs.
const BASH_SETTINGS: &[&str] = &[
    "BASH_ENV",
    "BASHOPTS",
    "BASH_XTRACEFD",
    "CDPATH",
    "ENV",
    "EXECIGNORE",
    "OLDPWD",
    "POSIXLY_CORRECT",
    "SHELLOPTS",
];

/// What the runner's bash gives a program it execs, learnt by [`probe_bash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BashExports {
    /// `SHLVL` the program sees when bash inherited none.
    shlvl_unset: String,
}

static ENABLED: OnceLock<BashExports> = OnceLock::new();

/// A process to start in place of `bash -c COMMAND`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Direct {
    /// The program's path, as bash found it.
    pub(crate) program: PathBuf,
    /// Its arguments, the first as written in the command.
    pub(crate) argv: Vec<String>,
    /// Its whole environment.
    pub(crate) env: Vec<(String, String)>,
}

/// Enables the shortcut with what [`probe_bash`] learnt of the runner's bash (the `SHLVL` it
/// leaves a program it execs, when it inherited none).
pub(crate) fn enable(shlvl_unset: &str) {
    let _ = ENABLED.set(BashExports {
        shlvl_unset: shlvl_unset.to_string(),
    });
}

/// `--probe-bash`: has `/bin/bash` exec this agent with [`ENV_PROBE_ARG`] and prints the `SHLVL`
/// it left, if bash exported exactly what [`plan`] adds; exit 1 otherwise.
pub(crate) fn probe_bash() -> i32 {
    match probe("/") {
        Some(exports) => {
            println!("{}", exports.shlvl_unset);
            0
        }
        None => {
            eprintln!("poseidon-agent: bash exported something else: plain commands stay bash's");
            1
        }
    }
}

/// The shortcut's settings: `None` unless [`enable`] was called.
fn enabled() -> Option<&'static BashExports> {
    ENABLED.get()
}

fn probe(cwd: &str) -> Option<BashExports> {
    let me = std::env::current_exe().ok()?;
    let me = me.to_str()?;
    let path = std::env::var("PATH").ok()?;
    let out = std::process::Command::new(BASH)
        .arg("-c")
        .arg(format!("{me} {ENV_PROBE_ARG}"))
        .env_clear()
        .env("PATH", &path)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let seen = parse_env(&out.stdout);
    let exports = BashExports {
        shlvl_unset: value(&seen, "SHLVL")?.to_string(),
    };
    let expected = exports.add(vec![("PATH".to_string(), path)], cwd, me)?;
    (sorted(seen) == sorted(expected)).then_some(exports)
}

/// Prints the agent's environment, NUL-separated (the end of [`probe_bash`]'s probe).
pub(crate) fn print_environment() -> i32 {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    match std::io::stdout().write_all(&out) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

impl BashExports {
    /// `env` plus what bash exports to a program it execs from `cwd`; `None` where this module
    /// does not know what bash would do.
    fn add(
        &self,
        mut env: Vec<(String, String)>,
        cwd: &str,
        program: &str,
    ) -> Option<Vec<(String, String)>> {
        match value(&env, "PWD") {
            Some(pwd) if pwd != cwd => return None,
            Some(_) => {}
            None => env.push(("PWD".into(), cwd.into())),
        }
        // bash counts itself in, and out again as it execs the program; what it makes of an
        // inherited level is left to bash (the gateway sets none).
        if value(&env, "SHLVL").is_some() {
            return None;
        }
        env.push(("SHLVL".into(), self.shlvl_unset.clone()));
        env.retain(|(name, _)| name != "_");
        env.push(("_".into(), program.into()));
        Some(env)
    }
}

/// What to start instead of `argv` (a `bash -c COMMAND`), or `None` to run bash.
pub(crate) fn plan(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    uid: u32,
) -> Option<Direct> {
    plan_with(enabled()?, argv, env, cwd, uid)
}

fn plan_with(
    exports: &BashExports,
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    uid: u32,
) -> Option<Direct> {
    let [shell, flag, command] = argv else {
        return None;
    };
    if shell != BASH || flag != "-c" {
        return None;
    }
    let words = plain_words(command)?;
    if !environment_is_plain(env) || !is_physical(cwd) {
        return None;
    }
    let program = find_program(&words[0], value(env, "PATH")?, cwd, uid)?;
    let env = exports.add(env.to_vec(), cwd, program.to_str()?)?;
    Some(Direct {
        program,
        argv: words,
        env,
    })
}

/// The words of a command that bash would take literally, or `None`.
fn plain_words(command: &str) -> Option<Vec<String>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./,:@%+-=".contains(c);
    if !command.chars().all(|c| plain(c) || c == ' ' || c == '\t') {
        return None;
    }
    let words: Vec<String> = command
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let first = words.first()?;
    if first.contains('=') || BASH_WORDS.split_whitespace().any(|w| w == first) {
        return None;
    }
    Some(words)
}

fn environment_is_plain(env: &[(String, String)]) -> bool {
    let mut names = std::collections::HashSet::new();
    env.iter().all(|(name, _)| {
        is_identifier(name)
            && names.insert(name.as_str())
            && !BASH_SETTINGS.contains(&name.as_str())
            && !name.starts_with("BASH_FUNC_")
    })
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_physical(cwd: &str) -> bool {
    cwd.starts_with('/') && std::fs::canonicalize(cwd).is_ok_and(|real| real == Path::new(cwd))
}

/// The program bash would run for `word` from `cwd`: a path as written (bash execs it relative to
/// the working directory, and exports it as written), or the first file of that name in a `PATH`
/// directory — which must then be an executable file for `uid`.
fn find_program(word: &str, path: &str, cwd: &str, uid: u32) -> Option<PathBuf> {
    let (program, meta) = if word.contains('/') {
        let meta = std::fs::metadata(Path::new(cwd).join(word)).ok()?;
        (PathBuf::from(word), meta)
    } else {
        let mut found = None;
        for dir in path.split(':') {
            if !dir.starts_with('/') {
                return None;
            }
            let candidate = Path::new(dir).join(word);
            match std::fs::metadata(&candidate) {
                Ok(meta) => {
                    found = Some((candidate, meta));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => return None,
            }
        }
        found?
    };
    (meta.is_file() && executable_by(&meta, uid)).then_some(program)
}

/// Whether `uid` (whose only group is the group of the same number) may execute the file.
fn executable_by(meta: &std::fs::Metadata, uid: u32) -> bool {
    let mode = meta.mode();
    if uid == 0 {
        return mode & 0o111 != 0;
    }
    let bit = if meta.uid() == uid {
        0o100
    } else if meta.gid() == uid {
        0o010
    } else {
        0o001
    };
    mode & bit != 0
}

fn value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn parse_env(out: &[u8]) -> Vec<(String, String)> {
    out.split(|&b| b == 0)
        .filter_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            let (name, value) = entry.split_once('=')?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

fn sorted(mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    env.sort();
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> BashExports {
        BashExports {
            shlvl_unset: "0".into(),
        }
    }

    fn bash(command: &str) -> Vec<String> {
        vec![BASH.into(), "-c".into(), command.into()]
    }

    fn env() -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("HOME".into(), "/tmp".into()),
        ]
    }

    #[test]
    fn only_plain_words_are_taken() {
        for command in [
            "true",
            "echo hi",
            "FOO=1 env",
            "env > out",
            "ls *.py",
            "cat ~/x",
            "env; env",
            "env && env",
            "printf '%s' x",
            "env $HOME",
            "env\nenv",
            "time env",
            "exec env",
            "kill 1",
            "test -e x",
            "while",
            "",
            "   ",
        ] {
            assert_eq!(plain_words(command), None, "{command:?}");
        }
        assert_eq!(
            plain_words("  python3\t-u main.py  a=b ").unwrap(),
            ["python3", "-u", "main.py", "a=b"]
        );
    }

    #[test]
    fn bash_settings_in_the_environment_leave_the_command_to_bash() {
        for extra in ["BASH_ENV", "SHELLOPTS", "BASH_FUNC_env%%", "OLDPWD", "1X"] {
            let mut env = env();
            env.push((extra.into(), "x".into()));
            assert!(
                plan_with(&exports(), &bash("env"), &env, "/", 0).is_none(),
                "{extra}"
            );
        }
        let mut env = env();
        env.push(("SHLVL".into(), "3".into()));
        assert!(plan_with(&exports(), &bash("env"), &env, "/", 0).is_none());
    }

    #[test]
    fn a_plain_command_runs_the_program_bash_would_find_with_its_exports() {
        let direct = plan_with(&exports(), &bash("env -0"), &env(), "/", 0).unwrap();
        assert_eq!(direct.program, Path::new("/usr/bin/env"));
        assert_eq!(direct.argv, ["env", "-0"]);
        let mut expected = env();
        expected.extend([
            ("PWD".into(), "/".into()),
            ("SHLVL".into(), "0".into()),
            ("_".into(), "/usr/bin/env".into()),
        ]);
        assert_eq!(sorted(direct.env), sorted(expected));
        assert!(plan_with(&exports(), &bash("no-such-program-here"), &env(), "/", 0).is_none());
        assert!(plan_with(
            &exports(),
            &["/bin/sh".into(), "-c".into(), "env".into()],
            &env(),
            "/",
            0
        )
        .is_none());
    }

    #[test]
    fn a_relative_program_is_found_from_the_working_directory_and_exported_as_written() {
        let direct = plan_with(&exports(), &bash("./bin/env"), &env(), "/usr", 0).unwrap();
        assert_eq!(direct.program, Path::new("./bin/env"));
        assert!(direct.env.contains(&("_".into(), "./bin/env".into())));
        assert!(plan_with(&exports(), &bash("./bin/env"), &env(), "/etc", 0).is_none());
    }

    #[test]
    fn relative_path_entries_leave_the_search_to_bash() {
        let mut env = env();
        env[0].1 = "/nonexistent::/usr/bin".into();
        assert!(plan_with(&exports(), &bash("env"), &env, "/", 0).is_none());
    }

    /// The shortcut's promise: what the program sees equals what the machine's bash gives it.
    #[test]
    fn a_direct_start_sees_what_bash_gives_the_program() {
        use std::os::unix::process::CommandExt;
        if !Path::new(BASH).exists() {
            eprintln!("skipped: no {BASH}");
            return;
        }
        let cwd = std::fs::canonicalize(std::env::temp_dir()).unwrap();
        let cwd = cwd.to_str().unwrap();
        let argv = bash("env -0");
        let via_bash = std::process::Command::new(BASH)
            .args(&argv[1..])
            .env_clear()
            .envs(env())
            .current_dir(cwd)
            .output()
            .unwrap();
        let via_bash = parse_env(&via_bash.stdout);
        let exports = BashExports {
            shlvl_unset: value(&via_bash, "SHLVL").unwrap().to_string(),
        };
        let direct = plan_with(&exports, &argv, &env(), cwd, 0).unwrap();
        let seen = std::process::Command::new(&direct.program)
            .arg0(&direct.argv[0])
            .args(&direct.argv[1..])
            .env_clear()
            .envs(direct.env)
            .current_dir(cwd)
            .output()
            .unwrap();
        assert_eq!(sorted(parse_env(&seen.stdout)), sorted(via_bash));
    }
}
