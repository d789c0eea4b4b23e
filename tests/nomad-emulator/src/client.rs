//! The emulated Nomad client: runs every task of a placed allocation as a real local process
//! tree, reports task events and applies the restart policy (nomad-api.md §5.1–§5.3).

use crate::jobspec;
use crate::json::{go_duration_string, now_ns};
use crate::state::{task_event, Batch, Shared, TaskCmd, TaskState};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Sends a command to every task of an allocation; `Stop`/`Lost` also end its exec sessions.
pub fn send(shared: &Shared, alloc_id: &str, cmd: TaskCmd) {
    let client = shared.lock().clients.get(alloc_id).cloned();
    if let Some(c) = client {
        for s in c.tasks.values() {
            let _ = s.send(cmd.clone());
        }
        if matches!(cmd, TaskCmd::Stop | TaskCmd::Lost) {
            c.cancel.cancel();
        }
    }
}

/// Sends a command to one task (the first task when `task` is `None`). Returns false if the
/// allocation has no running client.
pub fn send_to_task(shared: &Shared, alloc_id: &str, task: Option<&str>, cmd: TaskCmd) -> bool {
    let client = shared.lock().clients.get(alloc_id).cloned();
    let Some(c) = client else { return false };
    let sender = match task {
        Some(t) => c.tasks.get(t),
        None => c.tasks.values().next(),
    };
    sender.map(|s| s.send(cmd).is_ok()).unwrap_or(false)
}

/// Parses a signal name as used in `KillSignal`.
fn parse_signal(name: &str) -> Signal {
    name.parse::<Signal>().unwrap_or(Signal::SIGINT)
}

/// Kills a whole process group.
pub fn kill_group(pgid: i32, sig: Signal) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// Kills every process working in `task_dir` or below: what a container's end takes with it
/// (processes started through exec sessions, daemons that left the task's process group).
pub fn kill_contained(task_dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(task_dir)) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The environment Nomad gives a task.
fn task_env(
    alloc: &crate::state::Alloc,
    task: &Value,
    alloc_dir: &Path,
    task_dir: &Path,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let job = &alloc.job;
    let tname = task["Name"].as_str().unwrap_or("");
    let set = |env: &mut BTreeMap<String, String>, k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    set(&mut env, "NOMAD_ALLOC_ID", alloc.id.clone());
    set(
        &mut env,
        "NOMAD_SHORT_ALLOC_ID",
        alloc.id.chars().take(8).collect(),
    );
    set(&mut env, "NOMAD_ALLOC_NAME", alloc.name.clone());
    set(&mut env, "NOMAD_ALLOC_INDEX", alloc.name_index.to_string());
    set(&mut env, "NOMAD_JOB_ID", alloc.job_id.clone());
    set(
        &mut env,
        "NOMAD_JOB_NAME",
        job["Name"].as_str().unwrap_or("").into(),
    );
    set(&mut env, "NOMAD_GROUP_NAME", alloc.task_group.clone());
    set(&mut env, "NOMAD_TASK_NAME", tname.into());
    set(&mut env, "NOMAD_NAMESPACE", alloc.namespace.clone());
    set(&mut env, "NOMAD_REGION", "global".into());
    set(&mut env, "NOMAD_DC", "dc1".into());
    set(
        &mut env,
        "NOMAD_ALLOC_DIR",
        alloc_dir.join("alloc").display().to_string(),
    );
    set(
        &mut env,
        "NOMAD_TASK_DIR",
        task_dir.join("local").display().to_string(),
    );
    set(
        &mut env,
        "NOMAD_SECRETS_DIR",
        task_dir.join("secrets").display().to_string(),
    );
    let res = &task["Resources"];
    set(&mut env, "NOMAD_CPU_LIMIT", res["CPU"].to_string());
    set(&mut env, "NOMAD_MEMORY_LIMIT", res["MemoryMB"].to_string());
    // Combined meta: job < group < task.
    let group = jobspec::group(job, &alloc.task_group);
    for meta in [
        Some(&job["Meta"]),
        group.map(|g| &g["Meta"]),
        Some(&task["Meta"]),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(m) = meta.as_object() {
            for (k, v) in m {
                let v = v.as_str().unwrap_or("").to_string();
                env.insert(format!("NOMAD_META_{k}"), v.clone());
                env.insert(format!("NOMAD_META_{}", k.to_uppercase()), v);
            }
        }
    }
    if let Some(ports) = alloc.allocated_resources["Shared"]["Ports"].as_array() {
        for p in ports {
            let label = p["Label"].as_str().unwrap_or("").replace('-', "_");
            env.insert(format!("NOMAD_HOST_PORT_{label}"), p["Value"].to_string());
            env.insert(format!("NOMAD_PORT_{label}"), p["To"].to_string());
            env.insert(
                format!("NOMAD_ADDR_{label}"),
                format!("127.0.0.1:{}", p["Value"]),
            );
        }
    }
    if let Some(m) = task["Env"].as_object() {
        for (k, v) in m {
            env.insert(k.clone(), v.as_str().unwrap_or("").to_string());
        }
    }
    env
}

/// Starts the client side of a freshly placed allocation.
pub fn start_alloc(shared: Arc<Shared>, alloc_id: String) {
    let mut inner = shared.lock();
    let Some(alloc) = inner.allocs.get(&alloc_id).cloned() else {
        return;
    };
    if alloc.desired_status != "run" {
        return;
    }
    let Some(group) = jobspec::group(&alloc.job, &alloc.task_group).cloned() else {
        return;
    };
    let dir = shared.data_dir.join(&alloc.id);
    let cancel = CancellationToken::new();
    let mut tasks = BTreeMap::new();
    let mut envs = BTreeMap::new();
    let mut runners = Vec::new();
    for task in group["Tasks"].as_array().cloned().unwrap_or_default() {
        let name = task["Name"].as_str().unwrap_or("").to_string();
        let task_dir = dir.join(&name);
        let env = task_env(&alloc, &task, &dir, &task_dir);
        let (tx, rx) = mpsc::unbounded_channel();
        tasks.insert(name.clone(), tx);
        envs.insert(name.clone(), env.clone());
        runners.push(TaskRunner {
            shared: shared.clone(),
            alloc_id: alloc_id.clone(),
            name,
            task,
            restart_policy: group["RestartPolicy"].clone(),
            alloc_dir: dir.clone(),
            task_dir,
            env,
            rx,
        });
    }
    inner.clients.insert(
        alloc_id.clone(),
        crate::state::AllocClient {
            tasks,
            cancel,
            dir,
            env: envs,
        },
    );
    drop(inner);
    for r in runners {
        tokio::spawn(r.run());
    }
}

/// Applies a task-state change, recomputes the allocation's client status and commits an
/// `AllocationUpdated` (with an `alloc-failure` eval when the allocation failed).
fn update_task(shared: &Arc<Shared>, alloc_id: &str, task: &str, f: impl FnOnce(&mut TaskState)) {
    let follow_eval = {
        let mut inner = shared.lock();
        let Some(alloc) = inner.allocs.get(alloc_id) else {
            return;
        };
        if alloc.client_status == "lost" {
            return;
        }
        let index = inner.next_index();
        let alloc = inner.allocs.get_mut(alloc_id).unwrap();
        let ts = alloc.task_states.entry(task.to_string()).or_default();
        f(ts);
        let was_failed = alloc.client_status == "failed";
        alloc.derive_client_status();
        alloc.modify_index = index;
        alloc.modify_time = now_ns();
        let alloc = alloc.clone();
        let mut events = vec![alloc.event("AllocationUpdated", index)];
        let mut follow = None;
        if alloc.client_status == "failed"
            && !was_failed
            && alloc.desired_status == "run"
            && crate::scheduler::can_reschedule(&alloc)
        {
            let key = (alloc.namespace.clone(), alloc.job_id.clone());
            let (typ, prio, jmi) = inner
                .jobs
                .get(&key)
                .map(|j| {
                    (
                        j.typ().to_string(),
                        j.value["Priority"].as_i64().unwrap_or(50),
                        j.value["JobModifyIndex"].as_u64().unwrap_or(0),
                    )
                })
                .unwrap_or(("batch".into(), 50, 0));
            let e = inner.new_eval(
                &alloc.namespace,
                &alloc.job_id,
                &typ,
                "alloc-failure",
                prio,
                jmi,
                index,
            );
            events.push(e.event("AllocationUpdated", index));
            follow = Some(e.id);
        }
        inner.touch("allocs", index);
        inner.refresh_job_status(
            &alloc.namespace,
            &alloc.job_id,
            "AllocationUpdated",
            index,
            &mut events,
        );
        shared.publish(&mut inner, Batch { index, events });
        shared.announce(&inner);
        if alloc.client_terminal() {
            if let Some(c) = inner.clients.get(alloc_id) {
                let all_dead = alloc.task_states.values().all(|t| t.state == "dead");
                if all_dead {
                    c.cancel.cancel();
                }
            }
        }
        follow
    };
    if let Some(e) = follow_eval {
        crate::scheduler::spawn_eval(shared.clone(), e);
    }
}

struct TaskRunner {
    shared: Arc<Shared>,
    alloc_id: String,
    name: String,
    task: Value,
    restart_policy: Value,
    alloc_dir: PathBuf,
    task_dir: PathBuf,
    env: BTreeMap<String, String>,
    rx: mpsc::UnboundedReceiver<TaskCmd>,
}

enum Outcome {
    Exited {
        code: i64,
        signal: i64,
        oom: bool,
        fault: bool,
    },
    Stopped,
    Lost,
}

impl TaskRunner {
    fn update(&self, f: impl FnOnce(&mut TaskState)) {
        update_task(&self.shared, &self.alloc_id, &self.name, f);
    }

    fn prepare_dirs(&self) -> std::io::Result<()> {
        for d in ["alloc/logs", "alloc/data", "alloc/tmp"] {
            std::fs::create_dir_all(self.alloc_dir.join(d))?;
        }
        for d in ["local", "secrets", "tmp"] {
            std::fs::create_dir_all(self.task_dir.join(d))?;
        }
        Ok(())
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let cfg = &self.task["Config"];
        let driver = self.task["Driver"].as_str().unwrap_or("");
        let mut command = cfg["command"].as_str().unwrap_or("").to_string();
        let mut args: Vec<String> = cfg["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if command.is_empty() && driver == "docker" {
            // Images usually define their own command; the emulator has no image, so it idles.
            command = "sleep".into();
            args = vec!["infinity".into()];
        }
        if command.contains('/') && !command.starts_with('/') {
            command = self.task_dir.join(&command).display().to_string();
        }
        let logs = self.alloc_dir.join("alloc/logs");
        let stdout = std::fs::File::create(logs.join(format!("{}.stdout.0", self.name)))?;
        let stderr = std::fs::File::create(logs.join(format!("{}.stderr.0", self.name)))?;
        let mut cmd = Command::new(&command);
        cmd.args(&args)
            .current_dir(&self.task_dir)
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        if let Some(pid) = child.id() {
            self.shared.lock().pgids.insert(pid as i32);
        }
        Ok(child)
    }

    async fn kill(&self, child: &mut Child, sig: Signal, timeout: Duration) {
        let Some(pid) = child.id() else { return };
        let pgid = pid as i32;
        kill_group(pgid, sig);
        if sig != Signal::SIGKILL && tokio::time::timeout(timeout, child.wait()).await.is_ok() {
            kill_group(pgid, Signal::SIGKILL);
        } else {
            kill_group(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
        self.shared.lock().pgids.remove(&pgid);
        kill_contained(&self.task_dir);
    }

    /// Waits for `d`; returns the command that interrupted the wait, if any.
    async fn pause(&mut self, d: Duration) -> Option<TaskCmd> {
        tokio::select! {
            _ = tokio::time::sleep(d) => None,
            cmd = self.rx.recv() => Some(cmd.unwrap_or(TaskCmd::Lost)),
            _ = self.shared.shutdown.cancelled() => Some(TaskCmd::Lost),
        }
    }

    fn finish_stopped(&self, killed_running: bool) {
        let sig = self.task["KillSignal"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("SIGINT")
            .to_string();
        let kt = self.task["KillTimeout"].as_i64().unwrap_or(0);
        self.update(|ts| {
            ts.push_event(task_event(
                "Killing",
                &format!(
                    "Sent interrupt. Waiting {} before force killing",
                    go_duration_string(kt)
                ),
                &[
                    ("kill_timeout", go_duration_string(kt)),
                    ("kill_reason", String::new()),
                ],
            ));
            if killed_running {
                ts.push_event(task_event(
                    "Terminated",
                    "Exit Code: 137, Signal: 9",
                    &[
                        ("exit_code", "137".into()),
                        ("signal", "9".into()),
                        ("oom_killed", "false".into()),
                    ],
                ));
            }
            ts.push_event(task_event("Killed", "Task successfully killed", &[]));
            let _ = sig;
            ts.state = "dead".into();
            ts.failed = false;
            ts.finished_at = Some(now_ns());
        });
    }

    async fn run(mut self) {
        let delay = self.shared.config.client_delay;
        match self.pause(delay).await {
            Some(TaskCmd::Stop) => return self.finish_stopped(false),
            Some(TaskCmd::Lost) => return,
            _ => {}
        }
        let driver = self.task["Driver"].as_str().unwrap_or("").to_string();
        let image = self.task["Config"]["image"]
            .as_str()
            .unwrap_or("")
            .to_string();
        self.update(|ts| {
            ts.state = "pending".into();
            ts.push_event(task_event("Received", "Task received by client", &[]));
            ts.push_event(task_event(
                "Task Setup",
                "Building Task Directory",
                &[("message", "Building Task Directory".into())],
            ));
            if driver == "docker" {
                ts.push_event(task_event(
                    "Driver",
                    &format!("Downloading image {image}"),
                    &[("driver_message", format!("Downloading image {image}"))],
                ));
            }
        });
        let mut restart_times: Vec<Instant> = Vec::new();
        loop {
            // An image that cannot be pulled fails the start and goes through the restart policy
            // (no `Terminated` event), as with Nomad's Docker driver.
            let pull_failed = self
                .pull_failure()
                .map(|msg| task_event("Driver Failure", &msg, &[("driver_error", msg.clone())]));
            let spawned = match pull_failed {
                Some(_) => Err(std::io::Error::other("pull failed")),
                None => self.prepare_dirs().and_then(|_| self.spawn()),
            };
            let mut child = match (spawned, pull_failed) {
                (_, Some(event)) => {
                    if self.restart_or_fail(event, &mut restart_times).await {
                        continue;
                    }
                    return;
                }
                (Ok(c), None) => c,
                (Err(e), None) => {
                    let msg = format!("failed to launch command with executor: {e}");
                    self.update(|ts| {
                        ts.push_event(task_event(
                            "Driver Failure",
                            &msg,
                            &[("driver_error", msg.clone()), ("fails_task", "true".into())],
                        ));
                        ts.state = "dead".into();
                        ts.failed = true;
                        ts.finished_at = Some(now_ns());
                    });
                    return;
                }
            };
            self.update(|ts| {
                ts.state = "running".into();
                ts.started_at = Some(now_ns());
                ts.finished_at = None;
                ts.push_event(task_event("Started", "Task started by client", &[]));
            });
            let kill_sig = parse_signal(self.task["KillSignal"].as_str().unwrap_or("SIGINT"));
            let kill_timeout = self
                .shared
                .config
                .policy_delay(self.task["KillTimeout"].as_i64().unwrap_or(0));
            let outcome = tokio::select! {
                status = child.wait() => {
                    let (code, signal) = match status {
                        Ok(s) => match (s.code(), s.signal()) {
                            (Some(c), _) => (i64::from(c), 0),
                            (None, Some(sig)) => (128 + i64::from(sig), i64::from(sig)),
                            _ => (-1, 0),
                        },
                        Err(_) => (-1, 0),
                    };
                    if let Some(pid) = child.id() { self.shared.lock().pgids.remove(&(pid as i32)); }
                    kill_contained(&self.task_dir);
                    Outcome::Exited { code, signal, oom: false, fault: false }
                }
                cmd = self.rx.recv() => match cmd {
                    Some(TaskCmd::Stop) => { self.kill(&mut child, kill_sig, kill_timeout).await; Outcome::Stopped }
                    Some(TaskCmd::Kill { exit_code, signal, oom }) => {
                        self.kill(&mut child, Signal::SIGKILL, Duration::ZERO).await;
                        Outcome::Exited { code: exit_code, signal, oom, fault: oom }
                    }
                    Some(TaskCmd::Lost) | None => { self.kill(&mut child, Signal::SIGKILL, Duration::ZERO).await; Outcome::Lost }
                },
                _ = self.shared.shutdown.cancelled() => { self.kill(&mut child, Signal::SIGKILL, Duration::ZERO).await; Outcome::Lost }
            };
            let (code, signal, oom, fault) = match outcome {
                Outcome::Stopped => return self.finish_stopped(true),
                Outcome::Lost => return,
                Outcome::Exited {
                    code,
                    signal,
                    oom,
                    fault,
                } => (code, signal, oom, fault),
            };
            let mut details = vec![
                ("exit_code", code.to_string()),
                ("signal", signal.to_string()),
                ("oom_killed", oom.to_string()),
            ];
            let display = if oom {
                details.push(("exit_message", "OOM Killed".into()));
                format!("Exit Code: {code}, Exit Message: \"OOM Killed\"")
            } else if signal != 0 {
                format!("Exit Code: {code}, Signal: {signal}")
            } else {
                format!("Exit Code: {code}")
            };
            let mut terminated = task_event("Terminated", &display, &details);
            if oom {
                terminated["Message"] = Value::from("OOM Killed");
            }
            if code == 0 && signal == 0 && !fault {
                self.update(|ts| {
                    ts.push_event(terminated);
                    ts.state = "dead".into();
                    ts.finished_at = Some(now_ns());
                });
                return;
            }
            if !self.restart_or_fail(terminated, &mut restart_times).await {
                return;
            }
        }
    }

    /// Docker: the image cannot be pulled when its name starts with `missing/` (the emulator has no
    /// registry); the message is the Docker driver's.
    fn pull_failure(&self) -> Option<String> {
        let image = self.task["Config"]["image"].as_str()?;
        (self.task["Driver"] == "docker" && image.starts_with("missing/")).then(|| {
            format!(
                "Failed to pull `{image}`: Error response from daemon: pull access denied for {image}, repository does not exist or may require 'docker login': denied: requested access to the resource is denied"
            )
        })
    }

    /// Applies the restart policy after a failed run whose event is `event` (a `Terminated`, a
    /// `Driver Failure`): `true` once the task may start again (after the delay), `false` when it
    /// is dead (not restarting, stopped or lost).
    async fn restart_or_fail(&mut self, event: Value, restart_times: &mut Vec<Instant>) -> bool {
        let terminated = event;
        // Restart policy.
        let rp = &self.restart_policy;
        let attempts = rp["Attempts"].as_i64().unwrap_or(0);
        let interval = Duration::from_nanos(rp["Interval"].as_i64().unwrap_or(0).max(0) as u64);
        let delay_ns = rp["Delay"].as_i64().unwrap_or(0);
        let mode = rp["Mode"].as_str().unwrap_or("fail").to_string();
        let now = Instant::now();
        restart_times.retain(|t| now.duration_since(*t) < interval);
        let (allowed, wait_ns) = if (restart_times.len() as i64) < attempts {
            (true, delay_ns)
        } else if mode == "delay" {
            let oldest = restart_times.first().copied().unwrap_or(now);
            let left = interval.saturating_sub(now.duration_since(oldest));
            (true, left.as_nanos() as i64)
        } else {
            (false, 0)
        };
        if !allowed {
            let msg = format!(
                "Exceeded allowed attempts {attempts} in interval {} and mode is \"fail\"",
                go_duration_string(interval.as_nanos() as i64)
            );
            self.update(|ts| {
                ts.push_event(terminated);
                ts.push_event(task_event(
                    "Not Restarting",
                    &msg,
                    &[
                        ("restart_reason", msg.clone()),
                        ("fails_task", "true".into()),
                    ],
                ));
                ts.state = "dead".into();
                ts.failed = true;
                ts.finished_at = Some(now_ns());
            });
            return false;
        }
        let wait = self.shared.config.policy_delay(wait_ns);
        self.update(|ts| {
            ts.push_event(terminated);
            ts.push_event(task_event(
                "Restarting",
                &format!("Task restarting in {}", go_duration_string(wait_ns)),
                &[
                    ("restart_reason", "Restart within policy".into()),
                    ("start_delay", wait_ns.to_string()),
                ],
            ));
            ts.state = "pending".into();
            ts.restarts += 1;
            ts.last_restart = Some(now_ns());
        });
        restart_times.push(Instant::now());
        match self.pause(wait).await {
            Some(TaskCmd::Stop) => {
                self.finish_stopped(false);
                false
            }
            Some(TaskCmd::Lost) => false,
            _ => true,
        }
    }
}
