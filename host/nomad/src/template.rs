//! `server.templatejobfile`: an administrator's job replacing the built-in template (§4.5).

use std::path::Path;

use crate::api::{NomadClient, NomadError};
use crate::config::NomadConfig;

/// Reads the file into `config.template`: Nomad's JSON as it is (a job, or `{"Job": job}`), or HCL
/// turned into JSON by Nomad itself (`/v1/jobs/parse`, so Nomad must be reachable then).
pub async fn load(config: &mut NomadConfig, path: &Path) -> Result<(), NomadError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| NomadError::Decode(format!("cannot read it: {e}")))?;
    let job = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| NomadError::Decode(format!("invalid JSON: {e}")))?
    } else {
        NomadClient::new(config)?.parse_hcl(&text).await?
    };
    let job = job.get("Job").cloned().unwrap_or(job);
    if !job.is_object() {
        return Err(NomadError::Decode(
            "the template is not a job object".into(),
        ));
    }
    config.template = Some(job);
    Ok(())
}
