//! Environment definitions persisted as one JSON file each, written atomically.

use std::path::{Path, PathBuf};

use poseidon_core::{EnvironmentConfig, EnvironmentId};

/// Directory of persisted environments.
pub(crate) struct EnvironmentStore {
    dir: PathBuf,
}

impl EnvironmentStore {
    pub(crate) fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, id: EnvironmentId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes to a temporary file, syncs it, then renames it over the old one.
    pub(crate) async fn save(&self, config: &EnvironmentConfig) -> std::io::Result<()> {
        let path = self.path(config.id);
        let tmp = self.dir.join(format!(".{}.json.tmp", config.id));
        let json = serde_json::to_vec_pretty(config)?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    pub(crate) async fn remove(&self, id: EnvironmentId) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path(id)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// All stored environments; unreadable files are reported and skipped.
    pub(crate) async fn load(&self) -> std::io::Result<Vec<EnvironmentConfig>> {
        let mut out = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            if !is_environment_file(&path) {
                continue;
            }
            match tokio::fs::read(&path)
                .await
                .map(|b| serde_json::from_slice(&b))
            {
                Ok(Ok(config)) => out.push(config),
                Ok(Err(e)) => {
                    tracing::error!(file = %path.display(), error = %e, "skipping an unreadable environment")
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "skipping an unreadable environment")
                }
            }
        }
        out.sort_by_key(|c: &EnvironmentConfig| c.id);
        Ok(out)
    }
}

fn is_environment_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "json")
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
}
