//! One database's parts, made on first sight of its object and kept between reconciles;
//! forgotten (an unswitched attempt abandoned) when the object is deleted.

use super::*;
use crate::api::FIELD_MANAGER;
use crate::crd::BlueGreenDatabase;
use crate::endpoint::KubeEndpoint;
use crate::instances::KubeInstances;
use crate::journal::ConfigMapJournal;
use crate::objects::{self, PASSWORD_KEY, admin_secret_name};
use anyhow::Context;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::events::Recorder;
use kube::{Resource, ResourceExt};
use pgflip_core::spec::Desired;
use pgflip_engine::driver::{Driver, system_clock};
use pgflip_engine::phases::Phases;
use pgflip_engine::ports::ADMIN_USER;
use pgflip_engine::ports::Credentials;
use pgflip_engine::runner::Runner;
use std::sync::Arc;

impl Shared {
    /// Drops a deleted object's runner, and with it the endpoint's console session. Its
    /// data, endpoint and journal stay: an object created again under the name takes them up.
    /// An attempt that has not switched is abandoned first: its slots would otherwise
    /// hold blue's WAL with no one left to drop them.
    pub(super) async fn forget(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let Some(database) = self.databases.lock().await.remove(&key) else {
            return;
        };
        let mut runner = database.runner.lock().await;
        if let Err(e) = runner
            .release("the BlueGreenDatabase was deleted: the attempt is abandoned")
            .await
        {
            tracing::warn!(%namespace, %name, kind = e.metric_label(), error = %e, "could not clean up after the deleted object's attempt");
        }
        self.metrics.forget(namespace, name);
        self.plans.forget(namespace, name);
        tracing::info!(%namespace, %name, "the object is gone: forgot its database");
    }

    /// The database's runner, made on first sight (its admin Secret created if absent).
    /// None while the object has never been valid: nothing is created for it.
    pub(super) async fn database(
        &self,
        object: &BlueGreenDatabase,
        live: Option<&Desired>,
    ) -> Result<Option<Arc<Database>>, ControllerError> {
        let namespace = object.namespace().unwrap_or_default();
        let name = object.name_any();
        let key = (namespace.clone(), name.clone());
        let mut databases = self.databases.lock().await;
        if let Some(d) = databases.get(&key)
            && d.uid == object.metadata.uid
        {
            return Ok(Some(d.clone()));
        }
        // New, or deleted and created again under its name: its parts are (re)built, its
        // record read back from the journal, so that nothing, events included, still
        // refers to an old object.
        let journal = ConfigMapJournal::new(self.client.clone(), &namespace, &name);
        let record = journal.load().await.map_err(kube_error)?;
        let desired = match (live, &record.wanted) {
            (Some(d), _) => d.clone(),
            (None, Some(wanted)) => wanted.desired.clone(),
            (None, None) => return Ok(None),
        };
        let admin = self
            .admin_credentials(object, &desired)
            .await
            .map_err(kube_error)?;
        let instances = Adopting::new(
            KubeInstances::new(
                self.client.clone(),
                &namespace,
                object.clone(),
                admin.clone(),
            ),
            SecretPasswords::new(self.client.clone(), &namespace),
            admin.clone(),
        );
        let endpoint = KubeEndpoint::new(
            self.client.clone(),
            &namespace,
            object.clone(),
            &self.options.endpoint_image,
            admin.clone(),
        )
        .map_err(kube_error)?;
        let sinks = KubeSinks {
            events: KubeEvents {
                recorder: Recorder::new(self.client.clone(), self.reporter.clone()),
                reference: object.object_ref(&()),
                metrics: self.metrics.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
            },
            forge: self
                .forge
                .as_ref()
                .map(|f| f.with_context(format!("pgflip/{namespace}/{name}"))),
        };
        let driver = Driver::new(
            Phases::new(instances, endpoint, self.toolchain.clone(), admin),
            journal,
            sinks,
            system_clock(),
        );
        let database = Arc::new(Database {
            uid: object.metadata.uid.clone(),
            runner: tokio::sync::Mutex::new(Runner::new(driver, record)),
        });
        databases.insert(key, database.clone());
        Ok(Some(database))
    }

    /// pgflip's admin login for the database's servers: from its Secret, which is created
    /// with a random password if absent and never overwritten.
    pub(super) async fn admin_credentials(
        &self,
        object: &BlueGreenDatabase,
        desired: &Desired,
    ) -> anyhow::Result<Credentials> {
        let namespace = object.namespace().context("the object has no namespace")?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let name = admin_secret_name(&desired.name);
        if secrets.get_opt(&name).await?.is_none() {
            let secret = objects::admin_secret(object, desired, &pgflip_engine::random::token(32));
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match secrets.create(&params, &secret).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e).context("creating the admin Secret"),
            }
        }
        let secret = secrets.get(&name).await?;
        let password = secret
            .data
            .as_ref()
            .and_then(|d| d.get(PASSWORD_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .with_context(|| format!("Secret {name} has no {PASSWORD_KEY}"))?;
        Ok(Credentials {
            user: ADMIN_USER.into(),
            password,
        })
    }
}
