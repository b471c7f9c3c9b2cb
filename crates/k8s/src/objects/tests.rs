use super::*;
use pgflip_core::spec::Major;

const FIXTURE: &str = r#"
apiVersion: pgflip.dev/v1alpha1
kind: BlueGreenDatabase
metadata:
  name: orders
  namespace: shop
  uid: 7d6c0a6e-3f0e-4c55-9a57-0c8a3f1f2b11
spec:
  version: "16"
  image: "registry.example/postgres:{version}-alpine"
  storage: 20Gi
"#;

pub(in crate::objects) fn fixture() -> (BlueGreenDatabase, Desired) {
    let obj: BlueGreenDatabase = serde_yaml::from_str(FIXTURE).unwrap();
    let d = obj.desired().unwrap();
    (obj, d)
}

#[test]
fn statefulset_runs_the_member_major_with_logical_replication() {
    let (obj, d) = fixture();
    // Blue still runs 15 while the spec asks for 16.
    let member = Member {
        color: Color::Blue,
        major: Major(15),
    };
    let sts = statefulset(&obj, &d, &member);
    assert_eq!(sts.metadata.name.as_deref(), Some("orders-blue"));
    assert_eq!(sts.metadata.namespace.as_deref(), Some("shop"));
    assert!(
        sts.metadata.owner_references.is_none(),
        "data outlives the object"
    );
    let spec = sts.spec.unwrap();
    assert_eq!(spec.service_name.as_deref(), Some("orders-blue"));
    assert_eq!(spec.replicas, Some(1));
    let selector = spec.selector.match_labels.unwrap();
    assert_eq!(selector["pgflip.dev/color"], "blue");
    let pod = spec.template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example/postgres:15-alpine")
    );
    let args = c.args.as_ref().unwrap().join(" ");
    assert!(args.contains("-c wal_level=logical"), "{args}");
    assert!(
        args.contains("-c password_encryption=scram-sha-256"),
        "{args}"
    );
    let env = c.env.as_ref().unwrap();
    let password = env.iter().find(|e| e.name == "POSTGRES_PASSWORD").unwrap();
    assert!(
        password.value.is_none(),
        "the password comes from the Secret only"
    );
    assert_eq!(
        password
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "orders-pgflip-admin"
    );
    let claim = &spec.volume_claim_templates.unwrap()[0];
    let size = &claim
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["storage"];
    assert_eq!(size.0, "20Gi");
    let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(pod_labels["pgflip.dev/version"], "15");
    for (k, v) in &selector {
        assert_eq!(pod_labels.get(k), Some(v), "the selector matches the pod");
    }
}

#[test]
fn service_is_headless_and_owned_secret_is_not() {
    let (obj, d) = fixture();
    let svc = headless_service(&obj, &d, Color::Green);
    assert_eq!(svc.metadata.name.as_deref(), Some("orders-green"));
    let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("BlueGreenDatabase", "orders")
    );
    assert_eq!(owner.controller, Some(true));
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.selector.unwrap()["pgflip.dev/color"], "green");

    let secret = admin_secret(&obj, &d, "s3cret");
    assert_eq!(secret.metadata.name.as_deref(), Some("orders-pgflip-admin"));
    assert!(secret.metadata.owner_references.is_none());
    assert_eq!(secret.string_data.unwrap()[PASSWORD_KEY], "s3cret");
}

#[test]
fn endpoint_is_one_pgbouncer_replaced_not_rolled() {
    let (obj, d) = fixture();
    let deployment = endpoint_deployment(&obj, &d, "registry.example/pgflip:1");
    assert_eq!(deployment.metadata.name.as_deref(), Some("orders"));
    assert!(deployment.metadata.owner_references.is_none());
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.unwrap().type_.as_deref(),
        Some("Recreate"),
        "two PgBouncers must never serve at once"
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = &pod.containers[0];
    assert_eq!(c.command.as_deref().unwrap(), ["pgflip", "endpoint"]);
    let env = c.env.as_ref().unwrap();
    let source = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.clone())
            .unwrap()
    };
    assert_eq!(
        source("PGFLIP_ENDPOINT_CONFIG")
            .config_map_key_ref
            .unwrap()
            .name,
        "orders-pgflip-endpoint"
    );
    assert_eq!(
        source("PGFLIP_ADMIN_PASSWORD").secret_key_ref.unwrap().name,
        "orders-pgflip-admin"
    );
    assert_eq!(
        source("POD_IP").field_ref.unwrap().field_path,
        "status.podIP"
    );
    assert!(env.iter().all(|e| e.value.is_none()), "no literal values");
    let selector = spec.selector.match_labels.unwrap();
    assert_eq!(selector["app.kubernetes.io/component"], "endpoint");
    assert_eq!(spec.template.metadata.unwrap().labels.unwrap(), selector);

    let service = endpoint_service(&obj, &d);
    assert_eq!(service.metadata.name.as_deref(), Some("orders"));
    let port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(port.port, i32::from(d.endpoint_port));
    assert_eq!(port.target_port, Some(IntOrString::Int(PORT)));
    assert_eq!(
        service.spec.unwrap().selector.unwrap()["app.kubernetes.io/component"],
        "endpoint"
    );
}

#[test]
fn the_record_outlives_the_object() {
    let cm = state_config_map("shop", "orders", "{}".into());
    assert_eq!(cm.metadata.name.as_deref(), Some("orders-pgflip-state"));
    assert!(cm.metadata.owner_references.is_none());
    assert_eq!(cm.data.unwrap()["record.json"], "{}");
}
