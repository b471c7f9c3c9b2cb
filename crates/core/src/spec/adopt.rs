//! `spec.adopt`: the servers a user runs that pgflip moves the database between, and
//! `spec.switchover.directClients`, what a switch does about sessions that bypass the endpoint.

use super::{SpecError, is_dns_subdomain};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A PostgreSQL server the user runs, and how pgflip logs in to it (as a superuser).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdoptedServer {
    /// Host name or address (Kubernetes mode: a Service's DNS name).
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// A superuser of that server (default `postgres`).
    #[serde(default = "default_pg_user")]
    pub user: String,
    /// Local mode: a file holding the password (read by pgflip, never copied anywhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Local mode: an environment variable of pgflip's process holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Kubernetes mode: a Secret in the object's namespace holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    #[serde(default = "default_secret_key")]
    pub key: String,
}

impl fmt::Display for AdoptedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What the switch does about sessions connected to the serving server directly (not
/// through the endpoint): the fence would end them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DirectClients {
    /// The switch waits, naming them, until they are gone (moved to the endpoint).
    #[default]
    Wait,
    /// The switch ends them (their open transactions fail).
    End,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_pg_user() -> String {
    "postgres".to_string()
}
fn default_secret_key() -> String {
    "password".to_string()
}
pub(super) fn validate(servers: &[AdoptedServer]) -> Result<(), SpecError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in servers.iter().enumerate() {
        let at = format!("spec.adopt[{i}]");
        if s.host.is_empty() || s.host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SpecError::Invalid(format!(
                "{at}.host {:?} is not a host name or address",
                s.host
            )));
        }
        if s.port == 0 {
            return Err(SpecError::Invalid(format!(
                "{at}.port must be a port number"
            )));
        }
        if s.user.is_empty() || s.user.len() > 63 || s.user.contains('\0') {
            return Err(SpecError::Invalid(format!(
                "{at}.user {:?} is not a role name",
                s.user
            )));
        }
        let sources = [
            s.password_file.is_some(),
            s.password_env.is_some(),
            s.secret_ref.is_some(),
        ];
        if sources.iter().filter(|b| **b).count() > 1 {
            return Err(SpecError::Invalid(format!(
                "{at}: give at most one of passwordFile, passwordEnv and secretRef"
            )));
        }
        if let Some(r) = &s.secret_ref
            && (!is_dns_subdomain(&r.name) || r.key.is_empty())
        {
            return Err(SpecError::Invalid(format!(
                "{at}.secretRef: {:?} / {:?} is not a Secret name and key",
                r.name, r.key
            )));
        }
        if !seen.insert((s.host.to_ascii_lowercase(), s.port)) {
            return Err(SpecError::Invalid(format!("{at}: {s} is listed twice")));
        }
    }
    Ok(())
}
