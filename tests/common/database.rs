//! What the Kubernetes-mode tests read of a `BlueGreenDatabase` and what serves it: its
//! conditions, its endpoint pod, pgflip's admin login, the server version behind the
//! endpoint.

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams};
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_k8s::crd::BlueGreenDatabase;

pub fn condition<'a>(object: &'a BlueGreenDatabase, type_: &str) -> Option<&'a Condition> {
    object
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Ready, for its current generation, with `version` serving.
pub fn is_ready_at(object: &BlueGreenDatabase, version: &str) -> bool {
    let status = object.status.clone().unwrap_or_default();
    condition(object, "Ready").is_some_and(|c| c.status == "True")
        && status.observed_generation == object.metadata.generation
        && status.active_version.as_deref() == Some(version)
}

/// The endpoint pod's address, once it is Ready (no kube-proxy: the Service is reached
/// at its pod).
pub async fn endpoint(client: &kube::Client, namespace: &str) -> Option<Addr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=endpoint"))
        .await
        .ok()?;
    list.items
        .iter()
        .find_map(pgflip_k8s::api::ready_pod_ip)
        .map(|host| Addr { host, port: 5432 })
}

/// The endpoint's Service (its ClusterIP, which kube-proxy sends to the endpoint pod of
/// the moment), as clients in the cluster reach it.
pub async fn endpoint_service(client: &kube::Client, namespace: &str, name: &str) -> Option<Addr> {
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), namespace);
    let spec = services.get(name).await.ok()?.spec?;
    Some(Addr {
        host: spec.cluster_ip?,
        port: u16::try_from(spec.ports?.first()?.port).ok()?,
    })
}

/// pgflip's admin login for database `name`, from the Secret the controller created.
pub async fn admin(client: &kube::Client, namespace: &str, name: &str) -> Credentials {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets.get(&format!("{name}-pgflip-admin")).await.unwrap();
    let password = &secret.data.unwrap()["password"];
    Credentials {
        user: "pgflip".into(),
        password: String::from_utf8(password.0.clone()).unwrap(),
    }
}

/// `server_version_num` of the server behind `addr`.
pub async fn server_version(addr: &Addr, creds: &Credentials, database: &str) -> String {
    first_value(addr, creds, database, "SHOW server_version_num").await
}

/// The first column of the first row `sql` returns on the server behind `addr`, as text.
pub async fn first_value(addr: &Addr, creds: &Credentials, database: &str, sql: &str) -> String {
    let client = pgflip_engine::pg::connect(addr, creds, database)
        .await
        .unwrap();
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap()
}

/// How many sessions other than this probe's own are open on the PgBouncer admin console
/// at `addr` (the controller keeps one between reconciles, so a pause is one round trip).
pub async fn other_console_sessions(addr: &Addr, creds: &Credentials) -> usize {
    let client = pgflip_engine::pg::connect(addr, creds, "pgbouncer")
        .await
        .unwrap();
    let console = client
        .simple_query("SHOW CLIENTS")
        .await
        .unwrap()
        .into_iter()
        .filter(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("database") == Some("pgbouncer"),
            _ => false,
        })
        .count();
    // This probe is one of them.
    console.saturating_sub(1)
}
