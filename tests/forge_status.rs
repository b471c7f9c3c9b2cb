//! Commit statuses against a real HTTP server on loopback that checks each request.

mod common;

use common::forge::FakeForge;
use pgflip_core::report::{State, Update};
use pgflip_engine::adapters::forge_status::{ForgeConfig, ForgeStatus, Provider, Sinks};
use pgflip_engine::ports::StatusSink;
use serde_json::json;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn sha() -> pgflip_core::revision::Revision {
    pgflip_core::revision::Revision::commit(SHA).unwrap()
}
const TOKEN: &str = "ghp_s3cretT0ken";

fn sink(forge: &FakeForge, provider: Provider, api_path: &str) -> ForgeStatus {
    ForgeStatus::new(ForgeConfig {
        provider,
        api: format!("{}{api_path}", forge.url),
        repository: "shop/orders-db".into(),
        token: TOKEN.into(),
        context: "pgflip/orders".into(),
    })
    .unwrap()
}

fn update(state: State) -> Update {
    match state {
        State::Failure => Update::failure("preflight", "preflight refused: unlogged tables"),
        _ => Update::new(state, "initial-sync", "initial sync 40%").between(15, 16),
    }
}

#[tokio::test]
async fn github_gets_each_update_exactly() {
    let forge = FakeForge::start().await;
    let gh = sink(&forge, Provider::Github, "");
    for s in [State::Pending, State::Success, State::Failure] {
        gh.publish(&sha(), &update(s)).await.unwrap();
    }
    let reqs = forge.requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, format!("/repos/shop/orders-db/statuses/{SHA}"));
        assert_eq!(r.headers["authorization"], format!("Bearer {TOKEN}"));
        assert_eq!(r.headers["accept"], "application/vnd.github+json");
        assert_eq!(r.headers["x-github-api-version"], "2022-11-28");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(r.headers["user-agent"].starts_with("pgflip/"));
    }
    assert_eq!(
        reqs[0].body,
        json!({"state": "pending", "context": "pgflip/orders",
               "description": "pgflip: pending [initial-sync] 15 → 16: initial sync 40%"})
    );
    assert_eq!(reqs[1].body["state"], "success");
    assert_eq!(reqs[2].body["state"], "failure");
    assert_eq!(
        reqs[2].body["description"],
        "pgflip: failure [preflight]: preflight refused: unlogged tables"
    );
}

#[tokio::test]
async fn gitlab_and_gitea_get_each_update_exactly() {
    let forge = FakeForge::start().await;
    let gitlab = sink(&forge, Provider::Gitlab, "/api/v4");
    let gitea = sink(&forge, Provider::Gitea, "/api/v1");
    for s in [State::Pending, State::Success, State::Failure] {
        gitlab.publish(&sha(), &update(s)).await.unwrap();
        gitea.publish(&sha(), &update(s)).await.unwrap();
    }
    let reqs = forge.requests();
    assert_eq!(reqs.len(), 6);
    let pending = "pgflip: pending [initial-sync] 15 → 16: initial sync 40%";
    let success = "pgflip: success [initial-sync] 15 → 16: initial sync 40%";
    let failure = "pgflip: failure [preflight]: preflight refused: unlogged tables";
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(r.headers["user-agent"].starts_with("pgflip/"));
        assert!(!r.headers.contains_key("x-github-api-version"));
    }
    // GitLab: the project path as one URL segment, its own token header, `name` for the
    // context, and its own state words (its "pending" means queued: a switch under way
    // is "running").
    let gitlab_reqs: Vec<_> = reqs.iter().step_by(2).collect();
    for (r, (state, description)) in gitlab_reqs.iter().zip([
        ("running", pending),
        ("success", success),
        ("failed", failure),
    ]) {
        assert_eq!(
            r.path,
            format!("/api/v4/projects/shop%2Forders-db/statuses/{SHA}")
        );
        assert_eq!(r.headers["private-token"], TOKEN);
        assert!(!r.headers.contains_key("authorization"));
        assert_eq!(
            r.body,
            json!({"state": state, "name": "pgflip/orders", "description": description})
        );
    }
    // Gitea (and Forgejo): GitHub's shape under /api/v1, with a `token` authorization.
    let gitea_reqs: Vec<_> = reqs.iter().skip(1).step_by(2).collect();
    for (r, (state, description)) in gitea_reqs.iter().zip([
        ("pending", pending),
        ("success", success),
        ("failure", failure),
    ]) {
        assert_eq!(
            r.path,
            format!("/api/v1/repos/shop/orders-db/statuses/{SHA}")
        );
        assert_eq!(r.headers["authorization"], format!("token {TOKEN}"));
        assert_eq!(
            r.body,
            json!({"state": state, "context": "pgflip/orders", "description": description})
        );
    }
}

#[tokio::test]
async fn transient_errors_are_retried_refusals_are_not() {
    let forge = FakeForge::start().await;
    let gh = sink(&forge, Provider::Github, "");
    forge.answer_with(&[502, 429, 503]);
    gh.publish(&sha(), &update(State::Pending)).await.unwrap();
    assert_eq!(
        forge.requests().len(),
        4,
        "three transient failures, then success"
    );

    forge.answer_with(&[401]);
    let err = gh
        .publish(&sha(), &update(State::Success))
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("401"), "{text}");
    assert!(!text.contains(TOKEN), "the token leaked: {text}");
    assert_eq!(forge.requests().len(), 5, "a refusal is not retried");

    forge.answer_with(&[500, 500, 500, 500]);
    let err = gh
        .publish(&sha(), &update(State::Success))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("4 times"), "{err:#}");
    assert_eq!(forge.requests().len(), 9);
}

#[tokio::test]
async fn one_failing_sink_does_not_keep_the_update_from_the_other() {
    let forge = FakeForge::start().await;
    let unreachable = ForgeStatus::new(ForgeConfig {
        provider: Provider::Github,
        api: "http://127.0.0.1:9".into(),
        repository: "a/b".into(),
        token: TOKEN.into(),
        context: "c".into(),
    })
    .unwrap();
    let both = Sinks {
        first: unreachable,
        second: Some(sink(&forge, Provider::Github, "")),
    };
    assert!(both.publish(&sha(), &update(State::Success)).await.is_err());
    assert_eq!(forge.requests().len(), 1);
}
