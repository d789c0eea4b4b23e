//! `poseidon plugin …`: the plugin author's commands, none of which needs a server or root.
//!
//! - `check FILE`: what the server would think of the file (see [`crate::plugins::check_command`]);
//! - `call FILE --kind KIND --input JSON [--config k=v]…`: one call on your own input, with the
//!   server's bounds, printing the answer and how long the call took;
//! - `new KIND NAME [--lang rust|python]`: a buildable project for a plugin of that kind
//!   (WIT 0.2): Rust with `wit-bindgen`, or Python with componentize-py.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use poseidon_core::execution::ExecutionRequest;
use poseidon_core::files::{FileCopy, FileUpdate};

use poseidon_plugin_host::{
    AuthRequest, LifecycleEvent, PluginEntry, PluginHost, PluginKind, PluginsConfig,
    PoolSizerInput, Principal,
};

/// The usage of the plugin commands.
pub const USAGE: &str = "       poseidon plugin check FILE
       poseidon plugin call FILE --kind KIND --input JSON [--config KEY=VALUE]...
       poseidon plugin new KIND NAME [--lang rust|python]";

/// Runs `poseidon plugin ARGS…`; returns the process exit code (2: bad usage).
pub fn run(args: &[String]) -> i32 {
    match args {
        [check, file] if check == "check" => crate::plugins::check_command(Path::new(file)),
        [call, file, rest @ ..] if call == "call" => match CallArgs::parse(file, rest) {
            Ok(call) => report(call.run()),
            Err(e) => usage_error(&e),
        },
        [new, kind, name, rest @ ..] if new == "new" => match rest {
            [] => report(new_project(kind, Path::new(name), Lang::Rust)),
            [flag, lang] if flag == "--lang" => match lang.as_str() {
                "rust" => report(new_project(kind, Path::new(name), Lang::Rust)),
                "python" => report(new_project(kind, Path::new(name), Lang::Python)),
                other => usage_error(&format!("--lang {other}: one of rust, python")),
            },
            _ => usage_error("unexpected arguments after NAME"),
        },
        _ => usage_error("unknown plugin command"),
    }
}

fn usage_error(message: &str) -> i32 {
    eprintln!("{message}\nusage:\n{USAGE}");
    2
}

fn report(result: Result<(), String>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn parse_kind(kind: &str) -> Result<PluginKind, String> {
    PluginKind::ALL
        .into_iter()
        .find(|k| k.interface() == kind)
        .ok_or_else(|| {
            let all: Vec<_> = PluginKind::ALL.iter().map(|k| k.interface()).collect();
            format!("unknown kind {kind:?}; one of {}", all.join(", "))
        })
}

/// The arguments of `plugin call`.
struct CallArgs {
    file: PathBuf,
    kind: PluginKind,
    input: serde_json::Value,
    config: BTreeMap<String, String>,
}

impl CallArgs {
    fn parse(file: &str, rest: &[String]) -> Result<CallArgs, String> {
        let mut kind = None;
        let mut input = None;
        let mut config = BTreeMap::new();
        let mut it = rest.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--kind" => kind = Some(parse_kind(value()?)?),
                "--input" => {
                    let text = value()?;
                    input = Some(
                        serde_json::from_str(text)
                            .map_err(|e| format!("--input is not JSON: {e}"))?,
                    )
                }
                "--config" => {
                    let pair = value()?;
                    let (k, v) = pair
                        .split_once('=')
                        .ok_or_else(|| format!("--config {pair:?} is not KEY=VALUE"))?;
                    config.insert(k.to_string(), v.to_string());
                }
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        Ok(CallArgs {
            file: PathBuf::from(file),
            kind: kind.ok_or("--kind is required")?,
            input: input.ok_or("--input is required")?,
            config,
        })
    }

    fn run(self) -> Result<(), String> {
        show_plugin_output();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        runtime.block_on(self.call())
    }

    async fn call(self) -> Result<(), String> {
        let file = std::fs::canonicalize(&self.file)
            .map_err(|e| format!("{}: {e}", self.file.display()))?;
        let (Some(directory), Some(name)) = (file.parent(), file.file_name()) else {
            return Err(format!("{}: not a file", file.display()));
        };
        let entry: PluginEntry = serde_json::from_value(serde_json::json!({
            "file": name.to_string_lossy(),
            "kind": self.kind,
        }))
        .map_err(|e| e.to_string())?;
        let config = PluginsConfig {
            directory: directory.to_path_buf(),
            entries: vec![PluginEntry {
                config: self.config,
                ..entry
            }],
            watch: false,
            // A Python plugin takes seconds to compile: the next call of the same file
            // reuses the machine code.
            cache_directory: user_cache_directory(),
            ..PluginsConfig::default()
        };
        let host = PluginHost::start(config).await.map_err(|e| e.to_string())?;
        let status = || host.status().into_iter().next();
        if let Some(error) = status().and_then(|s| if s.loaded { None } else { s.last_error }) {
            return Err(error);
        }
        let input = self.input;
        let bad_input = |e: serde_json::Error| {
            format!("--input does not fit {}: {e}", self.kind.with_article())
        };
        let started = Instant::now();
        let answer = match self.kind {
            PluginKind::PoolSizer => {
                let input: PoolSizerInput = serde_json::from_value(input).map_err(bad_input)?;
                serde_json::to_value(host.pool_size(input).await)
            }
            PluginKind::Preprocessor if input.get("command").is_some() => {
                let input: ExecuteJson = serde_json::from_value(input).map_err(bad_input)?;
                let (environment, principal) = input.runner();
                let answer = host
                    .preprocess_execute(environment, principal.as_ref(), input.request())
                    .await
                    .map(|out| ExecuteJson::new(out, &input));
                serde_json::to_value(answer)
            }
            PluginKind::Preprocessor => {
                let input: FilesJson = serde_json::from_value(input).map_err(bad_input)?;
                let (environment, principal) = input.runner();
                let answer = host
                    .preprocess_files(environment, principal.as_ref(), input.update())
                    .await
                    .map(|out| FilesJson::new(out, &input));
                serde_json::to_value(answer)
            }
            PluginKind::Authenticator => {
                let input: AuthRequest = serde_json::from_value(input).map_err(bad_input)?;
                serde_json::to_value(host.authenticate(&input).await)
            }
            PluginKind::Observer => {
                let events: Vec<LifecycleEvent> = match input {
                    serde_json::Value::Array(_) => serde_json::from_value(input),
                    one => serde_json::from_value(one).map(|e| vec![e]),
                }
                .map_err(bad_input)?;
                let count = events.len() as u64;
                for event in events {
                    host.observe(event);
                }
                // The observer runs after the fact: wait until it has taken the events.
                let deadline = Instant::now() + Duration::from_secs(10);
                while host.observer_stats().delivered < count
                    && status().is_some_and(|s| s.failures == 0)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                serde_json::to_value(host.observer_stats())
            }
        }
        .map_err(|e| e.to_string())?;
        let took = started.elapsed();
        let st = status().ok_or("the plugin vanished")?;
        println!("{answer}");
        eprintln!(
            "{}: {} (WIT {}), call took {} µs",
            file.display(),
            self.kind,
            st.wit_version.unwrap_or_default(),
            took.as_micros()
        );
        match (st.failures, st.last_error) {
            (0, _) => Ok(()),
            (_, error) => Err(format!(
                "the call failed: {}",
                error.unwrap_or_else(|| "unknown error".into())
            )),
        }
    }
}

/// What `plugin call` logs unless `POSEIDON_LOG` says otherwise: everything the plugin logs
/// (`host::log`, every level) and writes to stderr (a panic message, a Python traceback), and
/// the host's warnings and errors.
const CALL_LOG: &str = "warn,poseidon_plugin_host::runtime=trace";

/// Shows the plugin's log lines and stderr on this command's stderr, as a server's log would
/// (filtered by `POSEIDON_LOG` as the server's is, else [`CALL_LOG`]); without this they
/// were lost, and a failing call said only e.g. "Python function threw an unexpected
/// exception", not why.
fn show_plugin_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSEIDON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(CALL_LOG));
    let _already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
}

/// Where `plugin call` and `plugin check` keep compiled plugins: `$POSEIDON_PLUGIN_CACHE`, else
/// `$XDG_CACHE_HOME/poseidon/compiled-plugins` or `~/.cache/poseidon/compiled-plugins`.
pub(crate) fn user_cache_directory() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("POSEIDON_PLUGIN_CACHE").or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".cache")))
            .map(|cache| cache.join("poseidon/compiled-plugins"))
    })
}

/// The WIT the generated projects are built against (copied into each project).
const WIT: &str = include_str!("../../wit/v0.2/plugins.wit");

/// The componentize-py release generated Python projects install (the one
/// `plugins/build.sh` uses).
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// The language of a new plugin project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lang {
    Rust,
    Python,
}

/// Whether cargo accepts `name` as a package name (ASCII only): it starts with a letter or
/// `_` (not a digit or `-`) and holds only letters, digits, `-` and `_`.
fn valid_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Writes a buildable plugin project of `kind` in `lang` into the new directory `dir`.
fn new_project(kind: &str, dir: &Path, lang: Lang) -> Result<(), String> {
    let kind = parse_kind(kind)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| valid_package_name(n))
        .ok_or_else(|| {
            format!(
                "{}: the name must start with a letter or _ and hold only letters, digits, - and _ (as cargo requires)",
                dir.display()
            )
        })?;
    if dir.exists() {
        return Err(format!("{} exists already", dir.display()));
    }
    let write = |path: &Path, text: &str| {
        std::fs::create_dir_all(path.parent().unwrap_or(dir))
            .and_then(|()| std::fs::write(path, text))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&dir.join("wit/plugins.wit"), WIT)?;
    if lang == Lang::Python {
        return new_python_project(kind, dir, &name, write);
    }
    write(
        &dir.join("Cargo.toml"),
        &format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nwit-bindgen = \"0.61\"\n\n\
             # Measured: faster calls, and no larger files than opt-level \"s\".\n[profile.release]\nopt-level = 3\nlto = true\nstrip = \"debuginfo\"\n"
        ),
    )?;
    write(&dir.join("src/lib.rs"), template(kind, lang))?;
    write(&dir.join(".gitignore"), "/target\n")?;
    println!(
        "created {dir}: {a_kind} plugin (poseidon:plugins@0.2.0)\n\
         build:  cd {dir} && cargo build --target wasm32-wasip2 --release\n\
         try:    poseidon plugin call {dir}/target/wasm32-wasip2/release/{file}.wasm --kind {kind} --input '{input}'",
        dir = dir.display(),
        a_kind = kind.with_article(),
        file = name.replace('-', "_"),
        input = example_input(kind),
    );
    Ok(())
}

/// The Python side of [`new_project`]: `app.py`, `build.sh` (componentize-py from PyPI
/// into `.venv` on first use) and `.gitignore`.
fn new_python_project(
    kind: PluginKind,
    dir: &Path,
    name: &str,
    write: impl Fn(&Path, &str) -> Result<(), String>,
) -> Result<(), String> {
    let file = name.replace('-', "_");
    write(&dir.join("app.py"), template(kind, Lang::Python))?;
    let build = dir.join("build.sh");
    write(
        &build,
        &format!(
            "#!/bin/sh\n\
             # Builds {file}.wasm from app.py with componentize-py (installed from PyPI into .venv\n\
             # on first use; set COMPONENTIZE_PY to use another installation).\n\
             set -eu\n\
             cd \"$(dirname \"$0\")\"\n\
             tool=\"${{COMPONENTIZE_PY:-.venv/bin/componentize-py}}\"\n\
             if [ ! -x \"$tool\" ]; then\n\
             \x20   python3 -m venv .venv\n\
             \x20   .venv/bin/pip install --quiet componentize-py=={COMPONENTIZE_PY_VERSION}\n\
             fi\n\
             \"$tool\" -d wit -w {world} componentize app -o {file}.wasm\n",
            world = kind.world(),
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&build, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", build.display()))?;
    }
    write(&dir.join(".gitignore"), "/.venv\n/*.wasm\n/wit_world\n")?;
    println!(
        "created {dir}: {a_kind} plugin in Python (poseidon:plugins@0.2.0)\n\
         build:  {dir}/build.sh\n\
         try:    poseidon plugin call {dir}/{file}.wasm --kind {kind} --input '{input}'",
        dir = dir.display(),
        a_kind = kind.with_article(),
        input = example_input(kind),
    );
    Ok(())
}

/// A JSON input for `plugin call` of `kind`, shown after `plugin new`.
fn example_input(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::PoolSizer => {
            r#"{"environment":{"id":10},"pool":{"configuredSize":5,"now":1767225600}}"#
        }
        PluginKind::Preprocessor => r#"{"command":"python main.py","environmentId":10}"#,
        PluginKind::Authenticator => {
            r#"{"method":"GET","path":"/api/v1/runners","poseidonToken":"t"}"#
        }
        PluginKind::Observer => {
            r#"{"atMs":0,"runnerId":"10-a","environmentId":10,"tenant":null,"kind":"claimed"}"#
        }
    }
}

/// The source a new plugin starts from (`host/plugin-templates/`): `src/lib.rs` in Rust,
/// `app.py` in Python, a small working example of the kind, alike in both languages.
fn template(kind: PluginKind, lang: Lang) -> &'static str {
    use PluginKind::*;
    match (lang, kind) {
        (Lang::Rust, PoolSizer) => include_str!("../plugin-templates/rust/pool_sizer.rs"),
        (Lang::Rust, Preprocessor) => include_str!("../plugin-templates/rust/preprocessor.rs"),
        (Lang::Rust, Authenticator) => include_str!("../plugin-templates/rust/authenticator.rs"),
        (Lang::Rust, Observer) => include_str!("../plugin-templates/rust/observer.rs"),
        (Lang::Python, PoolSizer) => include_str!("../plugin-templates/python/pool_sizer.py"),
        (Lang::Python, Preprocessor) => include_str!("../plugin-templates/python/preprocessor.py"),
        (Lang::Python, Authenticator) => {
            include_str!("../plugin-templates/python/authenticator.py")
        }
        (Lang::Python, Observer) => include_str!("../plugin-templates/python/observer.py"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_arguments_are_parsed_and_checked() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = CallArgs::parse(
            "x.wasm",
            &args(&["--kind", "observer", "--input", "[]", "--config", "a=b=c"]),
        )
        .unwrap();
        assert_eq!(c.kind, PluginKind::Observer);
        assert_eq!(c.config.get("a").map(String::as_str), Some("b=c"));
        let e = CallArgs::parse("x.wasm", &args(&["--kind", "sizer", "--input", "{}"]))
            .err()
            .unwrap();
        assert!(e.contains("unknown kind \"sizer\""), "{e}");
        let e = CallArgs::parse("x.wasm", &args(&["--kind", "observer", "--input", "{"]))
            .err()
            .unwrap();
        assert!(e.contains("--input is not JSON"), "{e}");
        let e = CallArgs::parse("x.wasm", &args(&["--kind", "observer"]))
            .err()
            .unwrap();
        assert_eq!(e, "--input is required");
    }
}

/// `--input` of a preprocessor call on an execution, and its answer: the WIT record's
/// fields (`timeLimit` in seconds, 0 = none; the runner's `environmentId` and tenant as
/// `principal`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ExecuteJson {
    command: String,
    env: Vec<(String, String)>,
    time_limit: u64,
    privileged: bool,
    environment_id: u64,
    principal: Option<String>,
}

impl ExecuteJson {
    fn runner(&self) -> (u64, Option<Principal>) {
        (self.environment_id, principal(&self.principal))
    }

    fn request(&self) -> ExecutionRequest {
        ExecutionRequest {
            command: self.command.clone(),
            environment: self.env.clone(),
            time_limit: (self.time_limit > 0).then(|| Duration::from_secs(self.time_limit)),
            privileged: self.privileged,
        }
    }

    fn new(out: ExecutionRequest, input: &ExecuteJson) -> ExecuteJson {
        ExecuteJson {
            command: out.command,
            env: out.environment,
            time_limit: out.time_limit.map_or(0, |d| d.as_secs()),
            privileged: out.privileged,
            environment_id: input.environment_id,
            principal: input.principal.clone(),
        }
    }
}

/// `--input` of a preprocessor call on a file update, and its answer (the WIT record's
/// fields; `content` as an array of bytes).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct FilesJson {
    copy: Vec<FileJson>,
    delete: Vec<String>,
    environment_id: u64,
    principal: Option<String>,
}

/// A file of [`FilesJson`].
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct FileJson {
    path: String,
    content: Vec<u8>,
}

impl FilesJson {
    fn runner(&self) -> (u64, Option<Principal>) {
        (self.environment_id, principal(&self.principal))
    }

    fn update(&self) -> FileUpdate {
        FileUpdate {
            delete: self.delete.clone(),
            copy: self
                .copy
                .iter()
                .map(|f| FileCopy {
                    path: f.path.clone(),
                    content: f.content.clone(),
                })
                .collect(),
        }
    }

    fn new(out: FileUpdate, input: &FilesJson) -> FilesJson {
        FilesJson {
            copy: out
                .copy
                .into_iter()
                .map(|f| FileJson {
                    path: f.path,
                    content: f.content,
                })
                .collect(),
            delete: out.delete,
            environment_id: input.environment_id,
            principal: input.principal.clone(),
        }
    }
}

/// The tenant of a `principal` field (all environments: a preprocessor sees only the name).
fn principal(tenant: &Option<String>) -> Option<Principal> {
    tenant.as_ref().map(|t| Principal {
        tenant: t.clone(),
        environments: None,
    })
}
