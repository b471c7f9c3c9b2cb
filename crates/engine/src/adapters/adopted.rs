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
use crate::pg::{self, connect, ident};
use crate::ports::ADMIN_USER;
use crate::ports::{Addr, Credentials, Instances, NotReady, Passwords, Result, Unusable};
use anyhow::Context;
use pgflip_core::plan::Member;
use pgflip_core::spec::{AdoptedServer, Desired, Major, SUPPORTED_MAJORS};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio_postgres::Client;

mod server_sql;
use server_sql::{
    check, database_comment, database_exists, disown, drop_copied_schemas, drop_own_slots,
    ensure_role, own_role_exists, remove_own_objects,
};

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

    /// A server the user runs is reached by the others where the user said it is.
    async fn peer_addr(&self, member: &Member, desired: &Desired, addr: &Addr) -> Result<Addr> {
        match self.find(member.major, desired).await? {
            Some(_) => Ok(addr.clone()),
            None => self.inner.peer_addr(member, desired, addr).await,
        }
    }

    async fn is_up(&self, member: &Member, desired: &Desired) -> Result<bool> {
        match self.find(member.major, desired).await? {
            Some(_) => Ok(true),
            None => self.inner.is_up(member, desired).await,
        }
    }

    async fn free_space(&self, member: &Member, desired: &Desired) -> Result<Option<u64>> {
        match self.find(member.major, desired).await? {
            Some(_) => Ok(None),
            None => self.inner.free_space(member, desired).await,
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

    async fn physical_copy_blocker(
        &self,
        from: &Member,
        to: &Member,
        desired: &Desired,
    ) -> Result<Option<String>> {
        for member in [from, to] {
            if let Some(server) = self.find(member.major, desired).await? {
                return Ok(Some(format!(
                    "{server} is a server you run: pgflip makes physical copies only between its own instances"
                )));
            }
        }
        self.inner.physical_copy_blocker(from, to, desired).await
    }

    async fn base_backup(
        &self,
        from: &Member,
        to: &Member,
        source: &Addr,
        slot: &str,
        desired: &Desired,
    ) -> Result<()> {
        self.inner
            .base_backup(from, to, source, slot, desired)
            .await
    }

    async fn upgrade_backup(
        &self,
        from: &Member,
        to: &Member,
        source: &Addr,
        slot: &str,
        stop_before: &str,
        desired: &Desired,
    ) -> Result<Addr> {
        self.inner
            .upgrade_backup(from, to, source, slot, stop_before, desired)
            .await
    }
}
