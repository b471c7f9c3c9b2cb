use super::*;

#[test]
fn splits_statements_and_drops_nothing() {
    let script = "\\restrict abc\n-- head\nSET a = 1;\nCREATE TABLE t (x text DEFAULT ';');\n\\unrestrict abc\n";
    let chunks = split(script);
    assert_eq!(
        chunks,
        vec![
            Chunk::MetaCommand("\\restrict abc\n"),
            Chunk::Filler("-- head\n"),
            Chunk::Statement("SET a = 1;"),
            Chunk::Filler("\n"),
            Chunk::Statement("CREATE TABLE t (x text DEFAULT ';');"),
            Chunk::Filler("\n"),
            Chunk::MetaCommand("\\unrestrict abc\n"),
        ]
    );
    let joined: String = chunks
        .iter()
        .map(|c| match c {
            Chunk::Statement(s) | Chunk::MetaCommand(s) | Chunk::Filler(s) => *s,
        })
        .collect();
    assert_eq!(joined, script);
}

#[test]
fn quotes_comments_and_bodies_do_not_end_statements() {
    let script = concat!(
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $fn$ BEGIN RETURN 1; END $fn$;\n",
        "SELECT E'it\\'s;', 'a''b;', \"odd;\"\"name\", $$;$$ /* x; /* nested; */ y; */;\n",
        "CREATE OR REPLACE FUNCTION g(x int) RETURNS int LANGUAGE sql\n",
        "BEGIN ATOMIC SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END; SELECT 3; END;\n",
        "BEGIN; SELECT $1; COMMIT\n",
    );
    let stmts: Vec<&str> = statements(script).collect();
    assert_eq!(stmts.len(), 6, "{stmts:#?}");
    assert!(stmts[0].ends_with("END $fn$;"));
    assert!(stmts[1].ends_with("y; */;"));
    assert!(stmts[2].starts_with("CREATE OR REPLACE") && stmts[2].ends_with("SELECT 3; END;"));
    assert_eq!(&stmts[3..], &["BEGIN;", "SELECT $1;", "COMMIT\n"]);
}

#[test]
fn words_fold_case_and_unquote() {
    assert_eq!(
        leading_words("  -- c\n ALTER Role \"My \"\"Role\"\" \" WITH LOGIN;", 4),
        vec![
            Word::Bare("alter".into()),
            Word::Bare("role".into()),
            Word::Quoted("My \"Role\" ".into()),
            Word::Bare("with".into())
        ]
    );
    assert_eq!(leading_words("SET x = 1", 5).len(), 2);
}

#[test]
fn passwords_are_redacted() {
    let s = "ALTER ROLE app WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:abc';";
    assert_eq!(
        redact_passwords(s),
        "ALTER ROLE app WITH LOGIN PASSWORD <redacted>;"
    );
    assert!(!excerpt(s).contains("SCRAM"));
}

#[test]
fn transaction_control_is_recognised() {
    assert!(is_transaction_control("COMMIT;"));
    assert!(is_transaction_control("start transaction;"));
    assert!(!is_transaction_control("CREATE TABLE begin (x int);"));
    assert!(!is_transaction_control("START_X;"));
}
