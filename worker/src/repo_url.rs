//! `GIT_REPO_URL` and the credentials it may carry: parsed once, shown only redacted, and
//! scrubbed from every message that might echo them (git's errors, task output).

use std::fmt;

use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};

/// `GIT_REPO_URL`: printed and logged only with its credentials replaced by `***`.
#[derive(Clone)]
pub struct RepoUrl(SecretString);

impl RepoUrl {
    pub fn new(url: &str) -> Self {
        RepoUrl(SecretString::from(url))
    }

    /// The URL as git needs it, credentials included. Never log this.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL with any user information replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }

    /// The secrets this URL carries: its user information, and the password or token alone.
    pub fn secrets(&self) -> Vec<&str> {
        let mut secrets = Vec::new();
        if let Some(userinfo) = userinfo(self.expose()) {
            secrets.push(userinfo);
            if let Some((_, password)) = userinfo.split_once(':')
                && password.len() >= 4
            {
                secrets.push(password);
            }
        }
        secrets
    }

    /// The URL git is given. An http(s) URL loses its user information: git gets the
    /// credentials from [`RepoUrl::http_credentials`] through a helper, so they are never
    /// written into the checkout's `.git/config`, where a task could read them. Any other URL
    /// (ssh, scp-like, a path) is given as it is: its user name is not a secret.
    pub fn for_git(&self) -> String {
        match self.http_parts() {
            Some((scheme, _, rest)) => format!("{scheme}://{rest}"),
            None => self.expose().to_string(),
        }
    }

    /// The user name and password of an http(s) URL, percent-decoded as git would.
    pub fn http_credentials(&self) -> Option<(String, SecretString)> {
        let (_, userinfo, _) = self.http_parts()?;
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        Some((decode(user), SecretString::from(decode(password))))
    }

    /// (scheme, userinfo, the rest after `@`) of an http(s) URL with user information.
    fn http_parts(&self) -> Option<(&str, &str, &str)> {
        let url = self.expose();
        let (scheme, rest) = url.split_once("://")?;
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return None;
        }
        let userinfo = userinfo(url)?;
        Some((scheme, userinfo, &rest[userinfo.len() + 1..]))
    }

    /// `text` without this URL's credentials, wherever they appear.
    pub fn scrub(&self, text: &str) -> String {
        redact_text(text, &self.secrets())
    }

    /// Refuses what is not a usable repository URL; messages show it redacted. The checkout's
    /// directory is named after the last path segment, so `.` and `..` are refused: they would
    /// put the checkout on the workspace itself or outside it.
    pub fn check(&self) -> Result<(), String> {
        let url = self.expose();
        if url.is_empty() {
            return Err("must not be empty".into());
        }
        if url.starts_with('-') || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("not a git URL: {}", self.redacted()));
        }
        let segments = self.path_segments();
        match segments.last().map(String::as_str) {
            None => Err(format!("no repository path in {}", self.redacted())),
            Some(name @ ("." | "..")) => Err(format!(
                "the repository name {name:?} cannot name a checkout directory: {}",
                self.redacted()
            )),
            Some(_) => Ok(()),
        }
    }

    /// The checkout's directory name: the last path segment without `.git`.
    pub fn repo_name(&self) -> String {
        let path = self.path_segments();
        path.last().cloned().unwrap_or_else(|| "repo".to_string())
    }

    /// `owner/name` for results of manual syncs (pushes carry their own).
    pub fn owner_and_name(&self) -> Option<String> {
        let segments = self.path_segments();
        match segments.as_slice() {
            [.., owner, name] => Some(format!("{owner}/{name}")),
            _ => None,
        }
    }

    fn path_segments(&self) -> Vec<String> {
        let url = self.expose();
        let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority_end = without_scheme.find('/').unwrap_or(without_scheme.len());
        let without_userinfo = match without_scheme[..authority_end].rfind('@') {
            Some(at) => &without_scheme[at + 1..],
            None => without_scheme,
        };
        let without_query = without_userinfo
            .split(['?', '#'])
            .next()
            .unwrap_or_default();
        // `git@host:owner/name.git` (scp-like) separates host and path with a colon.
        without_query
            .split(['/', ':'])
            .skip(usize::from(url.contains("://") || !url.starts_with('/')))
            .filter(|s| !s.is_empty())
            .map(|s| s.strip_suffix(".git").unwrap_or(s).to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

impl fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The user information of a `scheme://user:secret@host/...` URL.
pub fn userinfo(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    authority.rfind('@').map(|at| &authority[..at])
}

/// `url` with its user information replaced by `***`.
pub fn redact_url(url: &str) -> String {
    redact_text(url, &[])
}

/// `text` with every `scheme://userinfo@` turned into `scheme://***@`, and every occurrence
/// of each of `secrets` (however it reached the text) as well.
pub fn redact_text(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "***");
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || matches!(c, '\'' | '"' | '<' | '>'))
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_come_from_the_url_path() {
        let https = RepoUrl::new("https://user:tok@github.com/acme/infra.git");
        assert_eq!(https.repo_name(), "infra");
        assert_eq!(https.owner_and_name().as_deref(), Some("acme/infra"));
        let scp = RepoUrl::new("git@github.com:acme/infra.git");
        assert_eq!(scp.repo_name(), "infra");
        assert_eq!(scp.owner_and_name().as_deref(), Some("acme/infra"));
        let local = RepoUrl::new("/srv/git/infra.git");
        assert_eq!(local.repo_name(), "infra");
        assert_eq!(local.owner_and_name().as_deref(), Some("git/infra"));
        let bare = RepoUrl::new("https://host/infra");
        assert_eq!(bare.repo_name(), "infra");
        assert_eq!(bare.owner_and_name(), None);
    }

    #[test]
    fn the_repository_url_never_prints_its_credentials() {
        let url = RepoUrl::new("https://deploy:s3cret@github.com/acme/infra.git");
        assert_eq!(format!("{url}"), "https://***@github.com/acme/infra.git");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn credentials_in_urls_are_replaced() {
        assert_eq!(
            redact_url("https://user:tok@github.com/acme/infra.git"),
            "https://***@github.com/acme/infra.git"
        );
        assert_eq!(
            redact_url("https://github.com/acme/infra.git"),
            "https://github.com/acme/infra.git"
        );
        assert_eq!(redact_url("/srv/git/infra.git"), "/srv/git/infra.git");
        assert_eq!(
            redact_url("ssh://git@host:22/a@b/c"),
            "ssh://***@host:22/a@b/c"
        );
    }

    #[test]
    fn credentials_in_git_messages_are_replaced_wherever_they_appear() {
        let stderr = "fatal: unable to access 'https://deploy:hunter2@git.example/acme/infra.git/': \
                      Could not resolve host\nremote: token hunter2 rejected";
        let clean = redact_text(stderr, &["deploy:hunter2", "hunter2"]);
        assert!(!clean.contains("hunter2"), "{clean}");
        assert!(
            clean.contains("https://***@git.example/acme/infra.git/"),
            "{clean}"
        );
        let clean = redact_text("see http://a:b@x and https://c:d@y/z", &[]);
        assert_eq!(clean, "see http://***@x and https://***@y/z");
    }

    #[test]
    fn user_information_is_found_only_in_the_authority() {
        assert_eq!(userinfo("https://u:p@host/x"), Some("u:p"));
        assert_eq!(userinfo("https://host/x@y"), None);
        assert_eq!(userinfo("/local/path"), None);
    }

    #[test]
    fn a_repository_named_dot_or_dot_dot_is_refused() {
        for url in [
            "https://x/acme/..",
            "https://x/acme/.",
            "https://x/acme/...git",
            "/srv/git/..",
        ] {
            let err = RepoUrl::new(url).check().unwrap_err();
            assert!(
                err.contains("cannot name a checkout directory"),
                "{url}: {err}"
            );
        }
        assert!(RepoUrl::new("https://x/acme/infra.git").check().is_ok());
        assert!(RepoUrl::new("https://x/acme/.infra").check().is_ok());
    }

    #[test]
    fn http_credentials_leave_the_url_git_is_given() {
        let url = RepoUrl::new("https://x-access-token:p%40ss%3Aword@github.com/acme/infra.git");
        assert_eq!(url.for_git(), "https://github.com/acme/infra.git");
        let (user, password) = url.http_credentials().unwrap();
        assert_eq!(user, "x-access-token");
        assert_eq!(password.expose_secret(), "p@ss:word");
        let token_only = RepoUrl::new("https://ghp_token@github.com/acme/infra.git");
        let (user, password) = token_only.http_credentials().unwrap();
        assert_eq!((user.as_str(), password.expose_secret()), ("ghp_token", ""));
        for kept in [
            "ssh://git@github.com/acme/infra.git",
            "git@github.com:acme/infra.git",
            "https://github.com/acme/infra.git",
            "/srv/git/infra.git",
        ] {
            let url = RepoUrl::new(kept);
            assert_eq!(url.for_git(), kept);
            assert!(url.http_credentials().is_none(), "{kept}");
        }
    }
}
