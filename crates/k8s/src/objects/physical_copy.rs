//! Green's StatefulSet while it is made by a physical copy (Kubernetes mode): the server's
//! StatefulSet with init containers that run `physical_copy.sh` in two stages.
//!
//! 1. Backup: `base-backup` (green's image) streams blue's base backup into the volume,
//!    then `await-cut` holds the pod until the controller has made the logical slots on
//!    blue, whose start is the cut.
//! 2. Upgrade (the cut known): `old-binaries` (blue's image) copies blue's installation into
//!    an `emptyDir`, which `upgrade` (green's image) mounts at the same paths: the backup
//!    replayed to the cut with the old major's binaries, then `initdb` and
//!    `pg_upgrade --link` with both. The server container then starts on the result.
//!
//! Changing the stage changes the pod template; the StatefulSet's pods are managed in
//! `Parallel`, so the controller replaces a pod held in `await-cut` (never Ready) at once
//! instead of waiting for it to become Ready, and pgflip needs no right to delete pods.

use super::statefulset;
use crate::crd::BlueGreenDatabase;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, EmptyDirVolumeSource, EnvVar, Pod, Volume, VolumeMount,
};
use pgflip_core::plan::Member;
use pgflip_core::spec::Desired;
use pgflip_engine::replication::SERVER_SETTINGS;

/// The StatefulSet annotation saying it is (or was) made by a physical copy, and at which
/// stage ([`CopyStage`]).
pub const ANNOTATION: &str = "pgflip.dev/physical-copy";
/// The init containers, by the step of the script each runs.
const BACKUP_STEP: &str = "base-backup";
const AWAIT_STEP: &str = "await-cut";
const OLD_BINARIES_STEP: &str = "old-binaries";
const UPGRADE_STEP: &str = "upgrade";
const SCRIPT: &str = include_str!("physical_copy.sh");
const OLD_BINARIES_VOLUME: &str = "old-binaries";

/// Where green's copy comes from.
pub struct CopySource<'a> {
    /// Blue: its major and image.
    pub from: &'a Member,
    /// Blue's Service name, as green's pod resolves it.
    pub host: &'a str,
    pub port: u16,
    /// The physical slot holding blue's WAL for the copy.
    pub slot: &'a str,
}

/// Where a copy's StatefulSet is, as its annotation records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyStage {
    /// Taking the base backup, then waiting for the cut.
    AwaitingCut,
    /// Replaying to the cut and upgrading.
    Upgrading(String),
    /// The server runs on the upgraded copy: from here on it is green's server like any
    /// other (its init containers do nothing any more).
    Upgraded(String),
}

impl CopyStage {
    pub fn cut(&self) -> Option<&str> {
        match self {
            CopyStage::AwaitingCut => None,
            CopyStage::Upgrading(cut) | CopyStage::Upgraded(cut) => Some(cut),
        }
    }

    fn annotation(&self) -> String {
        match self {
            CopyStage::AwaitingCut => "awaiting-cut".into(),
            CopyStage::Upgrading(cut) => format!("upgrading {cut}"),
            CopyStage::Upgraded(cut) => format!("upgraded {cut}"),
        }
    }

    fn parse(annotation: &str) -> Option<CopyStage> {
        match annotation.split_once(' ') {
            None if annotation == "awaiting-cut" => Some(CopyStage::AwaitingCut),
            Some(("upgrading", cut)) => Some(CopyStage::Upgrading(cut.into())),
            Some(("upgraded", cut)) => Some(CopyStage::Upgraded(cut.into())),
            _ => None,
        }
    }
}

/// Green's StatefulSet at a stage of the copy. The pod template depends only on the cut:
/// recording "upgraded" does not replace the pod.
pub fn copy_statefulset(
    owner: &BlueGreenDatabase,
    desired: &Desired,
    to: &Member,
    source: &CopySource<'_>,
    stage: &CopyStage,
) -> StatefulSet {
    let cut = stage.cut();
    let mut sts = statefulset(owner, desired, to);
    sts.metadata
        .annotations
        .get_or_insert_default()
        .insert(ANNOTATION.into(), stage.annotation());
    let spec = sts.spec.as_mut().expect("statefulset() sets a spec");
    spec.pod_management_policy = Some("Parallel".into());
    let pod = spec
        .template
        .spec
        .as_mut()
        .expect("statefulset() sets a pod spec");
    let server = &pod.containers[0];
    let mut env = server.env.clone().unwrap_or_default();
    let settings: Vec<String> = SERVER_SETTINGS
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    for (name, value) in [
        ("PGFLIP_COPY_SCRIPT", SCRIPT.to_string()),
        ("PGFLIP_SOURCE_HOST", source.host.to_string()),
        ("PGFLIP_SOURCE_PORT", source.port.to_string()),
        ("PGFLIP_SLOT", source.slot.to_string()),
        ("PGFLIP_OLD_MAJOR", source.from.major.to_string()),
        ("PGFLIP_NEW_MAJOR", to.major.to_string()),
        ("PGFLIP_SERVER_SETTINGS", settings.join("\n")),
        ("PGFLIP_CUT", cut.unwrap_or_default().to_string()),
    ] {
        env.push(EnvVar {
            name: name.into(),
            value: Some(value),
            ..Default::default()
        });
    }
    let data = server.volume_mounts.clone().unwrap_or_default();
    let step = |name: &str, image: String, extra: Vec<VolumeMount>| Container {
        name: name.into(),
        image: Some(image),
        command: Some(
            [
                "sh",
                "-c",
                r#"exec sh -euc "$PGFLIP_COPY_SCRIPT" pgflip-copy "$0""#,
                name,
            ]
            .map(String::from)
            .to_vec(),
        ),
        env: Some(env.clone()),
        volume_mounts: Some([data.clone(), extra].concat()),
        // A failed step's last lines become its termination message, which pgflip reports.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let (old_image, new_image) = (desired.image(source.from.major), desired.image(to.major));
    pod.init_containers = Some(match cut {
        None => vec![
            step(BACKUP_STEP, new_image.clone(), vec![]),
            step(AWAIT_STEP, new_image, vec![]),
        ],
        Some(_) => {
            let old = source.from.major;
            let mount = |sub: &str, at: String| VolumeMount {
                name: OLD_BINARIES_VOLUME.into(),
                mount_path: at,
                sub_path: Some(sub.into()),
                ..Default::default()
            };
            vec![
                step(
                    OLD_BINARIES_STEP,
                    old_image,
                    vec![VolumeMount {
                        name: OLD_BINARIES_VOLUME.into(),
                        mount_path: "/old".into(),
                        ..Default::default()
                    }],
                ),
                step(
                    UPGRADE_STEP,
                    new_image,
                    vec![
                        mount("lib", format!("/usr/lib/postgresql/{old}")),
                        mount("share", format!("/usr/share/postgresql/{old}")),
                    ],
                ),
            ]
        }
    });
    if cut.is_some() {
        pod.volumes = Some(vec![Volume {
            name: OLD_BINARIES_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }]);
    }
    sts
}

/// The copy's stage as the StatefulSet's annotation says: None if it is not a copy.
pub fn stage(sts: &StatefulSet) -> Option<CopyStage> {
    CopyStage::parse(sts.metadata.annotations.as_ref()?.get(ANNOTATION)?)
}

/// Where a copy's pod is, as its init containers tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodStage {
    /// Still at an earlier stage's template (to be replaced), or not started yet.
    Pending,
    /// The base backup is taken; the pod waits for the cut.
    BackedUp,
    /// A step failed twice (once may be a passing fault): its name and last words.
    Failed { step: String, message: String },
    /// Anything else: a step running, or the server starting.
    Working,
}

/// Reads a copy pod's init containers: whether the stage `cut` (None: backing up) is
/// done, under way, or failed.
pub fn pod_stage(pod: &Pod, cut: Option<&str>) -> PodStage {
    let Some(spec) = &pod.spec else {
        return PodStage::Pending;
    };
    let names: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    let at_stage = match cut {
        None => names.contains(&AWAIT_STEP),
        Some(_) => names.contains(&UPGRADE_STEP),
    };
    if !at_stage || pod.metadata.deletion_timestamp.is_some() {
        return PodStage::Pending;
    }
    let statuses: &[ContainerStatus] = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default();
    for status in statuses {
        let failed = [status.state.as_ref(), status.last_state.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.terminated.as_ref())
            .find(|t| t.exit_code != 0);
        if let Some(t) = failed
            && status.restart_count >= 2
        {
            return PodStage::Failed {
                step: status.name.clone(),
                message: t
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("exit code {}", t.exit_code))
                    .trim()
                    .to_string(),
            };
        }
    }
    let backed_up = statuses.iter().any(|s| {
        s.name == BACKUP_STEP
            && s.state
                .as_ref()
                .and_then(|st| st.terminated.as_ref())
                .is_some_and(|t| t.exit_code == 0)
    });
    if cut.is_none() && backed_up {
        PodStage::BackedUp
    } else {
        PodStage::Working
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::tests::fixture;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, PodSpec, PodStatus,
    };
    use pgflip_core::plan::Color;
    use pgflip_core::spec::Major;

    fn member(color: Color, major: u32) -> Member {
        Member {
            color,
            major: Major(major),
        }
    }

    /// Green (17) copied from blue (15) at `stage`.
    fn copy_at(stage: CopyStage) -> StatefulSet {
        let blue = member(Color::Blue, 15);
        let source = CopySource {
            from: &blue,
            host: "orders-blue.shop.svc",
            port: 5432,
            slot: "pgflip_base_green",
        };
        let (owner, desired) = fixture();
        copy_statefulset(&owner, &desired, &member(Color::Green, 17), &source, &stage)
    }

    fn copy(cut: Option<&str>) -> StatefulSet {
        copy_at(match cut {
            None => CopyStage::AwaitingCut,
            Some(cut) => CopyStage::Upgrading(cut.into()),
        })
    }

    fn init_names(sts: &StatefulSet) -> Vec<String> {
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        pod.init_containers
            .iter()
            .flatten()
            .map(|c| format!("{}@{}", c.name, c.image.as_deref().unwrap()))
            .collect()
    }

    #[test]
    fn the_backup_stage_streams_with_green_s_image_and_waits_for_the_cut() {
        let sts = copy(None);
        assert_eq!(stage(&sts), Some(CopyStage::AwaitingCut));
        assert_eq!(
            init_names(&sts),
            [
                "base-backup@registry.example/postgres:17-alpine",
                "await-cut@registry.example/postgres:17-alpine"
            ]
        );
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        let init = &spec
            .template
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .unwrap()[0];
        let env = |name: &str| {
            init.env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .map(|e| e.value.clone())
        };
        assert_eq!(
            env("PGFLIP_SOURCE_HOST"),
            Some(Some("orders-blue.shop.svc".into()))
        );
        assert_eq!(env("PGFLIP_OLD_MAJOR"), Some(Some("15".into())));
        assert_eq!(env("PGFLIP_CUT"), Some(Some(String::new())));
        assert!(
            env("POSTGRES_PASSWORD").is_some_and(|v| v.is_none()),
            "the password comes from the Secret, never as a value"
        );
        assert!(
            env("PGFLIP_SERVER_SETTINGS")
                .flatten()
                .is_some_and(|s| s.contains("max_connections = 200")),
            "the replay runs with blue's settings"
        );
    }

    #[test]
    fn the_upgrade_stage_mounts_blue_s_binaries_where_blue_s_image_has_them() {
        let sts = copy(Some("0/3000060"));
        assert_eq!(stage(&sts), Some(CopyStage::Upgrading("0/3000060".into())));
        assert_eq!(
            init_names(&sts),
            [
                "old-binaries@registry.example/postgres:15-alpine",
                "upgrade@registry.example/postgres:17-alpine"
            ]
        );
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let upgrade = &pod.init_containers.as_ref().unwrap()[1];
        let mounts: Vec<_> = upgrade
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.as_str(), m.sub_path.as_deref()))
            .collect();
        assert!(mounts.contains(&("/usr/lib/postgresql/15", Some("lib"))));
        assert!(mounts.contains(&("/usr/share/postgresql/15", Some("share"))));
        assert!(
            mounts.contains(&("/var/lib/postgresql", None)),
            "the data volume"
        );
        assert_eq!(pod.volumes.as_ref().unwrap()[0].name, OLD_BINARIES_VOLUME);
        assert_eq!(
            pod.containers[0].name, "postgres",
            "the server runs after them"
        );
    }

    #[test]
    fn recording_the_upgrade_done_keeps_the_pod() {
        let upgrading = copy_at(CopyStage::Upgrading("0/1".into()));
        let upgraded = copy_at(CopyStage::Upgraded("0/1".into()));
        assert_eq!(stage(&upgraded), Some(CopyStage::Upgraded("0/1".into())));
        assert_eq!(
            upgrading.spec.as_ref().unwrap().template,
            upgraded.spec.as_ref().unwrap().template
        );
        assert_eq!(CopyStage::parse("upgraded"), None);
        assert_eq!(CopyStage::parse("later 0/1"), None);
    }

    fn pod(sts: &StatefulSet, statuses: Vec<ContainerStatus>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                init_containers: sts
                    .spec
                    .as_ref()
                    .unwrap()
                    .template
                    .spec
                    .as_ref()
                    .unwrap()
                    .init_containers
                    .clone(),
                ..Default::default()
            }),
            status: Some(PodStatus {
                init_container_statuses: Some(statuses),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn status(
        name: &str,
        exit: Option<i32>,
        last_exit: Option<i32>,
        restarts: i32,
    ) -> ContainerStatus {
        let terminated = |code: i32| ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                message: Some("physical copy (upgrade): pg_upgrade --link failed\n".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        ContainerStatus {
            name: name.into(),
            state: exit.map(terminated),
            last_state: last_exit.map(terminated),
            restart_count: restarts,
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_tells_its_stage_and_a_step_failing_twice() {
        let backing_up = copy(None);
        assert_eq!(
            pod_stage(
                &pod(&backing_up, vec![status("base-backup", None, None, 0)]),
                None
            ),
            PodStage::Working
        );
        assert_eq!(
            pod_stage(
                &pod(&backing_up, vec![status("base-backup", Some(0), None, 0)]),
                None
            ),
            PodStage::BackedUp
        );
        // The pod of the backup stage, once the cut is known: to be replaced.
        assert_eq!(
            pod_stage(
                &pod(&backing_up, vec![status("base-backup", Some(0), None, 0)]),
                Some("0/1")
            ),
            PodStage::Pending
        );
        let upgrading = copy(Some("0/1"));
        assert_eq!(
            pod_stage(
                &pod(&upgrading, vec![status("upgrade", None, Some(1), 1)]),
                Some("0/1")
            ),
            PodStage::Working,
            "one failure may be a passing fault"
        );
        assert_eq!(
            pod_stage(
                &pod(&upgrading, vec![status("upgrade", None, Some(1), 2)]),
                Some("0/1")
            ),
            PodStage::Failed {
                step: "upgrade".into(),
                message: "physical copy (upgrade): pg_upgrade --link failed".into()
            }
        );
    }
}
