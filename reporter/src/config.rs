//! The reporter's settings: flags, each also read from the environment.

use std::time::Duration;

use clap::{Args, Parser};
use iac_shared::deploy::{DEFAULT_PUSH_ENV, PushEnv, parse_push_env};
use iac_shared::nats::{NatsArgs, parse_positive_duration, parse_secret};
use iac_shared::telemetry::LogArgs;
use reqwest::Url;
use secrecy::SecretString;

use crate::github::GithubClient;
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

    /// The environment pushes deploy to, as the worker's; results in any other environment
    /// name it in their contexts (`IaC Runner / Sync (staging)`). Empty for none.
    #[arg(
        long = "push-env",
        env = "PUSH_ENV",
        value_name = "PUSH_ENV",
        default_value = DEFAULT_PUSH_ENV,
        value_parser = parse_push_env
    )]
    pub push_env: PushEnv,

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
    pub web: WebArgs,
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
        value_parser = parse_secret
    )]
    pub token: Option<SecretString>,

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

impl GithubArgs {
    /// The client, or `None` without a token (log-only mode).
    pub fn client(&self) -> Result<Option<GithubClient>, reqwest::Error> {
        self.token
            .as_ref()
            .map(|token| GithubClient::new(self.api_url.clone(), token.clone(), self.timeout))
            .transpose()
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

    pub fn status_settings(&self) -> StatusSettings {
        StatusSettings {
            context: self.status_context.clone(),
            per_service: self.status_per_service,
            target_url: self.status_target_url.clone(),
            default_repository: self.github_repo.clone(),
            push_env: self.push_env.0.clone(),
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
        assert_eq!(config.status_context, "IaC Runner / Sync");
        assert_eq!(config.github.timeout, Duration::from_secs(10));
        assert_eq!(config.give_up_after, Duration::from_secs(30 * 60));
        // The one exception: `PUSH_ENV=` means "no push environment", as for the worker.
        assert_eq!(config.status_settings().push_env, None);
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
