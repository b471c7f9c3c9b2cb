//! Local mode's source of the passwords of servers the user runs (`spec.adopt`).

use crate::ports::{Passwords, Result};
use anyhow::Context;
use pgflip_core::spec::AdoptedServer;

/// Local mode's passwords: a file, or an environment variable of pgflip's process.
pub struct LocalPasswords;

impl Passwords for LocalPasswords {
    async fn password(&self, server: &AdoptedServer) -> Result<Option<String>> {
        if let Some(path) = &server.password_file {
            let text = tokio::fs::read_to_string(path)
                .await
                .with_context(|| format!("reading passwordFile {path}"))?;
            return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
        }
        if let Some(var) = &server.password_env {
            return std::env::var(var)
                .map(Some)
                .with_context(|| format!("environment variable {var} (passwordEnv) is not set"));
        }
        if server.secret_ref.is_some() {
            anyhow::bail!(
                "{server}: secretRef is read in Kubernetes mode; in local mode give passwordFile or passwordEnv"
            );
        }
        Ok(None)
    }
}
