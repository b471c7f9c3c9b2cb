//! The statements pgflip runs on a server it does not run: what it checks there, the role it
//! adds, and how it removes everything of its own again when the server is released.

use super::CREATED_DATABASE_COMMENT;
use crate::pg::{ident, literal};
use crate::ports::{ADMIN_USER, Credentials, Result, Unusable};
use crate::replication as repl;
use pgflip_core::spec::AdoptedServer;
use tokio_postgres::Client;

/// The comment on the role pgflip adds, so it never takes over (or drops) a `pgflip`
/// role the user made.
const ROLE_COMMENT: &str = "added by pgflip for its replication; removed when released";

/// What pgflip needs of a server it does not run, as one finding per unmet need.
pub(super) async fn check(
    client: &Client,
    server: &AdoptedServer,
    databases: usize,
) -> anyhow::Result<Vec<String>> {
    let row = client
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_setting('wal_level'),
                    current_setting('max_replication_slots')::int
                      - (SELECT count(*) FROM pg_replication_slots WHERE slot_name NOT LIKE 'pgflip\\_%')::int,
                    current_setting('max_wal_senders')::int
                      - (SELECT count(*) FROM pg_stat_replication WHERE application_name NOT LIKE 'pgflip\\_%')::int",
            &[],
        )
        .await?;
    let superuser: bool = row.get(0);
    let wal_level: String = row.get(1);
    let free_slots: i32 = row.get(2);
    let free_senders: i32 = row.get(3);
    // One link per database, plus the table-sync workers of the initial copy (two per
    // subscription by default), each holding a slot and a WAL sender while it runs.
    let needed = (databases * 3) as i32;
    let mut problems = Vec::new();
    if !superuser {
        problems.push(format!(
            "{server}: user {} is not a superuser (pgflip adds its own replication role and publishes every table)",
            server.user
        ));
    }
    if wal_level != "logical" {
        problems.push(format!(
            "{server}: wal_level is {wal_level}; set wal_level = logical and restart the server (pgflip never restarts a server it does not run)"
        ));
    }
    if free_slots < needed {
        problems.push(format!(
            "{server}: {free_slots} replication slots free, {needed} needed: raise max_replication_slots (a restart)"
        ));
    }
    if free_senders < needed {
        problems.push(format!(
            "{server}: {free_senders} WAL senders free, {needed} needed: raise max_wal_senders (a restart)"
        ));
    }
    Ok(problems)
}

/// pgflip's role, with pgflip's password (sent as a SCRAM verifier, so the password never
/// reaches the server's statement log). A `pgflip` role the user made is left alone.
pub(super) async fn ensure_role(
    client: &Client,
    server: &AdoptedServer,
    admin: &Credentials,
) -> Result<()> {
    let verifier = postgres_protocol::password::scram_sha_256(admin.password.as_bytes());
    let role = ident(ADMIN_USER);
    let exists = client
        .query_opt(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
            &[&ADMIN_USER],
        )
        .await?;
    match exists {
        Some(row) if row.get::<_, Option<String>>(0).as_deref() != Some(ROLE_COMMENT) => {
            Err(Unusable(vec![format!(
                "{server} already has a role named {ADMIN_USER} that pgflip did not add: rename it"
            )])
            .into())
        }
        Some(_) => Ok(client
            .batch_execute(&format!(
                "ALTER ROLE {role} WITH LOGIN SUPERUSER REPLICATION PASSWORD {}",
                literal(&verifier)
            ))
            .await?),
        None => Ok(client
            .batch_execute(&format!(
                "CREATE ROLE {role} WITH LOGIN SUPERUSER REPLICATION PASSWORD {}; COMMENT ON ROLE {role} IS {}",
                literal(&verifier),
                literal(ROLE_COMMENT)
            ))
            .await?),
    }
}

/// In the database connected to: what pgflip's role owns goes to `user` (a database
/// pgflip created, objects copied with pgflip as their owner), its privileges are revoked.
pub(super) fn disown(user: &str) -> String {
    format!(
        "REASSIGN OWNED BY {a} TO {u}; DROP OWNED BY {a};",
        a = ident(ADMIN_USER),
        u = ident(user)
    )
}

pub(super) async fn own_role_exists(client: &Client) -> anyhow::Result<bool> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1 AND shobj_description(oid, 'pg_authid') = $2",
            &[&ADMIN_USER, &ROLE_COMMENT],
        )
        .await?
        .is_some())
}

pub(super) async fn database_exists(client: &Client, db: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .is_some())
}

pub(super) async fn database_comment(client: &Client, db: &str) -> anyhow::Result<Option<String>> {
    Ok(client
        .query_one(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&db],
        )
        .await?
        .get(0))
}

/// In one database: pgflip's subscriptions, publications and `_pgflip` schema, and its
/// mark on the database.
pub(super) async fn remove_own_objects(client: &Client, db: &str) -> anyhow::Result<()> {
    let subscriptions = client
        .query(
            "SELECT subname FROM pg_subscription WHERE subname LIKE 'pgflip\\_%'
               AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await?;
    for row in subscriptions {
        repl::drop_subscription(client, row.get(0)).await?;
    }
    let publications = client
        .query(
            "SELECT pubname FROM pg_publication WHERE pubname LIKE 'pgflip\\_%'",
            &[],
        )
        .await?;
    for row in publications {
        repl::drop_publication(client, row.get(0)).await?;
    }
    client
        .batch_execute("DROP SCHEMA IF EXISTS _pgflip CASCADE")
        .await?;
    if database_comment(client, db).await?.as_deref() == Some(CREATED_DATABASE_COMMENT) {
        client
            .batch_execute(&format!("COMMENT ON DATABASE {} IS NULL", ident(db)))
            .await?;
    }
    Ok(())
}

pub(super) async fn drop_own_slots(client: &Client) -> anyhow::Result<()> {
    let slots = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'pgflip\\_%'",
            &[],
        )
        .await?;
    for row in slots {
        repl::drop_slot(client, row.get(0)).await?;
    }
    Ok(())
}

/// Every schema of a database the copy filled (the database held no user objects before
/// it), and `public` made again as a new database has it.
pub(super) async fn drop_copied_schemas(client: &Client) -> anyhow::Result<()> {
    let schemas = client
        .query(
            "SELECT nspname::text FROM pg_namespace
              WHERE nspname NOT IN ('pg_catalog', 'information_schema', '_pgflip')
                AND nspname NOT LIKE 'pg\\_toast%' AND nspname NOT LIKE 'pg\\_temp\\_%'",
            &[],
        )
        .await?;
    let mut sql = String::new();
    for row in schemas {
        sql.push_str(&format!(
            "DROP SCHEMA {} CASCADE;\n",
            ident(row.get::<_, &str>(0))
        ));
    }
    sql.push_str(
        "CREATE SCHEMA public AUTHORIZATION pg_database_owner;\n\
         GRANT USAGE ON SCHEMA public TO PUBLIC;\n\
         COMMENT ON SCHEMA public IS 'standard public schema';\n",
    );
    client
        .batch_execute(&format!("BEGIN;\n{sql}COMMIT;"))
        .await?;
    Ok(())
}
