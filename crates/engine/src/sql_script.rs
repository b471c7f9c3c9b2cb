//! SQL scripts as pg_dump and pg_dumpall write them: split into top-level statements
//! (so single statements can be rewritten, dropped or named in an error), and run whole
//! inside one transaction.
//!
//! The splitter follows psql's own lexer where it matters: quotes (standard, `E''`,
//! dollar-quoted), quoted identifiers, nested block comments, parentheses, and the
//! `BEGIN ATOMIC … END` bodies of SQL-standard functions, whose semicolons do not end the
//! statement. A backslash at the start of a statement is a psql meta-command (pg_dump
//! 17.6+ and its back-branch releases write `\restrict KEY` / `\unrestrict KEY`).

use tokio_postgres::Client;

/// One piece of a script. Concatenating the pieces gives the script back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// One statement: from its first token to its terminating `;` (included, when present).
    Statement(&'a str),
    /// A psql meta-command line (`\restrict …`), newline included. The server cannot run it.
    MetaCommand(&'a str),
    /// Whitespace and comments between statements.
    Filler(&'a str),
}

/// Splits a script into statements, meta-commands and the filler between them.
pub fn split(script: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut pos = 0;
    // Start of the pending statement; None while only filler was seen since the last one.
    let mut stmt_start: Option<usize> = None;
    let mut filler_start = 0;
    let mut state = StatementState::default();
    while pos < script.len() {
        let token = next_token(script, pos);
        if stmt_start.is_none() {
            match token.kind {
                TokenKind::Space | TokenKind::Comment => {
                    pos = token.end;
                    continue;
                }
                TokenKind::Backslash => {
                    if filler_start < pos {
                        chunks.push(Chunk::Filler(&script[filler_start..pos]));
                    }
                    let end = script[pos..]
                        .find('\n')
                        .map_or(script.len(), |i| pos + i + 1);
                    chunks.push(Chunk::MetaCommand(&script[pos..end]));
                    pos = end;
                    filler_start = end;
                    continue;
                }
                _ => {
                    if filler_start < pos {
                        chunks.push(Chunk::Filler(&script[filler_start..pos]));
                    }
                    stmt_start = Some(pos);
                    state = StatementState::default();
                }
            }
        }
        if state.accept(&token, &script[token.start..token.end]) {
            let start = stmt_start.take().expect("inside a statement");
            chunks.push(Chunk::Statement(&script[start..token.end]));
            filler_start = token.end;
        }
        pos = token.end;
    }
    match stmt_start {
        Some(start) => chunks.push(Chunk::Statement(&script[start..])),
        None if filler_start < script.len() => chunks.push(Chunk::Filler(&script[filler_start..])),
        None => {}
    }
    chunks
}

/// The statements of a script, meta-commands and filler left out.
pub fn statements(script: &str) -> impl Iterator<Item = &str> {
    split(script).into_iter().filter_map(|c| match c {
        Chunk::Statement(s) => Some(s),
        _ => None,
    })
}

/// One word of a statement: a keyword or identifier as the server sees it (unquoted words
/// folded to lower case, quoted identifiers as written between the quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Word {
    Bare(String),
    Quoted(String),
}

impl Word {
    /// The name this word denotes.
    pub fn name(&self) -> &str {
        match self {
            Word::Bare(s) | Word::Quoted(s) => s,
        }
    }

    /// Whether this is the (unquoted) keyword `kw` (given in lower case).
    pub fn is(&self, kw: &str) -> bool {
        matches!(self, Word::Bare(s) if s == kw)
    }
}

/// The first `n` words of a statement; stops early at anything that is not a word
/// (a literal, an operator, `;`). Comments and whitespace are skipped.
pub fn leading_words(statement: &str, n: usize) -> Vec<Word> {
    let mut words = Vec::new();
    let mut pos = 0;
    while pos < statement.len() && words.len() < n {
        let token = next_token(statement, pos);
        let text = &statement[token.start..token.end];
        match token.kind {
            TokenKind::Space | TokenKind::Comment => {}
            TokenKind::Word => words.push(Word::Bare(text.to_ascii_lowercase())),
            TokenKind::QuotedIdent => {
                words.push(Word::Quoted(text[1..text.len() - 1].replace("\"\"", "\"")))
            }
            _ => break,
        }
        pos = token.end;
    }
    words
}

/// Replaces the literal after every `PASSWORD` keyword by `<redacted>`, so a statement from
/// a roles dump can be quoted in an error without leaking a password verifier.
pub fn redact_passwords(statement: &str) -> String {
    let mut out = String::with_capacity(statement.len());
    let mut pos = 0;
    let mut after_password = false;
    while pos < statement.len() {
        let token = next_token(statement, pos);
        let text = &statement[token.start..token.end];
        match token.kind {
            TokenKind::String if after_password => {
                out.push_str("<redacted>");
                after_password = false;
            }
            TokenKind::Space | TokenKind::Comment => out.push_str(text),
            _ => {
                after_password =
                    token.kind == TokenKind::Word && text.eq_ignore_ascii_case("password");
                out.push_str(text);
            }
        }
        pos = token.end;
    }
    out
}

/// Runs a whole script in one transaction: every statement takes effect, or none does.
/// On failure the transaction is rolled back (the connection stays usable) and the error
/// names the first statement that fails, found by replaying the script one statement at a
/// time in a transaction that is rolled back too.
///
/// A script setting session parameters (pg_dump's `search_path = ''` among them) would
/// leave them on the connection: after a successful run they are reset with `RESET ALL`.
pub async fn run_in_transaction(client: &Client, script: &str) -> Result<(), ScriptError> {
    if let Some(stmt) = statements(script).find(|s| is_transaction_control(s)) {
        return Err(ScriptError {
            message: "the script controls transactions itself, so it cannot be loaded atomically"
                .into(),
            statement: Some(excerpt(stmt)),
        });
    }
    // The newline before COMMIT ends a trailing `--` comment the script may end with.
    let batch = format!("BEGIN;\n{script}\n;COMMIT;RESET ALL;");
    let Err(batch_error) = client.batch_execute(&batch).await else {
        return Ok(());
    };
    let _ = client.batch_execute("ROLLBACK").await;
    let mut error = ScriptError {
        message: describe_error(&batch_error),
        statement: None,
    };
    if client.batch_execute("BEGIN").await.is_ok() {
        for stmt in statements(script) {
            if let Err(e) = client.batch_execute(stmt).await {
                error = ScriptError {
                    message: describe_error(&e),
                    statement: Some(excerpt(stmt)),
                };
                break;
            }
        }
        let _ = client.batch_execute("ROLLBACK; RESET ALL").await;
    }
    Err(error)
}

/// Why a script did not run: the server's message and, when found, the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError {
    pub message: String,
    /// The failing statement, passwords redacted, shortened to a few hundred characters.
    pub statement: Option<String>,
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(stmt) = &self.statement {
            write!(f, "; failing statement: {stmt}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ScriptError {}

/// A server error as one line: message (SQLSTATE), detail and hint.
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                s.push_str(&format!("; hint: {hint}"));
            }
            s
        }
        None => e.to_string(),
    }
}

fn is_transaction_control(statement: &str) -> bool {
    let words = leading_words(statement, 2);
    match words.first() {
        Some(w)
            if [
                "begin",
                "commit",
                "rollback",
                "abort",
                "savepoint",
                "release",
            ]
            .iter()
            .any(|k| w.is(k)) =>
        {
            true
        }
        Some(w) if w.is("end") => true,
        Some(w) if w.is("start") => words.get(1).is_some_and(|w| w.is("transaction")),
        _ => false,
    }
}

fn excerpt(statement: &str) -> String {
    const MAX: usize = 400;
    let text = redact_passwords(statement.trim());
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MAX) {
        Some((i, _)) => format!("{} …", &one_line[..i]),
        None => one_line,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Space,
    Comment,
    Word,
    QuotedIdent,
    String,
    Number,
    Semicolon,
    OpenParen,
    CloseParen,
    Backslash,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Token {
    kind: TokenKind,
    start: usize,
    end: usize,
}

/// What a statement has seen so far, to tell a terminating `;` from one inside parentheses
/// or inside the `BEGIN ATOMIC … END` body of `CREATE [OR REPLACE] FUNCTION|PROCEDURE`.
#[derive(Debug, Default)]
struct StatementState {
    /// First letters of the leading words, to recognise CREATE [OR REPLACE] FUNCTION.
    initials: Vec<u8>,
    word_count: usize,
    paren_depth: usize,
    begin_depth: usize,
}

impl StatementState {
    /// Takes one token; true when it ends the statement.
    fn accept(&mut self, token: &Token, text: &str) -> bool {
        match token.kind {
            TokenKind::OpenParen => self.paren_depth += 1,
            TokenKind::CloseParen => self.paren_depth = self.paren_depth.saturating_sub(1),
            TokenKind::Semicolon => return self.paren_depth == 0 && self.begin_depth == 0,
            TokenKind::Word => self.accept_word(&text.to_ascii_lowercase()),
            _ => {}
        }
        false
    }

    fn accept_word(&mut self, word: &str) {
        if self.word_count < 4
            && ["create", "function", "procedure", "or", "replace"].contains(&word)
        {
            self.initials.push(word.as_bytes()[0]);
        } else if self.word_count < 4 {
            self.initials.push(0);
        }
        self.word_count += 1;
        let i = &self.initials;
        let creates_routine = i.first() == Some(&b'c')
            && (matches!(i.get(1), Some(b'f' | b'p'))
                || (i.get(1) == Some(&b'o')
                    && i.get(2) == Some(&b'r')
                    && matches!(i.get(3), Some(b'f' | b'p'))));
        if !creates_routine || self.paren_depth > 0 {
            return;
        }
        match word {
            "begin" => self.begin_depth += 1,
            // CASE also ends with END; it only matters inside a BEGIN.
            "case" if self.begin_depth > 0 => self.begin_depth += 1,
            "end" => self.begin_depth = self.begin_depth.saturating_sub(1),
            _ => {}
        }
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

fn is_ident_char(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == '$'
}

/// The token starting at byte `pos` (which is on a char boundary).
fn next_token(s: &str, pos: usize) -> Token {
    let rest = &s[pos..];
    let mut chars = rest.char_indices();
    let (_, c) = chars.next().expect("pos < len");
    let next = rest[c.len_utf8()..].chars().next();
    let token = |kind, len: usize| Token {
        kind,
        start: pos,
        end: pos + len,
    };
    match c {
        c if c.is_whitespace() => {
            let len = rest
                .find(|c: char| !c.is_whitespace())
                .unwrap_or(rest.len());
            token(TokenKind::Space, len)
        }
        '-' if next == Some('-') => token(
            TokenKind::Comment,
            rest.find('\n').map_or(rest.len(), |i| i + 1),
        ),
        '/' if next == Some('*') => token(TokenKind::Comment, block_comment_len(rest)),
        '\'' => token(TokenKind::String, quoted_len(rest, '\'', false)),
        'e' | 'E' if next == Some('\'') => {
            token(TokenKind::String, 1 + quoted_len(&rest[1..], '\'', true))
        }
        '"' => token(TokenKind::QuotedIdent, quoted_len(rest, '"', false)),
        '$' => match dollar_tag(rest) {
            Some(tag) => {
                let body_end = rest[tag.len()..]
                    .find(tag)
                    .map_or(rest.len(), |i| tag.len() + i + tag.len());
                token(TokenKind::String, body_end)
            }
            None => {
                // `$1` (a parameter) or a lone `$`.
                let len = 1 + rest[1..]
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len() - 1);
                token(TokenKind::Other, len)
            }
        },
        c if is_ident_start(c) => {
            let len = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
            token(TokenKind::Word, len)
        }
        c if c.is_ascii_digit() => {
            let len = rest
                .find(|c: char| !(is_ident_char(c) || c == '.'))
                .unwrap_or(rest.len());
            token(TokenKind::Number, len)
        }
        ';' => token(TokenKind::Semicolon, 1),
        '(' => token(TokenKind::OpenParen, 1),
        ')' => token(TokenKind::CloseParen, 1),
        '\\' => token(TokenKind::Backslash, 1),
        c => token(TokenKind::Other, c.len_utf8()),
    }
}

/// Length of a `/* … */` comment (they nest); the rest of the text when unterminated.
fn block_comment_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut depth = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    s.len()
}

/// Length of a quoted token starting with `quote`; a doubled quote stands for itself, and
/// with `backslash_escapes` (E'' strings) a backslash escapes the next character.
fn quoted_len(s: &str, quote: char, backslash_escapes: bool) -> usize {
    let bytes = s.as_bytes();
    let q = quote as u8;
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if backslash_escapes => i += 2,
            b if b == q => {
                if bytes.get(i + 1) == Some(&q) {
                    i += 2;
                } else {
                    return i + 1;
                }
            }
            _ => i += 1,
        }
    }
    s.len()
}

/// The opening `$tag$` of a dollar-quoted string, if `s` starts with one.
fn dollar_tag(s: &str) -> Option<&str> {
    let body = &s[1..];
    let end = body.find('$')?;
    let tag = &body[..end];
    let valid = tag.chars().next().is_none_or(is_ident_start)
        && tag.chars().all(|c| is_ident_char(c) && c != '$');
    valid.then(|| &s[..end + 2])
}

#[cfg(test)]
mod tests;
