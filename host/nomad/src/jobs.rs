//! Template and runner job JSON (poseidon-behavior.md §4) and the reverse mapping (§4.6).

use poseidon_core::backend::Claim;
use poseidon_core::{EnvironmentConfig, EnvironmentId};
use serde_json::{json, Map, Value};

use crate::config::NomadConfig;

/// Name of the runner task group.
pub const DEFAULT_GROUP: &str = "default-group";
/// Name of the runner task.
pub const DEFAULT_TASK: &str = "default-task";
/// Name of the count-0 group holding mutable meta.
pub const CONFIG_GROUP: &str = "config";

/// `template-<id>`.
pub fn template_job_id(id: EnvironmentId) -> String {
    format!("template-{id}")
}

/// The environment id of a template job id.
pub fn environment_of_template(job_id: &str) -> Option<EnvironmentId> {
    job_id.strip_prefix("template-")?.parse().ok()
}

/// Builds a job for the environment: the template job (meta with `prewarmingPoolSize`) or a
/// runner job (meta `used`).
pub fn build_job(
    env: &EnvironmentConfig,
    id: &str,
    config_meta: Map<String, Value>,
    force_pull: bool,
    nomad: &NomadConfig,
) -> Value {
    let networks: Vec<Value> = if env.network_access {
        let ports: Vec<Value> = env
            .exposed_ports
            .iter()
            .map(|p| json!({"Label": p.to_string(), "To": p}))
            .collect();
        vec![nomad.network.resource(ports)]
    } else {
        Vec::new()
    };
    // The template reserves 50 MB; a smaller limit lowers the reservation instead of failing
    // Nomad's MemoryMaxMB >= MemoryMB validation.
    let memory_max = i64::from(env.memory_limit);
    let memory = if memory_max > 0 {
        memory_max.clamp(10, 50)
    } else {
        50
    };
    let docker = nomad.driver == "docker";
    let task_config = if docker {
        json!({"image": env.image, "command": "sleep", "args": ["infinity"],
               "network_mode": if env.network_access { "" } else { "none" },
               "force_pull": force_pull && !nomad.disableforcepull})
    } else {
        json!({"command": "sleep", "args": ["infinity"]})
    };
    let mut config_meta = config_meta;
    if !docker {
        // Without a docker config, the image and network setting live in the meta only.
        config_meta.insert("image".into(), json!(env.image));
        config_meta.insert(
            "networkAccess".into(),
            json!(env.network_access.to_string()),
        );
    }
    let generated = json!({
        "ID": id, "Name": id, "Type": "batch", "Namespace": nomad.namespace,
        "Datacenters": nomad.datacenters,
        "TaskGroups": [
            {"Name": DEFAULT_GROUP, "Count": 1,
             "EphemeralDisk": {"Migrate": false, "SizeMB": 10, "Sticky": false},
             "Spreads": [{"Attribute": "${node.unique.name}", "Weight": 100}],
             "RestartPolicy": {"Attempts": 3, "Delay": 15_000_000_000i64, "Interval": 3_600_000_000_000i64, "Mode": "fail"},
             "ReschedulePolicy": {"Unlimited": false, "Attempts": 3, "Interval": 21_600_000_000_000i64,
                                  "Delay": 60_000_000_000i64, "MaxDelay": 240_000_000_000i64,
                                  "DelayFunction": "exponential"},
             "Networks": networks,
             "Tasks": [{"Name": DEFAULT_TASK, "Driver": nomad.driver, "KillTimeout": 0, "KillSignal": "SIGKILL",
                        "Config": task_config,
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                        "Resources": {"CPU": env.cpu_limit.max(1), "MemoryMB": memory, "MemoryMaxMB": memory_max}}]},
            {"Name": CONFIG_GROUP, "Count": 0, "Meta": config_meta,
             "Tasks": [{"Name": "config", "Driver": "exec", "Config": {"command": "true"},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                        "Resources": {"CPU": 1, "MemoryMB": 10}}]}
        ]
    });
    match &nomad.template {
        Some(template) => overlay(template, generated),
        None => generated,
    }
}

/// Applies the gateway's fields to an administrator's template job (Poseidon §4.5): a
/// `default-group` with a `default-task` running `sleep infinity`, a count-0 `config` group with the
/// meta, and image, resources, network, ID and name from the environment. The rest is the template's.
fn overlay(template: &Value, generated: Value) -> Value {
    let mut job = template.clone();
    if let Some(inner) = job.get("Job").cloned() {
        job = inner; // accept `{"Job": {...}}` as `/v1/jobs/parse` and the register API use it
    }
    for key in ["ID", "Name", "Namespace", "Type"] {
        job[key] = generated[key].clone();
    }
    if job["Datacenters"].as_array().is_none_or(|d| d.is_empty()) {
        job["Datacenters"] = generated["Datacenters"].clone();
    }
    let generated_groups = generated["TaskGroups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut groups = job["TaskGroups"].as_array().cloned().unwrap_or_default();
    for wanted in &generated_groups {
        let name = wanted["Name"].as_str().unwrap_or_default();
        match groups.iter_mut().find(|g| g["Name"] == name) {
            None => groups.push(wanted.clone()),
            Some(group) => {
                group["Count"] = wanted["Count"].clone();
                if name == DEFAULT_GROUP {
                    group["Networks"] = wanted["Networks"].clone();
                } else {
                    group["Meta"] = wanted["Meta"].clone();
                }
                let wanted_task = &wanted["Tasks"][0];
                let tasks = group["Tasks"].as_array().cloned().unwrap_or_default();
                let mut tasks: Vec<Value> = tasks;
                match tasks.iter_mut().find(|t| t["Name"] == wanted_task["Name"]) {
                    None => tasks.push(wanted_task.clone()),
                    Some(task) => {
                        if task["Driver"].as_str().is_none_or(str::is_empty) {
                            task["Driver"] = wanted_task["Driver"].clone();
                        }
                        let mut config = task["Config"].as_object().cloned().unwrap_or_default();
                        for (k, v) in wanted_task["Config"].as_object().into_iter().flatten() {
                            config.insert(k.clone(), v.clone());
                        }
                        task["Config"] = Value::Object(config);
                        if name == DEFAULT_GROUP {
                            let mut resources =
                                task["Resources"].as_object().cloned().unwrap_or_default();
                            for key in ["CPU", "MemoryMaxMB"] {
                                resources.insert(key.into(), wanted_task["Resources"][key].clone());
                            }
                            resources
                                .entry("MemoryMB")
                                .or_insert(wanted_task["Resources"]["MemoryMB"].clone());
                            task["Resources"] = Value::Object(resources);
                        }
                    }
                }
                group["Tasks"] = Value::Array(tasks);
            }
        }
    }
    job["TaskGroups"] = Value::Array(groups);
    job
}

/// The template job of an environment.
pub fn template_job(env: &EnvironmentConfig, nomad: &NomadConfig) -> Value {
    let mut meta = Map::new();
    meta.insert("used".into(), json!("false"));
    meta.insert(
        "prewarmingPoolSize".into(),
        json!(env.prewarming_pool_size.to_string()),
    );
    build_job(env, &template_job_id(env.id), meta, true, nomad)
}

/// A runner job of an environment.
pub fn runner_job(env: &EnvironmentConfig, id: &str, nomad: &NomadConfig) -> Value {
    let mut meta = Map::new();
    meta.insert("used".into(), json!("false"));
    build_job(env, id, meta, true, nomad)
}

/// The allocation to use of a job's allocations: a running one if there is one (after a reschedule
/// the list also holds the dead predecessor), else the first listed.
pub fn current_allocation(allocations: &[Value]) -> Option<&Value> {
    allocations
        .iter()
        .find(|a| a["ClientStatus"] == "running")
        .or_else(|| allocations.iter().find(|a| a["DesiredStatus"] == "run"))
        .or_else(|| allocations.first())
}

fn group<'a>(job: &'a Value, name: &str) -> Option<&'a Value> {
    job["TaskGroups"]
        .as_array()?
        .iter()
        .find(|g| g["Name"] == name)
}

/// Meta of the config group.
pub fn config_meta(job: &Value) -> Option<&Map<String, Value>> {
    group(job, CONFIG_GROUP)?.get("Meta")?.as_object()
}

/// Records a runner's claim in its config group's meta, as Poseidon does (`used`, `timeout`), and
/// its owner (`owner`, only when the claim names one); `None` marks it idle again. Other keys stay.
pub fn record_claim(meta: &mut Map<String, Value>, claim: Option<&Claim>) {
    meta.insert("used".into(), json!(claim.is_some().to_string()));
    match claim {
        Some(claim) => meta.insert(
            "timeout".into(),
            json!(claim.inactivity_timeout.to_string()),
        ),
        None => meta.remove("timeout"),
    };
    match claim.and_then(|c| c.owner.as_ref()) {
        Some(owner) => meta.insert("owner".into(), json!(owner)),
        None => meta.remove("owner"),
    };
}

/// The claim a runner job's config meta records (see [`record_claim`]): `None` if it is idle. A
/// claim without `owner` (also one Poseidon or an earlier version recorded) names nobody.
pub fn recorded_claim(meta: &Map<String, Value>) -> Option<Claim> {
    let text = |key: &str| meta.get(key).and_then(Value::as_str);
    (text("used") == Some("true")).then(|| Claim {
        inactivity_timeout: text("timeout").and_then(|t| t.parse().ok()).unwrap_or(60),
        owner: text("owner").map(str::to_string),
    })
}

/// Reads the environment back from a template job (§4.6).
pub fn environment_from_job(job: &Value) -> Option<EnvironmentConfig> {
    let id = environment_of_template(job["ID"].as_str()?)?;
    let g = group(job, DEFAULT_GROUP)?;
    let task = g["Tasks"]
        .as_array()?
        .iter()
        .find(|t| t["Name"] == DEFAULT_TASK)?;
    let pool = config_meta(job)
        .and_then(|m| m.get("prewarmingPoolSize"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let meta = config_meta(job);
    let meta_text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
    let network_access = match task["Config"]["network_mode"].as_str() {
        Some(mode) => mode != "none",
        None => meta_text("networkAccess")
            .map(|v| v == "true")
            .unwrap_or(true),
    };
    let exposed_ports = g["Networks"]
        .as_array()
        .and_then(|n| n.first())
        .and_then(|n| n["DynamicPorts"].as_array())
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["To"].as_u64().and_then(|v| u16::try_from(v).ok()))
                .collect()
        })
        .unwrap_or_default();
    Some(EnvironmentConfig {
        id,
        image: task["Config"]["image"]
            .as_str()
            .or_else(|| meta_text("image"))
            .unwrap_or("")
            .to_string(),
        prewarming_pool_size: pool,
        cpu_limit: task["Resources"]["CPU"].as_u64().unwrap_or(0) as u32,
        memory_limit: task["Resources"]["MemoryMaxMB"].as_u64().unwrap_or(0) as u32,
        network_access,
        exposed_ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_round_trips() {
        let env = EnvironmentConfig {
            id: 10,
            image: "openhpi/docker_exec_phusion".into(),
            prewarming_pool_size: 3,
            cpu_limit: 40,
            memory_limit: 512,
            network_access: true,
            exposed_ports: vec![8080, 3000],
        };
        let job = template_job(&env, &NomadConfig::default());
        assert_eq!(job["ID"], "template-10");
        assert_eq!(job["TaskGroups"][1]["Count"], 0);
        assert_eq!(
            job["TaskGroups"][0]["Networks"][0]["DynamicPorts"][0]["Label"],
            "8080"
        );
        assert_eq!(environment_from_job(&job), Some(env.clone()));
    }

    #[test]
    fn an_administrators_template_keeps_its_own_settings() {
        let env = EnvironmentConfig {
            id: 12,
            image: "python:3".into(),
            prewarming_pool_size: 2,
            cpu_limit: 50,
            memory_limit: 256,
            network_access: false,
            exposed_ports: vec![],
        };
        let template = json!({"Job": {"ID": "x", "Datacenters": ["eu-1"], "Constraints": [{"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="}],
            "TaskGroups": [{"Name": "default-group", "Count": 5, "Tasks": [{"Name": "default-task", "Driver": "docker",
                "Config": {"image": "old", "command": "bash", "runtime": "runsc"}, "Resources": {"CPU": 1, "MemoryMB": 30}}]}]}});
        let nomad = NomadConfig {
            template: Some(template),
            ..NomadConfig::default()
        };
        let job = template_job(&env, &nomad);
        assert_eq!(job["ID"], "template-12");
        assert_eq!(job["Datacenters"], json!(["eu-1"]));
        assert_eq!(job["Constraints"][0]["RTarget"], "linux");
        let task = &job["TaskGroups"][0]["Tasks"][0];
        assert_eq!(job["TaskGroups"][0]["Count"], 1);
        assert_eq!(task["Config"]["runtime"], "runsc");
        assert_eq!(task["Config"]["image"], "python:3");
        assert_eq!(task["Config"]["command"], "sleep");
        assert_eq!(task["Resources"]["MemoryMB"], 30);
        assert_eq!(task["Resources"]["MemoryMaxMB"], 256);
        assert_eq!(job["TaskGroups"][1]["Name"], "config");
        assert_eq!(environment_from_job(&job), Some(env));
    }

    #[test]
    fn exec_driver_keeps_image_and_network_in_the_meta() {
        let env = EnvironmentConfig {
            id: 11,
            image: "python".into(),
            prewarming_pool_size: 1,
            cpu_limit: 40,
            memory_limit: 0,
            network_access: false,
            exposed_ports: vec![],
        };
        let nomad = NomadConfig {
            driver: "raw_exec".into(),
            ..NomadConfig::default()
        };
        let job = template_job(&env, &nomad);
        assert_eq!(job["TaskGroups"][0]["Tasks"][0]["Driver"], "raw_exec");
        assert_eq!(
            job["TaskGroups"][0]["Tasks"][0]["Config"]["command"],
            "sleep"
        );
        assert_eq!(environment_from_job(&job), Some(env));
    }

    #[test]
    fn a_claim_and_its_owner_are_recorded_in_the_meta_and_read_back() {
        let mut meta = Map::new();
        meta.insert("image".into(), json!("python"));
        assert_eq!(recorded_claim(&meta), None);
        let claim = Claim {
            inactivity_timeout: 90,
            owner: Some("hpi".into()),
        };
        record_claim(&mut meta, Some(&claim));
        assert_eq!(
            Value::Object(meta.clone()),
            json!({"image": "python", "used": "true", "timeout": "90", "owner": "hpi"})
        );
        assert_eq!(recorded_claim(&meta), Some(claim));
        // Claimed again by nobody in particular, then idle: no owner is left behind.
        let ownerless = Claim {
            inactivity_timeout: 0,
            owner: None,
        };
        record_claim(&mut meta, Some(&ownerless));
        assert_eq!(recorded_claim(&meta), Some(ownerless));
        record_claim(&mut meta, None);
        assert_eq!(
            Value::Object(meta.clone()),
            json!({"image": "python", "used": "false"})
        );
        assert_eq!(recorded_claim(&meta), None);
    }

    #[test]
    fn a_claim_recorded_without_an_owner_names_nobody() {
        // As Poseidon and versions before owners were recorded left it.
        let meta = json!({"used": "true", "timeout": "30"});
        assert_eq!(
            recorded_claim(meta.as_object().unwrap()),
            Some(Claim {
                inactivity_timeout: 30,
                owner: None
            })
        );
    }
}
