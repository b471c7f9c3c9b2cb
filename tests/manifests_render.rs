//! `kubectl kustomize manifests` renders the installation base cleanly, and its RBAC is
//! exactly what the controller uses: a new verb or resource must be added here on purpose.
//! (tests/k8s_controller.rs runs the controller under these very rules.)

use std::collections::BTreeSet;
use std::process::Command;

fn rendered() -> Vec<serde_yaml::Value> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests");
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .expect("kubectl is needed (Debian package kubectl; `make setup` installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn triples(rules: &serde_yaml::Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_sequence().unwrap() {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        for g in list("apiGroups") {
            for r in list("resources") {
                for v in list("verbs") {
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

fn expect(spec: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    spec.iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn the_base_renders_with_least_privilege_rbac_and_a_locked_down_controller() {
    let docs = rendered();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
    ] {
        assert_eq!(of_kind(&docs, kind).len(), 1, "one {kind}");
    }

    let cluster_role = of_kind(&docs, "ClusterRole")[0];
    assert_eq!(
        triples(&cluster_role["rules"]),
        expect(&[
            (
                "pgflip.dev",
                "bluegreendatabases",
                &["get", "list", "watch", "patch"]
            ),
            ("pgflip.dev", "bluegreendatabases/status", &["patch"]),
            (
                "apps",
                "statefulsets",
                &["get", "list", "watch", "create", "patch", "delete"]
            ),
            ("apps", "deployments", &["create", "patch"]),
            (
                "",
                "services",
                &["list", "watch", "create", "patch", "delete"]
            ),
            ("", "configmaps", &["get", "create", "patch"]),
            ("", "secrets", &["get", "create"]),
            ("", "pods", &["get", "list"]),
            ("", "persistentvolumeclaims", &["get", "delete"]),
            ("events.k8s.io", "events", &["create", "patch"]),
            ("kustomize.toolkit.fluxcd.io", "kustomizations", &["get"]),
            ("source.toolkit.fluxcd.io", "gitrepositories", &["get"]),
        ])
    );
    let role = of_kind(&docs, "Role")[0];
    assert_eq!(role["metadata"]["namespace"], "pgflip-system");
    assert_eq!(
        triples(&role["rules"]),
        expect(&[(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"]
        )])
    );
    for rule in cluster_role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(role["rules"].as_sequence().unwrap())
    {
        let text = serde_yaml::to_string(rule).unwrap();
        assert!(!text.contains('*'), "no wildcard: {text}");
    }

    let deployment = of_kind(&docs, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let account = pod["serviceAccountName"].as_str().unwrap();
    assert_eq!(
        of_kind(&docs, "ServiceAccount")[0]["metadata"]["name"],
        account
    );
    for binding in ["ClusterRoleBinding", "RoleBinding"] {
        let subject = &of_kind(&docs, binding)[0]["subjects"][0];
        assert_eq!(subject["kind"], "ServiceAccount");
        assert_eq!(subject["name"], account, "{binding}");
        assert_eq!(subject["namespace"], "pgflip-system", "{binding}");
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "controller");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert!(
        deployment["spec"]["replicas"].as_u64().unwrap() >= 2,
        "a standby for the lease"
    );
}
