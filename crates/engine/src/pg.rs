//! Connecting to PostgreSQL and quoting. Every identifier that reaches SQL goes through
//! [`ident`]; every literal through [`literal`].

use crate::ports::{Addr, Credentials};
use anyhow::Context;
use tokio_postgres::{Client, NoTls};

pub fn config(addr: &Addr, creds: &Credentials, dbname: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&addr.host)
        .port(addr.port)
        .user(&creds.user)
        .password(&creds.password)
        .dbname(dbname)
        .application_name("pgflip")
        .connect_timeout(std::time::Duration::from_secs(10));
    c
}

/// Waits (up to `within`) until the server accepts a login.
pub async fn wait_ready(
    addr: &Addr,
    admin: &Credentials,
    within: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match crate::pg::connect(addr, admin, "postgres").await {
            Ok(c) => {
                c.simple_query("SELECT 1").await?;
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context("server did not become ready"));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Opens a connection and drives it on a background task.
pub async fn connect(addr: &Addr, creds: &Credentials, dbname: &str) -> anyhow::Result<Client> {
    let (client, conn) = config(addr, creds, dbname)
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to {addr}/{dbname} as {}", creds.user))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
    Ok(client)
}

/// A quoted SQL identifier: `"name"`, with inner quotes doubled.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A schema-qualified, quoted name.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", ident(schema), ident(name))
}

/// A quoted SQL string literal (standard_conforming_strings is on in every supported major).
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A libpq connection string (for CREATE SUBSCRIPTION), each value quoted.
pub fn conninfo(addr: &Addr, creds: &Credentials, dbname: &str) -> String {
    format!(
        "{} password={}",
        conninfo_without_password(addr, &creds.user, dbname),
        conninfo_value(&creds.password)
    )
}

/// A libpq connection string for tools that get the password some other way (the
/// environment of their own process only).
pub fn conninfo_without_password(addr: &Addr, user: &str, dbname: &str) -> String {
    format!(
        "host={} port={} dbname={} user={} application_name=pgflip connect_timeout=10",
        conninfo_value(&addr.host),
        addr.port,
        conninfo_value(dbname),
        conninfo_value(user)
    )
}

pub(crate) fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Creates database `db` unless it exists (the client is connected to another database).
pub async fn ensure_database(admin: &Client, db: &str) -> anyhow::Result<()> {
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .is_some();
    if !exists {
        // Two statements: CREATE DATABASE cannot run inside the implicit transaction of
        // a multi-statement query.
        admin
            .batch_execute(&format!("CREATE DATABASE {}", ident(db)))
            .await?;
        admin
            .batch_execute(&format!(
                "COMMENT ON DATABASE {} IS {}",
                ident(db),
                literal(crate::adapters::adopted::CREATED_DATABASE_COMMENT)
            ))
            .await?;
    }
    Ok(())
}

/// The major version of the server a client is connected to.
pub async fn server_major(client: &Client) -> anyhow::Result<u32> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    let n: i32 = row.get(0);
    Ok(n as u32 / 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(ident("Order\"s"), "\"Order\"\"s\"");
        assert_eq!(qualified("public", "t"), "\"public\".\"t\"");
        assert_eq!(literal("it's"), "'it''s'");
        let c = Credentials {
            user: "u".into(),
            password: "p'w\\".into(),
        };
        let s = conninfo(
            &Addr {
                host: "127.0.0.1".into(),
                port: 5,
            },
            &c,
            "db",
        );
        assert_eq!(
            s,
            "host='127.0.0.1' port=5 dbname='db' user='u' application_name=pgflip connect_timeout=10 password='p\\'w\\\\'"
        );
        assert!(!format!("{c:?}").contains("p'w"));
    }
}
