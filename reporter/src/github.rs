//! The GitHub commit status client: one `POST`, its failures sorted into retry, wait for the
//! rate limit, or refused; and the shared gate that slows every post after a rate limit.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER, USER_AGENT};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};

use crate::app_auth::Installation;
use crate::status::Status;

/// `User-Agent` of every request.
pub const USER_AGENT_VALUE: &str = concat!("iac-runner/", env!("CARGO_PKG_VERSION"));
/// The REST API version the requests are written against.
pub const API_VERSION: &str = "2022-11-28";
/// GitHub's advice when a secondary rate limit gives no time: wait a minute.
pub const SECONDARY_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// How GitHub's message starts when a 403 is a secondary rate limit, which carries no
/// rate-limit headers: "You have exceeded a secondary rate limit. Please wait a few minutes…".
const SECONDARY_LIMIT_MESSAGE: &str = "exceeded a secondary rate limit";

/// Why a status was not posted.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// 401, 404, 422 and other refusals. A 404 or 422 can be passing (a repository being
    /// renamed or restored, a token's access being fixed), so these are retried until
    /// `STATUS_GIVE_UP_AFTER`; a 401 is [final](PostError::is_final).
    #[error("GitHub refused the status ({code}): {message}")]
    Refused { code: u16, message: String },
    /// 403/429 with rate-limit headers, 429, or a 403 saying it is a secondary rate limit:
    /// allowed again after `wait`. `code` is `None` when this process held the post back
    /// itself, after an earlier answer.
    #[error("GitHub rate limit reached, allowed again in {wait:?}")]
    RateLimited { wait: Duration, code: Option<u16> },
    /// 5xx, timeouts and connection errors.
    #[error("GitHub did not accept the status ({reason}): {detail}")]
    Transient {
        reason: &'static str,
        detail: String,
        code: Option<u16>,
    },
}

impl PostError {
    /// A 401: the token itself is refused, and every attempt until an operator changes it
    /// would be too, so the status is given up at once (kept in `IAC_UNDELIVERED`).
    pub fn is_final(&self) -> bool {
        matches!(self, PostError::Refused { code: 401, .. })
    }

    /// The HTTP status GitHub answered with, when it answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            PostError::Refused { code, .. } => Some(*code),
            PostError::RateLimited { code, .. } | PostError::Transient { code, .. } => *code,
        }
    }

    pub(crate) fn transport(e: reqwest::Error) -> Self {
        let reason = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connection"
        } else {
            "transport"
        };
        PostError::Transient {
            reason,
            // The log line names repository and commit already; the URL would repeat them.
            detail: e.without_url().to_string(),
            code: None,
        }
    }
}

/// Sorts a GitHub answer; `message` is GitHub's `message` field, when there is one.
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    message: &str,
    now_epoch: u64,
) -> Result<(), PostError> {
    if status.is_success() {
        return Ok(());
    }
    let code = status.as_u16();
    match code {
        403 | 429 => {
            let secondary = message
                .to_ascii_lowercase()
                .contains(SECONDARY_LIMIT_MESSAGE);
            match rate_limit_wait(headers, now_epoch) {
                // GitHub asks for at least a minute after a secondary limit, whatever it says.
                Some(wait) if secondary && code == 403 => Err(PostError::RateLimited {
                    wait: wait.max(SECONDARY_LIMIT_WAIT),
                    code: Some(code),
                }),
                Some(wait) => Err(PostError::RateLimited {
                    wait,
                    code: Some(code),
                }),
                None if code == 429 || secondary => Err(PostError::RateLimited {
                    wait: SECONDARY_LIMIT_WAIT,
                    code: Some(code),
                }),
                None => Err(refused(code, message)),
            }
        }
        408 | 500..=599 => Err(PostError::Transient {
            reason: "server_error",
            detail: format!("HTTP {code} {message}").trim().to_string(),
            code: Some(code),
        }),
        _ => Err(refused(code, message)),
    }
}

fn refused(code: u16, message: &str) -> PostError {
    let message = if message.is_empty() {
        "no reason given".to_string()
    } else {
        iac_shared::events::truncate_chars(message, 300)
    };
    PostError::Refused { code, message }
}

/// How long GitHub asks us to wait: `Retry-After` seconds, or until `x-ratelimit-reset` when
/// `x-ratelimit-remaining` is 0.
pub fn rate_limit_wait(headers: &HeaderMap, now_epoch: u64) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(seconds) = number(RETRY_AFTER.as_str()) {
        return Some(Duration::from_secs(seconds.max(1)));
    }
    if number("x-ratelimit-remaining") == Some(0) {
        let reset = number("x-ratelimit-reset")?;
        return Some(Duration::from_secs(reset.saturating_sub(now_epoch).max(1)));
    }
    None
}

/// `x-ratelimit-remaining`, when GitHub sent it.
pub fn rate_limit_remaining(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("x-ratelimit-remaining")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Seconds since the epoch, for `x-ratelimit-reset`.
pub fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The longest [`backoff`].
pub const BACKOFF_CAP: Duration = Duration::from_secs(120);

/// Exponential backoff for the `attempt`-th delivery (1-based), half fixed and half `jitter`
/// (0..1), capped at [`BACKOFF_CAP`].
pub fn backoff(attempt: i64, jitter: f64) -> Duration {
    const BASE: Duration = Duration::from_millis(250);
    const CAP: Duration = BACKOFF_CAP;
    let exponent = attempt.clamp(1, 20) as u32 - 1;
    let full = BASE.saturating_mul(2u32.saturating_pow(exponent)).min(CAP);
    full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// "Not before": after a rate limit every post of this process waits, not only the one that hit it.
#[derive(Debug, Default)]
pub struct Gate {
    not_before: Mutex<Option<Instant>>,
}

impl Gate {
    /// Holds every post for `wait` from now (a later hold wins).
    pub fn hold(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut not_before = self.not_before.lock().expect("gate lock");
        if not_before.is_none_or(|t| t < until) {
            *not_before = Some(until);
        }
    }

    /// How long posts must still wait, if at all.
    pub fn remaining(&self) -> Option<Duration> {
        let not_before = *self.not_before.lock().expect("gate lock");
        not_before
            .and_then(|t| t.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }
}

/// GitHub's answer to one post, with the rate limit it reported.
#[derive(Debug)]
pub struct Answer {
    pub result: Result<(), PostError>,
    /// `x-ratelimit-remaining`, when GitHub sent it.
    pub rate_limit_remaining: Option<i64>,
    /// The budget is spent even though this post was accepted: wait this long before the next.
    pub exhausted_for: Option<Duration>,
}

impl Answer {
    fn failed(error: PostError) -> Self {
        Answer {
            result: Err(error),
            rate_limit_remaining: None,
            exhausted_for: None,
        }
    }
}

/// How the client proves who it is: a token (`GITHUB_TOKEN`) or a GitHub App installation.
pub enum Auth {
    Token(SecretString),
    App(Installation),
}

/// Posts commit statuses and check runs with the token (the only holder of it).
pub struct GithubClient {
    http: reqwest::Client,
    api: Url,
    auth: Auth,
}

impl GithubClient {
    pub fn new(api: Url, auth: Auth, timeout: Duration) -> Result<Self, reqwest::Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/vnd.github+json"),
        );
        headers.insert(
            "x-github-api-version",
            HeaderValue::from_static(API_VERSION),
        );
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .default_headers(headers)
            .build()?;
        Ok(GithubClient { http, api, auth })
    }

    /// True with GitHub App authentication (check runs need it).
    pub fn is_app(&self) -> bool {
        matches!(self.auth, Auth::App(_))
    }

    fn repo_url(&self, repository: &str, rest: &str) -> String {
        format!(
            "{}/repos/{repository}/{rest}",
            self.api.as_str().trim_end_matches('/')
        )
    }

    /// Sends `body` with the token; with App authentication a 401 fetches a new installation
    /// token and sends once more (the token may have been revoked before it expired).
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: &impl serde::Serialize,
    ) -> Result<reqwest::Response, PostError> {
        let mut refreshed = false;
        loop {
            let token = match &self.auth {
                Auth::Token(token) => token.clone(),
                Auth::App(app) => app.token(&self.http).await?,
            };
            let Ok(mut authorization) =
                HeaderValue::try_from(format!("Bearer {}", token.expose_secret()))
            else {
                return Err(refused(
                    401,
                    "GITHUB_TOKEN holds characters a header cannot carry",
                ));
            };
            authorization.set_sensitive(true);
            let response = self
                .http
                .request(method.clone(), url)
                .header(AUTHORIZATION, authorization)
                .json(body)
                .send()
                .await
                .map_err(PostError::transport)?;
            if let (Auth::App(app), StatusCode::UNAUTHORIZED, false) =
                (&self.auth, response.status(), refreshed)
            {
                tracing::warn!("GitHub refused the installation token; fetching a new one");
                app.forget(&token).await;
                refreshed = true;
                continue;
            }
            return Ok(response);
        }
    }

    /// `POST /repos/{repository}/statuses/{commit}`.
    pub async fn post(&self, repository: &str, commit: &str, status: &Status) -> Answer {
        let url = self.repo_url(repository, &format!("statuses/{commit}"));
        let response = match self.send(reqwest::Method::POST, &url, status).await {
            Ok(response) => response,
            Err(error) => return Answer::failed(error),
        };
        let code = response.status();
        let headers = response.headers().clone();
        let message = if code.is_success() {
            String::new()
        } else {
            github_message(&response.bytes().await.unwrap_or_default())
        };
        let rate_limit_remaining = rate_limit_remaining(&headers);
        let result = classify(code, &headers, &message, now_epoch());
        let exhausted_for = (result.is_ok() && rate_limit_remaining == Some(0))
            .then(|| rate_limit_wait(&headers, now_epoch()))
            .flatten();
        Answer {
            result,
            rate_limit_remaining,
            exhausted_for,
        }
    }

    /// `POST /repos/{repository}/check-runs` (no `id`) or `PATCH …/check-runs/{id}`; returns
    /// the check run's id.
    pub async fn check_run(
        &self,
        repository: &str,
        id: Option<u64>,
        body: &serde_json::Value,
    ) -> Result<u64, PostError> {
        let (method, url) = match id {
            None => (
                reqwest::Method::POST,
                self.repo_url(repository, "check-runs"),
            ),
            Some(id) => (
                reqwest::Method::PATCH,
                self.repo_url(repository, &format!("check-runs/{id}")),
            ),
        };
        let response = self.send(method, &url, body).await?;
        let code = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(PostError::transport)?;
        let message = if code.is_success() {
            String::new()
        } else {
            github_message(&bytes)
        };
        classify(code, &headers, &message, now_epoch())?;
        #[derive(serde::Deserialize)]
        struct Created {
            id: u64,
        }
        match (id, serde_json::from_slice::<Created>(&bytes)) {
            (Some(id), _) => Ok(id),
            (None, Ok(created)) => Ok(created.id),
            (None, Err(e)) => Err(PostError::Transient {
                reason: "server_error",
                detail: format!("the created check run has no id: {e}"),
                code: Some(code.as_u16()),
            }),
        }
    }
}

/// GitHub's `message` (and the first validation error), or the start of a non-JSON body.
pub(crate) fn github_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        message: String,
        #[serde(default)]
        errors: Vec<serde_json::Value>,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) => match parsed.errors.first() {
            Some(first) => {
                let detail = first
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map_or_else(|| first.to_string(), str::to_string);
                format!("{} ({detail})", parsed.message)
            }
            None => parsed.message,
        },
        Err(_) => iac_shared::events::truncate_chars(&String::from_utf8_lossy(body), 200),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn refusals_are_sorted_apart_from_server_errors_and_only_a_401_is_final() {
        let none = HeaderMap::new();
        assert!(classify(StatusCode::CREATED, &none, "", 0).is_ok());
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, &none, "", 0),
            Err(PostError::Transient { .. })
        ));
        for code in [401, 404, 422] {
            let err =
                classify(StatusCode::from_u16(code).unwrap(), &none, "Not Found", 0).unwrap_err();
            assert!(
                matches!(err, PostError::Refused { code: c, ref message } if c == code && message == "Not Found"),
                "{err}"
            );
            assert_eq!(err.is_final(), code == 401, "{err}");
            assert_eq!(err.http_status(), Some(code));
        }
    }

    #[test]
    fn rate_limits_wait_for_retry_after_or_the_reset_time() {
        let retry_after = headers(&[("retry-after", "7")]);
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, &retry_after, "", 0),
            Err(PostError::RateLimited { wait, .. }) if wait == Duration::from_secs(7)
        ));
        let exhausted = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1030"),
        ]);
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, &exhausted, "", 1000),
            Err(PostError::RateLimited { wait, .. }) if wait == Duration::from_secs(30)
        ));
        assert!(matches!(
            classify(
                StatusCode::FORBIDDEN,
                &HeaderMap::new(),
                "Resource not accessible",
                0
            ),
            Err(PostError::Refused { code: 403, .. })
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), "", 0),
            Err(PostError::RateLimited { wait, .. }) if wait == SECONDARY_LIMIT_WAIT
        ));
    }

    #[test]
    fn a_secondary_rate_limit_403_without_headers_waits_a_minute_and_is_not_final() {
        let message = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.";
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, &HeaderMap::new(), message, 0),
            Err(PostError::RateLimited { wait, .. }) if wait >= Duration::from_secs(60)
        ));
        // Headers may ask for longer, never for less.
        for (seconds, wait) in [("90", 90), ("5", 60)] {
            let retry_after = headers(&[("retry-after", seconds)]);
            assert!(matches!(
                classify(StatusCode::FORBIDDEN, &retry_after, message, 0),
                Err(PostError::RateLimited { wait: w, .. }) if w == Duration::from_secs(wait)
            ));
        }
    }

    #[test]
    fn a_reset_time_in_the_past_still_waits_a_second() {
        let stale = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "5")]);
        assert_eq!(rate_limit_wait(&stale, 100), Some(Duration::from_secs(1)));
        let plenty = headers(&[("x-ratelimit-remaining", "4000")]);
        assert_eq!(rate_limit_wait(&plenty, 100), None);
        assert_eq!(rate_limit_remaining(&plenty), Some(4000));
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_and_a_cap() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(125));
        assert_eq!(backoff(1, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(3, 0.0), Duration::from_millis(500));
        assert!(backoff(30, 0.5) <= Duration::from_secs(120));
        assert!(backoff(30, 0.0) >= Duration::from_secs(60));
    }

    #[test]
    fn the_gate_holds_until_the_latest_deadline() {
        let gate = Gate::default();
        assert_eq!(gate.remaining(), None);
        gate.hold(Duration::from_secs(30));
        gate.hold(Duration::from_secs(1));
        assert!(gate.remaining().unwrap() > Duration::from_secs(20));
    }

    #[test]
    fn github_messages_are_read_from_the_error_body() {
        assert_eq!(github_message(br#"{"message":"Not Found"}"#), "Not Found");
        assert_eq!(
            github_message(
                br#"{"message":"Validation Failed","errors":[{"message":"sha is not a commit"}]}"#
            ),
            "Validation Failed (sha is not a commit)"
        );
        assert_eq!(github_message(b"bad gateway"), "bad gateway");
    }
}
