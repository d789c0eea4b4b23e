//! What an execution leaves behind: processes that left its session (`setsid`, a double fork, a
//! daemon), which killing the session does not reach.
//!
//! The agent is the reaper of every process it starts and of their descendants: it is the PID
//! namespace's init where the backend makes it one (bubblewrap's `--as-pid-1`), and a child
//! subreaper everywhere else (a container's agent), so a process orphaned inside the runner
//! becomes the agent's child instead of escaping to an init the agent does not know. Two duties
//! follow:
//! - **Reaping.** The agent waits for the orphans that die (else they would stay zombies and use
//!   up the runner's process limit). Its own children (executions, file helpers) are waited by
//!   whoever started them, so they are registered here ([`spawn`]) and never reaped by the
//!   reaper.
//! - **Ending leftovers.** When an execution ends and no other one runs, every descendant of the
//!   agent that is not one of its own helpers is what some execution left behind: it is killed
//!   ([`end_leftovers`]), so that a learner's program never outlives its execution.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Processes the agent started itself and waits for itself.
static OWN: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Rounds of killing before [`end_leftovers`] gives up on processes forking faster than they die.
const KILL_ROUNDS: usize = 100;

/// Makes the agent the reaper of everything it starts, and reaps the orphans that die from now
/// on. Called once, inside the agent's runtime.
pub(crate) fn start_reaping() {
    // As a namespace's init this is implied; elsewhere it is what keeps orphans in reach.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let Ok(mut children) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
    else {
        return;
    };
    tokio::spawn(async move {
        while children.recv().await.is_some() {
            reap();
        }
    });
}

/// A child the agent started; unregistered (so the reaper may take it) when dropped, which the
/// owner does once it has waited for it.
pub(crate) struct OwnChild(i32);

impl Drop for OwnChild {
    fn drop(&mut self) {
        if let Some(own) = OWN.lock().unwrap().as_mut() {
            own.remove(&self.0);
        }
    }
}

/// Spawns `command` and registers the child, under the lock the reaper takes, so that the reaper
/// never waits for it in its owner's stead. Keep the [`OwnChild`] until the child was waited for.
pub(crate) fn spawn(
    command: &mut tokio::process::Command,
) -> std::io::Result<(tokio::process::Child, OwnChild)> {
    let mut own = OWN.lock().unwrap();
    let child = command.spawn()?;
    let pid = child.id().map_or(0, |p| p as i32);
    own.get_or_insert_with(HashSet::new).insert(pid);
    Ok((child, OwnChild(pid)))
}

/// One process as `/proc/PID/stat` shows it.
struct Process {
    pid: i32,
    parent: i32,
    zombie: bool,
}

/// Every process the agent can see (its PID namespace).
fn processes() -> Vec<Process> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (state, parent) = state_and_parent(&stat)?;
            Some(Process {
                pid,
                parent,
                zombie: state == 'Z',
            })
        })
        .collect()
}

/// The state and parent pid fields of a `/proc/PID/stat` line (the command name may contain
/// anything, even parentheses).
fn state_and_parent(stat: &str) -> Option<(char, i32)> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// Waits for every dead orphan (a child of the agent that it did not start itself).
fn reap() {
    let me = std::process::id() as i32;
    let own = OWN.lock().unwrap();
    for process in processes() {
        let registered = own.as_ref().is_some_and(|o| o.contains(&process.pid));
        if process.zombie && process.parent == me && !registered {
            let _ = waitpid(Pid::from_raw(process.pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// The agent's descendants, but for its own children and theirs (executions still running,
/// file helpers).
fn leftovers(processes: &[Process], me: i32, own: &HashSet<i32>) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in processes {
        children.entry(p.parent).or_default().push(p.pid);
    }
    let mut found = Vec::new();
    let mut next: Vec<i32> = children
        .get(&me)
        .into_iter()
        .flatten()
        .copied()
        .filter(|pid| !own.contains(pid))
        .collect();
    while let Some(pid) = next.pop() {
        found.push(pid);
        next.extend(children.get(&pid).into_iter().flatten().copied());
    }
    found
}

/// Kills everything executions left behind. Only when no execution runs: a process that left
/// its session cannot be told apart from one that belongs to a running execution.
/// Synchronous: on the agent's single-threaded runtime no execution starts meanwhile.
pub(crate) fn end_leftovers() {
    let me = std::process::id() as i32;
    for _ in 0..KILL_ROUNDS {
        let own = OWN.lock().unwrap().clone().unwrap_or_default();
        let alive: Vec<Process> = processes().into_iter().filter(|p| !p.zombie).collect();
        let found = leftovers(&alive, me, &own);
        if found.is_empty() {
            return;
        }
        for pid in found {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, parent: i32) -> Process {
        Process {
            pid,
            parent,
            zombie: false,
        }
    }

    #[test]
    fn leftovers_are_descendants_but_not_the_agents_own_children_or_theirs() {
        // 1: the agent; 2: an execution (own) with its child 3; 4: an orphan reparented to the
        // agent with its child 5; 6: not the agent's at all (a bridge from outside).
        let all = [p(1, 0), p(2, 1), p(3, 2), p(4, 1), p(5, 4), p(6, 0)];
        let own = HashSet::from([2]);
        let mut found = leftovers(&all, 1, &own);
        found.sort();
        assert_eq!(found, [4, 5]);
    }

    #[test]
    fn stat_lines_with_odd_names_parse() {
        assert_eq!(
            state_and_parent("12 (a) b (c)) Z 7 12 12 0"),
            Some(('Z', 7))
        );
        assert_eq!(state_and_parent("garbage"), None);
    }
}
