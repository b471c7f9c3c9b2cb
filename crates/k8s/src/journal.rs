//! Kubernetes mode's journal: the engine's record in a ConfigMap beside the object
//! (`<database>-pgflip-state`), written with server-side apply before every step, so a
//! controller that is killed, or loses its lease, is resumed by the next leader exactly
//! where it stopped. It holds no secret: only colors, majors, revisions and timings.

use super::api::apply;
use super::objects::{state_config_map, state_name};
use anyhow::Context;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use pgflip_core::plan::Record;
use pgflip_engine::ports::{Journal, Result};

pub struct ConfigMapJournal {
    api: Api<ConfigMap>,
    namespace: String,
    database: String,
}

impl ConfigMapJournal {
    pub fn new(client: kube::Client, namespace: &str, database: &str) -> ConfigMapJournal {
        ConfigMapJournal {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            database: database.to_string(),
        }
    }

    /// The stored record, or a fresh one for a database pgflip has not touched yet.
    pub async fn load(&self) -> anyhow::Result<Record> {
        let name = state_name(&self.database);
        let Some(cm) = self.api.get_opt(&name).await? else {
            return Ok(Record::default());
        };
        let json = cm
            .data
            .as_ref()
            .and_then(|d| d.get("record.json"))
            .with_context(|| format!("ConfigMap {name} has no record.json"))?;
        serde_json::from_str(json).with_context(|| format!("reading the record in {name}"))
    }
}

impl Journal for ConfigMapJournal {
    async fn save(&self, record: &Record) -> Result<()> {
        let json = serde_json::to_string(record)?;
        let cm = state_config_map(&self.namespace, &self.database, json);
        apply(&self.api, &cm).await?;
        Ok(())
    }
}
