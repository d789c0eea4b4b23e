//! The emulated cluster state: a raft-like global index, jobs, evaluations, allocations,
//! nodes, namespaces and the event buffer (nomad-api.md §2, §3, §9).

use crate::config::EmulatorConfig;
use crate::json::{now_ns, time_or_null, Obj};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One event of the event stream (`Event` struct: all keys always present).
#[derive(Debug, Clone)]
pub struct Event {
    /// `Job`, `Evaluation`, `Allocation`, `Node`.
    pub topic: &'static str,
    /// Raft operation name (`JobRegistered`, `PlanResult`, ...).
    pub typ: &'static str,
    /// Object ID.
    pub key: String,
    /// Namespace, empty for nodes.
    pub namespace: String,
    /// Filter keys (`[JobID, DeploymentID]` for allocations and evaluations).
    pub filter_keys: Option<Vec<String>>,
    /// Raft index.
    pub index: u64,
    /// Payload wrapper (`{"Allocation":{...}}`).
    pub payload: Value,
}

impl Event {
    /// JSON form of the event.
    pub fn to_json(&self) -> Value {
        json!({
            "Topic": self.topic,
            "Type": self.typ,
            "Key": self.key,
            "Namespace": self.namespace,
            "FilterKeys": self.filter_keys,
            "Index": self.index,
            "Payload": self.payload,
        })
    }
}

/// The events of one commit, sent as one NDJSON line.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Raft index of the commit.
    pub index: u64,
    /// Its events.
    pub events: Vec<Event>,
}

/// A job as stored by the server: the canonical JSON plus bookkeeping.
#[derive(Debug, Clone)]
pub struct JobRec {
    /// Full job JSON including server-managed fields.
    pub value: Value,
}

impl JobRec {
    /// Job ID.
    pub fn id(&self) -> &str {
        self.value["ID"].as_str().unwrap_or("")
    }
    /// Current `Status`.
    pub fn status(&self) -> &str {
        self.value["Status"].as_str().unwrap_or("")
    }
    /// Job `CreateIndex`.
    pub fn create_index(&self) -> u64 {
        self.value["CreateIndex"].as_u64().unwrap_or(0)
    }
    /// Job `ModifyIndex`.
    pub fn modify_index(&self) -> u64 {
        self.value["ModifyIndex"].as_u64().unwrap_or(0)
    }
    /// Job `Version`.
    pub fn version(&self) -> u64 {
        self.value["Version"].as_u64().unwrap_or(0)
    }
    /// Whether the job is stopped.
    pub fn stopped(&self) -> bool {
        self.value["Stop"].as_bool().unwrap_or(false)
    }
    /// Job type.
    pub fn typ(&self) -> &str {
        self.value["Type"].as_str().unwrap_or("")
    }
}

/// An evaluation (serialised with struct-level omitempty).
#[derive(Debug, Clone, Default)]
pub struct Eval {
    /// ID.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Priority.
    pub priority: i64,
    /// Job type (or `service` for deregister evals, as Nomad does).
    pub typ: String,
    /// Trigger.
    pub triggered_by: String,
    /// Job.
    pub job_id: String,
    /// Job modify index at creation.
    pub job_modify_index: u64,
    /// Node for node evals.
    pub node_id: String,
    /// Status.
    pub status: String,
    /// Status description.
    pub status_description: String,
    /// `WaitUntil` (ns) for delayed follow-ups.
    pub wait_until: Option<i64>,
    /// Previous eval.
    pub previous_eval: String,
    /// Blocked eval created for failed placements.
    pub blocked_eval: String,
    /// `FailedTGAllocs`.
    pub failed_tg_allocs: Value,
    /// `QueuedAllocations`.
    pub queued_allocations: Value,
    /// Create index.
    pub create_index: u64,
    /// Modify index.
    pub modify_index: u64,
    /// Create time (ns).
    pub create_time: i64,
    /// Modify time (ns).
    pub modify_time: i64,
}

impl Eval {
    /// JSON with omitempty.
    pub fn to_json(&self) -> Value {
        Obj::omit_empty()
            .put("ID", self.id.clone())
            .put("Namespace", self.namespace.clone())
            .put("Priority", self.priority)
            .put("Type", self.typ.clone())
            .put("TriggeredBy", self.triggered_by.clone())
            .put("JobID", self.job_id.clone())
            .put("JobModifyIndex", self.job_modify_index)
            .put("NodeID", self.node_id.clone())
            .put("Status", self.status.clone())
            .put("StatusDescription", self.status_description.clone())
            .put(
                "WaitUntil",
                self.wait_until
                    .map(|t| time_or_null(Some(t)))
                    .unwrap_or(Value::Null),
            )
            .put("PreviousEval", self.previous_eval.clone())
            .put("BlockedEval", self.blocked_eval.clone())
            .put("FailedTGAllocs", self.failed_tg_allocs.clone())
            .put("QueuedAllocations", self.queued_allocations.clone())
            .put("CreateIndex", self.create_index)
            .put("ModifyIndex", self.modify_index)
            .put("CreateTime", self.create_time)
            .put("ModifyTime", self.modify_time)
            .build()
    }

    /// Whether the status is terminal.
    pub fn terminal(&self) -> bool {
        matches!(self.status.as_str(), "complete" | "failed" | "canceled")
    }

    /// The event for this eval.
    pub fn event(&self, typ: &'static str, index: u64) -> Event {
        Event {
            topic: "Evaluation",
            typ,
            key: self.id.clone(),
            namespace: self.namespace.clone(),
            filter_keys: Some(vec![self.job_id.clone(), String::new()]),
            index,
            payload: json!({ "Evaluation": self.to_json() }),
        }
    }
}

/// State of one task inside an allocation.
#[derive(Debug, Clone, Default)]
pub struct TaskState {
    /// `pending`, `running`, `dead`.
    pub state: String,
    /// Failed flag.
    pub failed: bool,
    /// Restart count.
    pub restarts: u64,
    /// Last restart time (ns).
    pub last_restart: Option<i64>,
    /// Start time (ns).
    pub started_at: Option<i64>,
    /// Finish time (ns).
    pub finished_at: Option<i64>,
    /// Up to 10 task events (JSON).
    pub events: VecDeque<Value>,
}

impl TaskState {
    /// JSON (all fields present).
    pub fn to_json(&self) -> Value {
        json!({
            "State": self.state,
            "Failed": self.failed,
            "Restarts": self.restarts,
            "LastRestart": time_or_null(self.last_restart),
            "StartedAt": time_or_null(self.started_at),
            "FinishedAt": time_or_null(self.finished_at),
            "Events": self.events,
            "Paused": "",
        })
    }

    /// Appends a task event, keeping at most 10.
    pub fn push_event(&mut self, ev: Value) {
        self.events.push_back(ev);
        while self.events.len() > 10 {
            self.events.pop_front();
        }
    }
}

/// Builds a `TaskEvent` (all fields present).
pub fn task_event(typ: &str, display: &str, details: &[(&str, String)]) -> Value {
    let mut d = Map::new();
    for (k, v) in details {
        d.insert((*k).to_string(), Value::String(v.clone()));
    }
    let get = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let exit_code: i64 = get("exit_code").parse().unwrap_or(0);
    let signal: i64 = get("signal").parse().unwrap_or(0);
    json!({
        "Type": typ, "Time": now_ns(), "Message": get("message"), "DisplayMessage": display,
        "Details": d, "FailsTask": get("fails_task") == "true", "RestartReason": get("restart_reason"),
        "SetupError": get("setup_error"), "DriverError": get("driver_error"), "ExitCode": exit_code,
        "Signal": signal, "KillTimeout": 0, "KillError": "", "KillReason": get("kill_reason"),
        "StartDelay": get("start_delay").parse::<i64>().unwrap_or(0),
        "DownloadError": "", "ValidationError": "", "DiskLimit": 0, "FailedSibling": "",
        "VaultError": "", "TaskSignalReason": "", "TaskSignal": "", "DriverMessage": get("driver_message"),
        "GenericSource": "",
    })
}

/// An allocation.
#[derive(Debug, Clone, Default)]
pub struct Alloc {
    /// ID.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Eval that placed it.
    pub eval_id: String,
    /// `<job>.<group>[<n>]`.
    pub name: String,
    /// Index inside the group.
    pub name_index: u64,
    /// Node.
    pub node_id: String,
    /// Node name.
    pub node_name: String,
    /// Job ID.
    pub job_id: String,
    /// Denormalised job (at placement / last in-place update).
    pub job: Value,
    /// `CreateIndex` of the job instance it belongs to.
    pub job_create_index: u64,
    /// Task group.
    pub task_group: String,
    /// `AllocatedResources`.
    pub allocated_resources: Value,
    /// `run`, `stop`, `evict`.
    pub desired_status: String,
    /// Scheduler's description.
    pub desired_description: String,
    /// Client status.
    pub client_status: String,
    /// Client description.
    pub client_description: String,
    /// Task states by task name.
    pub task_states: BTreeMap<String, TaskState>,
    /// Predecessor.
    pub previous_allocation: String,
    /// Successor.
    pub next_allocation: String,
    /// `RescheduleTracker` JSON or null.
    pub reschedule_tracker: Value,
    /// Follow-up eval.
    pub followup_eval_id: String,
    /// Create index.
    pub create_index: u64,
    /// Modify index.
    pub modify_index: u64,
    /// Alloc modify index (server writes).
    pub alloc_modify_index: u64,
    /// Create time (ns).
    pub create_time: i64,
    /// Modify time (ns).
    pub modify_time: i64,
}

impl Alloc {
    /// Whether the client status is terminal.
    pub fn client_terminal(&self) -> bool {
        matches!(self.client_status.as_str(), "complete" | "failed" | "lost")
    }

    /// Terminal for job-status purposes (desired stop/evict counts as terminal).
    pub fn terminal(&self) -> bool {
        self.client_terminal() || self.desired_status != "run"
    }

    fn task_states_json(&self) -> Value {
        if self.task_states.is_empty() {
            return Value::Null;
        }
        Value::Object(
            self.task_states
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        )
    }

    /// Full `Allocation` JSON with omitempty; `with_job` adds the denormalised job.
    pub fn to_json(&self, with_job: bool) -> Value {
        Obj::omit_empty()
            .put("ID", self.id.clone())
            .put("Namespace", self.namespace.clone())
            .put("EvalID", self.eval_id.clone())
            .put("Name", self.name.clone())
            .put("NodeID", self.node_id.clone())
            .put("NodeName", self.node_name.clone())
            .put("JobID", self.job_id.clone())
            .put(
                "Job",
                if with_job {
                    self.job.clone()
                } else {
                    Value::Null
                },
            )
            .put("TaskGroup", self.task_group.clone())
            .put("AllocatedResources", self.allocated_resources.clone())
            .put("DesiredStatus", self.desired_status.clone())
            .put("DesiredDescription", self.desired_description.clone())
            .put("ClientStatus", self.client_status.clone())
            .put("ClientDescription", self.client_description.clone())
            .put("TaskStates", self.task_states_json())
            .put("PreviousAllocation", self.previous_allocation.clone())
            .put("NextAllocation", self.next_allocation.clone())
            .put("RescheduleTracker", self.reschedule_tracker.clone())
            .put("FollowupEvalID", self.followup_eval_id.clone())
            .put("CreateIndex", self.create_index)
            .put("ModifyIndex", self.modify_index)
            .put("AllocModifyIndex", self.alloc_modify_index)
            .put("CreateTime", self.create_time)
            .put("ModifyTime", self.modify_time)
            .build()
    }

    /// `AllocListStub` JSON (all fields present).
    pub fn stub(&self, task_states: bool, resources: bool) -> Value {
        let mut v = json!({
            "ID": self.id, "EvalID": self.eval_id, "Name": self.name, "Namespace": self.namespace,
            "NodeID": self.node_id, "NodeName": self.node_name, "JobID": self.job_id,
            "JobType": self.job["Type"], "JobVersion": self.job["Version"],
            "TaskGroup": self.task_group, "DesiredStatus": self.desired_status,
            "DesiredDescription": self.desired_description, "ClientStatus": self.client_status,
            "ClientDescription": self.client_description,
            "DesiredTransition": {"Migrate":null,"Reschedule":null,"ForceReschedule":null,"NoShutdownDelay":null},
            "TaskStates": if task_states { self.task_states_json() } else { Value::Null },
            "DeploymentStatus": null, "FollowupEvalID": self.followup_eval_id,
            "NextAllocation": self.next_allocation, "RescheduleTracker": self.reschedule_tracker,
            "PreemptedAllocations": null, "PreemptedByAllocation": "",
            "CreateIndex": self.create_index, "ModifyIndex": self.modify_index,
            "CreateTime": self.create_time, "ModifyTime": self.modify_time,
        });
        if resources {
            v["AllocatedResources"] = self.allocated_resources.clone();
        }
        v
    }

    /// The event for this allocation (job removed from the payload).
    pub fn event(&self, typ: &'static str, index: u64) -> Event {
        Event {
            topic: "Allocation",
            typ,
            key: self.id.clone(),
            namespace: self.namespace.clone(),
            filter_keys: Some(vec![self.job_id.clone(), String::new()]),
            index,
            payload: json!({ "Allocation": self.to_json(false) }),
        }
    }

    /// Recomputes the client status from the task states.
    pub fn derive_client_status(&mut self) {
        let states: Vec<&TaskState> = self.task_states.values().collect();
        let (status, desc) = if states.is_empty() || states.iter().any(|t| t.state == "pending") {
            ("pending", "No tasks have started")
        } else if states.iter().any(|t| t.state == "running") {
            ("running", "Tasks are running")
        } else if states.iter().any(|t| t.failed) {
            ("failed", "Failed tasks")
        } else {
            ("complete", "All tasks have completed")
        };
        self.client_status = status.into();
        self.client_description = desc.into();
    }
}

/// A client node.
#[derive(Debug, Clone)]
pub struct Node {
    /// ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// `ready`, `down`.
    pub status: String,
    /// Create index.
    pub create_index: u64,
    /// Modify index.
    pub modify_index: u64,
}

/// Drivers every emulated node offers (all run tasks as local processes).
pub const DRIVERS: &[&str] = &["docker", "exec", "raw_exec"];

impl Node {
    fn drivers(&self) -> Value {
        let mut m = Map::new();
        for d in DRIVERS {
            m.insert(
                (*d).to_string(),
                json!({"Attributes":{},"Detected":true,"Healthy":true,"HealthDescription":"Healthy",
                       "UpdateTime": crate::json::rfc3339(now_ns())}),
            );
        }
        Value::Object(m)
    }

    /// `NodeListStub` JSON.
    pub fn stub(&self, http_addr: SocketAddr) -> Value {
        json!({
            "Address": http_addr.ip().to_string(), "ID": self.id, "Attributes": null,
            "Datacenter": "dc1", "Name": self.name, "NodeClass": "", "NodePool": "default",
            "Version": "1.10.5", "Drain": false, "SchedulingEligibility": "eligible",
            "Status": self.status, "StatusDescription": "", "Drivers": self.drivers(),
            "NodeResources": null, "ReservedResources": null, "LastDrain": null,
            "HostVolumes": null, "CreateIndex": self.create_index, "ModifyIndex": self.modify_index,
        })
    }

    /// Full `Node` JSON.
    pub fn full(&self, http_addr: SocketAddr) -> Value {
        json!({
            "ID": self.id, "SecretID": "", "Datacenter": "dc1", "Name": self.name,
            "HTTPAddr": http_addr.to_string(), "TLSEnabled": false,
            "Attributes": {"kernel.name":"linux","unique.hostname":self.name,"unique.network.ip-address":"127.0.0.1",
                           "driver.docker":"1","driver.exec":"1","driver.raw_exec":"1","nomad.version":"1.10.5","os.name":"emulator"},
            "NodeResources": {"Cpu":{"CpuShares":4000},"Memory":{"MemoryMB":8192},"Disk":{"DiskMB":10240},"Networks":null},
            "ReservedResources": null, "Links": null, "Meta": null, "NodeClass": "", "NodePool": "default",
            "ComputedClass": "", "Drain": false, "DrainStrategy": null, "SchedulingEligibility": "eligible",
            "Status": self.status, "StatusDescription": "", "StatusUpdatedAt": now_ns() / 1_000_000_000,
            "Events": null, "Drivers": self.drivers(), "CSIControllerPlugins": null, "CSINodePlugins": null,
            "HostVolumes": null, "HostNetworks": null, "LastDrain": null,
            "CreateIndex": self.create_index, "ModifyIndex": self.modify_index,
        })
    }

    /// Node event.
    pub fn event(&self, typ: &'static str, index: u64, addr: SocketAddr) -> Event {
        let mut node = self.full(addr);
        node["Drain"] = Value::Bool(false);
        Event {
            topic: "Node",
            typ,
            key: self.id.clone(),
            namespace: String::new(),
            filter_keys: None,
            index,
            payload: json!({ "Node": node }),
        }
    }
}

/// A namespace.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Create index.
    pub create_index: u64,
    /// Modify index.
    pub modify_index: u64,
}

impl Namespace {
    /// JSON.
    pub fn to_json(&self) -> Value {
        json!({"Name": self.name, "Description": self.description, "Quota": "", "Capabilities": null,
               "NodePoolConfiguration": null, "VaultConfiguration": null, "ConsulConfiguration": null,
               "Meta": null, "CreateIndex": self.create_index, "ModifyIndex": self.modify_index})
    }
}

/// Commands for a running task.
#[derive(Debug, Clone)]
pub enum TaskCmd {
    /// Stop the task (job stopped / alloc not needed): Killing → Terminated → Killed.
    Stop,
    /// Kill the task process as a fault; the restart policy applies.
    Kill {
        /// Exit code to report.
        exit_code: i64,
        /// Signal to report.
        signal: i64,
        /// Report `oom_killed=true`.
        oom: bool,
    },
    /// The node was lost: kill silently, report nothing.
    Lost,
}

/// Client-side handles of an allocation.
#[derive(Debug, Clone)]
pub struct AllocClient {
    /// Command senders per task.
    pub tasks: BTreeMap<String, mpsc::UnboundedSender<TaskCmd>>,
    /// Cancelled when the allocation stops; exec sessions watch it.
    pub cancel: CancellationToken,
    /// Allocation directory.
    pub dir: PathBuf,
    /// Environment per task.
    pub env: BTreeMap<String, BTreeMap<String, String>>,
}

/// Scheduler configuration.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Full inner object.
    pub value: Value,
}

/// Everything behind the state lock.
#[derive(Debug)]
pub struct Inner {
    /// Global raft-like index.
    pub index: u64,
    /// Table indexes.
    pub table_index: HashMap<&'static str, u64>,
    /// Namespaces.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Jobs by (namespace, id).
    pub jobs: BTreeMap<(String, String), JobRec>,
    /// Evaluations by ID.
    pub evals: BTreeMap<String, Eval>,
    /// Allocations by ID.
    pub allocs: BTreeMap<String, Alloc>,
    /// Client nodes.
    pub nodes: Vec<Node>,
    /// Replay buffer of committed batches.
    pub buffer: VecDeque<Arc<Batch>>,
    /// Scheduler configuration.
    pub sched: SchedConfig,
    /// Client handles by allocation ID.
    pub clients: HashMap<String, AllocClient>,
    /// Process groups of everything the emulator started (killed on shutdown).
    pub pgids: std::collections::HashSet<i32>,
    /// Next dynamic host port.
    pub next_port: u16,
}

/// Fault injection settings.
#[derive(Debug, Default)]
pub struct Faults {
    /// Delay applied to every `/v1` request.
    pub delay: std::time::Duration,
    /// Remaining delayed requests (`None` = unlimited while `delay` > 0).
    pub delay_count: Option<u64>,
    /// Next live batches to send twice.
    pub duplicate: u64,
    /// Next live batches to reorder (each is held back and sent after its successor).
    pub reorder: u64,
    /// The batch currently held back for reordering.
    pub held: Option<Arc<Batch>>,
    /// Refuse connections until this instant.
    pub refuse_until: Option<std::time::Instant>,
}

/// Shared emulator state.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: EmulatorConfig,
    /// Bound address.
    pub addr: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The locked state.
    inner: Mutex<Inner>,
    /// Live batches for event stream subscribers.
    pub live: broadcast::Sender<Arc<Batch>>,
    /// Current global index (for blocking queries).
    pub index_watch: watch::Sender<u64>,
    /// Bumped to cut every open event stream.
    pub stream_cut: watch::Sender<u64>,
    /// Fault settings.
    pub faults: Mutex<Faults>,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// Notified when the listener must close (refuse-connections fault).
    pub refuse: tokio::sync::Notify,
    /// Bumped by the refuse-connections fault: open keep-alive connections end too, as when the
    /// agent goes down.
    pub outage: watch::Sender<u64>,
}

impl Shared {
    /// Creates the initial state: namespace `default`, `config.nodes` ready nodes.
    pub fn new(config: EmulatorConfig, addr: SocketAddr, data_dir: PathBuf) -> Arc<Self> {
        let mut inner = Inner {
            index: 1,
            table_index: HashMap::new(),
            namespaces: BTreeMap::new(),
            jobs: BTreeMap::new(),
            evals: BTreeMap::new(),
            allocs: BTreeMap::new(),
            nodes: Vec::new(),
            buffer: VecDeque::new(),
            sched: SchedConfig {
                value: json!({"SchedulerAlgorithm":"binpack",
                    "PreemptionConfig":{"SystemSchedulerEnabled":true,"SysBatchSchedulerEnabled":false,
                                        "BatchSchedulerEnabled":false,"ServiceSchedulerEnabled":false},
                    "MemoryOversubscriptionEnabled": config.memory_oversubscription,
                    "RejectJobRegistration":false,"PauseEvalBroker":false,
                    "NodeLimitForFeasibilityChecks":0,"CreateIndex":1,"ModifyIndex":1}),
            },
            clients: HashMap::new(),
            pgids: Default::default(),
            next_port: 20000,
        };
        inner.namespaces.insert(
            "default".into(),
            Namespace {
                name: "default".into(),
                description: "Default shared namespace".into(),
                create_index: 1,
                modify_index: 1,
            },
        );
        for n in 0..config.nodes.max(1) {
            inner.index += 1;
            let idx = inner.index;
            inner.nodes.push(Node {
                id: uuid::Uuid::new_v4().to_string(),
                name: format!("emulator-node-{}", n + 1),
                status: "ready".into(),
                create_index: idx,
                modify_index: idx,
            });
        }
        inner.table_index.insert("nodes", inner.index);
        inner.table_index.insert("namespaces", 1);
        let (live, _) = broadcast::channel(4096);
        let (index_watch, _) = watch::channel(inner.index);
        let (stream_cut, _) = watch::channel(0);
        Arc::new(Shared {
            config,
            addr,
            data_dir,
            inner: Mutex::new(inner),
            live,
            index_watch,
            stream_cut,
            faults: Mutex::new(Faults::default()),
            shutdown: CancellationToken::new(),
            refuse: tokio::sync::Notify::new(),
            outage: watch::channel(0).0,
        })
    }

    /// Locks the state (poisoning is ignored: a panicking handler must not wedge the emulator).
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the fault settings.
    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a committed batch: replay buffer + live subscribers (with fault injection).
    pub fn publish(&self, inner: &mut Inner, batch: Batch) {
        if batch.events.is_empty() {
            return;
        }
        let batch = Arc::new(batch);
        inner.buffer.push_back(batch.clone());
        // The buffer counts commits; two lines of one register commit count once each here.
        while inner.buffer.len() > self.config.event_buffer_size.max(1) {
            inner.buffer.pop_front();
        }
        let mut f = self.faults();
        let mut out = Vec::new();
        if f.reorder > 0 && f.held.is_none() {
            f.reorder -= 1;
            f.held = Some(batch);
            // A held batch is released by the next batch or by the flush timer (see faults).
            return;
        }
        out.push(batch.clone());
        if let Some(h) = f.held.take() {
            out.push(h);
        }
        if f.duplicate > 0 {
            f.duplicate -= 1;
            out.push(batch);
        }
        drop(f);
        for b in out {
            let _ = self.live.send(b);
        }
    }

    /// Releases a batch held back by the reorder fault.
    pub fn flush_held(&self) {
        let held = self.faults().held.take();
        if let Some(h) = held {
            let _ = self.live.send(h);
        }
    }

    /// Announces the new global index to blocking queries.
    pub fn announce(&self, inner: &Inner) {
        self.index_watch.send_replace(inner.index);
    }
}

impl Inner {
    /// Bumps and returns the global index.
    pub fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Records a write to a table.
    pub fn touch(&mut self, table: &'static str, index: u64) {
        self.table_index.insert(table, index);
    }

    /// Index of a table (for list responses).
    pub fn table(&self, table: &str) -> u64 {
        self.table_index.get(table).copied().unwrap_or(1)
    }

    /// Job status per nomad-api.md §2.3.
    pub fn compute_job_status(&self, ns: &str, id: &str) -> &'static str {
        let Some(job) = self.jobs.get(&(ns.to_string(), id.to_string())) else {
            return "dead";
        };
        let cidx = job.create_index();
        let allocs = self
            .allocs
            .values()
            .filter(|a| a.namespace == ns && a.job_id == id && a.job_create_index == cidx);
        let mut any_alloc = false;
        for a in allocs {
            any_alloc = true;
            if !a.terminal() {
                return "running";
            }
        }
        let evals: Vec<&Eval> = self
            .evals
            .values()
            .filter(|e| e.namespace == ns && e.job_id == id && e.create_index >= cidx)
            .collect();
        if evals.iter().any(|e| !e.terminal()) {
            return "pending";
        }
        if !evals.is_empty() || job.stopped() || any_alloc {
            return "dead";
        }
        "pending"
    }

    /// Recomputes the job status; on change updates the job and appends a Job event.
    pub fn refresh_job_status(
        &mut self,
        ns: &str,
        id: &str,
        typ: &'static str,
        index: u64,
        events: &mut Vec<Event>,
    ) {
        let status = self.compute_job_status(ns, id);
        let key = (ns.to_string(), id.to_string());
        if let Some(job) = self.jobs.get_mut(&key) {
            if job.status() != status {
                job.value["Status"] = Value::from(status);
                job.value["ModifyIndex"] = Value::from(index);
                let ev = job_event(&job.value, typ, index, false);
                events.push(ev);
                self.table_index.insert("jobs", index);
            }
        }
    }

    /// Creates an evaluation and returns it (not yet published).
    #[allow(clippy::too_many_arguments)]
    pub fn new_eval(
        &mut self,
        ns: &str,
        job_id: &str,
        typ: &str,
        triggered_by: &str,
        priority: i64,
        job_modify_index: u64,
        index: u64,
    ) -> Eval {
        let now = now_ns();
        let e = Eval {
            id: uuid::Uuid::new_v4().to_string(),
            namespace: ns.into(),
            priority,
            typ: typ.into(),
            triggered_by: triggered_by.into(),
            job_id: job_id.into(),
            job_modify_index,
            status: "pending".into(),
            create_index: index,
            modify_index: index,
            create_time: now,
            modify_time: now,
            ..Eval::default()
        };
        self.evals.insert(e.id.clone(), e.clone());
        self.touch("evals", index);
        e
    }

    /// Ready nodes.
    pub fn ready_nodes(&self) -> Vec<Node> {
        self.nodes
            .iter()
            .filter(|n| n.status == "ready")
            .cloned()
            .collect()
    }
}

/// A Job event.
pub fn job_event(job: &Value, typ: &'static str, index: u64, deleted: bool) -> Event {
    let mut payload = json!({ "Job": job });
    if deleted {
        payload["Deleted"] = Value::Bool(true);
    }
    Event {
        topic: "Job",
        typ,
        key: job["ID"].as_str().unwrap_or("").to_string(),
        namespace: job["Namespace"].as_str().unwrap_or("").to_string(),
        filter_keys: None,
        index,
        payload,
    }
}
