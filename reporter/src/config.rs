//! The reporter's settings: flags, each also read from the environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use iac_shared::deploy::EnvironmentArgs;
use iac_shared::nats::{NatsArgs, parse_positive_duration, parse_secret};
use iac_shared::telemetry::LogArgs;
use reqwest::Url;
use secrecy::SecretString;

use crate::app_auth::{AppAuthError, AppCredentials, Installation};
use crate::github::{Auth, GithubClient};
use crate::status::{StatusSettings, is_valid_repository};

/// Posts GitHub commit statuses from iac-runner results.
#[derive(Debug, Clone, Parser)]
#[command(name = "iac-reporter", version, about)]
pub struct Config {
    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(flatten)]
    pub github: GithubArgs,

    /// `owner/repo` to report on when an event does not name its repository.
    #[arg(
        long = "github-repo",
        env = "GITHUB_REPO",
        value_name = "GITHUB_REPO",
        value_parser = parse_repository
    )]
    pub github_repo: Option<String>,

    /// Context of the whole-sync status; per-service statuses replace its last part.
    #[arg(
        long = "status-context",
        env = "STATUS_CONTEXT",
        value_name = "STATUS_CONTEXT",
        default_value = "IaC Runner / Sync",
        value_parser = parse_context
    )]
    pub status_context: String,

    /// `PUSH_ENV` (and `DEPLOY_ENVS`), as the worker's: results in any other environment than
    /// the push one name it in their contexts (`IaC Runner / Sync (staging)`).
    #[command(flatten)]
    pub environments: EnvironmentArgs,

    /// Also post one status per service (`IaC Runner / <service>`).
    #[arg(
        long = "status-per-service",
        env = "STATUS_PER_SERVICE",
        value_name = "STATUS_PER_SERVICE",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub status_per_service: bool,

    /// Link of each status; `{commit}`, `{repository}` and `{event_id}` are filled in.
    #[arg(
        long = "status-target-url",
        env = "STATUS_TARGET_URL",
        value_name = "STATUS_TARGET_URL",
        value_parser = parse_target_url
    )]
    pub status_target_url: Option<String>,

    /// Port of `/metrics`, `/health` and `/ready` (0 = off).
    #[arg(
        long = "metrics-port",
        env = "METRICS_PORT",
        value_name = "METRICS_PORT",
        default_value_t = 0
    )]
    pub metrics_port: u16,

    /// Messages this process handles at once.
    #[arg(
        long = "reporter-concurrency",
        env = "REPORTER_CONCURRENCY",
        value_name = "REPORTER_CONCURRENCY",
        default_value_t = 8,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub concurrency: u16,

    /// How long a status GitHub keeps refusing (or not answering) is tried before it is given
    /// up and kept in IAC_UNDELIVERED, e.g. `30m`; a 401 is given up at once.
    #[arg(
        long = "status-give-up-after",
        env = "STATUS_GIVE_UP_AFTER",
        value_name = "STATUS_GIVE_UP_AFTER",
        default_value = "30m",
        value_parser = parse_positive_duration
    )]
    pub give_up_after: Duration,

    #[command(flatten)]
    pub notify: NotifyArgs,

    #[command(flatten)]
    pub checks: ChecksArgs,

    #[command(flatten)]
    pub web: WebArgs,
}

/// Check runs, and whether commit statuses still flow beside them.
#[derive(Debug, Clone, Args)]
pub struct ChecksArgs {
    /// One check run per service and sync (`IaC Runner / <service>`), with its output and a
    /// Re-run button; needs GitHub App authentication.
    #[arg(
        long = "check-runs",
        env = "CHECK_RUNS",
        value_name = "CHECK_RUNS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub check_runs: bool,

    /// Post commit statuses (`false` leaves only the check runs).
    #[arg(
        long = "commit-statuses",
        env = "COMMIT_STATUSES",
        value_name = "COMMIT_STATUSES",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub commit_statuses: bool,
}

/// Where failures and recoveries are announced (`NOTIFY_*`); off without `NOTIFY_URL`.
#[derive(Debug, Clone, Args)]
pub struct NotifyArgs {
    /// Receives one JSON POST when a service's sync starts failing and one when it recovers.
    /// Kept secret: a chat webhook's URL is its password.
    #[arg(
        id = "notify_url",
        long = "notify-url",
        env = "NOTIFY_URL",
        value_name = "NOTIFY_URL",
        hide_env_values = true,
        value_parser = parse_notify_url
    )]
    pub url: Option<SecretString>,

    /// Signs each notification (`X-Hub-Signature-256`, HMAC-SHA256 of the body).
    #[arg(
        id = "notify_secret",
        long = "notify-secret",
        env = "NOTIFY_SECRET",
        value_name = "NOTIFY_SECRET",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub secret: Option<SecretString>,

    /// `json` (the notification as it is) or `slack` (`{"text": ...}` for an incoming webhook).
    #[arg(
        id = "notify_format",
        long = "notify-format",
        env = "NOTIFY_FORMAT",
        value_name = "NOTIFY_FORMAT",
        default_value = "json"
    )]
    pub format: NotifyFormat,

    /// How long a notification the endpoint keeps refusing (or not answering) is tried before
    /// it is given up, e.g. `1h`.
    #[arg(
        id = "notify_give_up_after",
        long = "notify-give-up-after",
        env = "NOTIFY_GIVE_UP_AFTER",
        value_name = "NOTIFY_GIVE_UP_AFTER",
        default_value = "1h",
        value_parser = parse_positive_duration
    )]
    pub give_up_after: Duration,

    /// Time limit of one notification request, e.g. `10s`.
    #[arg(
        id = "notify_timeout",
        long = "notify-timeout",
        env = "NOTIFY_TIMEOUT",
        value_name = "NOTIFY_TIMEOUT",
        default_value = "10s",
        value_parser = parse_positive_duration
    )]
    pub timeout: Duration,
}

/// The body a notification is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyFormat {
    Json,
    Slack,
}

/// An http(s) URL; the error never repeats it, as it may hold a token.
fn parse_notify_url(s: &str) -> Result<SecretString, String> {
    let url = Url::parse(s.trim()).map_err(|_| "not a URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected an http(s) URL".into());
    }
    Ok(SecretString::from(url.to_string()))
}

// Run pages: the web server, its links and who may see the list.

/// The run pages (`/runs`, `/runs/<id>`) and the links statuses carry to them.
#[derive(Debug, Clone, Args)]
pub struct WebArgs {
    /// Port of the run pages (0 = off).
    #[arg(
        id = "web_port",
        long = "web-port",
        env = "WEB_PORT",
        value_name = "WEB_PORT",
        default_value_t = 8081
    )]
    pub port: u16,

    /// Address the run pages are reached at from outside (`https://ci.example.com`); with it,
    /// every status links to its run page, in place of STATUS_TARGET_URL.
    #[arg(
        id = "public_url",
        long = "public-url",
        env = "PUBLIC_URL",
        value_name = "PUBLIC_URL",
        value_parser = parse_public_url
    )]
    pub public_url: Option<Url>,

    /// Secret the run links are signed with; unset, one is generated once and kept in the
    /// IAC_RUN_LINKS bucket, shared by every reporter.
    #[arg(
        id = "run_link_secret",
        long = "run-link-secret",
        env = "RUN_LINK_SECRET",
        value_name = "RUN_LINK_SECRET",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub run_link_secret: Option<SecretString>,

    /// User of the run list (`/runs`), with WEB_PASSWORD; without both the list is off.
    #[arg(
        id = "web_user",
        long = "web-user",
        env = "WEB_USER",
        value_name = "WEB_USER",
        requires = "web_password"
    )]
    pub user: Option<String>,

    /// Password of the run list.
    #[arg(
        id = "web_password",
        long = "web-password",
        env = "WEB_PASSWORD",
        value_name = "WEB_PASSWORD",
        hide_env_values = true,
        requires = "web_user",
        value_parser = parse_secret
    )]
    pub password: Option<SecretString>,
}

fn parse_public_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected an http(s) URL such as https://ci.example.com".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(url)
}

/// How to reach GitHub: the service's settings, and those of `undelivered replay`.
#[derive(Debug, Clone, Args)]
pub struct GithubArgs {
    /// GitHub token allowed to create commit statuses; without it statuses are only logged.
    #[arg(
        id = "github_token",
        long = "github-token",
        env = "GITHUB_TOKEN",
        value_name = "GITHUB_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret,
        conflicts_with_all = ["github_app_id", "github_app_private_key_file", "github_app_installation_id"]
    )]
    pub token: Option<SecretString>,

    #[command(flatten)]
    pub app: GithubAppArgs,

    /// GitHub REST API base URL (GitHub Enterprise: https://HOST/api/v3).
    #[arg(
        id = "github_api_url",
        long = "github-api-url",
        env = "GITHUB_API_URL",
        value_name = "GITHUB_API_URL",
        default_value = "https://api.github.com",
        value_parser = parse_api_url
    )]
    pub api_url: Url,

    /// Time limit of one GitHub request, e.g. `10s`.
    #[arg(
        id = "github_timeout",
        long = "github-timeout",
        env = "GITHUB_TIMEOUT",
        value_name = "GITHUB_TIMEOUT",
        default_value = "10s",
        value_parser = parse_positive_duration
    )]
    pub timeout: Duration,
}

/// GitHub App authentication, the alternative to `GITHUB_TOKEN`: all three or none.
#[derive(Debug, Clone, Args)]
pub struct GithubAppArgs {
    /// The GitHub App's id (its settings page, "App ID").
    #[arg(
        id = "github_app_id",
        long = "github-app-id",
        env = "GITHUB_APP_ID",
        value_name = "GITHUB_APP_ID",
        requires_all = ["github_app_private_key_file", "github_app_installation_id"]
    )]
    pub app_id: Option<u64>,

    /// The App's private key (PEM, as GitHub generates it), a file only the reporter reads.
    #[arg(
        id = "github_app_private_key_file",
        long = "github-app-private-key-file",
        env = "GITHUB_APP_PRIVATE_KEY_FILE",
        value_name = "GITHUB_APP_PRIVATE_KEY_FILE",
        requires_all = ["github_app_id", "github_app_installation_id"]
    )]
    pub private_key_file: Option<PathBuf>,

    /// The installation of the App on the repository's account (the number ending its
    /// installation's settings URL).
    #[arg(
        id = "github_app_installation_id",
        long = "github-app-installation-id",
        env = "GITHUB_APP_INSTALLATION_ID",
        value_name = "GITHUB_APP_INSTALLATION_ID",
        requires_all = ["github_app_id", "github_app_private_key_file"]
    )]
    pub installation_id: Option<u64>,
}

/// Why the GitHub client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    App(#[from] AppAuthError),
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl GithubArgs {
    /// The client, or `None` with neither a token nor an App (log-only mode).
    pub fn client(&self) -> Result<Option<GithubClient>, ClientError> {
        let auth = match (&self.token, &self.app) {
            (Some(token), _) => Auth::Token(token.clone()),
            (
                None,
                GithubAppArgs {
                    app_id: Some(app_id),
                    private_key_file: Some(key),
                    installation_id: Some(installation_id),
                },
            ) => {
                let credentials = AppCredentials::load(*app_id, *installation_id, key)?;
                Auth::App(Installation::new(credentials, &self.api_url))
            }
            _ => return Ok(None),
        };
        Ok(Some(GithubClient::new(
            self.api_url.clone(),
            auth,
            self.timeout,
        )?))
    }

    /// How long a lease covers one post: the timeout plus [`crate::order::LEASE_MARGIN`].
    pub fn lease(&self) -> Duration {
        self.timeout + crate::order::LEASE_MARGIN
    }
}

impl Config {
    /// Parses `args` (the first is the program name) and the environment, as the binary does.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Config::try_parse_from(args)
    }

    /// What clap cannot check: check runs need GitHub App authentication.
    pub fn validate(&self) -> Result<(), String> {
        if self.checks.check_runs && self.github.app.app_id.is_none() {
            return Err(
                "CHECK_RUNS=true needs GitHub App authentication (GITHUB_APP_ID, \
                 GITHUB_APP_PRIVATE_KEY_FILE, GITHUB_APP_INSTALLATION_ID): a GITHUB_TOKEN \
                 cannot create check runs"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn status_settings(&self) -> StatusSettings {
        StatusSettings {
            context: self.status_context.clone(),
            per_service: self.status_per_service,
            target_url: self.status_target_url.clone(),
            default_repository: self.github_repo.clone(),
            push_env: self.environments.push_env.0.clone(),
            run_links: None,
        }
    }
}

fn parse_api_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected an http(s) URL such as https://api.github.com".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(url)
}

fn parse_repository(s: &str) -> Result<String, String> {
    if is_valid_repository(s) {
        Ok(s.to_string())
    } else {
        Err("expected owner/repo".into())
    }
}

fn parse_context(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

fn parse_target_url(s: &str) -> Result<String, String> {
    let sample = s
        .replace("{commit}", "0123abc")
        .replace("{repository}", "owner/repo")
        .replace("{event_id}", "event");
    let url = Url::parse(&sample).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("expected an http(s) URL".into());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("iac-reporter").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_documentation() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.github.api_url.as_str(), "https://api.github.com/");
        assert_eq!(config.status_context, "IaC Runner / Sync");
        assert!(!config.status_per_service);
        assert_eq!(config.concurrency, 8);
        assert_eq!(config.metrics_port, 0);
        assert_eq!(config.github.timeout, Duration::from_secs(10));
        assert_eq!(config.give_up_after, Duration::from_secs(30 * 60));
    }

    #[test]
    fn bad_values_are_refused_naming_the_variable() {
        for (args, name) in [
            (&["--github-api-url", "ftp://x"][..], "GITHUB_API_URL"),
            (&["--github-repo", "just-a-name"][..], "GITHUB_REPO"),
            (&["--reporter-concurrency", "0"][..], "REPORTER_CONCURRENCY"),
            (&["--github-timeout", "0s"][..], "GITHUB_TIMEOUT"),
            (&["--status-give-up-after", "0"][..], "STATUS_GIVE_UP_AFTER"),
            (
                &["--status-target-url", "not a url"][..],
                "STATUS_TARGET_URL",
            ),
            (&["--notify-url", "ftp://x"][..], "NOTIFY_URL"),
            (&["--notify-format", "teams"][..], "NOTIFY_FORMAT"),
            (&["--notify-give-up-after", "0"][..], "NOTIFY_GIVE_UP_AFTER"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(name), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_token_is_never_printed() {
        let config = parse(&["--github-token", "ghp_supersecret"]).unwrap();
        assert!(!format!("{config:?}").contains("ghp_supersecret"));
    }

    #[test]
    fn notifications_are_off_until_a_url_is_given_and_their_secret_is_never_printed() {
        let config = parse(&[]).unwrap();
        assert!(config.notify.url.is_none());
        assert_eq!(config.notify.format, NotifyFormat::Json);
        assert_eq!(config.notify.give_up_after, Duration::from_secs(3600));
        let config = parse(&[
            "--notify-url",
            "https://hooks.example.com/services/T0/B0/webhooktoken",
            "--notify-secret",
            "notify-supersecret",
            "--notify-format",
            "slack",
        ])
        .unwrap();
        assert_eq!(config.notify.format, NotifyFormat::Slack);
        let printed = format!("{config:?}");
        assert!(!printed.contains("notify-supersecret"), "{printed}");
        assert!(!printed.contains("webhooktoken"), "{printed}");
    }

    #[test]
    fn empty_variables_count_as_unset() {
        use clap::CommandFactory;
        use iac_shared::cli::Invocation;
        #[derive(Debug, clap::Subcommand)]
        enum Operation {
            Status,
        }
        if !iac_shared::env::in_child_with_empty_variables(
            module_path!(),
            "empty_variables_count_as_unset",
            &Config::command(),
        ) {
            return;
        }
        // The path the binary takes.
        let invocation = Invocation::<Config, Operation>::try_parse_from(["iac-reporter"]);
        let Ok(Invocation::Serve(config)) = invocation else {
            panic!("{invocation:?}");
        };
        assert!(config.github.token.is_none());
        assert!(config.github_repo.is_none());
        assert!(config.status_target_url.is_none());
        assert!(config.notify.url.is_none() && config.notify.secret.is_none());
        assert_eq!(config.status_context, "IaC Runner / Sync");
        assert_eq!(config.github.timeout, Duration::from_secs(10));
        assert_eq!(config.give_up_after, Duration::from_secs(30 * 60));
        // The one exception: `PUSH_ENV=` means "no push environment", as for the worker.
        assert_eq!(config.status_settings().push_env, None);
    }

    #[test]
    fn a_token_and_an_app_together_are_refused_naming_both() {
        let err = parse(&[
            "--github-token",
            "ghp_x",
            "--github-app-id",
            "1",
            "--github-app-private-key-file",
            "/k.pem",
            "--github-app-installation-id",
            "2",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("GITHUB_TOKEN") && err.contains("GITHUB_APP"),
            "{err}"
        );
    }

    #[test]
    fn an_app_needs_its_id_key_and_installation_together() {
        let err = parse(&["--github-app-id", "1"]).unwrap_err().to_string();
        assert!(err.contains("GITHUB_APP_PRIVATE_KEY_FILE"), "{err}");
        assert!(err.contains("GITHUB_APP_INSTALLATION_ID"), "{err}");
    }

    #[test]
    fn check_runs_are_refused_without_an_app_and_statuses_flow_by_default() {
        let config = parse(&["--github-token", "ghp_x", "--check-runs", "true"]).unwrap();
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("CHECK_RUNS") && err.contains("GITHUB_APP_ID"),
            "{err}"
        );
        let app = parse(&[
            "--github-app-id",
            "1",
            "--github-app-private-key-file",
            "/k.pem",
            "--github-app-installation-id",
            "2",
            "--check-runs",
            "true",
        ])
        .unwrap();
        assert!(app.validate().is_ok());
        assert!(app.checks.commit_statuses);
    }

    #[test]
    fn run_pages_listen_on_8081_and_their_settings_are_checked_and_kept_secret() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.web.port, 8081);
        assert!(config.web.public_url.is_none() && config.web.user.is_none());
        for (args, name) in [
            (&["--public-url", "ftp://ci.example"][..], "PUBLIC_URL"),
            (
                &["--public-url", "https://ci.example/?x=1"][..],
                "PUBLIC_URL",
            ),
            (&["--web-user", "ops"][..], "WEB_PASSWORD"),
            (&["--web-password", "pw"][..], "WEB_USER"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(name), "{args:?}: {err}");
        }
        let config = parse(&[
            "--web-user",
            "ops",
            "--web-password",
            "list-password",
            "--run-link-secret",
            "link-secret",
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("list-password") && !shown.contains("link-secret"));
    }

    #[test]
    fn the_give_up_budget_takes_bare_seconds_like_the_other_durations() {
        let config = parse(&["--status-give-up-after", "90"]).unwrap();
        assert_eq!(config.give_up_after, Duration::from_secs(90));
    }

    #[test]
    fn pushes_deploy_to_production_unless_told_otherwise() {
        let parse = |args: &[&str]| {
            Config::from_args([&["iac-reporter"][..], args].concat())
                .unwrap()
                .status_settings()
                .push_env
        };
        assert_eq!(parse(&[]).as_deref(), Some("production"));
        assert_eq!(
            parse(&["--push-env", "staging"]).as_deref(),
            Some("staging")
        );
        let err = Config::from_args(["iac-reporter", "--push-env", "Staging"]).unwrap_err();
        assert!(err.to_string().contains("PUSH_ENV"), "{err}");
    }
}
