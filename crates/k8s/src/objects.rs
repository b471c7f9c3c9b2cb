//! The objects pgflip creates for a `BlueGreenDatabase`, built from the validated spec.
//! Pure: each builder returns the full desired object, applied with server-side apply.
//!
//! Per color: a StatefulSet of one PostgreSQL pod with its volume claim, and a headless
//! Service giving it a stable name. Per database: a Secret with pgflip's admin password,
//! created once if absent and never overwritten.
//!
//! Ownership: Services carry an owner reference to the `BlueGreenDatabase` (they hold no
//! state and are garbage-collected with it). StatefulSets, their volumes and the Secret
//! do not: deleting or pruning the object must never delete the data or the credentials
//! that reach it. They are found by their labels instead.

use super::crd::BlueGreenDatabase;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapKeySelector, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec,
    PodTemplateSpec, Probe, Secret, SecretKeySelector, SecurityContext, Service, ServicePort,
    ServiceSpec, TCPSocketAction, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use pgflip_core::plan::{Color, Member};
use pgflip_core::spec::Desired;
use pgflip_engine::ports::ADMIN_USER;
use pgflip_engine::replication::SERVER_SETTINGS;
use std::collections::BTreeMap;

pub const PORT: i32 = 5432;
/// The endpoint pod's control port: the controller pushes a new target to it.
pub const CONTROL_PORT: i32 = 8432;
/// The pod label saying which major a color's StatefulSet runs.
pub const VERSION_LABEL: &str = "pgflip.dev/version";
/// The endpoint ConfigMap's key: the endpoint's stored configuration (JSON).
pub const ENDPOINT_CONFIG_KEY: &str = "endpoint.json";
/// The Secret key holding the admin password.
pub const PASSWORD_KEY: &str = "password";
const DATA_MOUNT: &str = "/var/lib/postgresql";
/// Below the mount point (a fresh volume's root may hold `lost+found`); outside
/// `/var/lib/postgresql/data`, which PostgreSQL 18's image refuses as a mount.
const PGDATA: &str = "/var/lib/postgresql/pgdata";

/// The name of one color's StatefulSet and headless Service: `<database>-<color>`.
pub fn instance_name(db: &str, color: Color) -> String {
    format!("{db}-{color}")
}

/// The endpoint's Deployment and Service are named after the database: clients connect
/// to `<database>.<namespace>.svc`.
pub fn endpoint_name(db: &str) -> String {
    db.to_string()
}

pub fn endpoint_config_name(db: &str) -> String {
    format!("{db}-pgflip-endpoint")
}

/// The ConfigMap holding the engine's record for the database (its journal).
pub fn state_name(db: &str) -> String {
    format!("{db}-pgflip-state")
}

/// Labels of the endpoint pod.
pub fn endpoint_labels(db: &str) -> BTreeMap<String, String> {
    let mut l = labels(db, None);
    l.insert("app.kubernetes.io/name".into(), "pgbouncer".into());
    l.insert("app.kubernetes.io/component".into(), "endpoint".into());
    l
}

pub fn admin_secret_name(db: &str) -> String {
    format!("{db}-pgflip-admin")
}

/// Labels selecting one color's pod (and, without the color, everything of a database).
pub fn labels(db: &str, color: Option<Color>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "postgresql".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), db.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "pgflip".to_string(),
        ),
    ]);
    if let Some(c) = color {
        l.insert("pgflip.dev/color".to_string(), c.to_string());
    }
    l
}

fn meta(owner: &BlueGreenDatabase, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: owner.metadata.namespace.clone(),
        labels: Some(labels),
        ..Default::default()
    }
}

fn owner_reference(owner: &BlueGreenDatabase) -> Option<Vec<OwnerReference>> {
    owner.controller_owner_ref(&()).map(|r| vec![r])
}

/// The StatefulSet running one color at `member.major`. The server starts with
/// `wal_level = logical` and the other replication settings, so it can publish without
/// a restart; the pod is ready when it accepts connections.
pub fn statefulset(owner: &BlueGreenDatabase, desired: &Desired, member: &Member) -> StatefulSet {
    let name = instance_name(&desired.name, member.color);
    let selector = labels(&desired.name, Some(member.color));
    let mut pod_labels = selector.clone();
    pod_labels.insert(VERSION_LABEL.into(), member.major.to_string());
    let args: Vec<String> = SERVER_SETTINGS
        .iter()
        .flat_map(|(k, v)| ["-c".to_string(), format!("{k}={}", v.trim_matches('\''))])
        .collect();
    let env = vec![
        EnvVar {
            name: "POSTGRES_USER".into(),
            value: Some(ADMIN_USER.into()),
            ..Default::default()
        },
        EnvVar {
            name: "POSTGRES_PASSWORD".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: admin_secret_name(&desired.name),
                    key: PASSWORD_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        EnvVar {
            name: "PGDATA".into(),
            value: Some(PGDATA.into()),
            ..Default::default()
        },
    ];
    let container = Container {
        name: "postgres".into(),
        image: Some(desired.image(member.major)),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("postgres".into()),
            container_port: PORT,
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(
                    [
                        "pg_isready",
                        "-h",
                        "127.0.0.1",
                        "-U",
                        ADMIN_USER,
                        "-d",
                        "postgres",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: DATA_MOUNT.into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    StatefulSet {
        metadata: meta(owner, name.clone(), pod_labels.clone()),
        spec: Some(StatefulSetSpec {
            service_name: Some(name),
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    // PostgreSQL shuts down cleanly (fast mode) well within this.
                    termination_grace_period_seconds: Some(60),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_string(),
                            Quantity(desired.storage.clone()),
                        )])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The headless Service that names one color's pod: `<db>-<color>-0.<db>-<color>`.
pub fn headless_service(owner: &BlueGreenDatabase, desired: &Desired, color: Color) -> Service {
    let name = instance_name(&desired.name, color);
    let mut metadata = meta(owner, name, labels(&desired.name, Some(color)));
    metadata.owner_references = owner_reference(owner);
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels(&desired.name, Some(color))),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: PORT,
                ..Default::default()
            }]),
            // Replication connects before the pod is ready during a restart.
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The admin Secret, with a password generated by the caller. Created only if absent.
pub fn admin_secret(owner: &BlueGreenDatabase, desired: &Desired, password: &str) -> Secret {
    Secret {
        metadata: meta(
            owner,
            admin_secret_name(&desired.name),
            labels(&desired.name, None),
        ),
        string_data: Some(BTreeMap::from([
            ("username".to_string(), ADMIN_USER.to_string()),
            (PASSWORD_KEY.to_string(), password.to_string()),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The endpoint's stored configuration. A restarted endpoint pod reads it (through its
/// environment) and so points where the last switch left it.
pub fn endpoint_config(
    owner: &BlueGreenDatabase,
    desired: &Desired,
    config_json: String,
) -> ConfigMap {
    ConfigMap {
        metadata: meta(
            owner,
            endpoint_config_name(&desired.name),
            endpoint_labels(&desired.name),
        ),
        data: Some(BTreeMap::from([(
            ENDPOINT_CONFIG_KEY.to_string(),
            config_json,
        )])),
        ..Default::default()
    }
}

fn env_from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(source),
        ..Default::default()
    }
}

/// The endpoint: one PgBouncer pod run by `pgflip endpoint` (pgflip's image carries
/// PgBouncer), which renders PgBouncer's configuration and takes a new target from the
/// controller on its control port. One replica, replaced with `Recreate`: two PgBouncers
/// behind the Service during a switch could send clients to both colors.
pub fn endpoint_deployment(
    owner: &BlueGreenDatabase,
    desired: &Desired,
    image: &str,
) -> Deployment {
    let name = endpoint_name(&desired.name);
    let selector = endpoint_labels(&desired.name);
    let env = vec![
        env_from(
            "PGFLIP_ENDPOINT_CONFIG",
            EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: endpoint_config_name(&desired.name),
                    key: ENDPOINT_CONFIG_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            },
        ),
        env_from(
            "PGFLIP_ADMIN_PASSWORD",
            EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: admin_secret_name(&desired.name),
                    key: PASSWORD_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            },
        ),
        env_from(
            "POD_IP",
            EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    ];
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.into()),
        container_port: port,
        ..Default::default()
    };
    let container = Container {
        name: "pgbouncer".into(),
        image: Some(image.into()),
        command: Some(vec!["pgflip".into(), "endpoint".into()]),
        env: Some(env),
        ports: Some(vec![port("postgres", PORT), port("control", CONTROL_PORT)]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(PORT),
                ..Default::default()
            }),
            period_seconds: Some(2),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: meta(owner, name, selector.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(selector),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service clients connect to: `<database>:<spec.endpoint.port>`.
pub fn endpoint_service(owner: &BlueGreenDatabase, desired: &Desired) -> Service {
    let mut metadata = meta(
        owner,
        endpoint_name(&desired.name),
        endpoint_labels(&desired.name),
    );
    metadata.owner_references = owner_reference(owner);
    Service {
        metadata,
        spec: Some(ServiceSpec {
            selector: Some(endpoint_labels(&desired.name)),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: i32::from(desired.endpoint_port),
                target_port: Some(IntOrString::Int(PORT)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The engine's record, stored beside the object. Not owned by it: the record must
/// outlive a pruned object as long as the data it describes.
pub fn state_config_map(namespace: &str, db: &str, record_json: String) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(state_name(db)),
            namespace: Some(namespace.to_string()),
            labels: Some(labels(db, None)),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("record.json".to_string(), record_json)])),
        ..Default::default()
    }
}

pub mod physical_copy;

#[cfg(test)]
mod tests;
