use super::*;

const GOOD: &str = "apiVersion: pgflip.dev/v1alpha1\nkind: BlueGreenDatabase\nmetadata:\n  name: orders\nspec:\n  version: \"16\"\n";

#[test]
fn defaults_fill_everything_but_version() {
    let d = parse(GOOD).unwrap();
    assert_eq!(d.major, Major(16));
    assert_eq!(d.databases, vec!["app"]);
    assert_eq!(d.endpoint_port, 6432);
    assert_eq!(d.retain_previous, Duration::from_secs(3600));
    assert_eq!(d.switchover.pause_timeout, Duration::from_secs(2));
    assert_eq!(d.unsupported, UnsupportedPolicy::Refuse);
    assert_eq!(d.verification, Verification::Full);
    assert_eq!(d.image(d.major), "postgres:16");
    assert_eq!(d.storage, "1Gi");
    assert_eq!(d.copy, CopyPreference::Auto);
}

#[test]
fn the_copy_method_is_read_and_checked() {
    for (text, want) in [
        ("logical", CopyPreference::Logical),
        ("physical", CopyPreference::Physical),
        ("auto", CopyPreference::Auto),
    ] {
        let d = parse(&format!("{GOOD}  copy: {text}\n")).unwrap();
        assert_eq!(d.copy, want);
    }
    let err = parse(&format!("{GOOD}  copy: fastest\n")).unwrap_err();
    assert!(err.to_string().contains("fastest"), "{err}");
}

#[test]
fn full_document_parses() {
    let text = render(
        "orders",
        Major(17),
        "databases: [shop, billing]\nendpoint:\n  port: 7000\nswitchover:\n  maxLagBytes: 4096\n  pauseTimeout: 500ms\n  catchUpTimeout: 2m\nverification: count\nretainPrevious: 30m\nunsupported: warn\nimage: registry.example/pg:{version}-alpine",
    );
    let d = parse(&text).unwrap();
    assert_eq!(d.major, Major(17));
    assert_eq!(d.databases, vec!["shop", "billing"]);
    assert_eq!(d.endpoint_port, 7000);
    assert_eq!(d.switchover.max_lag_bytes, 4096);
    assert_eq!(d.switchover.pause_timeout, Duration::from_millis(500));
    assert_eq!(d.verification, Verification::Count);
    assert_eq!(d.retain_previous, Duration::from_secs(1800));
    assert_eq!(d.unsupported, UnsupportedPolicy::Warn);
    assert_eq!(d.image(Major(15)), "registry.example/pg:15-alpine");
}

#[test]
fn numeric_and_minor_versions_are_accepted() {
    assert_eq!(
        parse(&GOOD.replace("\"16\"", "15")).unwrap().major,
        Major(15)
    );
    assert_eq!(
        parse(&GOOD.replace("\"16\"", "\"17.2\"")).unwrap().major,
        Major(17)
    );
}

#[test]
fn bad_documents_are_rejected_with_a_reason() {
    let cases: &[(&str, &str)] = &[
        ("spec: [unclosed", "not valid YAML"),
        (
            &GOOD.replace("kind: BlueGreenDatabase", "kind: Deployment"),
            "kind",
        ),
        (
            &GOOD.replace("pgflip.dev/v1alpha1", "pgflip.dev/v9"),
            "apiVersion",
        ),
        (
            &GOOD.replace("  version: \"16\"\n", "  version: \"16\"\n  colour: blue\n"),
            "unknown field `colour`",
        ),
        (
            &GOOD.replace("  version: \"16\"\n", "  databases: [app]\n"),
            "version",
        ),
        (
            &GOOD.replace("\"16\"", "\"sixteen\""),
            "not a PostgreSQL major",
        ),
        (&GOOD.replace("\"16\"", "\"9\""), "not supported"),
        (&GOOD.replace("\"16\"", "\"14\""), "not supported"),
        (&GOOD.replace("\"16\"", "~"), "missing"),
        (
            &GOOD.replace("name: orders", "name: Orders_DB"),
            "DNS label",
        ),
        (&format!("{GOOD}  databases: []\n"), "at least one"),
        (&format!("{GOOD}  databases: [postgres]\n"), "reserved"),
        (&format!("{GOOD}  databases: [a, a]\n"), "twice"),
        (&format!("{GOOD}  retainPrevious: soon\n"), "retainPrevious"),
        (&format!("{GOOD}  unsupported: ignore\n"), "unknown variant"),
        (&format!("{GOOD}  image: postgres:16\n"), "{version}"),
        (&format!("{GOOD}  storage: lots\n"), "spec.storage"),
        (&format!("{GOOD}  storage: 10GB\n"), "spec.storage"),
    ];
    for (text, needle) in cases {
        let err = parse(text).expect_err(text).to_string();
        assert!(
            err.contains(needle),
            "{text:?}: error {err:?} should mention {needle:?}"
        );
    }
}

#[test]
fn names_are_peeked_from_invalid_documents() {
    assert_eq!(
        peek_name(&GOOD.replace("\"16\"", "\"9\"")).as_deref(),
        Some("orders")
    );
    assert_eq!(peek_name("spec: [unclosed"), None);
}

#[test]
fn major_parse() {
    assert_eq!(Major::parse("160004").unwrap(), Major(16));
    assert!(Major::parse("").is_err());
}

#[test]
fn adopted_servers_parse_with_defaults_and_bad_ones_are_named() {
    let d = parse(&render(
        "orders",
        Major(17),
        "adopt:\n  - host: 10.0.0.5\n    passwordFile: /etc/pgflip/db-a\n  - host: orders-17-rw.shop.svc\n    port: 6543\n    user: admin\n    secretRef: {name: orders-17-superuser}\nswitchover:\n  directClients: end",
    ))
    .unwrap();
    assert_eq!(d.adopt.len(), 2);
    assert_eq!(d.adopt[0].port, 5432);
    assert_eq!(d.adopt[0].user, "postgres");
    assert_eq!(d.adopt[0].to_string(), "10.0.0.5:5432");
    assert_eq!(d.adopt[1].secret_ref.as_ref().unwrap().key, "password");
    assert_eq!(d.switchover.direct_clients, DirectClients::End);
    assert_eq!(
        parse(GOOD).unwrap().switchover.direct_clients,
        DirectClients::Wait
    );
    for (extra, says) in [
        (
            "adopt:\n  - host: a\n    passwordFile: f\n    passwordEnv: E",
            "at most one of",
        ),
        ("adopt:\n  - host: a\n  - host: A", "listed twice"),
        ("adopt:\n  - host: \"a b\"", "not a host"),
        ("adopt:\n  - host: a\n    port: 0", "port"),
        (
            "adopt:\n  - host: a\n    password: hunter2",
            "unknown field",
        ),
        (
            "adopt:\n  - host: a\n    secretRef: {name: Bad_Name}",
            "secretRef",
        ),
    ] {
        let e = parse(&render("orders", Major(17), extra))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{extra}: {e}");
    }
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn hostile_name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z'\"\\\\ \n\r{}:;#=\\-_.é€😀\t\u{0}]{0,70}",
            "[a-z0-9-]{1,70}",
            "[a-zA-Z0-9_.-]{1,70}",
            ".{0,80}",
        ]
    }

    /// A document with `name` and `db` written as JSON strings (valid YAML flow scalars,
    /// whatever they hold).
    fn document(name: &str, db: &str) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap();
        format!(
            "apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata:\n  name: {}\nspec:\n  version: \"16\"\n  databases: [{}]\n",
            q(name),
            q(db)
        )
    }

    proptest! {
        /// Any text: an error or a document, never a panic.
        #[test]
        fn any_text_parses_or_says_why(text in ".{0,400}") {
            if let Err(e) = parse(&text) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// What is accepted is exactly what went in, and only what every later stage can
        /// carry (PgBouncer's configuration, SQL, libpq); the rest is refused naming the
        /// field (or, for what YAML itself cannot hold, saying so).
        #[test]
        fn hostile_names_are_taken_exactly_or_refused_clearly(
            name in hostile_name(),
            db in hostile_name(),
        ) {
            match parse(&document(&name, &db)) {
                Ok(d) => {
                    prop_assert_eq!(&d.name, &name);
                    prop_assert_eq!(d.databases, vec![db.clone()]);
                    prop_assert!(!db.is_empty() && db.len() <= 63);
                    prop_assert!(is_endpoint_name(&db), "{:?}", db);
                    prop_assert!(name.len() <= 63 && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
                }
                Err(e) => {
                    let e = e.to_string();
                    prop_assert!(
                        ["metadata.name", "spec.databases", "not valid YAML"].iter().any(|w| e.contains(w)),
                        "{}", e
                    );
                }
            }
        }
    }
}
