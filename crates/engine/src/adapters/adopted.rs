//! Servers the user runs (`spec.adopt`), in front of pgflip's own instances: a member whose
//! major a listed server runs *is* that server; any other member is one of pgflip's own
//! instances (the wrapped [`Instances`]). Both run modes use it.
//!
//! pgflip never starts, stops, reconfigures, restarts or deletes such a server. On first
//! use it checks that it can work there (a superuser login, `wal_level = logical`, free
//! replication slots and WAL senders) and adds its own login role, `pgflip`, with the
//! password of its other instances, so every later step logs in the same way everywhere
//! (and the user's password is read only here). When the server is retired, everything of
//! pgflip's goes — its slots, publications, subscriptions, `_pgflip` schema, the fence and
//! the role — and the server keeps running with its data ("released").

use crate::fence;
use crate::pg::{self, connect, ident, literal};
use crate::ports::ADMIN_USER;
use crate::ports::{Addr, Credentials, Instances, NotReady, Passwords, Result, Unusable};
use crate::replication as repl;
use anyhow::Context;
use pgflip_core::plan::Member;
use pgflip_core::spec::{AdoptedServer, Desired, Major, SUPPORTED_MAJORS};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio_postgres::Client;

/// The comment on the role pgflip adds, so it never takes over (or drops) a `pgflip`
/// role the user made.
const ROLE_COMMENT: &str = "added by pgflip for its replication; removed when released";
/// The comment on a database pgflip created on a server the user runs (a copy's target),
/// so that cleaning up after a failed copy may drop it, and nothing else.
pub const CREATED_DATABASE_COMMENT: &str = "created by pgflip for a copy";

pub struct Adopting<I, P> {
    inner: I,
    passwords: P,
    admin: Credentials,
    /// What each listed server answered on first contact: its major, and whether pgflip's
    /// checks passed and its role is in place.
    seen: Mutex<HashMap<AdoptedServer, Seen>>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    major: Major,
    prepared: bool,
}

fn addr_of(server: &AdoptedServer) -> Addr {
    Addr {
        host: server.host.clone(),
        port: server.port,
    }
}

impl<I: Instances, P: Passwords> Adopting<I, P> {
    pub fn new(inner: I, passwords: P, admin: Credentials) -> Self {
        Adopting {
            inner,
            passwords,
            admin,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn inner(&self) -> &I {
        &self.inner
    }

    /// The listed server that runs `member`, if one does (for `pgflip status`).
    pub async fn server_of(
        &self,
        member: &Member,
        desired: &Desired,
    ) -> Result<Option<AdoptedServer>> {
        self.find(member.major, desired).await
    }

    fn seen(&self, server: &AdoptedServer) -> Option<Seen> {
        self.seen.lock().expect("not poisoned").get(server).copied()
    }

    fn remember(&self, server: &AdoptedServer, seen: Seen) {
        self.seen
            .lock()
            .expect("not poisoned")
            .insert(server.clone(), seen);
    }

    /// A session as the user's own superuser.
    async fn connect_as_user(&self, server: &AdoptedServer, db: &str) -> Result<Client> {
        let password = self.passwords.password(server).await.map_err(|e| {
            if crate::ports::is_not_ready(&e) {
                return e;
            }
            Unusable(vec![format!(
                "{server}: no password for {}: {e:#}",
                server.user
            )])
            .into()
        })?;
        let login = Credentials {
            user: server.user.clone(),
            password: password.unwrap_or_default(),
        };
        let client = connect(&addr_of(server), &login, db)
            .await
            .map_err(|e| refusal_or_wait(server, e))?;
        // A fenced server's roles are read-only by default (the user's superuser too);
        // what pgflip does as that user (releasing the server, say) must still write.
        client
            .batch_execute("SET default_transaction_read_only = off")
            .await?;
        Ok(client)
    }

    /// The server's major, asked once.
    async fn major(&self, server: &AdoptedServer) -> Result<Major> {
        if let Some(seen) = self.seen(server) {
            return Ok(seen.major);
        }
        let client = self.connect_as_user(server, "postgres").await?;
        let major = Major(pg::server_major(&client).await?);
        if !SUPPORTED_MAJORS.contains(&major.0) {
            return Err(Unusable(vec![format!(
                "{server} runs PostgreSQL {major}; pgflip moves databases between PostgreSQL {}",
                SUPPORTED_MAJORS
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )])
            .into());
        }
        self.remember(
            server,
            Seen {
                major,
                prepared: false,
            },
        );
        Ok(major)
    }

    /// The listed server running `major`, if any. A listed server that does not answer
    /// yet (an operator still creating it) could be the one: wait for it.
    async fn find(&self, major: Major, desired: &Desired) -> Result<Option<AdoptedServer>> {
        // Servers already seen answer from memory: a silent one is not asked every step.
        if let Some(server) = desired
            .adopt
            .iter()
            .find(|s| self.seen(s).is_some_and(|seen| seen.major == major))
        {
            return Ok(Some(server.clone()));
        }
        let mut found: Option<&AdoptedServer> = None;
        let mut silent = Vec::new();
        for server in &desired.adopt {
            match self.major(server).await {
                Ok(m) if m == major => {
                    if let Some(first) = found {
                        return Err(Unusable(vec![format!(
                            "{first} and {server} both run PostgreSQL {major}: list one server per major"
                        )])
                        .into());
                    }
                    found = Some(server);
                }
                Ok(_) => {}
                Err(e) if crate::ports::is_not_ready(&e) => silent.push(format!("{e:#}")),
                Err(e) => return Err(e),
            }
        }
        match found {
            Some(server) => Ok(Some(server.clone())),
            None if silent.is_empty() => Ok(None),
            None => Err(NotReady(format!(
                "no listed server answers as PostgreSQL {major} yet: {}",
                silent.join("; ")
            ))
            .into()),
        }
    }

    /// First use of a server: the checks, then pgflip's role. Nothing is changed on a
    /// server that fails a check.
    async fn prepare(&self, server: &AdoptedServer, desired: &Desired) -> Result<Addr> {
        let addr = addr_of(server);
        let major = self.major(server).await?;
        if self.seen(server).is_some_and(|s| s.prepared) {
            return Ok(addr);
        }
        let client = self.connect_as_user(server, "postgres").await?;
        let problems = check(&client, server, desired.databases.len()).await?;
        if !problems.is_empty() {
            return Err(Unusable(problems).into());
        }
        ensure_role(&client, server, &self.admin).await?;
        connect(&addr, &self.admin, "postgres").await.map_err(|e| {
            Unusable(vec![format!(
                "{server}: pgflip's role {ADMIN_USER} cannot log in ({e:#}): pg_hba.conf must let it connect from pgflip's host with a password"
            )])
        })?;
        self.remember(
            server,
            Seen {
                major,
                prepared: true,
            },
        );
        Ok(addr)
    }

    /// Removes everything of pgflip's from a server, which keeps running with its data.
    async fn release(&self, server: &AdoptedServer, desired: &Desired) -> Result<()> {
        let postgres = self.connect_as_user(server, "postgres").await?;
        for db in &desired.databases {
            if !database_exists(&postgres, db).await? {
                continue;
            }
            let c = self.connect_as_user(server, db).await?;
            remove_own_objects(&c, db).await?;
            if own_role_exists(&c).await? {
                c.batch_execute(&disown(&server.user)).await?;
            }
        }
        fence::unfence(&postgres).await?;
        drop_own_slots(&postgres).await?;
        if own_role_exists(&postgres).await? {
            postgres
                .batch_execute(&format!(
                    "{} DROP ROLE {}",
                    disown(&server.user),
                    ident(ADMIN_USER)
                ))
                .await
                .with_context(|| format!("dropping role {ADMIN_USER} on {server}"))?;
        }
        if let Some(seen) = self.seen(server) {
            self.remember(
                server,
                Seen {
                    prepared: false,
                    ..seen
                },
            );
        }
        tracing::info!(%server, "released: pgflip's objects removed, the server keeps running");
        Ok(())
    }

    /// After a copy onto the server that never served: what the copy put there goes (the
    /// server was empty of user objects when it began), then pgflip's own objects.
    async fn clean_copy(&self, server: &AdoptedServer, desired: &Desired) -> Result<()> {
        let postgres = self.connect_as_user(server, "postgres").await?;
        for db in &desired.databases {
            if !database_exists(&postgres, db).await? {
                continue;
            }
            if database_comment(&postgres, db).await?.as_deref() == Some(CREATED_DATABASE_COMMENT) {
                postgres
                    .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", ident(db)))
                    .await
                    .with_context(|| format!("dropping database {db} on {server}"))?;
                continue;
            }
            let c = self.connect_as_user(server, db).await?;
            if crate::schema::copied_fingerprint(&c).await?.is_some() {
                drop_copied_schemas(&c).await?;
            }
        }
        self.release(server, desired).await
    }
}

/// A server's answer that will not change by waiting (a refused login, a missing
/// database) is a refusal; no answer at all is a wait.
fn refusal_or_wait(server: &AdoptedServer, e: anyhow::Error) -> anyhow::Error {
    let db_error = e
        .chain()
        .find_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.as_db_error().map(|d| d.message().to_string()));
    match db_error {
        Some(message) => {
            Unusable(vec![format!("{server} refuses {}: {message}", server.user)]).into()
        }
        None => NotReady(format!("{server} does not answer yet: {e:#}")).into(),
    }
}

/// What pgflip needs of a server it does not run, as one finding per unmet need.
async fn check(
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
async fn ensure_role(client: &Client, server: &AdoptedServer, admin: &Credentials) -> Result<()> {
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
fn disown(user: &str) -> String {
    format!(
        "REASSIGN OWNED BY {a} TO {u}; DROP OWNED BY {a};",
        a = ident(ADMIN_USER),
        u = ident(user)
    )
}

async fn own_role_exists(client: &Client) -> anyhow::Result<bool> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1 AND shobj_description(oid, 'pg_authid') = $2",
            &[&ADMIN_USER, &ROLE_COMMENT],
        )
        .await?
        .is_some())
}

async fn database_exists(client: &Client, db: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .is_some())
}

async fn database_comment(client: &Client, db: &str) -> anyhow::Result<Option<String>> {
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
async fn remove_own_objects(client: &Client, db: &str) -> anyhow::Result<()> {
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

async fn drop_own_slots(client: &Client) -> anyhow::Result<()> {
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
async fn drop_copied_schemas(client: &Client) -> anyhow::Result<()> {
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

impl<I: Instances, P: Passwords> Instances for Adopting<I, P> {
    async fn serving_today(&self, desired: &Desired) -> Result<Option<Major>> {
        match desired.adopt.first() {
            Some(first) => Ok(Some(self.major(first).await?)),
            None => self.inner.serving_today(desired).await,
        }
    }

    async fn runs_here(&self, major: Major, desired: &Desired) -> Result<bool> {
        match self.find(major, desired).await? {
            Some(_) => Ok(false),
            None => self.inner.runs_here(major, desired).await,
        }
    }

    async fn ensure(&self, member: &Member, desired: &Desired) -> Result<Addr> {
        match self.find(member.major, desired).await? {
            Some(server) => self.prepare(&server, desired).await,
            None => self.inner.ensure(member, desired).await,
        }
    }

    async fn addr(&self, member: &Member, desired: &Desired) -> Result<Option<Addr>> {
        match self.find(member.major, desired).await? {
            Some(server) => Ok(Some(addr_of(&server))),
            None => self.inner.addr(member, desired).await,
        }
    }

    async fn remove(&self, member: &Member, desired: &Desired) -> Result<()> {
        match self.find(member.major, desired).await? {
            Some(server) => self.clean_copy(&server, desired).await,
            None => self.inner.remove(member, desired).await,
        }
    }

    async fn retire(&self, member: &Member, desired: &Desired) -> Result<()> {
        match self.find(member.major, desired).await? {
            Some(server) => self.release(&server, desired).await,
            None => self.inner.retire(member, desired).await,
        }
    }
}

/// Local mode's passwords: a file, or an environment variable of pgflip's process.
pub struct LocalPasswords;

impl Passwords for LocalPasswords {
    async fn password(&self, server: &AdoptedServer) -> Result<Option<String>> {
        if let Some(path) = &server.password_file {
            let text = tokio::fs::read_to_string(path)
                .await
                .with_context(|| format!("reading passwordFile {path}"))?;
            return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
        }
        if let Some(var) = &server.password_env {
            return std::env::var(var)
                .map(Some)
                .with_context(|| format!("environment variable {var} (passwordEnv) is not set"));
        }
        if server.secret_ref.is_some() {
            anyhow::bail!(
                "{server}: secretRef is read in Kubernetes mode; in local mode give passwordFile or passwordEnv"
            );
        }
        Ok(None)
    }
}
