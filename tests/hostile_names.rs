//! Hostile names: the SQL quoting checked by a real PostgreSQL on generated names, and a
//! switch of a database whose schema, table, column and role names are made of quotes,
//! backslashes, spaces and unicode — switched, verified and read back through the endpoint
//! (pg_dump, pg_upgrade, the replication links and the verification all see them). The
//! database's own name needs SQL quoting too (`.` and `-`), but only what PgBouncer's
//! configuration can name (the document refuses the rest, see `spec::is_endpoint_name`).

mod common;

use common::user_server::UserServer;
use common::{Harness, MINUTE};
use pgflip_core::plan::Color;
use pgflip_engine::pg::{connect, ident, literal, qualified};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Names PostgreSQL can hold (no NUL, at most 63 bytes) made of what breaks quoting.
fn hostile_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z'\"\\\\ ;$.,()\\-\n\té€😀]{1,20}", "[^\u{0}]{1,20}",]
        .prop_filter("at most 63 bytes", |s| s.len() <= 63)
}

#[test]
fn quoting_reads_back_exactly_on_a_real_server() {
    let server = UserServer::start(17, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(server.connect("postgres"));
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(
            &(hostile_name(), hostile_name(), hostile_name(), "[^\u{0}]{0,200}"),
            |(schema, table, column, text)| {
                rt.block_on(async {
                    let got: String = client
                        .query_one(&format!("SELECT {}", literal(&text)), &[])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(got, text, "a literal");
                    client
                        .batch_execute(&format!(
                            "CREATE SCHEMA {s}; CREATE TABLE {t} ({c} int); INSERT INTO {t} VALUES (1)",
                            s = ident(&schema),
                            t = qualified(&schema, &table),
                            c = ident(&column),
                        ))
                        .await
                        .unwrap_or_else(|e| panic!("{schema:?}.{table:?}({column:?}): {e}"));
                    let row = client
                        .query_one(
                            "SELECT n.nspname::text, c.relname::text, a.attname::text
                               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = 1
                              WHERE n.nspname = $1",
                            &[&schema],
                        )
                        .await
                        .unwrap();
                    let names: (String, String, String) = (row.get(0), row.get(1), row.get(2));
                    assert_eq!(names, (schema.clone(), table.clone(), column.clone()));
                    client
                        .batch_execute(&format!("DROP SCHEMA {} CASCADE", ident(&schema)))
                        .await
                        .unwrap();
                });
                Ok(())
            },
        )
        .unwrap();
}

const DB: &str = "shop.orders-2";
const SCHEMA: &str = "s p\"a'ce; $x";
const TABLE: &str = "t\\ab'le \"1\"";
const COLUMN: &str = "c\"ol 😀";
const ROLE: &str = "r'o\"le \\ é";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_hostile_names_is_switched_and_verified() {
    let databases = format!("databases: [{DB}]");
    let mut h = Harness::new(&databases);
    h.commit_version(15);
    h.start(None);
    h.wait("bootstrap", MINUTE, |r| r.serving.is_some()).await;
    let admin = h.admin();
    let app = connect(&h.endpoint(), &admin, DB).await.unwrap();
    let (s, t, c, r) = (
        ident(SCHEMA),
        qualified(SCHEMA, TABLE),
        ident(COLUMN),
        ident(ROLE),
    );
    app.batch_execute(&format!(
        "CREATE ROLE {r} LOGIN PASSWORD {pw};
         CREATE SCHEMA {s} AUTHORIZATION {r};
         CREATE TABLE {t} (id serial PRIMARY KEY, {c} text NOT NULL);
         ALTER TABLE {t} OWNER TO {r};
         INSERT INTO {t} ({c}) SELECT 'row ' || g || ' ''\"\\' FROM generate_series(1, 500) g;",
        pw = literal("s3cret'\"\\"),
    ))
    .await
    .unwrap();
    let up = h.commit_version(17);
    let record = h.wait_switched("upgrade", 1, &up, (Color::Green, 17)).await;
    let verified = record.history.last().unwrap().verified_tables;
    assert_eq!(verified, 1, "the hostile table was compared");
    // Through the endpoint, on 17: the rows, the sequence, the owner.
    let app = connect(&h.endpoint(), &admin, DB).await.unwrap();
    let version: String = app
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("17"), "{version}");
    let row = app
        .query_one(&format!("SELECT count(*), max({c}) FROM {t}"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 500);
    assert_eq!(row.get::<_, String>(1), "row 99 '\"\\");
    let id: i32 = app
        .query_one(
            &format!("INSERT INTO {t} ({c}) VALUES ('new') RETURNING id"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 501, "the sequence carried over");
    let owner: String = app
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
            &[&SCHEMA, &TABLE],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, ROLE);
}
