//! `nomad.*` configuration keys (poseidon-behavior.md §7): address, port, token, namespace,
//! tls, disableforcepull, network.

use serde::Deserialize;

/// Errors reading the `nomad.*` section.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has the wrong type or value.
    #[error("nomad configuration: {0}")]
    Invalid(String),
}

/// `nomad.tls.*`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct TlsConfig {
    /// Use HTTPS towards Nomad.
    pub active: bool,
    /// CA certificate file.
    pub cafile: String,
    /// Client certificate file.
    pub certfile: String,
    /// Client key file.
    pub keyfile: String,
}

/// `nomad.network.dns`: the DNS configuration of runners' network namespaces.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

/// `nomad.network.cni`: arguments for CNI plugins.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CniConfig {
    /// `CNI_ARGS`.
    pub args: std::collections::BTreeMap<String, String>,
}

/// `nomad.network.*`: the network resource given to runners with network access; the keys are
/// those of Nomad's `NetworkResource` in lower case, as Poseidon reads them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Network mode (`bridge`, `host`, `cni/<name>`, `none`).
    pub mode: String,
    /// Host network device.
    pub device: String,
    /// CIDR of the network.
    pub cidr: String,
    /// IP address.
    pub ip: String,
    /// Host name inside the network namespace.
    pub hostname: String,
    /// Bandwidth in MBits.
    pub mbits: u32,
    /// DNS configuration.
    pub dns: Option<DnsConfig>,
    /// CNI arguments.
    pub cni: Option<CniConfig>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: "bridge".into(),
            device: String::new(),
            cidr: String::new(),
            ip: String::new(),
            hostname: String::new(),
            mbits: 0,
            dns: None,
            cni: None,
        }
    }
}

impl NetworkConfig {
    /// Nomad's `NetworkResource` JSON with the given dynamic ports.
    pub fn resource(&self, dynamic_ports: Vec<serde_json::Value>) -> serde_json::Value {
        let mut n = serde_json::json!({"Mode": self.mode, "DynamicPorts": dynamic_ports});
        for (key, value) in [
            ("Device", &self.device),
            ("CIDR", &self.cidr),
            ("IP", &self.ip),
            ("Hostname", &self.hostname),
        ] {
            if !value.is_empty() {
                n[key] = serde_json::json!(value);
            }
        }
        if self.mbits > 0 {
            n["MBits"] = serde_json::json!(self.mbits);
        }
        if let Some(dns) = &self.dns {
            n["DNS"] = serde_json::json!({"Servers": dns.servers, "Searches": dns.searches, "Options": dns.options});
        }
        if let Some(cni) = &self.cni {
            n["CNI"] = serde_json::json!({"Args": cni.args});
        }
        n
    }
}

/// The Nomad backend's settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NomadConfig {
    /// Host name or IP of the Nomad agent.
    pub address: String,
    /// HTTP port of the Nomad agent.
    pub port: u16,
    /// ACL token (`X-Nomad-Token`), empty for none.
    pub token: String,
    /// Namespace of all jobs.
    pub namespace: String,
    /// TLS settings.
    pub tls: TlsConfig,
    /// Never set docker `force_pull`.
    pub disableforcepull: bool,
    /// Network of runners with network access.
    pub network: NetworkConfig,
    /// Prefix that runs a command as the unprivileged user (Poseidon: `/sbin/setuser user`).
    /// Empty runs unprivileged commands as the task's user (used with the emulator).
    pub unprivilegedprefix: String,
    /// Run a runner agent in every runner (default): executions and file operations are messages
    /// to it over one long-lived exec session per runner. `false` opens exec sessions per
    /// operation (for images the agent cannot run in).
    pub runneragent: bool,
    /// The agent binary put into runners (a static `x86_64-unknown-linux-musl` build runs in any
    /// image); empty: `poseidon-agent` next to the gateway's executable.
    pub agentbinary: String,
    /// Seconds to wait for a new runner's allocation to run.
    pub startuptimeoutseconds: u64,
    /// Task driver of runners: `docker` (as Poseidon), or `exec`/`raw_exec` for clusters without
    /// Docker (the image is then only recorded, the task runs on the node's file system).
    pub driver: String,
    /// Datacenters of all jobs.
    pub datacenters: Vec<String>,
    /// A job (Nomad's JSON) replacing the built-in template: everything the gateway does not set
    /// itself (constraints, policies, volumes, driver options, ...) comes from it. Loaded from
    /// `server.templatejobfile` by the server.
    #[serde(skip)]
    pub template: Option<serde_json::Value>,
    /// `server.interactivestderr` (Poseidon): with a terminal, stderr is split off through a FIFO
    /// read by a second exec session; `false` runs one session and stderr arrives as stdout.
    #[serde(skip)]
    pub interactive_stderr: bool,
}

impl Default for NomadConfig {
    fn default() -> Self {
        NomadConfig {
            address: "127.0.0.1".into(),
            port: 4646,
            token: String::new(),
            namespace: "default".into(),
            tls: TlsConfig::default(),
            disableforcepull: false,
            network: NetworkConfig::default(),
            unprivilegedprefix: "/sbin/setuser user".into(),
            runneragent: true,
            agentbinary: String::new(),
            startuptimeoutseconds: 120,
            driver: "docker".into(),
            datacenters: vec!["dc1".into()],
            template: None,
            interactive_stderr: true,
        }
    }
}

impl NomadConfig {
    /// Reads the `nomad.*` mapping (without `enabled`, which the server reads).
    pub fn from_yaml(section: &serde_yaml::Mapping) -> Result<Self, ConfigError> {
        let mut m = section.clone();
        m.remove("enabled");
        serde_yaml::from_value(serde_yaml::Value::Mapping(m))
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// `http(s)://address:port`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.active { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.address, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_poseidon_keys() {
        let y: serde_yaml::Mapping = serde_yaml::from_str(
            "enabled: true\naddress: nomad.local\nport: 4747\ntoken: s\nnamespace: poseidon\ndisableforcepull: true\nnetwork:\n  mode: cni/secure-bridge\n",
        )
        .unwrap();
        let c = NomadConfig::from_yaml(&y).unwrap();
        assert_eq!(c.base_url(), "http://nomad.local:4747");
        assert_eq!(c.namespace, "poseidon");
        assert!(c.disableforcepull);
        assert_eq!(c.network.mode, "cni/secure-bridge");
        assert_eq!(c.unprivilegedprefix, "/sbin/setuser user");
    }

    #[test]
    fn every_network_field_reaches_the_job() {
        let y: serde_yaml::Mapping = serde_yaml::from_str(
            "network:\n  mode: bridge\n  hostname: runner\n  mbits: 10\n  dns:\n    servers: [10.0.0.53]\n    searches: [example.org]\n    options: [ndots:2]\n  cni:\n    args: {IgnoreUnknown: '1'}\n",
        )
        .unwrap();
        let c = NomadConfig::from_yaml(&y).unwrap();
        let n = c.network.resource(vec![]);
        assert_eq!(n["Mode"], "bridge");
        assert_eq!(n["Hostname"], "runner");
        assert_eq!(n["MBits"], 10);
        assert_eq!(n["DNS"]["Servers"][0], "10.0.0.53");
        assert_eq!(n["DNS"]["Searches"][0], "example.org");
        assert_eq!(n["DNS"]["Options"][0], "ndots:2");
        assert_eq!(n["CNI"]["Args"]["IgnoreUnknown"], "1");
        assert!(n.get("CIDR").is_none());
        let bad: serde_yaml::Mapping =
            serde_yaml::from_str("network:\n  mode: bridge\n  dsn: {}\n").unwrap();
        assert!(NomadConfig::from_yaml(&bad)
            .unwrap_err()
            .to_string()
            .contains("dsn"));
    }
}
