//! The checked-in Kubernetes manifests against the code they come from.

use std::path::Path;

/// `manifests/crd.yaml` is what `pgflip crd` prints: regenerate it with
/// `cargo run -- crd > manifests/crd.yaml` after changing the document's types.
#[test]
fn crd_yaml_matches_the_rust_type() {
    let checked_in = std::fs::read_to_string("manifests/crd.yaml").unwrap();
    assert!(
        checked_in == pgflip_k8s::crd::crd_yaml(),
        "manifests/crd.yaml drifted from crates/k8s/src/crd.rs: run `cargo run -- crd > manifests/crd.yaml`"
    );
}

/// Every resource the kustomization lists exists and is YAML of a Kubernetes object
/// (read with serde_yaml, as pgflip reads kustomizations), and the CRD is among them.
#[test]
fn kustomization_lists_existing_objects() {
    let root = Path::new("manifests");
    let k: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("kustomization.yaml")).unwrap())
            .unwrap();
    let resources: Vec<&str> = k["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(resources.contains(&"crd.yaml"));
    let mut kinds = Vec::new();
    for r in resources {
        let text = std::fs::read_to_string(root.join(r)).unwrap_or_else(|e| panic!("{r}: {e}"));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            assert!(v["apiVersion"].is_string(), "{r}: no apiVersion");
            kinds.push(v["kind"].as_str().unwrap().to_string());
        }
    }
    assert!(
        kinds.contains(&"CustomResourceDefinition".to_string()),
        "{kinds:?}"
    );
}
