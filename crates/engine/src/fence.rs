//! Fencing: the color that does not serve must not take writes, even from clients that
//! bypass the endpoint. Every login role except pgflip's own (whose apply workers write
//! reverse replication) gets `default_transaction_read_only = on`, and open client
//! sessions are ended so they pick it up. Unfencing resets it. Both are idempotent.

use crate::ports::ADMIN_USER;
use tokio_postgres::Client;

/// Fences the instance in one transaction (a standby that stays fenced; the switchover
/// fences in two halves: [`stage`], [`commit_staged`]).
pub async fn fence(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "{}; {}",
            read_only_roles_sql(),
            end_sessions_sql()
        ))
        .await?;
    Ok(())
}

/// The switchover's fence, in two halves. This one, while PgBouncer drains: the roles are
/// made read-only in a transaction left open on `fencer`, its own session, so nothing
/// changes for anyone yet (a pause that fails is undone by [`abandon`]).
pub async fn stage(fencer: &Client) -> anyhow::Result<()> {
    fencer
        .batch_execute(&format!("BEGIN; {}", read_only_roles_sql()))
        .await?;
    Ok(())
}

/// The other half, inside the pause: the commit — which does not wait for the WAL flush
/// (`synchronous_commit = off`): the marker's commit comes next and its flush covers this
/// earlier record, so the fence is durable before the commit point is — and the end of
/// the sessions, so they pick it up.
pub async fn commit_staged(fencer: &Client) -> anyhow::Result<()> {
    fencer
        .batch_execute(&format!(
            "SET LOCAL synchronous_commit = off; COMMIT; {}",
            end_sessions_sql()
        ))
        .await?;
    Ok(())
}

/// Undoes a staged fence that is not to be committed: its transaction is rolled back (a
/// session that does not answer is dropped, which ends it on the server too), so that
/// unfencing on another session does not wait behind its row locks.
pub async fn abandon(fencer: Client) {
    let rollback = fencer.batch_execute("ROLLBACK");
    if tokio::time::timeout(std::time::Duration::from_secs(1), rollback)
        .await
        .is_err()
    {
        tracing::warn!("the staged fence's session did not answer; dropped");
    }
}

fn read_only_roles_sql() -> String {
    format!(
        "DO $$ DECLARE r record; BEGIN
           FOR r IN SELECT rolname FROM pg_roles WHERE rolcanlogin AND rolname <> {admin} LOOP
             EXECUTE format('ALTER ROLE %I SET default_transaction_read_only = on', r.rolname);
           END LOOP;
         END $$",
        admin = super::pg::literal(ADMIN_USER)
    )
}

fn end_sessions_sql() -> String {
    format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
            AND (usename <> {admin} OR application_name IS DISTINCT FROM 'pgflip')",
        admin = super::pg::literal(ADMIN_USER)
    )
}

pub async fn unfence(client: &Client) -> anyhow::Result<()> {
    let sql = format!(
        "DO $$ DECLARE r record; BEGIN
           FOR r IN SELECT rolname FROM pg_roles WHERE rolcanlogin AND rolname <> {admin} LOOP
             EXECUTE format('ALTER ROLE %I RESET default_transaction_read_only', r.rolname);
           END LOOP;
         END $$;",
        admin = super::pg::literal(ADMIN_USER)
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// Whether the instance is fenced (any login role other than pgflip's is read-only).
pub async fn is_fenced(client: &Client) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
                             WHERE s.setdatabase = 0 AND r.rolname <> $1
                               AND 'default_transaction_read_only=on' = ANY (s.setconfig))",
            &[&ADMIN_USER],
        )
        .await?;
    Ok(row.get(0))
}
