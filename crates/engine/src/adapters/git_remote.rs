//! Talking to a remote Git repository: telling URLs from paths, keeping credentials out of
//! logs, errors and `.git/config`, and authenticating fetches and pushes.
//!
//! Credentials travel only in memory: a URL such as `https://user:token@host/repo.git` is
//! used as is for the connection (libgit2 gets the user and token from the credentials
//! callback), but whatever is shown or stored is its redacted or credential-free form.

use git2::{Cred, CredentialType, FetchOptions, PushOptions, RemoteCallbacks, Repository};

/// Whether `repo` names a remote repository (a URL) rather than a path on disk.
pub fn is_url(repo: &str) -> bool {
    repo.contains("://")
}

/// `url` with its user information replaced by `***`, safe for logs and errors.
/// Tokens are often passed as the user name alone, so the whole user information goes.
pub fn redact_url(url: &str) -> String {
    match split_userinfo(url) {
        Some((scheme, _, rest)) => format!("{scheme}://***@{rest}"),
        None => url.to_string(),
    }
}

/// `url` without any user information: what may be written to disk (`remote.origin.url`).
pub fn strip_credentials(url: &str) -> String {
    match split_userinfo(url) {
        Some((scheme, _, rest)) => format!("{scheme}://{rest}"),
        None => url.to_string(),
    }
}

/// `text` (typically a libgit2 error message) with every appearance of `url`, and of its
/// user information, redacted.
pub fn redact_in(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    if let Some((_, userinfo, _)) = split_userinfo(url)
        && !userinfo.is_empty()
    {
        out = out.replace(userinfo, "***");
    }
    out
}

/// Splits `scheme://userinfo@rest` into its three parts; `None` when there is no user
/// information. The `@` must come before the first `/` of the path (an `@` in the path is
/// not user information).
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, after) = url.split_once("://")?;
    let authority_end = after.find('/').unwrap_or(after.len());
    let at = after[..authority_end].rfind('@')?;
    Some((scheme, &after[..at], &after[at + 1..]))
}

/// `url` (credential-free, `https://host/repo.git`) with `user` and `password` written
/// into it, percent-encoded: the form [`callbacks`] authenticates with.
pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let plain = strip_credentials(url);
    match plain.split_once("://") {
        Some((scheme, rest)) => format!(
            "{scheme}://{}:{}@{rest}",
            percent_encode(user),
            percent_encode(password)
        ),
        None => plain,
    }
}

/// `text` with every byte but the unreserved ones (RFC 3986) percent-encoded: safe in a
/// URL's user information or as one path segment.
pub(crate) fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The user name and password written in `url`, percent-decoded.
fn url_credentials(url: &str) -> Option<(String, String)> {
    let (_, userinfo, _) = split_userinfo(url)?;
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    Some((percent_decode(user), percent_decode(password)))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Callbacks answering libgit2's credential requests with the user and password from
/// `url`. libgit2 asks again after a refusal; answering the same thing forever would loop,
/// so the second request is refused.
pub fn callbacks<'a>(url: Option<&str>) -> RemoteCallbacks<'a> {
    let creds = url.and_then(url_credentials);
    let mut asked = false;
    let mut cbs = RemoteCallbacks::new();
    cbs.credentials(move |_url, _user_from_url, allowed| {
        let Some((user, password)) = &creds else {
            return Err(git2::Error::from_str(
                "the repository asks for credentials; put them in the URL",
            ));
        };
        if asked || !allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            return Err(git2::Error::from_str(
                "the credentials in the URL were refused",
            ));
        }
        asked = true;
        Cred::userpass_plaintext(user, password)
    });
    cbs
}

pub fn fetch_options(url: Option<&str>) -> FetchOptions<'static> {
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(callbacks(url));
    opts.download_tags(git2::AutotagOption::None);
    opts
}

pub fn push_options(callbacks: RemoteCallbacks<'_>) -> PushOptions<'_> {
    let mut opts = PushOptions::new();
    opts.remote_callbacks(callbacks);
    opts
}

/// A remote given by name (configured in `repo`) or by URL (used anonymously, so its
/// credentials never reach the configuration), and the URL to authenticate with.
pub fn find_remote<'r>(
    repo: &'r Repository,
    name_or_url: &str,
) -> anyhow::Result<(git2::Remote<'r>, Option<String>)> {
    if is_url(name_or_url) {
        let remote = repo.remote_anonymous(name_or_url).map_err(|e| {
            anyhow::anyhow!(
                "remote {}: {}",
                redact_url(name_or_url),
                redact_in(e.message(), name_or_url)
            )
        })?;
        Ok((remote, Some(name_or_url.to_string())))
    } else {
        let remote = repo
            .find_remote(name_or_url)
            .map_err(|e| anyhow::anyhow!("remote {name_or_url:?}: {}", e.message()))?;
        let url = remote.url().map(str::to_string);
        Ok((remote, url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_written_into_a_url_read_back_the_same() {
        let url = with_credentials("https://old@git.example/r.git", "bot", "p@ss:w/rd %");
        assert_eq!(url, "https://bot:p%40ss%3Aw%2Frd%20%25@git.example/r.git");
        assert_eq!(
            url_credentials(&url),
            Some(("bot".to_string(), "p@ss:w/rd %".to_string()))
        );
        assert_eq!(redact_url(&url), "https://***@git.example/r.git");
    }

    #[test]
    fn redacts_user_information() {
        assert_eq!(
            redact_url("https://bob:s3cret@git.example/r.git"),
            "https://***@git.example/r.git"
        );
        assert_eq!(
            redact_url("https://t0ken@git.example/r.git"),
            "https://***@git.example/r.git"
        );
        assert_eq!(
            redact_url("https://git.example/a@b/r.git"),
            "https://git.example/a@b/r.git"
        );
        assert_eq!(redact_url("file:///srv/r.git"), "file:///srv/r.git");
        assert_eq!(redact_url("/srv/r.git"), "/srv/r.git");
        assert_eq!(
            strip_credentials("http://u:p@127.0.0.1:8080/r"),
            "http://127.0.0.1:8080/r"
        );
    }

    #[test]
    fn redacts_urls_inside_messages() {
        let url = "https://bob:s3cret@git.example/r.git";
        let msg = format!("failed to fetch {url}: bob:s3cret refused");
        let clean = redact_in(&msg, url);
        assert!(!clean.contains("s3cret"), "{clean}");
        assert_eq!(
            clean,
            "failed to fetch https://***@git.example/r.git: *** refused"
        );
    }

    #[test]
    fn decodes_credentials() {
        assert_eq!(
            url_credentials("https://bob:p%40ss%2Fw@h/r"),
            Some(("bob".to_string(), "p@ss/w".to_string()))
        );
        assert_eq!(
            url_credentials("https://tok@h/r"),
            Some(("tok".to_string(), String::new()))
        );
        assert_eq!(url_credentials("https://h/r"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
