//! The `BlueGreenDatabase` document: its model, parsing and validation. Pure: no I/O.
//!
//! A document is the whole desired state a Git commit carries. Anything malformed is
//! rejected here with a reason meant for the commit's failure status, before anything
//! is touched.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

mod adopt;
pub use adopt::{AdoptedServer, DirectClients, SecretKeyRef};

pub const API_VERSION: &str = "pgflip.dev/v1alpha1";
pub const KIND: &str = "BlueGreenDatabase";

/// PostgreSQL majors pgflip can run and move between.
pub const SUPPORTED_MAJORS: &[u32] = &[15, 16, 17, 18];

/// A PostgreSQL major version, e.g. 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Major(pub u32);

impl fmt::Display for Major {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Major {
    /// Parses "16", "16.4" (minor ignored) or a server_version_num such as 160004.
    pub fn parse(text: &str) -> Result<Major, SpecError> {
        let t = text.trim();
        let head = t.split('.').next().unwrap_or("");
        let n: u32 = head.parse().map_err(|_| {
            SpecError::Invalid(format!(
                "spec.version {t:?} is not a PostgreSQL major version such as \"16\""
            ))
        })?;
        let n = if n >= 100_000 { n / 10_000 } else { n };
        let major = Major(n);
        if !SUPPORTED_MAJORS.contains(&n) {
            return Err(SpecError::Invalid(format!(
                "spec.version {t:?}: PostgreSQL {n} is not supported (supported: {})",
                SUPPORTED_MAJORS
                    .iter()
                    .map(|m| m.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(major)
    }
}

/// What to do with objects logical replication cannot carry (unlogged tables, large
/// objects, tables without a replica identity that receive UPDATE/DELETE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum UnsupportedPolicy {
    /// Refuse to start, naming the objects. Nothing is touched.
    #[default]
    Refuse,
    /// Go ahead and say loudly what is not carried over (tables without a key get
    /// `REPLICA IDENTITY FULL`).
    Warn,
}

/// How green gets its first copy of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CopyPreference {
    /// Physical for an upgrade where it can be done (both majors' tools installed, green
    /// one of pgflip's own instances), logical otherwise.
    #[default]
    Auto,
    /// Logical replication copies every table (the only way for a downgrade).
    Logical,
    /// A base backup of blue, replayed to the replication slot's start and upgraded with
    /// `pg_upgrade --link`; logical replication carries what came after. Refused where it
    /// cannot be done.
    Physical,
}

/// How thoroughly green is compared with blue before the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Verification {
    /// Row count and a SHA-256 content checksum of every table, at one consistent cut.
    #[default]
    Full,
    /// Row counts only, at the same consistent cut.
    Count,
    /// No comparison (not recommended).
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Document {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<serde_yaml::Mapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_yaml::Mapping>,
}

// The schema derived here is also the Kubernetes CRD's (`pgflip_k8s::crd`), so both run
// modes read one document; doc comments on these types are its user-facing descriptions.
/// The desired state of the database, as written in Git. Every field but `version` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// The PostgreSQL major to run, as a string ("16"): the field a pull request changes.
    #[schemars(schema_with = "int_or_string")]
    pub version: serde_yaml::Value,
    /// Databases carried over. Created empty when pgflip bootstraps the first instance.
    #[serde(default = "default_databases")]
    pub databases: Vec<String>,
    #[serde(default)]
    pub endpoint: EndpointSpec,
    #[serde(default)]
    pub switchover: SwitchoverSpec,
    #[serde(default)]
    pub verification: Verification,
    /// How long the previous color is kept in reverse replication so that `git revert`
    /// switches back without losing a write. "0s" decommissions it right after the switch.
    #[serde(default = "default_retain", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retain_previous: Duration,
    #[serde(default)]
    pub unsupported: UnsupportedPolicy,
    /// How green gets its first copy: `auto` (physical for upgrades where it can be done),
    /// `logical` or `physical`.
    #[serde(default)]
    pub copy: CopyPreference,
    /// Kubernetes mode: the server image, `{version}` standing for the major
    /// (default `postgres:{version}`). Local mode runs the installed binaries instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Kubernetes mode: the volume size of each color (default `1Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// Servers you run (systemd, a managed service, an operator's cluster) that pgflip
    /// moves the database between; it never starts, stops, reconfigures or deletes them.
    /// On first sight the first one listed serves; after that, the one whose major is
    /// `version` must serve. A version no listed server runs gets a pgflip instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopt: Vec<AdoptedServer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    /// The stable client port: PgBouncer in transaction pooling (local mode: on 127.0.0.1;
    /// Kubernetes: the port of the endpoint Service).
    #[serde(default = "default_port")]
    pub port: u16,
}

impl Default for EndpointSpec {
    fn default() -> Self {
        EndpointSpec {
            port: default_port(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SwitchoverSpec {
    /// The lag gate: the switch starts only when green is at most this many bytes of WAL behind.
    #[serde(default = "default_max_lag")]
    pub max_lag_bytes: u64,
    /// Upper bound on the client-visible pause. On expiry clients resume on blue and the
    /// attempt reports failure (it is retried on the next pass).
    #[serde(default = "default_pause_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub pause_timeout: Duration,
    /// How long to wait for the lag gate before giving up on this attempt.
    #[serde(default = "default_catch_up_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub catch_up_timeout: Duration,
    /// Sessions on the serving server that bypass the endpoint: `wait` (the switch waits
    /// until they are gone) or `end` (the fence ends them).
    #[serde(default)]
    pub direct_clients: DirectClients,
    /// A physical copy: the most WAL the source may hold for it (from the base backup until
    /// green subscribes). Beyond it the attempt is abandoned and its slots dropped.
    #[serde(default = "default_max_retained_wal")]
    pub max_retained_wal_bytes: u64,
}

impl Default for SwitchoverSpec {
    fn default() -> Self {
        SwitchoverSpec {
            max_lag_bytes: default_max_lag(),
            pause_timeout: default_pause_timeout(),
            catch_up_timeout: default_catch_up_timeout(),
            direct_clients: DirectClients::default(),
            max_retained_wal_bytes: default_max_retained_wal(),
        }
    }
}

/// `version: "16"` and `version: 16` are both accepted (validation says which majors).
fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-int-or-string": true })
}

fn default_databases() -> Vec<String> {
    vec!["app".to_string()]
}
fn default_port() -> u16 {
    6432
}
fn default_retain() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_lag() -> u64 {
    1 << 20
}
fn default_max_retained_wal() -> u64 {
    10 << 30
}
fn default_pause_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_catch_up_timeout() -> Duration {
    Duration::from_secs(600)
}

/// A validated document: what the engine works from, and what the record keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Desired {
    pub name: String,
    pub major: Major,
    pub databases: Vec<String>,
    pub endpoint_port: u16,
    pub switchover: SwitchoverSpec,
    pub verification: Verification,
    #[serde(with = "humantime_serde")]
    pub retain_previous: Duration,
    pub unsupported: UnsupportedPolicy,
    #[serde(default)]
    pub copy: CopyPreference,
    /// Kubernetes mode: the server image, `{version}` standing for the major.
    pub image_template: String,
    /// Kubernetes mode: the volume size of each color, a Kubernetes quantity.
    pub storage: String,
    /// Servers the user runs (see [`Spec::adopt`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopt: Vec<AdoptedServer>,
}

pub const DEFAULT_IMAGE: &str = "postgres:{version}";
pub const DEFAULT_STORAGE: &str = "1Gi";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the document is not valid YAML: {0}")]
    Yaml(String),
    #[error("invalid BlueGreenDatabase: {0}")]
    Invalid(String),
}

/// Parses and validates one `BlueGreenDatabase` document.
pub fn parse(text: &str) -> Result<Desired, SpecError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| SpecError::Yaml(e.to_string()))?;
    if let Some(kind) = value.get("kind")
        && kind.as_str() != Some(KIND)
    {
        return Err(SpecError::Invalid(format!(
            "kind is {kind:?}, expected {KIND}"
        )));
    }
    let doc: Document =
        serde_yaml::from_str(text).map_err(|e| SpecError::Invalid(e.to_string()))?;
    validate(doc)
}

fn validate(doc: Document) -> Result<Desired, SpecError> {
    if doc.api_version != API_VERSION {
        return Err(SpecError::Invalid(format!(
            "apiVersion is {:?}, expected {API_VERSION}",
            doc.api_version
        )));
    }
    if doc.kind != KIND {
        return Err(SpecError::Invalid(format!(
            "kind is {:?}, expected {KIND}",
            doc.kind
        )));
    }
    validate_spec(&doc.metadata.name, doc.spec)
}

/// `metadata.name` of a document that may be invalid otherwise (to say which database a
/// failure is about), if it can be read at all.
pub fn peek_name(text: &str) -> Option<String> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
    Some(value.get("metadata")?.get("name")?.as_str()?.to_string())
}

/// Validates a `spec` (from a Git document, or from the Kubernetes object Flux applied).
pub fn validate_spec(name: &str, s: Spec) -> Result<Desired, SpecError> {
    if !is_dns_label(name) {
        return Err(SpecError::Invalid(format!(
            "metadata.name {name:?} must be a DNS label (lowercase letters, digits, '-', at most 63)"
        )));
    }
    let version_text = match &s.version {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Null => {
            return Err(SpecError::Invalid("spec.version is missing".into()));
        }
        other => {
            return Err(SpecError::Invalid(format!(
                "spec.version {other:?} is not a version string"
            )));
        }
    };
    let major = Major::parse(&version_text)?;
    if s.databases.is_empty() {
        return Err(SpecError::Invalid(
            "spec.databases must name at least one database".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for db in &s.databases {
        if db.is_empty() || db.len() > 63 {
            return Err(SpecError::Invalid(format!(
                "spec.databases: {db:?} is not a valid database name"
            )));
        }
        if !is_endpoint_name(db) {
            return Err(SpecError::Invalid(format!(
                "spec.databases: {db:?} cannot be served through the endpoint: PgBouncer's \
                 configuration takes database names of ASCII letters, digits, '_', '.' and '-' only"
            )));
        }
        if ["postgres", "template0", "template1", "pgbouncer"].contains(&db.as_str()) {
            return Err(SpecError::Invalid(format!(
                "spec.databases: {db:?} is reserved"
            )));
        }
        if !seen.insert(db) {
            return Err(SpecError::Invalid(format!(
                "spec.databases: {db:?} is listed twice"
            )));
        }
    }
    if s.switchover.max_retained_wal_bytes == 0 {
        return Err(SpecError::Invalid(
            "spec.switchover.maxRetainedWalBytes must be more than 0".into(),
        ));
    }
    if s.endpoint.port == 0 {
        return Err(SpecError::Invalid(
            "spec.endpoint.port must be a port number".into(),
        ));
    }
    if s.switchover.pause_timeout.is_zero() || s.switchover.pause_timeout > Duration::from_secs(60)
    {
        return Err(SpecError::Invalid(
            "spec.switchover.pauseTimeout must be between 1ms and 60s".into(),
        ));
    }
    let image_template = s.image.as_deref().unwrap_or(DEFAULT_IMAGE);
    if !image_template.contains("{version}") || image_template.chars().any(char::is_whitespace) {
        return Err(SpecError::Invalid(format!(
            "spec.image {image_template:?} must name the image with {{version}} where the major goes, e.g. \"postgres:{{version}}\""
        )));
    }
    let storage = s.storage.unwrap_or_else(|| DEFAULT_STORAGE.to_string());
    if !is_quantity(&storage) {
        return Err(SpecError::Invalid(format!(
            "spec.storage {storage:?} is not a size such as \"10Gi\""
        )));
    }
    adopt::validate(&s.adopt)?;
    Ok(Desired {
        adopt: s.adopt,
        name: name.to_string(),
        storage,
        image_template: image_template.to_string(),
        major,
        databases: s.databases,
        endpoint_port: s.endpoint.port,
        switchover: s.switchover,
        verification: s.verification,
        retain_previous: s.retain_previous,
        unsupported: s.unsupported,
        copy: s.copy,
    })
}

impl Desired {
    /// Kubernetes mode: the server image of `major` (during a switch the two colors run
    /// different majors of the same image).
    pub fn image(&self, major: Major) -> String {
        self.image_template.replace("{version}", &major.to_string())
    }
}

/// A plain Kubernetes quantity: digits and an optional binary or decimal suffix.
fn is_quantity(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && ["", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix)
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Renders a minimal document (used by the demo and tests to write commits).
/// Whether PgBouncer (the endpoint, in both modes) can name database `db` in its
/// configuration: its `[databases]` keys are read unquoted, of these characters only
/// (PgBouncer 1.18 refuses a quoted key, and any other character, as a syntax error).
pub fn is_endpoint_name(db: &str) -> bool {
    !db.is_empty()
        && db
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn render(name: &str, major: Major, extra_spec_yaml: &str) -> String {
    let mut out = format!(
        "apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata:\n  name: {name}\nspec:\n  version: \"{major}\"\n"
    );
    for line in extra_spec_yaml.lines().filter(|l| !l.trim().is_empty()) {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
