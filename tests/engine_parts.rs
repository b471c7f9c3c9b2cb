//! The engine's parts against real servers of different majors: preflight, schema and
//! role copy (up and down), fingerprints, sequences and the content checksum.
//!
//! Each test starts its own blue and green under a temporary state directory (free
//! ports, so tests run in parallel with anything else) and stops them on the way out,
//! pass or fail.

mod common;

use common::TempState;
use futures_util::{SinkExt, StreamExt};
use pgflip_core::plan::{Color, Member};
use pgflip_core::spec::{self, Major, UnsupportedPolicy, Verification};
use pgflip_engine::adapters::local_instances::LocalInstances;
use pgflip_engine::pg::{self, ident, qualified};
use pgflip_engine::ports::Instances;
use pgflip_engine::ports::{Addr, Credentials};
use pgflip_engine::schema::{self, SchemaLoad};
use pgflip_engine::toolchain::Toolchain;
use pgflip_engine::{preflight, sequences, verify};
use tokio_postgres::Client;

const COVERAGE: &str = include_str!("fixtures/coverage.sql");

struct Pair {
    _guard: TempState,
    blue: Addr,
    green: Addr,
    blue_major: Major,
    green_major: Major,
    creds: Credentials,
    toolchain: Toolchain,
}

impl Pair {
    async fn start(blue_major: u32, green_major: u32) -> Pair {
        let guard = TempState::new();
        let state = guard.state.clone();
        let creds = state.admin_credentials().unwrap();
        let toolchain = Toolchain::discover().await;
        let instances = LocalInstances::new(state, toolchain.clone(), creds.clone()).unwrap();
        let desired = spec::parse(&spec::render("pair", Major(blue_major), "")).unwrap();
        let blue = instances
            .ensure(
                &Member {
                    color: Color::Blue,
                    major: Major(blue_major),
                },
                &desired,
            )
            .await
            .unwrap();
        let green = instances
            .ensure(
                &Member {
                    color: Color::Green,
                    major: Major(green_major),
                },
                &desired,
            )
            .await
            .unwrap();
        Pair {
            _guard: guard,
            blue,
            green,
            blue_major: Major(blue_major),
            green_major: Major(green_major),
            creds,
            toolchain,
        }
    }

    async fn green(&self, db: &str) -> Client {
        pg::connect(&self.green, &self.creds, db).await.unwrap()
    }

    async fn create_db(&self, addr: &Addr, db: &str) -> Client {
        let admin = pg::connect(addr, &self.creds, "postgres").await.unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {}", ident(db)))
            .await
            .unwrap();
        pg::connect(addr, &self.creds, db).await.unwrap()
    }

    /// Blue database `db` with the coverage fixture loaded.
    async fn blue_with_fixture(&self, db: &str) -> Client {
        let blue = self.create_db(&self.blue, db).await;
        blue.batch_execute(COVERAGE).await.unwrap();
        blue
    }

    /// Roles, then the schema of `db`: dump on blue, prepare for green's major, load.
    async fn copy_roles_and_schema(&self, db: &str, blue: &Client) -> anyhow::Result<Client> {
        let roles =
            schema::dump_roles(&self.toolchain, &self.blue, &self.creds, self.blue_major).await?;
        let green_postgres = self.green("postgres").await;
        schema::load_roles(
            &green_postgres,
            &schema::prepare_for_target(&roles, self.green_major),
        )
        .await?;
        let fingerprint = schema::fingerprint(blue).await?;
        let dump = schema::dump_schema(
            &self.toolchain,
            &self.blue,
            &self.creds,
            db,
            self.blue_major,
        )
        .await?;
        let green = self.create_db(&self.green, db).await;
        let outcome = schema::load_once(
            &green,
            &schema::prepare_for_target(&dump, self.green_major),
            &fingerprint,
        )
        .await?;
        assert_eq!(outcome, SchemaLoad::Loaded);
        Ok(green)
    }
}

/// Copies every table's rows from blue to green with COPY, the way the apply worker
/// writes: as `replica`, so green's triggers (the audit trigger) do not fire again.
async fn copy_data(blue: &Client, green: &Client) {
    green
        .batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    for (schema, table) in verify::list_tables(blue).await.unwrap() {
        let columns: Vec<String> = blue
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 \
                 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&qualified(&schema, &table)],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| ident(r.get::<_, &str>(0)))
            .collect();
        let cols = columns.join(", ");
        let name = qualified(&schema, &table);
        let out = blue
            .copy_out(&format!("COPY (SELECT {cols} FROM {name}) TO STDOUT"))
            .await
            .unwrap();
        let mut out = std::pin::pin!(out);
        let sink = green
            .copy_in(&format!("COPY {name} ({cols}) FROM STDIN"))
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        while let Some(chunk) = out.next().await {
            sink.send(chunk.unwrap()).await.unwrap();
        }
        sink.finish().await.unwrap();
    }
    green
        .batch_execute("RESET session_replication_role")
        .await
        .unwrap();
}

/// Compares every table at a REPEATABLE READ snapshot on both sides.
async fn compare_all(blue: &Client, green: &Client) -> verify::Report {
    for c in [blue, green] {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await
            .unwrap();
    }
    let tables = verify::list_tables(blue).await.unwrap();
    let report = verify::compare(blue, green, &tables, Verification::Full, &mut |_| {})
        .await
        .unwrap();
    for c in [blue, green] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    report
}

async fn user_object_count(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Customer ids in the order a sequential scan returns them: the physical order.
async fn stored_order(client: &Client) -> Vec<i32> {
    let rows = client
        .query("SELECT id FROM ONLY shop.customers", &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn names(list: &[(String, String)]) -> Vec<String> {
    list.iter().map(|(s, n)| format!("{s}.{n}")).collect()
}

/// The whole copy across majors, then checks that green matches blue: schema (portable
/// fingerprint), rows (checksums of every table, so the text form of every value is the
/// same on both majors), logins with blue's passwords.
async fn copy_across_majors(blue_major: u32, green_major: u32) {
    let pair = Pair::start(blue_major, green_major).await;
    let blue = pair.blue_with_fixture("app").await;
    let findings = preflight::check(
        &blue,
        "app",
        pair.green_major,
        UnsupportedPolicy::Refuse,
        &pair.toolchain,
    )
    .await
    .unwrap();
    assert!(findings.refusals.is_empty(), "{:?}", findings.refusals);
    preflight::ensure_replica_identity_full(&blue, &findings.needs_replica_identity_full)
        .await
        .unwrap();

    let green = pair
        .copy_roles_and_schema("app", &blue)
        .await
        .unwrap_or_else(|e| panic!("copying the schema from {blue_major} to {green_major}: {e:#}"));
    let (b, g) = (
        schema::describe(&blue).await.unwrap(),
        schema::describe(&green).await.unwrap(),
    );
    assert_eq!(
        b.portable_fingerprint(),
        g.portable_fingerprint(),
        "{blue_major} → {green_major}: {:#?}",
        b.differences(&g, true)
    );
    // Whatever differs otherwise is deparsed query text (see schema::fingerprint).
    for line in b.differences(&g, false) {
        assert!(
            line[2..].starts_with("view ") || line[2..].starts_with("function body "),
            "{line}"
        );
    }

    copy_data(&blue, &green).await;
    let report = compare_all(&blue, &green).await;
    assert!(
        report.mismatches.is_empty(),
        "{blue_major} → {green_major}: {:?}",
        report.mismatches
    );
    assert_eq!(report.tables, 6, "{report:?}");

    let app = Credentials {
        user: "shop_app".into(),
        password: "shop-app-secret".into(),
    };
    let login = pg::connect(&pair.green, &app, "app")
        .await
        .expect("blue's password works on green");
    let n: i64 = login
        .query_one("SELECT count(*) FROM shop.customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "shop_app reads through its group role's grant");
}

#[tokio::test]
async fn upgrade_15_to_16_copies_schema_roles_sequences_and_data() {
    let pair = Pair::start(15, 16).await;
    let blue = pair.blue_with_fixture("app").await;

    // Preflight passes; the insert-only table without a key gets REPLICA IDENTITY FULL.
    let findings = preflight::check(
        &blue,
        "app",
        Major(16),
        UnsupportedPolicy::Refuse,
        &pair.toolchain,
    )
    .await
    .unwrap();
    assert!(findings.refusals.is_empty(), "{:?}", findings.refusals);
    assert_eq!(
        names(&findings.needs_replica_identity_full),
        ["shop.page_views"]
    );
    assert!(
        findings
            .warnings
            .iter()
            .any(|w| w.contains("shop.page_views")),
        "{:?}",
        findings.warnings
    );
    assert_eq!(names(&findings.materialized_views), ["shop.daily_revenue"]);
    let tables = names(&findings.tables);
    assert!(
        tables.contains(&"shop.events".to_string())
            && !tables.iter().any(|t| t.contains("events_2024"))
    );
    assert_eq!(tables.len(), 6, "{tables:?}");
    for _ in 0..2 {
        preflight::ensure_replica_identity_full(&blue, &findings.needs_replica_identity_full)
            .await
            .unwrap();
    }
    let ident: String = blue
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'shop.page_views'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ident, "f");

    // The fingerprint is stable while nothing changes.
    let fingerprint = schema::fingerprint(&blue).await.unwrap();
    assert_eq!(schema::fingerprint(&blue).await.unwrap(), fingerprint);

    // Roles load, and load again (a retried copy); blue's password works on green.
    let roles = schema::dump_roles(&pair.toolchain, &pair.blue, &pair.creds, Major(15))
        .await
        .unwrap();
    assert!(!roles.is_empty());
    let green_postgres = pair.green("postgres").await;
    let roles = schema::prepare_for_target(&roles, Major(16));
    schema::load_roles(&green_postgres, &roles).await.unwrap();
    schema::load_roles(&green_postgres, &roles).await.unwrap();
    let app = Credentials {
        user: "shop_app".into(),
        password: "shop-app-secret".into(),
    };
    pg::connect(&pair.green, &app, "postgres")
        .await
        .expect("blue's password works on green");

    // The schema loads once; a second pass leaves it alone.
    let dump = schema::dump_schema(&pair.toolchain, &pair.blue, &pair.creds, "app", Major(15))
        .await
        .unwrap();
    let prepared = schema::prepare_for_target(&dump, Major(16));
    let green = pair.create_db(&pair.green, "app").await;
    assert_eq!(
        schema::load_once(&green, &prepared, &fingerprint)
            .await
            .unwrap(),
        SchemaLoad::Loaded
    );
    assert_eq!(
        schema::load_once(&green, &prepared, &fingerprint)
            .await
            .unwrap(),
        SchemaLoad::AlreadyLoaded
    );
    assert_eq!(
        schema::copied_fingerprint(&green).await.unwrap().as_deref(),
        Some(fingerprint.as_str())
    );
    let (b, g) = (
        schema::describe(&blue).await.unwrap(),
        schema::describe(&green).await.unwrap(),
    );
    assert_eq!(
        b.portable_fingerprint(),
        g.portable_fingerprint(),
        "{:#?}",
        b.differences(&g, true)
    );
    let full_differences = b.differences(&g, false);
    eprintln!("15 → 16, lines of the full description that differ: {full_differences:#?}");
    assert!(
        full_differences.iter().all(|l| l[2..].starts_with("view ")),
        "{full_differences:#?}"
    );

    // Blue moves on: new rows take new ids from every kind of sequence.
    blue.batch_execute(
        "INSERT INTO shop.customers (email, name) VALUES ('dan@example.com', 'Dan'), ('eve@example.com', 'Eve');
         INSERT INTO shop.orders (customer_id, amount) VALUES (4, 1), (5, 2), (5, 3);
         INSERT INTO shop.events (at, kind) VALUES ('2025-06-01', 'login');
         SELECT nextval('shop.invoice_no'), nextval('shop.invoice_no');",
    )
    .await
    .unwrap();

    // Data, then verification at a snapshot.
    copy_data(&blue, &green).await;
    let report = compare_all(&blue, &green).await;
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert_eq!(report.tables, 6);
    assert!(report.rows > 20 && report.bytes > 0, "{report:?}");

    // Sequences: every one is carried (serial, identity, standalone, bigserial, the
    // partitioned table's identity), in one statement each way.
    let states = sequences::read_all(&blue).await.unwrap();
    let seq_names: Vec<String> = states
        .iter()
        .map(|s| format!("{}.{}", s.schema, s.name))
        .collect();
    assert_eq!(
        seq_names,
        [
            "shop.audit_log_id_seq",
            "shop.customers_id_seq",
            "shop.events_id_seq",
            "shop.invoice_no",
            "shop.orders_id_seq"
        ]
    );
    assert_eq!(sequences::apply_all(&green, &states).await.unwrap(), 5);
    for (seq, used_on_blue) in [
        ("customers_id_seq", 5),
        ("orders_id_seq", 7),
        ("invoice_no", 1000 + 7 * 9),
    ] {
        let state = states.iter().find(|s| s.name == seq).unwrap();
        assert!(state.is_called);
        assert_eq!(state.last_value, used_on_blue, "{seq}");
        let next: i64 = green
            .query_one(&format!("SELECT nextval('shop.{seq}')"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            next > state.last_value,
            "{seq}: green's next {next} must follow blue's {}",
            state.last_value
        );
    }
    // A sequence restarted but not used yet keeps its position (pg_sequences would say NULL).
    blue.batch_execute("SELECT setval('shop.invoice_no', 5000, false)")
        .await
        .unwrap();
    let states = sequences::read_all(&blue).await.unwrap();
    sequences::apply_all(&green, &states).await.unwrap();
    let next: i64 = green
        .query_one("SELECT nextval('shop.invoice_no')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 5000);

    // Inside the pause only what moved since the copy made right before it is carried:
    // nothing yet; then a used sequence and one set back, not the one still not called.
    let ahead = sequences::read_all(&blue).await.unwrap();
    assert!(
        sequences::read_moved(&blue, &ahead)
            .await
            .unwrap()
            .is_empty()
    );
    blue.batch_execute(
        "SELECT nextval('shop.orders_id_seq'); SELECT setval('shop.events_id_seq', 77, false);",
    )
    .await
    .unwrap();
    let moved = sequences::read_moved(&blue, &ahead).await.unwrap();
    let moved: Vec<(String, i64, bool)> = moved
        .into_iter()
        .map(|s| (s.name, s.last_value, s.is_called))
        .collect();
    assert_eq!(
        moved,
        [
            ("events_id_seq".to_string(), 77, false),
            ("orders_id_seq".to_string(), 8, true)
        ]
    );

    // The checksum sees one changed value, and does not care about physical row order.
    green
        .batch_execute("UPDATE shop.customers SET name = 'Bob!' WHERE id = 2")
        .await
        .unwrap();
    let report = compare_all(&blue, &green).await;
    assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
    assert!(
        report.mismatches[0].starts_with("shop.customers: same 5 rows, different content"),
        "{:?}",
        report.mismatches
    );
    green
        .batch_execute("UPDATE shop.customers SET name = 'Bob' WHERE id = 2")
        .await
        .unwrap();
    green
        .batch_execute("UPDATE shop.customers SET name = name WHERE id = 1")
        .await
        .unwrap();
    let (blue_order, green_order) = (stored_order(&blue).await, stored_order(&green).await);
    assert_ne!(
        blue_order, green_order,
        "the rows should now be stored in another order on green"
    );
    let report = compare_all(&blue, &green).await;
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    green
        .batch_execute("DELETE FROM shop.page_views WHERE path = '/'")
        .await
        .unwrap();
    let report = compare_all(&blue, &green).await;
    assert_eq!(
        report.mismatches,
        ["shop.page_views: 2 rows on blue, 1 on green"]
    );

    // DDL on blue after the copy changes the fingerprint, names the change, and a copy
    // pass now refuses to treat green's copy as current.
    blue.batch_execute("ALTER TABLE shop.customers ADD COLUMN note text")
        .await
        .unwrap();
    let changed = schema::describe(&blue).await.unwrap();
    assert_ne!(changed.fingerprint(), fingerprint);
    assert_eq!(
        b.differences(&changed, false),
        ["+ column shop.customers 6 note text"]
    );
    let err = schema::load_once(&green, &prepared, &changed.fingerprint())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed after it was copied"), "{err}");

    // A schema that does not load leaves nothing behind, and says which statement failed.
    let empty = pair.create_db(&pair.green, "bad").await;
    let err = schema::load(
        &empty,
        "CREATE TABLE public.a (x int);\nCREATE TABLE public.b (y no_such_type);\nCREATE TABLE public.c (z int);",
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the schema does not load on PostgreSQL 16"),
        "{err}"
    );
    assert!(
        err.contains("no_such_type") && err.contains("CREATE TABLE public.b"),
        "{err}"
    );
    assert_eq!(user_object_count(&empty).await, 0);
    empty
        .batch_execute("CREATE TABLE public.ok (x int)")
        .await
        .expect("the connection is usable after a failed load");
    let err = schema::load_once(&empty, "SELECT 1;", "x")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");

    checksum_throughput(&pair).await;
}

/// Prints how fast the checksum reads a table of ~40 MB of COPY text.
async fn checksum_throughput(pair: &Pair) {
    let bulk = pair.create_db(&pair.blue, "bulk").await;
    bulk.batch_execute(
        "CREATE TABLE public.bulk AS
             SELECT g AS id, md5(g::text) AS hash, g * 1.5 AS amount, now() - g * interval '1 s' AS at,
                    repeat('x', 40) AS pad, jsonb_build_object('n', g) AS doc
             FROM generate_series(1, 300000) g",
    )
    .await
    .unwrap();
    bulk.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let sum = verify::table_checksum(&bulk, "public", "bulk", Verification::Full)
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    bulk.batch_execute("COMMIT").await.unwrap();
    assert_eq!(sum.rows, 300_000);
    eprintln!(
        "checksum throughput: {} rows, {:.1} MB in {:.2} s = {:.1} MB/s ({:.0} rows/s)",
        sum.rows,
        sum.bytes as f64 / 1e6,
        elapsed,
        sum.bytes as f64 / 1e6 / elapsed,
        sum.rows as f64 / elapsed
    );
}

#[tokio::test]
async fn preflight_names_what_cannot_be_carried() {
    let pair = Pair::start(15, 16).await;
    let blue = pair.create_db(&pair.blue, "legacy").await;
    blue.batch_execute(
        "CREATE UNLOGGED TABLE public.scratch (x int PRIMARY KEY);
         SELECT lo_from_bytea(0, 'hello'), lo_from_bytea(0, 'world');
         CREATE TABLE public.keyless (x int, y text);
         INSERT INTO public.keyless VALUES (1, 'a'), (2, 'b');
         UPDATE public.keyless SET y = 'c' WHERE x = 2;
         CREATE TABLE public.log (at date NOT NULL, msg text) PARTITION BY RANGE (at);
         CREATE TABLE public.log_2025 PARTITION OF public.log FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO public.log VALUES ('2025-03-01', 'inserted only');
         CREATE TABLE public.by_index (x int NOT NULL, y int);
         CREATE UNIQUE INDEX by_index_x ON public.by_index (x);
         ALTER TABLE public.by_index REPLICA IDENTITY USING INDEX by_index_x;
         UPDATE public.by_index SET y = 1;
         CREATE EXTENSION adminpack;
         -- Statistics reach the shared counters when the session goes idle; make it now.
         SELECT pg_stat_force_next_flush();",
    )
    .await
    .unwrap();

    // PostgreSQL 17 dropped adminpack: asking for 17 refuses it, 16 does not.
    let refused = preflight::check(
        &blue,
        "legacy",
        Major(17),
        UnsupportedPolicy::Refuse,
        &pair.toolchain,
    )
    .await
    .unwrap();
    let all = refused.refusals.join("\n");
    for needle in [
        "unlogged tables are not replicated: public.scratch",
        "2 large object(s) in database legacy",
        "public.keyless (1 rows updated or deleted)",
        "extension adminpack is not available for PostgreSQL 17",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(refused.refusals.len(), 4, "{all}");
    assert!(
        !all.contains("by_index") && !all.contains("public.log"),
        "{all}"
    );
    assert_eq!(
        names(&refused.needs_replica_identity_full),
        ["public.log"],
        "insert-only: FULL, not refused"
    );
    let message = refused.refusal("legacy").unwrap().to_string();
    assert!(
        message.starts_with("database legacy cannot be carried over: ")
            && message.contains("public.scratch")
    );

    let to_16 = preflight::check(
        &blue,
        "legacy",
        Major(16),
        UnsupportedPolicy::Refuse,
        &pair.toolchain,
    )
    .await
    .unwrap();
    assert!(
        !to_16.refusals.iter().any(|r| r.contains("adminpack")),
        "{:?}",
        to_16.refusals
    );

    // Under `warn`, the same things are warnings and every keyless table gets FULL.
    let warned = preflight::check(
        &blue,
        "legacy",
        Major(16),
        UnsupportedPolicy::Warn,
        &pair.toolchain,
    )
    .await
    .unwrap();
    assert!(warned.refusals.is_empty(), "{:?}", warned.refusals);
    assert_eq!(
        names(&warned.needs_replica_identity_full),
        ["public.keyless", "public.log"]
    );
    let warnings = warned.warnings.join("\n");
    for needle in [
        "EMPTY on green: public.scratch",
        "MISSING on green: 2 large object(s)",
        "public.keyless, public.log",
    ] {
        assert!(
            warnings.contains(needle),
            "missing {needle:?} in:\n{warnings}"
        );
    }

    // FULL goes on the partition root and its partitions; a second call changes nothing.
    preflight::ensure_replica_identity_full(&blue, &warned.needs_replica_identity_full)
        .await
        .unwrap();
    preflight::ensure_replica_identity_full(&blue, &warned.needs_replica_identity_full)
        .await
        .unwrap();
    let idents: Vec<String> = blue
        .query(
            "SELECT relname || '=' || relreplident::text FROM pg_class \
             WHERE relname IN ('keyless', 'log', 'log_2025', 'by_index') ORDER BY relname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(idents, ["by_index=i", "keyless=f", "log=f", "log_2025=f"]);
    let again = preflight::check(
        &blue,
        "legacy",
        Major(16),
        UnsupportedPolicy::Refuse,
        &pair.toolchain,
    )
    .await
    .unwrap();
    assert!(
        !again.refusals.iter().any(|r| r.contains("keyless")),
        "FULL is an identity: {:?}",
        again.refusals
    );
}

#[tokio::test]
async fn downgrade_17_to_15() {
    copy_across_majors(17, 15).await;
}

#[tokio::test]
async fn downgrade_16_to_15() {
    copy_across_majors(16, 15).await;
}

#[tokio::test]
async fn upgrade_15_to_18() {
    copy_across_majors(15, 18).await;
}

/// The way back from 18: pg_dump 18 (the PyPI wheel's, with its own libpq) dumps an 18 server.
#[tokio::test]
async fn downgrade_18_to_16() {
    copy_across_majors(18, 16).await;
}

/// Under `unsupported: warn` the verification leaves out exactly the unlogged tables that
/// preflight lets through: an unlogged table, and the unlogged partition of a logged
/// partitioned table, whose logged partitions are then compared one by one.
#[tokio::test]
async fn verification_leaves_out_the_unlogged_tables() {
    let pair = Pair::start(16, 17).await;
    let blue = pair.create_db(&pair.blue, "mixed").await;
    blue.batch_execute(
        "CREATE TABLE public.kept (x int PRIMARY KEY);
         CREATE UNLOGGED TABLE public.scratch (x int PRIMARY KEY);
         CREATE TABLE public.events (at date NOT NULL, msg text) PARTITION BY RANGE (at);
         CREATE TABLE public.events_2024 PARTITION OF public.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE UNLOGGED TABLE public.events_2025 PARTITION OF public.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         CREATE TABLE public.log (at date NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE public.log_2025 PARTITION OF public.log FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');",
    )
    .await
    .unwrap();
    let warned = verify::tables_to_verify(&blue, true).await.unwrap();
    assert_eq!(
        names(&warned.compared),
        ["public.events_2024", "public.kept", "public.log"]
    );
    assert_eq!(
        names(&warned.left_behind),
        ["public.events_2025", "public.scratch"]
    );
    assert_eq!(
        warned.left_behind,
        preflight::unlogged_tables(&blue).await.unwrap(),
        "the same tables preflight lets through"
    );
    let all = verify::tables_to_verify(&blue, false).await.unwrap();
    assert_eq!(
        names(&all.compared),
        [
            "public.events",
            "public.kept",
            "public.log",
            "public.scratch"
        ]
    );
    assert!(all.left_behind.is_empty());
}

#[tokio::test]
async fn downgrade_refuses_a_schema_the_older_major_cannot_parse() {
    let pair = Pair::start(17, 15).await;
    let blue = pair.create_db(&pair.blue, "newer").await;
    // IS JSON is PostgreSQL 16+ syntax.
    blue.batch_execute(
        "CREATE TABLE public.docs (id int PRIMARY KEY, body text CHECK (body IS JSON OBJECT))",
    )
    .await
    .unwrap();
    let err = pair
        .copy_roles_and_schema("newer", &blue)
        .await
        .unwrap_err()
        .to_string();
    eprintln!("17 → 15 with IS JSON: {err}");
    assert!(
        err.contains("the schema does not load on PostgreSQL 15"),
        "{err}"
    );
    assert!(
        err.contains("public.docs"),
        "the error names the statement: {err}"
    );
    let green = pair.green("newer").await;
    assert_eq!(user_object_count(&green).await, 0, "nothing is left behind");
    assert_eq!(schema::copied_fingerprint(&green).await.unwrap(), None);
}

/// The verification's write hold does not queue behind autovacuum: a real autovacuum
/// worker, throttled so that it holds its lock on the table for minutes, is cancelled, and
/// the hold is taken. `deadlock_timeout` is raised on the locking session so PostgreSQL's
/// own cancellation (after 1 s by default) cannot be what frees the lock: without pgflip's
/// cancellation the hold fails at its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_hold_cancels_an_autovacuum_in_its_way() {
    let pair = Pair::start(16, 16).await;
    let blue = pair.create_db(&pair.blue, "vac").await;
    blue.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, pad text);
         INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g;
         ALTER TABLE t SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
                            autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1,
                            autovacuum_analyze_threshold = 1000000000);
         DELETE FROM t WHERE id % 2 = 0;",
    )
    .await
    .unwrap();
    // One statement per call: ALTER SYSTEM refuses the implicit transaction of a batch.
    for sql in [
        "ALTER SYSTEM SET autovacuum_naptime = '1s'",
        "SELECT pg_reload_conf()",
    ] {
        blue.batch_execute(sql).await.unwrap();
    }
    // The same question before and after the hold: first it must be yes.
    let vacuum_holds_t = "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
                          WHERE a.backend_type = 'autovacuum worker' AND l.relation = 't'::regclass \
                            AND l.granted";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if blue.query_opt(vacuum_holds_t, &[]).await.unwrap().is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no autovacuum worker started on t"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let locker = pg::connect(&pair.blue, &pair.creds, "vac").await.unwrap();
    locker
        .batch_execute("SET deadlock_timeout = '10min'")
        .await
        .unwrap();
    verify::hold_writes(
        &locker,
        &[("public".into(), "t".into())],
        std::time::Duration::from_secs(5),
    )
    .await
    .expect("the hold is taken once the autovacuum is cancelled");
    let held: String = locker
        .query_one(
            "SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() AND relation = 't'::regclass \
             AND granted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, "ExclusiveLock");
    // Its lock on t is gone (a worker started since waits behind the hold: not granted).
    assert!(
        blue.query_opt(vacuum_holds_t, &[]).await.unwrap().is_none(),
        "the autovacuum of t was cancelled"
    );
    locker.batch_execute("COMMIT").await.unwrap();
}

/// `ALTER TABLE … REPLICA IDENTITY FULL` queues every new writer of the table behind it
/// while it waits for its lock. With a transaction left open on the table, preflight's
/// short tries let other writers through between them (one long wait would hold them all
/// for its whole timeout), and the identity is set once that transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_tries_let_writers_through_a_long_transaction() {
    let pair = Pair::start(16, 16).await;
    let blue = pair.create_db(&pair.blue, "busy").await;
    blue.batch_execute("CREATE TABLE keyless (v int)")
        .await
        .unwrap();
    let long = pg::connect(&pair.blue, &pair.creds, "busy").await.unwrap();
    long.batch_execute("BEGIN; INSERT INTO keyless VALUES (0)")
        .await
        .unwrap();
    let setting = tokio::spawn(async move {
        preflight::ensure_replica_identity_full(&blue, &[("public".into(), "keyless".into())]).await
    });
    let writer = pg::connect(&pair.blue, &pair.creds, "busy").await.unwrap();
    for v in 1..=20 {
        writer
            .execute("INSERT INTO keyless VALUES ($1)", &[&v])
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        !setting.is_finished(),
        "the identity was settled (or given up) while the long transaction was still open: {:?}",
        setting.await
    );
    long.batch_execute("COMMIT").await.unwrap();
    setting.await.unwrap().unwrap();
    let ident: String = writer
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'keyless'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ident, "f");
    let rows: i64 = writer
        .query_one("SELECT count(*) FROM keyless", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 21);
}
