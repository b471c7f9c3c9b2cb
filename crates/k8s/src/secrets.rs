//! Kubernetes mode's passwords for servers the user runs (`spec.adopt[].secretRef`): read
//! from a Secret in the object's namespace when needed, never copied anywhere (not into
//! the record, the status, events, notes or logs). `passwordFile` and `passwordEnv` work as
//! in local mode (a file mounted into the controller's pod, its environment).

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use pgflip_core::spec::AdoptedServer;
use pgflip_engine::adapters::local_passwords::LocalPasswords;
use pgflip_engine::ports::{NotReady, Passwords, Result};

pub struct SecretPasswords {
    secrets: Api<Secret>,
}

impl SecretPasswords {
    pub fn new(client: kube::Client, namespace: &str) -> SecretPasswords {
        SecretPasswords {
            secrets: Api::namespaced(client, namespace),
        }
    }
}

impl Passwords for SecretPasswords {
    async fn password(&self, server: &AdoptedServer) -> Result<Option<String>> {
        let Some(reference) = &server.secret_ref else {
            return LocalPasswords.password(server).await;
        };
        // An operator creates the Secret with its cluster: until then, wait.
        let secret = self
            .secrets
            .get_opt(&reference.name)
            .await?
            .ok_or_else(|| {
                NotReady(format!(
                    "Secret {} (the password for {server}) does not exist yet",
                    reference.name
                ))
            })?;
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&reference.key))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "Secret {} has no key {:?} (the password for {server})",
                    reference.name,
                    reference.key
                )
            })?;
        Ok(Some(String::from_utf8_lossy(&value.0).into_owned()))
    }
}
