//! Job decoding, canonicalisation (server defaults) and validation (nomad-api.md §1.3, §4).
//!
//! The request JSON is decoded like Go's `encoding/json` (case-insensitive keys, unknown keys
//! ignored, type mismatches → 400), defaults are filled as the Nomad server does, and the
//! result is validated; validation failures are 500 with go-multierror text.

use crate::error::ApiError;
use crate::json::{ci_get, ci_get_nn, json_kind, multierror, Obj};
use serde_json::{json, Map, Value};

/// Server-managed job fields that do not take part in the "spec changed?" comparison.
pub const SERVER_FIELDS: &[&str] = &[
    "Status",
    "StatusDescription",
    "Stable",
    "Version",
    "SubmitTime",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
];

/// Decoding context: the Go struct name and the field path for error messages.
struct Ctx<'a> {
    obj: &'a Map<String, Value>,
    strct: &'static str,
    path: String,
}

impl<'a> Ctx<'a> {
    fn new(obj: &'a Map<String, Value>, strct: &'static str, path: impl Into<String>) -> Self {
        Ctx {
            obj,
            strct,
            path: path.into(),
        }
    }

    fn mismatch(&self, key: &str, v: &Value, go_type: &str) -> ApiError {
        ApiError::bad_request(format!(
            "json: cannot unmarshal {} into Go struct field {}.{}.{} of type {}",
            json_kind(v),
            self.strct,
            self.path,
            key,
            go_type
        ))
    }

    fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match ci_get_nn(self.obj, key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.mismatch(key, v, "string")),
        }
    }

    fn int(&self, key: &str, go_type: &str) -> Result<Option<i64>, ApiError> {
        match ci_get_nn(self.obj, key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.mismatch(key, &Value::Number(n.clone()), go_type)),
            Some(v) => Err(self.mismatch(key, v, go_type)),
        }
    }

    fn duration(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.int(key, "time.Duration")
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match ci_get_nn(self.obj, key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.mismatch(key, v, "bool")),
        }
    }

    fn string_map(&self, key: &str) -> Result<Value, ApiError> {
        match ci_get_nn(self.obj, key) {
            None => Ok(Value::Null),
            Some(Value::Object(m)) => {
                for v in m.values() {
                    if !v.is_string() {
                        return Err(self.mismatch(key, v, "string"));
                    }
                }
                Ok(Value::Object(m.clone()))
            }
            Some(v) => Err(self.mismatch(key, v, "map[string]string")),
        }
    }

    fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, ApiError> {
        match ci_get_nn(self.obj, key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.mismatch(key, other, "string")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.mismatch(key, v, "[]string")),
        }
    }

    fn object(&self, key: &str, go_type: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match ci_get_nn(self.obj, key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.mismatch(key, v, go_type)),
        }
    }

    fn array(&self, key: &str, go_type: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match ci_get_nn(self.obj, key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.mismatch(key, v, go_type)),
        }
    }

    /// Free-form pass-through of a field we do not model.
    fn raw(&self, key: &str) -> Value {
        ci_get(self.obj, key).cloned().unwrap_or(Value::Null)
    }
}

/// Result of decoding a register request.
pub struct RegisterRequest {
    /// Canonical job (without server-managed fields).
    pub job: Value,
    /// Body-level `Namespace`.
    pub namespace: Option<String>,
    /// `EnforceIndex` flag.
    pub enforce_index: bool,
    /// `JobModifyIndex` for `EnforceIndex`.
    pub job_modify_index: u64,
}

/// Decodes a `JobRegisterRequest` body; the returned job still needs namespace resolution
/// and [`validate`].
pub fn decode_register(body: &[u8]) -> Result<RegisterRequest, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request("Request body is empty"));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Value::Object(top) = v else {
        return Err(ApiError::bad_request(format!(
            "json: cannot unmarshal {} into Go value of type api.JobRegisterRequest",
            json_kind(&v)
        )));
    };
    let ctx = Ctx::new(&top, "JobRegisterRequest", "");
    let priority = ctx.int("EvalPriority", "int")?.unwrap_or(0);
    if priority != 0 && !(1..=100).contains(&priority) {
        return Err(ApiError::bad_request(
            "Eval priority must be between 1 and 100 inclusively",
        ));
    }
    let job = match ci_get_nn(&top, "Job") {
        None => return Err(ApiError::bad_request("Job must be specified")),
        Some(Value::Object(j)) => j,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
            "json: cannot unmarshal {} into Go struct field JobRegisterRequest.Job of type api.Job",
            json_kind(v)
        )))
        }
    };
    let job_ctx = Ctx::new(job, "Job", "Job");
    match job_ctx.string("ID")? {
        Some(id) if !id.is_empty() => {}
        _ => return Err(ApiError::bad_request("Job ID hasn't been provided")),
    }
    Ok(RegisterRequest {
        job: canonical_job(job)?,
        namespace: ctx.string("Namespace")?.filter(|s| !s.is_empty()),
        enforce_index: ctx.boolean("EnforceIndex")?.unwrap_or(false),
        job_modify_index: ctx.int("JobModifyIndex", "uint64")?.unwrap_or(0).max(0) as u64,
    })
}

fn canonical_job(job: &Map<String, Value>) -> Result<Value, ApiError> {
    let c = Ctx::new(job, "Job", "Job");
    let id = c.string("ID")?.unwrap_or_default();
    let typ = c.string("Type")?.unwrap_or_else(|| "service".into());
    let name = c
        .string("Name")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| id.clone());
    let mut groups = Vec::new();
    if let Some(tgs) = c.array("TaskGroups", "[]*api.TaskGroup")? {
        for tg in tgs {
            let Value::Object(tg) = tg else {
                return Err(c.mismatch("TaskGroups", tg, "api.TaskGroup"));
            };
            groups.push(canonical_group(tg, &typ)?);
        }
    }
    let datacenters = c
        .string_list("Datacenters")?
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| vec!["*".into()]);
    Ok(Obj::full()
        .put("Stop", c.boolean("Stop")?.unwrap_or(false))
        .put(
            "Region",
            c.string("Region")?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "global".into()),
        )
        .put("Namespace", c.string("Namespace")?.unwrap_or_default())
        .put("ID", id)
        .put("ParentID", c.string("ParentID")?.unwrap_or_default())
        .put("Name", name)
        .put("Type", typ)
        .put(
            "Priority",
            c.int("Priority", "int")?.filter(|p| *p != 0).unwrap_or(50),
        )
        .put("AllAtOnce", c.boolean("AllAtOnce")?.unwrap_or(false))
        .put("Datacenters", datacenters)
        .put(
            "NodePool",
            c.string("NodePool")?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        )
        .put("Constraints", c.raw("Constraints"))
        .put("Affinities", c.raw("Affinities"))
        .put("Spreads", canonical_spreads(&c)?)
        .put("TaskGroups", Value::Array(groups))
        .put("Update", zero_update())
        .put("Multiregion", c.raw("Multiregion"))
        .put("Periodic", c.raw("Periodic"))
        .put("ParameterizedJob", c.raw("ParameterizedJob"))
        .put("Dispatched", c.boolean("Dispatched")?.unwrap_or(false))
        .put(
            "DispatchIdempotencyToken",
            c.string("DispatchIdempotencyToken")?.unwrap_or_default(),
        )
        .put("Payload", c.raw("Payload"))
        .put("Meta", c.string_map("Meta")?)
        .put(
            "ConsulNamespace",
            c.string("ConsulNamespace")?.unwrap_or_default(),
        )
        .put(
            "VaultNamespace",
            c.string("VaultNamespace")?.unwrap_or_default(),
        )
        .put("NomadTokenID", "")
        .put("Status", "")
        .put("StatusDescription", "")
        .put("Stable", false)
        .put("Version", 0)
        .put("SubmitTime", 0)
        .put("CreateIndex", 0)
        .put("ModifyIndex", 0)
        .put("JobModifyIndex", 0)
        .put("UI", c.raw("UI"))
        .put("VersionTag", c.raw("VersionTag"))
        .build())
}

fn zero_update() -> Value {
    json!({"Stagger":0,"MaxParallel":0,"HealthCheck":"","MinHealthyTime":0,"HealthyDeadline":0,
           "ProgressDeadline":0,"AutoRevert":false,"AutoPromote":false,"Canary":0})
}

fn canonical_spreads(c: &Ctx<'_>) -> Result<Value, ApiError> {
    let Some(spreads) = c.array("Spreads", "[]*api.Spread")? else {
        return Ok(Value::Null);
    };
    let mut out = Vec::new();
    for s in spreads {
        let Value::Object(s) = s else {
            return Err(c.mismatch("Spreads", s, "api.Spread"));
        };
        let sc = Ctx::new(s, "Spread", format!("{}.Spreads", c.path));
        out.push(
            Obj::full()
                .put("Attribute", sc.string("Attribute")?.unwrap_or_default())
                .put("Weight", sc.int("Weight", "int8")?.unwrap_or(0))
                .put("SpreadTarget", sc.raw("SpreadTarget"))
                .build(),
        );
    }
    Ok(Value::Array(out))
}

fn canonical_group(tg: &Map<String, Value>, job_type: &str) -> Result<Value, ApiError> {
    let c = Ctx::new(tg, "TaskGroup", "Job.TaskGroups");
    let batch = job_type == "batch";
    let rp = c.object("RestartPolicy", "api.RestartPolicy")?;
    let rp = {
        let empty = Map::new();
        let r = Ctx::new(
            rp.unwrap_or(&empty),
            "RestartPolicy",
            "Job.TaskGroups.RestartPolicy",
        );
        let (da, di, dd) = if batch {
            (3, 86_400_000_000_000i64, 15_000_000_000i64)
        } else {
            (2, 1_800_000_000_000, 15_000_000_000)
        };
        Obj::full()
            .put("Attempts", r.int("Attempts", "int")?.unwrap_or(da))
            .put("Interval", r.duration("Interval")?.unwrap_or(di))
            .put("Delay", r.duration("Delay")?.unwrap_or(dd))
            .put(
                "Mode",
                r.string("Mode")?
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "fail".into()),
            )
            .put(
                "RenderTemplates",
                r.boolean("RenderTemplates")?.unwrap_or(false),
            )
            .build()
    };
    let resched = {
        let empty = Map::new();
        let r0 = c.object("ReschedulePolicy", "api.ReschedulePolicy")?;
        let r = Ctx::new(
            r0.unwrap_or(&empty),
            "ReschedulePolicy",
            "Job.TaskGroups.ReschedulePolicy",
        );
        let (att, int, del, f, max, unl) = if batch {
            (
                1,
                86_400_000_000_000i64,
                5_000_000_000i64,
                "constant",
                0i64,
                false,
            )
        } else {
            (0, 0, 30_000_000_000, "exponential", 3_600_000_000_000, true)
        };
        Obj::full()
            .put("Attempts", r.int("Attempts", "int")?.unwrap_or(att))
            .put("Interval", r.duration("Interval")?.unwrap_or(int))
            .put("Delay", r.duration("Delay")?.unwrap_or(del))
            .put(
                "DelayFunction",
                r.string("DelayFunction")?
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| f.into()),
            )
            .put("MaxDelay", r.duration("MaxDelay")?.unwrap_or(max))
            .put("Unlimited", r.boolean("Unlimited")?.unwrap_or(unl))
            .build()
    };
    let disk = {
        let empty = Map::new();
        let d0 = c.object("EphemeralDisk", "api.EphemeralDisk")?;
        let d = Ctx::new(
            d0.unwrap_or(&empty),
            "EphemeralDisk",
            "Job.TaskGroups.EphemeralDisk",
        );
        Obj::full()
            .put("Sticky", d.boolean("Sticky")?.unwrap_or(false))
            .put("SizeMB", d.int("SizeMB", "int")?.unwrap_or(300))
            .put("Migrate", d.boolean("Migrate")?.unwrap_or(false))
            .build()
    };
    let networks = match c.array("Networks", "[]*api.NetworkResource")? {
        None => Value::Null,
        Some(nets) => Value::Array(
            nets.iter()
                .map(|n| canonical_network(n, "Job.TaskGroups.Networks"))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let mut tasks = Vec::new();
    if let Some(ts) = c.array("Tasks", "[]*api.Task")? {
        for t in ts {
            let Value::Object(t) = t else {
                return Err(c.mismatch("Tasks", t, "api.Task"));
            };
            tasks.push(canonical_task(t, &rp)?);
        }
    }
    Ok(Obj::full()
        .put("Name", c.string("Name")?.unwrap_or_default())
        .put("Count", c.int("Count", "int")?.unwrap_or(1))
        .put("Update", Value::Null)
        .put("Migrate", Value::Null)
        .put("Constraints", c.raw("Constraints"))
        .put("Scaling", c.raw("Scaling"))
        .put("RestartPolicy", rp)
        .put("Disconnect", c.raw("Disconnect"))
        .put("Tasks", Value::Array(tasks))
        .put("EphemeralDisk", disk)
        .put("Meta", c.string_map("Meta")?)
        .put("ReschedulePolicy", resched)
        .put("Affinities", c.raw("Affinities"))
        .put("Spreads", canonical_spreads(&c)?)
        .put("Networks", networks)
        .put("Consul", c.raw("Consul"))
        .put("Services", c.raw("Services"))
        .put("Volumes", c.raw("Volumes"))
        .put(
            "ShutdownDelay",
            c.duration("ShutdownDelay")?
                .map(Value::from)
                .unwrap_or(Value::Null),
        )
        .put("StopAfterClientDisconnect", Value::Null)
        .put("MaxClientDisconnect", Value::Null)
        .put(
            "PreventRescheduleOnLost",
            c.boolean("PreventRescheduleOnLost")?.unwrap_or(false),
        )
        .build())
}

fn canonical_network(n: &Value, path: &str) -> Result<Value, ApiError> {
    let Value::Object(n) = n else {
        return Err(ApiError::bad_request(format!(
            "json: cannot unmarshal {} into Go struct field {path} of type api.NetworkResource",
            json_kind(n)
        )));
    };
    let c = Ctx::new(n, "NetworkResource", path);
    let ports = |key: &str| -> Result<Value, ApiError> {
        let Some(ps) = c.array(key, "[]api.Port")? else {
            return Ok(Value::Null);
        };
        let mut out = Vec::new();
        for p in ps {
            let Value::Object(p) = p else {
                return Err(c.mismatch(key, p, "api.Port"));
            };
            let pc = Ctx::new(p, "Port", format!("{path}.{key}"));
            out.push(
                Obj::omit_empty()
                    .put("Label", pc.string("Label")?.unwrap_or_default())
                    .put("Value", pc.int("Value", "int")?.unwrap_or(0))
                    .put("To", pc.int("To", "int")?.unwrap_or(0))
                    .put(
                        "HostNetwork",
                        pc.string("HostNetwork")?
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| "default".into()),
                    )
                    .build(),
            );
        }
        Ok(Value::Array(out))
    };
    Ok(Obj::omit_empty()
        .put("Mode", c.string("Mode")?.unwrap_or_default())
        .put("Device", c.string("Device")?.unwrap_or_default())
        .put("CIDR", c.string("CIDR")?.unwrap_or_default())
        .put("IP", c.string("IP")?.unwrap_or_default())
        .put("Hostname", c.string("Hostname")?.unwrap_or_default())
        .put("MBits", c.int("MBits", "int")?.unwrap_or(0))
        .put("DNS", c.raw("DNS"))
        .put("ReservedPorts", ports("ReservedPorts")?)
        .put("DynamicPorts", ports("DynamicPorts")?)
        .put("CNI", c.raw("CNI"))
        .build())
}

fn canonical_task(t: &Map<String, Value>, group_rp: &Value) -> Result<Value, ApiError> {
    let c = Ctx::new(t, "Task", "Job.TaskGroups.Tasks");
    let res = {
        let empty = Map::new();
        let r0 = c.object("Resources", "api.Resources")?;
        let r = Ctx::new(
            r0.unwrap_or(&empty),
            "Resources",
            "Job.TaskGroups.Tasks.Resources",
        );
        Obj::full()
            .put("CPU", r.int("CPU", "int")?.unwrap_or(100))
            .put("Cores", r.int("Cores", "int")?.unwrap_or(0))
            .put("MemoryMB", r.int("MemoryMB", "int")?.unwrap_or(300))
            .put("MemoryMaxMB", r.int("MemoryMaxMB", "int")?.unwrap_or(0))
            .put("DiskMB", r.int("DiskMB", "int")?.unwrap_or(0))
            .put("IOPS", r.int("IOPS", "int")?.unwrap_or(0))
            .put("Networks", r.raw("Networks"))
            .put("Devices", r.raw("Devices"))
            .put("NUMA", r.raw("NUMA"))
            .put("SecretsMB", r.int("SecretsMB", "int")?.unwrap_or(0))
            .build()
    };
    let logs = {
        let empty = Map::new();
        let l0 = c.object("LogConfig", "api.LogConfig")?;
        let l = Ctx::new(
            l0.unwrap_or(&empty),
            "LogConfig",
            "Job.TaskGroups.Tasks.LogConfig",
        );
        Obj::full()
            .put("MaxFiles", l.int("MaxFiles", "int")?.unwrap_or(10))
            .put(
                "MaxFileSizeMB",
                l.int("MaxFileSizeMB", "int")?.unwrap_or(10),
            )
            .put("Disabled", l.boolean("Disabled")?.unwrap_or(false))
            .build()
    };
    let config = match c.object("Config", "map[string]interface {}")? {
        Some(m) => Value::Object(m.clone()),
        None => Value::Null,
    };
    Ok(Obj::full()
        .put("Name", c.string("Name")?.unwrap_or_default())
        .put("Driver", c.string("Driver")?.unwrap_or_default())
        .put("User", c.string("User")?.unwrap_or_default())
        .put("Config", config)
        .put("Env", c.string_map("Env")?)
        .put("Services", c.raw("Services"))
        .put("Vault", c.raw("Vault"))
        .put("Consul", c.raw("Consul"))
        .put("Templates", c.raw("Templates"))
        .put("Constraints", c.raw("Constraints"))
        .put("Affinities", c.raw("Affinities"))
        .put("Resources", res)
        .put("RestartPolicy", group_rp.clone())
        .put("DispatchPayload", c.raw("DispatchPayload"))
        .put("Lifecycle", c.raw("Lifecycle"))
        .put("Meta", c.string_map("Meta")?)
        .put(
            "KillTimeout",
            c.duration("KillTimeout")?.unwrap_or(5_000_000_000),
        )
        .put("LogConfig", logs)
        .put("Artifacts", c.raw("Artifacts"))
        .put("Leader", c.boolean("Leader")?.unwrap_or(false))
        .put("ShutdownDelay", c.duration("ShutdownDelay")?.unwrap_or(0))
        .put("VolumeMounts", c.raw("VolumeMounts"))
        .put("ScalingPolicies", Value::Null)
        .put("KillSignal", c.string("KillSignal")?.unwrap_or_default())
        .put("Kind", c.string("Kind")?.unwrap_or_default())
        .put("CSIPluginConfig", c.raw("CSIPluginConfig"))
        .put("Identity", Value::Null)
        .put("Identities", c.raw("Identities"))
        .put("Actions", c.raw("Actions"))
        .put("Schedule", c.raw("Schedule"))
        .build())
}

fn int_of(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Validates a canonical job like `Job.Validate()`; returns the multierror text on failure.
/// Also returns warnings (memory oversubscription) on success.
pub fn validate(job: &Value, oversubscription: bool) -> Result<Vec<String>, ApiError> {
    let mut errs = Vec::new();
    let id = str_of(job, "ID");
    if id.is_empty() {
        errs.push("Missing job ID".to_string());
    } else if id.contains(' ') {
        errs.push("Job ID contains a space".to_string());
    } else if id.contains('\0') {
        errs.push("Job ID contains a null character".to_string());
    }
    if str_of(job, "Name").is_empty() {
        errs.push("Missing job name".to_string());
    }
    let typ = str_of(job, "Type");
    if !matches!(typ, "service" | "batch" | "system" | "sysbatch") {
        errs.push(format!("Invalid job type: {typ:?}"));
    }
    let prio = int_of(job, "Priority");
    if !(1..=100).contains(&prio) {
        errs.push("job priority must be between [1, 100]".to_string());
    }
    let groups = job
        .get("TaskGroups")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if groups.is_empty() {
        errs.push("Missing job task groups".to_string());
    }
    let mut warnings = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let gname = str_of(g, "Name");
        if gname.is_empty() {
            errs.push(format!("Job task group {} missing name", i + 1));
        } else if let Some(j) = seen.iter().position(|n| *n == gname) {
            errs.push(format!(
                "Job task group {} redefines '{}' from group {}",
                i + 1,
                gname,
                j + 1
            ));
        }
        seen.push(gname);
        let mut gerrs = Vec::new();
        if int_of(g, "Count") < 0 {
            gerrs.push("Task group count can't be negative".to_string());
        }
        let disk_mb = g
            .get("EphemeralDisk")
            .map(|d| int_of(d, "SizeMB"))
            .unwrap_or(300);
        let tasks = g
            .get("Tasks")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if tasks.is_empty() {
            gerrs.push("Missing tasks for task group".to_string());
        }
        if let Some(rp) = g.get("RestartPolicy") {
            let mode = str_of(rp, "Mode");
            if mode != "fail" && mode != "delay" {
                gerrs.push(format!("Unsupported restart mode: {mode:?}"));
            }
        }
        if let Some(rp) = g.get("ReschedulePolicy") {
            let f = str_of(rp, "DelayFunction");
            if !matches!(f, "constant" | "exponential" | "fibonacci") {
                gerrs.push(format!(
                    "Invalid delay function {f:?}, must be one of [constant exponential fibonacci]"
                ));
            }
        }
        if let Some(spreads) = g.get("Spreads").and_then(Value::as_array) {
            for s in spreads {
                let w = int_of(s, "Weight");
                if !(1..=100).contains(&w) {
                    gerrs.push("Spread block must have a positive weight from 0 to 100".into());
                }
            }
        }
        for t in &tasks {
            let tname = str_of(t, "Name");
            let mut terrs = Vec::new();
            if tname.is_empty() {
                terrs.push("Missing task name".to_string());
            } else if tname == "alloc" {
                terrs.push("Task cannot be named \"alloc\"".to_string());
            }
            if str_of(t, "Driver").is_empty() {
                terrs.push("Missing task driver".to_string());
            }
            if int_of(t, "KillTimeout") < 0 {
                terrs.push("KillTimeout must be a positive value".to_string());
            }
            if let Some(r) = t.get("Resources") {
                let cpu = int_of(r, "CPU");
                let cores = int_of(r, "Cores");
                if cores == 0 && cpu < 1 {
                    terrs.push(format!("minimum CPU value is 1; got {cpu}"));
                }
                let mem = int_of(r, "MemoryMB");
                if mem < 10 {
                    terrs.push(format!("minimum MemoryMB value is 10; got {mem}"));
                }
                let max = int_of(r, "MemoryMaxMB");
                if max != 0 && max != -1 && max < mem {
                    terrs.push(format!(
                        "MemoryMaxMB value ({max}) should be larger than MemoryMB value ({mem})"
                    ));
                }
                if max > 0 && !oversubscription {
                    warnings.push(format!(
                        "Memory oversubscription is not enabled; Task \"{gname}.{tname}\" memory_max value will be ignored. Update the Scheduler Configuration to allow oversubscription."
                    ));
                }
            }
            if let Some(l) = t.get("LogConfig") {
                let total = int_of(l, "MaxFiles") * int_of(l, "MaxFileSizeMB");
                if total >= disk_mb && !l.get("Disabled").and_then(Value::as_bool).unwrap_or(false)
                {
                    terrs.push(format!(
                        "log storage ({total} MB) must be less than requested disk capacity ({disk_mb} MB)"
                    ));
                }
            }
            if !terrs.is_empty() {
                gerrs.push(format!(
                    "Task {tname} validation failed: {}",
                    multierror(&terrs)
                ));
            }
        }
        if !gerrs.is_empty() {
            errs.push(format!(
                "Task group {gname} validation failed: {}",
                multierror(&gerrs)
            ));
        }
    }
    if errs.is_empty() {
        Ok(warnings)
    } else {
        Err(ApiError::internal(multierror(&errs)))
    }
}

/// Renders register warnings: `""`, `"1 warning:\n\n* a"`, `"2 warnings:\n\n* a\n* b"`.
pub fn render_warnings(w: &[String]) -> String {
    match w.len() {
        0 => String::new(),
        n => {
            let head = if n == 1 {
                "1 warning:".to_string()
            } else {
                format!("{n} warnings:")
            };
            let items: Vec<String> = w.iter().map(|s| format!("* {s}")).collect();
            format!("{head}\n\n{}", items.join("\n"))
        }
    }
}

/// The job without server-managed fields, for change detection.
pub fn spec_of(job: &Value) -> Value {
    let mut j = job.clone();
    if let Value::Object(m) = &mut j {
        for f in SERVER_FIELDS {
            m.remove(*f);
        }
    }
    j
}

/// Finds a task group by name.
pub fn group<'a>(job: &'a Value, name: &str) -> Option<&'a Value> {
    job.get("TaskGroups")?
        .as_array()?
        .iter()
        .find(|g| str_of(g, "Name") == name)
}

/// Whether an allocation of group `name` must be replaced when moving from `old` to `new`
/// (tasks, combined meta, networks or disk changed; nomad: scheduler/util.go `tasksUpdated`).
pub fn group_destructively_changed(old: &Value, new: &Value, name: &str) -> bool {
    let (Some(og), Some(ng)) = (group(old, name), group(new, name)) else {
        return true;
    };
    let fields = ["Tasks", "Meta", "Networks", "EphemeralDisk", "Volumes"];
    old.get("Meta") != new.get("Meta") || fields.iter().any(|f| og.get(*f) != ng.get(*f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let body = br#"{"job":{"id":"demo","type":"batch","TaskGroups":[
            {"Name":"config","Count":0,"Tasks":[{"Name":"config","Driver":"raw_exec"}]},
            {"Name":"g","Tasks":[{"Name":"t"}]}]}}"#;
        let req = decode_register(body).unwrap();
        assert_eq!(req.job["TaskGroups"][1]["Count"], 1);
        assert_eq!(
            req.job["TaskGroups"][1]["Tasks"][0]["Resources"]["MemoryMB"],
            300
        );
        assert_eq!(req.job["TaskGroups"][1]["RestartPolicy"]["Attempts"], 3);
        let err = validate(&req.job, false).unwrap_err();
        assert_eq!(err.status.as_u16(), 500);
        assert_eq!(
            err.message,
            "1 error occurred:\n\t* Task group g validation failed: 1 error occurred:\n\t* Task t validation failed: 1 error occurred:\n\t* Missing task driver\n\n\n\n\n\n"
        );
    }

    #[test]
    fn duration_strings_are_rejected() {
        let body =
            br#"{"Job":{"ID":"x","TaskGroups":[{"Name":"g","RestartPolicy":{"Delay":"15s"}}]}}"#;
        let err = decode_register(body).err().unwrap();
        assert_eq!(err.status.as_u16(), 400);
        assert!(
            err.message.contains("of type time.Duration"),
            "{}",
            err.message
        );
    }

    #[test]
    fn missing_job_and_id() {
        assert_eq!(
            decode_register(b"{}").err().unwrap().message,
            "Job must be specified"
        );
        assert_eq!(
            decode_register(br#"{"Job":{}}"#).err().unwrap().message,
            "Job ID hasn't been provided"
        );
        assert_eq!(
            decode_register(b"").err().unwrap().message,
            "Request body is empty"
        );
    }
}
