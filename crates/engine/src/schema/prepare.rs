//! Making a dump load on the target major through a plain simple-query batch.
//!
//! Each rule exists because a real dump did not load without it:
//! - psql meta-commands (`\restrict KEY` / `\unrestrict KEY`, written by pg_dump 17.6,
//!   16.10, 15.14 and later) are psql's, not the server's: dropped.
//! - `SET` of a parameter the target does not know (pg_dump 17 writes
//!   `SET transaction_timeout = 0;` even when dumping an older server): dropped when the
//!   target predates it. The setting only matters to the restore session itself.
//! - The admin role exists on every instance (initdb made it, with its own password): the
//!   dump's `CREATE ROLE` / `ALTER ROLE` / `COMMENT ON ROLE` of it are dropped.
//! - Other roles may exist on the target already (a retried copy, a second database of the
//!   same cluster): `CREATE ROLE` becomes a no-op for an existing role; the `ALTER ROLE`
//!   after it still sets the attributes and password to blue's.
//! - pg_dumpall 16+ writes role memberships as `GRANT r TO m WITH INHERIT TRUE …`, syntax
//!   PostgreSQL 15 does not have. `INHERIT TRUE` is what 15 does for a member with the
//!   INHERIT attribute (which the `ALTER ROLE` carries), so it is dropped for a 15 target.
//!   `INHERIT FALSE` and `SET FALSE` are kept: 15 cannot express them, and the load fails
//!   naming the statement rather than quietly granting more than blue did.

use crate::ports::ADMIN_USER;
use crate::sql_script::{Chunk, Word, leading_words, split};
use pgflip_core::spec::Major;

/// Server parameters pg_dump may `SET`, with the first major that knows them.
const SETTINGS_INTRODUCED_IN: &[(&str, u32)] = &[("transaction_timeout", 17)];

/// Rewrites a schema or roles dump so that it loads on `target_major` as one batch.
pub fn prepare_for_target(sql: &str, target_major: Major) -> String {
    prepare_roles_for_target(sql, target_major, &[])
}

/// [`prepare_for_target`] for a roles dump onto a target whose own roles `kept` (its
/// install superuser: a server the user runs keeps its own password) are left as they
/// are, like pgflip's.
pub fn prepare_roles_for_target(sql: &str, target_major: Major, kept: &[String]) -> String {
    let mut out = String::with_capacity(sql.len());
    for chunk in split(sql) {
        match chunk {
            Chunk::Filler(text) => out.push_str(text),
            Chunk::MetaCommand(_) => {}
            Chunk::Statement(stmt) => match rewrite(stmt, target_major, kept) {
                Rewrite::Keep => out.push_str(stmt),
                Rewrite::Drop => {}
                Rewrite::Replace(text) => out.push_str(&text),
            },
        }
    }
    out
}

enum Rewrite {
    Keep,
    Drop,
    Replace(String),
}

fn rewrite(stmt: &str, target: Major, kept: &[String]) -> Rewrite {
    let words = leading_words(stmt, 4);
    let word = |i: usize, kw: &str| words.get(i).is_some_and(|w: &Word| w.is(kw));
    let is_admin = |i: usize| {
        words
            .get(i)
            .is_some_and(|w| w.name() == ADMIN_USER || kept.iter().any(|k| k == w.name()))
    };

    if word(0, "set") {
        let unknown = words.get(1).is_some_and(|param| {
            SETTINGS_INTRODUCED_IN
                .iter()
                .any(|(name, since)| param.is(name) && target.0 < *since)
        });
        return if unknown {
            Rewrite::Drop
        } else {
            Rewrite::Keep
        };
    }
    let about_admin = ((word(0, "create") || word(0, "alter")) && word(1, "role") && is_admin(2))
        || (word(0, "comment") && word(1, "on") && word(2, "role") && is_admin(3));
    if about_admin {
        return Rewrite::Drop;
    }
    if word(0, "create") && word(1, "role") {
        return Rewrite::Replace(ignore_duplicate(stmt));
    }
    if word(0, "grant") && target.0 < 16 {
        return Rewrite::Replace(without_inherit_true(stmt));
    }
    Rewrite::Keep
}

/// `stmt` wrapped so that an existing object is no error: a DO block catching
/// duplicate_object, quoted with a dollar tag the statement does not contain.
fn ignore_duplicate(stmt: &str) -> String {
    let body = stmt.trim_end().trim_end_matches(';');
    let mut tag = "$pgflip$".to_string();
    while body.contains(&tag) {
        tag.insert(tag.len() - 1, '_');
    }
    format!("DO {tag}BEGIN {body}; EXCEPTION WHEN duplicate_object THEN NULL; END{tag};")
}

/// Drops the `INHERIT TRUE` grant option pg_dumpall 16+ writes (see the module comment).
fn without_inherit_true(stmt: &str) -> String {
    stmt.replace(" WITH INHERIT TRUE, ", " WITH ")
        .replace(", INHERIT TRUE", "")
        .replace(" WITH INHERIT TRUE", "")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES_17: &str = "--\n-- PostgreSQL database cluster dump\n--\n\n\\restrict KEY\n\n\
        SET default_transaction_read_only = off;\n\nSET client_encoding = 'UTF8';\n\
        CREATE ROLE pgflip;\n\
        ALTER ROLE pgflip WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;\n\
        CREATE ROLE shop_app;\n\
        ALTER ROLE shop_app WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:x$y:z';\n\
        CREATE ROLE \"Odd $pgflip$ Name\";\n\
        GRANT shop_reader TO shop_app WITH INHERIT TRUE GRANTED BY pgflip;\n\
        GRANT a TO b WITH ADMIN OPTION, INHERIT TRUE GRANTED BY pgflip;\n\
        GRANT c TO d WITH INHERIT FALSE GRANTED BY pgflip;\n\n\\unrestrict KEY\n";

    #[test]
    fn roles_dump_for_15() {
        let out = prepare_for_target(ROLES_17, Major(15));
        assert!(!out.contains('\\'), "{out}");
        assert!(!out.contains("ROLE pgflip"), "{out}");
        assert!(out.contains(
            "DO $pgflip$BEGIN CREATE ROLE shop_app; EXCEPTION WHEN duplicate_object THEN NULL; END$pgflip$;"
        ));
        assert!(
            out.contains("DO $pgflip_$BEGIN CREATE ROLE \"Odd $pgflip$ Name\";"),
            "{out}"
        );
        assert!(out.contains("ALTER ROLE shop_app WITH LOGIN PASSWORD"));
        assert!(out.contains("GRANT shop_reader TO shop_app GRANTED BY pgflip;"));
        assert!(out.contains("GRANT a TO b WITH ADMIN OPTION GRANTED BY pgflip;"));
        assert!(out.contains("GRANT c TO d WITH INHERIT FALSE GRANTED BY pgflip;"));
    }

    #[test]
    fn a_kept_role_is_neither_created_nor_altered() {
        let dump = "CREATE ROLE postgres;\nALTER ROLE postgres WITH SUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:a$b:c';\nCOMMENT ON ROLE postgres IS 'x';\nCREATE ROLE app;\n";
        let out = prepare_roles_for_target(dump, Major(17), &["postgres".to_string()]);
        assert!(!out.contains("postgres"), "{out}");
        assert!(out.contains("CREATE ROLE app"), "{out}");
        assert!(prepare_for_target(dump, Major(17)).contains("ALTER ROLE postgres"));
    }

    #[test]
    fn roles_dump_for_16_keeps_grant_options() {
        let out = prepare_for_target(ROLES_17, Major(16));
        assert!(out.contains("GRANT shop_reader TO shop_app WITH INHERIT TRUE GRANTED BY pgflip;"));
    }

    #[test]
    fn transaction_timeout_only_for_older_targets() {
        let dump =
            "SET statement_timeout = 0;\nSET transaction_timeout = 0;\nCREATE TABLE t (x int);\n";
        assert_eq!(
            prepare_for_target(dump, Major(15)),
            "SET statement_timeout = 0;\n\nCREATE TABLE t (x int);\n"
        );
        assert_eq!(prepare_for_target(dump, Major(17)), dump);
    }

    #[test]
    fn function_bodies_are_left_alone() {
        let dump = "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$\nBEGIN\n\\x\nSET transaction_timeout = 0;\nCREATE ROLE pgflip;\nEND $$;\n";
        assert_eq!(prepare_for_target(dump, Major(15)), dump);
    }
}
