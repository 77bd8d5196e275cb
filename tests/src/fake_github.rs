//! A fake GitHub commit status API (wiremock) that records every request in arrival order and
//! can answer slowly, with server errors, rate limits, or refusals; started as a GitHub App's
//! API ([`FakeGithub::start_app`]) it also verifies App JWTs, issues short-lived installation
//! tokens (refusing expired or revoked ones with a 401) and keeps check runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// One request to `POST /repos/{owner}/{repo}/statuses/{sha}`, as received.
#[derive(Debug, Clone)]
pub struct StatusRequest {
    /// Arrival order, from 1.
    pub number: u64,
    pub method: String,
    pub path: String,
    /// `owner/repo` from the path.
    pub repository: String,
    pub commit: String,
    pub body: serde_json::Value,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The HTTP code the fake answered with.
    pub answered: u16,
    /// When the request arrived.
    pub arrived: Instant,
    /// When the answer was sent: a status takes effect when GitHub answers, not on arrival.
    pub landed: Instant,
}

impl StatusRequest {
    pub fn state(&self) -> &str {
        self.body["state"].as_str().unwrap_or_default()
    }

    pub fn description(&self) -> &str {
        self.body["description"].as_str().unwrap_or_default()
    }

    pub fn context(&self) -> &str {
        self.body["context"].as_str().unwrap_or_default()
    }

    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

/// How the fake misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every n-th request is answered `502 Bad Gateway`.
    pub bad_gateway_every: Option<u64>,
    /// Every n-th request is answered `429` with `Retry-After: <seconds>`.
    pub rate_limit_every: Option<(u64, u64)>,
    /// The first n requests are answered `403` with `x-ratelimit-remaining: 0` and a
    /// `x-ratelimit-reset` this many seconds ahead.
    pub exhausted_first: Option<(u64, u64)>,
    /// The first n requests are answered `403` with GitHub's secondary-rate-limit message and
    /// no rate-limit headers.
    pub secondary_limit_first: Option<u64>,
    /// Statuses on these commits are refused with (code, message).
    pub refused_commits: HashMap<String, (u16, String)>,
    /// Every answer waits this long, plus `latency_spread` times (request number mod 4) / 3.
    pub latency: Duration,
    pub latency_spread: Duration,
    /// Statuses with this `state` are answered this much later still.
    pub slow_state: Option<(String, Duration)>,
    /// The first n requests are answered this much later still (and still applied when the
    /// client gave up waiting, as GitHub may).
    pub slow_first: Option<(u64, Duration)>,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<StatusRequest>>,
    faults: Mutex<Faults>,
    count: AtomicU64,
    /// Set by [`FakeGithub::start_app`].
    app: Option<AppState>,
}

/// The GitHub App the fake knows.
#[derive(Debug, Clone)]
pub struct FakeApp {
    pub app_id: u64,
    pub installation_id: u64,
    /// The App's public key (PEM): every JWT must verify with it.
    pub public_key_pem: Vec<u8>,
    /// How long an installation token lives (GitHub: an hour).
    pub token_lifetime: Duration,
}

/// An installation token the fake issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub issued: Instant,
    pub expires: Instant,
}

/// One check run request (`POST …/check-runs` or `PATCH …/check-runs/{id}`), as received.
#[derive(Debug, Clone)]
pub struct CheckRunRequest {
    pub method: String,
    pub repository: String,
    pub id: u64,
    pub body: serde_json::Value,
}

struct AppState {
    app: FakeApp,
    tokens: Mutex<Vec<IssuedToken>>,
    revoked: Mutex<Vec<String>>,
    /// Token exchanges refused: the JWT did not verify (with why).
    refused_jwts: Mutex<Vec<String>>,
    check_runs: Mutex<Vec<CheckRunRequest>>,
    /// Each check run as GitHub shows it: the creation with every update merged in.
    shown_runs: Mutex<BTreeMap<u64, serde_json::Value>>,
}

impl AppState {
    fn bearer(request: &Request) -> String {
        request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string()
    }

    /// `POST /app/installations/{id}/access_tokens` with the App's JWT.
    fn exchange(&self, request: &Request, installation: &str) -> ResponseTemplate {
        if let Err(why) = self.verify_jwt(&Self::bearer(request)) {
            self.refused_jwts.lock().unwrap().push(why.clone());
            return error(
                401,
                &format!("A JSON web token could not be decoded: {why}"),
            );
        }
        if installation != self.app.installation_id.to_string() {
            return error(404, "Not Found");
        }
        let mut tokens = self.tokens.lock().unwrap();
        let token = format!("ghs_fakeInstallationToken{:04}", tokens.len() + 1);
        let now = Instant::now();
        tokens.push(IssuedToken {
            token: token.clone(),
            issued: now,
            expires: now + self.app.token_lifetime,
        });
        let expires_at = time::OffsetDateTime::now_utc() + self.app.token_lifetime;
        let expires_at = expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        ResponseTemplate::new(201).set_body_json(serde_json::json!({
            "token": token,
            "expires_at": expires_at,
            "permissions": { "checks": "write", "statuses": "write", "contents": "read" },
        }))
    }

    /// RS256 with the App's key, issued by the App, at most 10 minutes ahead.
    fn verify_jwt(&self, jwt: &str) -> Result<(), String> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
        #[derive(serde::Deserialize)]
        struct Claims {
            iat: u64,
            exp: u64,
        }
        let key = DecodingKey::from_rsa_pem(&self.app.public_key_pem).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[self.app.app_id.to_string()]);
        validation.set_required_spec_claims(&["exp", "iat", "iss"]);
        let claims = decode::<Claims>(jwt, &key, &validation)
            .map_err(|e| e.to_string())?
            .claims;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if claims.exp > now + 600 {
            return Err("exp is more than 10 minutes in the future".into());
        }
        if claims.iat > now {
            return Err("iat is in the future".into());
        }
        Ok(())
    }

    /// Whether the request carries an issued token that is neither expired nor revoked.
    fn authorized(&self, request: &Request) -> bool {
        let token = Self::bearer(request);
        let live = self
            .tokens
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.token == token && t.expires > Instant::now());
        live && !self.revoked.lock().unwrap().contains(&token)
    }

    /// `POST /repos/{repository}/check-runs`, or `PATCH …/check-runs/{id}` when `id` is set.
    fn check_run(
        &self,
        method: &str,
        repository: String,
        id: Option<u64>,
        body: serde_json::Value,
    ) -> (u16, ResponseTemplate) {
        let mut shown = self.shown_runs.lock().unwrap();
        let (code, id) = match id {
            None if method == "POST" => (201, 1000 + shown.len() as u64 + 1),
            Some(id) if method == "PATCH" && shown.contains_key(&id) => (200, id),
            _ => return (404, error(404, "Not Found")),
        };
        let run = shown
            .entry(id)
            .or_insert_with(|| serde_json::json!({ "id": id }));
        for (key, value) in body.as_object().into_iter().flatten() {
            run[key] = value.clone();
        }
        let answer = run.clone();
        self.check_runs.lock().unwrap().push(CheckRunRequest {
            method: method.to_string(),
            repository,
            id,
            body,
        });
        (code, ResponseTemplate::new(code).set_body_json(answer))
    }
}

/// A running fake GitHub API on a free port.
pub struct FakeGithub {
    server: MockServer,
    state: Arc<State>,
}

struct Responder(Arc<State>);

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let number = self.0.count.fetch_add(1, Ordering::SeqCst) + 1;
        let faults = self.0.faults.lock().unwrap().clone();
        let path = request.url.path().to_string();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (repository, commit) = match parts.as_slice() {
            ["repos", owner, repo, "statuses", sha] => (format!("{owner}/{repo}"), sha.to_string()),
            _ => (String::new(), String::new()),
        };
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        if let Some(app) = &self.0.app {
            match parts.as_slice() {
                ["app", "installations", installation, "access_tokens"] => {
                    return app.exchange(request, installation);
                }
                _ if !app.authorized(request) => {
                    self.0.requests.lock().unwrap().push(StatusRequest {
                        number,
                        method: request.method.to_string(),
                        path,
                        repository,
                        commit,
                        body,
                        headers: BTreeMap::new(),
                        answered: 401,
                        arrived: Instant::now(),
                        landed: Instant::now(),
                    });
                    return error(401, "Bad credentials");
                }
                ["repos", owner, repo, "check-runs", rest @ ..] => {
                    let id = rest.first().and_then(|id| id.parse().ok());
                    let repository = format!("{owner}/{repo}");
                    return app
                        .check_run(request.method.as_str(), repository, id, body)
                        .1;
                }
                _ => {}
            }
        }
        let slow = match &faults.slow_state {
            Some((state, extra)) if body["state"] == state.as_str() => *extra,
            _ => Duration::ZERO,
        };
        let slow_first = match faults.slow_first {
            Some((n, extra)) if number <= n => extra,
            _ => Duration::ZERO,
        };
        let delay = faults.latency
            + faults.latency_spread.mul_f64((number % 4) as f64 / 3.0)
            + slow
            + slow_first;
        let (answered, template) = if commit.is_empty() || request.method.as_str() != "POST" {
            (404, error(404, "Not Found"))
        } else {
            answer(&faults, number, &commit, &body)
        };
        self.0.requests.lock().unwrap().push(StatusRequest {
            number,
            method: request.method.to_string(),
            path,
            repository,
            commit,
            body,
            headers: request
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        v.to_str().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
            answered,
            arrived: Instant::now(),
            landed: Instant::now() + delay,
        });
        template.set_delay(delay)
    }
}

/// The answer to the `number`-th status request under `faults`.
fn answer(
    faults: &Faults,
    number: u64,
    commit: &str,
    body: &serde_json::Value,
) -> (u16, ResponseTemplate) {
    if let Some((code, message)) = faults.refused_commits.get(commit) {
        (*code, error(*code, message))
    } else if let Some((_, seconds)) = faults.exhausted_first.filter(|(n, _)| number <= *n) {
        let reset = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + seconds;
        let template = error(403, "API rate limit exceeded")
            .insert_header("x-ratelimit-remaining", "0")
            .insert_header("x-ratelimit-reset", reset.to_string().as_str());
        (403, template)
    } else if faults.secondary_limit_first.is_some_and(|n| number <= n) {
        let message = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.";
        (403, error(403, message))
    } else if faults
        .bad_gateway_every
        .is_some_and(|n| number.is_multiple_of(n))
    {
        (
            502,
            ResponseTemplate::new(502).set_body_string("bad gateway"),
        )
    } else if let Some((_, seconds)) = faults
        .rate_limit_every
        .filter(|(n, _)| number.is_multiple_of(*n))
    {
        let template = error(429, "You have exceeded a secondary rate limit")
            .insert_header("retry-after", seconds.to_string().as_str());
        (429, template)
    } else {
        let mut created = body.clone();
        created["id"] = number.into();
        let template = ResponseTemplate::new(201)
            .insert_header("x-ratelimit-remaining", "4999")
            .set_body_json(created);
        (201, template)
    }
}

fn error(code: u16, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(code).set_body_json(serde_json::json!({
        "message": message,
        "documentation_url": "https://docs.github.com/rest/commits/statuses",
    }))
}

impl FakeGithub {
    pub async fn start() -> Self {
        Self::start_with(State::default()).await
    }

    /// A fake GitHub serving `app`: statuses and check runs need one of its tokens.
    pub async fn start_app(app: FakeApp) -> Self {
        Self::start_with(State {
            app: Some(AppState {
                app,
                tokens: Mutex::default(),
                revoked: Mutex::default(),
                refused_jwts: Mutex::default(),
                check_runs: Mutex::default(),
                shown_runs: Mutex::default(),
            }),
            ..State::default()
        })
        .await
    }

    async fn start_with(state: State) -> Self {
        let server = MockServer::start().await;
        let state = Arc::new(state);
        Mock::given(any())
            .respond_with(Responder(state.clone()))
            .mount(&server)
            .await;
        FakeGithub { server, state }
    }

    fn app(&self) -> &AppState {
        self.state
            .app
            .as_ref()
            .expect("a fake GitHub started with start_app")
    }

    /// Every installation token issued so far, in order.
    pub fn issued_tokens(&self) -> Vec<IssuedToken> {
        self.app().tokens.lock().unwrap().clone()
    }

    /// Why each refused token exchange's JWT did not verify.
    pub fn refused_jwts(&self) -> Vec<String> {
        self.app().refused_jwts.lock().unwrap().clone()
    }

    /// Revokes every token issued so far: requests with them are answered 401.
    pub fn revoke_tokens(&self) {
        let app = self.app();
        let issued: Vec<String> = app
            .tokens
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.token.clone())
            .collect();
        app.revoked.lock().unwrap().extend(issued);
    }

    /// Every check run request accepted, in arrival order.
    pub fn check_run_requests(&self) -> Vec<CheckRunRequest> {
        self.app().check_runs.lock().unwrap().clone()
    }

    /// The check runs named `name` on `commit` as GitHub shows them, oldest first.
    pub fn check_runs(&self, commit: &str, name: &str) -> Vec<serde_json::Value> {
        self.app()
            .shown_runs
            .lock()
            .unwrap()
            .values()
            .filter(|run| run["head_sha"] == commit && run["name"] == name)
            .cloned()
            .collect()
    }

    /// Waits until `count` check runs named `name` on `commit` are completed; returns them.
    pub async fn wait_for_completed_runs(
        &self,
        commit: &str,
        name: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        crate::wait_for(
            &format!("{count} completed check run(s) {name} on {commit}"),
            timeout,
            || {
                let runs = self.check_runs(commit, name);
                let done = runs.iter().filter(|r| r["status"] == "completed").count() >= count;
                async move { done.then_some(runs) }
            },
        )
        .await
    }

    /// The API base URL (`GITHUB_API_URL`).
    pub fn url(&self) -> String {
        self.server.uri()
    }

    /// Replaces the misbehaviour from the next request on.
    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock().unwrap() = faults;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<StatusRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<StatusRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.accepted())
            .collect()
    }

    /// What GitHub shows for (commit, context): the accepted status answered last, once
    /// answered.
    pub fn shown(&self, commit: &str, context: &str) -> Option<StatusRequest> {
        let now = Instant::now();
        self.accepted()
            .into_iter()
            .filter(|r| r.commit == commit && r.context() == context && r.landed <= now)
            .max_by_key(|r| (r.landed, r.number))
    }

    /// Waits until GitHub shows `state` for (commit, context); returns that status.
    pub async fn wait_for_shown(
        &self,
        commit: &str,
        context: &str,
        state: &str,
        timeout: Duration,
    ) -> StatusRequest {
        crate::wait_for(
            &format!("GitHub to show {state} for {context} on {commit}"),
            timeout,
            || {
                let shown = self
                    .shown(commit, context)
                    .filter(|shown| shown.state() == state);
                async move { shown }
            },
        )
        .await
    }

    /// Waits until a status `state` for (commit, context) was accepted; returns every status
    /// accepted for them, in arrival order.
    pub async fn wait_for_accepted(
        &self,
        commit: &str,
        context: &str,
        state: &str,
        timeout: Duration,
    ) -> Vec<StatusRequest> {
        crate::wait_for(
            &format!("a {state} status for {context} on {commit}"),
            timeout,
            || {
                let seen: Vec<StatusRequest> = self
                    .accepted()
                    .into_iter()
                    .filter(|r| r.commit == commit && r.context() == context)
                    .collect();
                let found = seen.iter().any(|r| r.state() == state).then_some(seen);
                async move { found }
            },
        )
        .await
    }
}
