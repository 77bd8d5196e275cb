//! GitHub App authentication: an RS256 JWT signed with the App's private key is exchanged for
//! an installation token, which is kept until shortly before it expires (or GitHub refuses it)
//! and never printed.

use std::path::Path;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::github::{PostError, classify, github_message, now_epoch};

/// How far in the past a JWT says it was issued: GitHub's advice against clock drift.
pub const JWT_BACKDATE_SECS: u64 = 60;
/// How long a JWT is valid from now: under GitHub's 10 minutes, with room for drift.
pub const JWT_LIFETIME_SECS: u64 = 9 * 60;
/// The longest an installation token is used before `expires_at`: a request started just
/// before expiry must not arrive after it.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);

/// Why the App's settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AppAuthError {
    #[error("GITHUB_APP_PRIVATE_KEY_FILE: cannot read {path}: {error}")]
    ReadKey { path: String, error: std::io::Error },
    #[error("GITHUB_APP_PRIVATE_KEY_FILE: {path} is not an RSA private key in PEM form: {error}")]
    BadKey { path: String, error: String },
}

/// The App's identity: what signs its JWTs.
pub struct AppCredentials {
    pub app_id: u64,
    pub installation_id: u64,
    key: EncodingKey,
}

impl std::fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCredentials")
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwtClaims {
    pub iat: u64,
    pub exp: u64,
    /// The App id, as text (GitHub accepts the client id or the App id).
    pub iss: String,
}

impl JwtClaims {
    /// Issued a minute in the past, valid [`JWT_LIFETIME_SECS`] from `now_epoch`.
    pub fn at(app_id: u64, now_epoch: u64) -> Self {
        JwtClaims {
            iat: now_epoch.saturating_sub(JWT_BACKDATE_SECS),
            exp: now_epoch + JWT_LIFETIME_SECS,
            iss: app_id.to_string(),
        }
    }
}

impl AppCredentials {
    /// Reads the PEM key (PKCS#1 as GitHub hands it out, or PKCS#8) from `path`.
    pub fn load(app_id: u64, installation_id: u64, path: &Path) -> Result<Self, AppAuthError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|error| AppAuthError::ReadKey {
            path: shown.clone(),
            error,
        })?;
        let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| AppAuthError::BadKey {
            path: shown,
            error: e.to_string(),
        })?;
        Ok(AppCredentials {
            app_id,
            installation_id,
            key,
        })
    }

    /// A JWT for the App, as of `now_epoch`.
    pub fn jwt(&self, now_epoch: u64) -> Result<SecretString, PostError> {
        let claims = JwtClaims::at(self.app_id, now_epoch);
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map(SecretString::from)
            .map_err(|e| PostError::Refused {
                code: 401,
                message: format!("the App JWT could not be signed: {e}"),
            })
    }
}

/// When to fetch a new token for one that expires `expires_in` after it was received: a
/// quarter of its life early, at most [`REFRESH_AHEAD`], so short-lived tokens are used too.
pub fn refresh_after(expires_in: Duration) -> Duration {
    expires_in.saturating_sub((expires_in / 4).min(REFRESH_AHEAD))
}

struct Cached {
    token: SecretString,
    refresh_at: Instant,
}

/// The installation token, fetched when first needed and again before it expires.
pub struct Installation {
    credentials: AppCredentials,
    url: String,
    cached: Mutex<Option<Cached>>,
}

/// GitHub's answer to `POST /app/installations/{id}/access_tokens`.
#[derive(Deserialize)]
struct AccessToken {
    /// Wrapped in a `SecretString` as soon as it is read.
    token: String,
    /// RFC 3339.
    expires_at: String,
}

impl Installation {
    pub fn new(credentials: AppCredentials, api: &reqwest::Url) -> Self {
        let url = format!(
            "{}/app/installations/{}/access_tokens",
            api.as_str().trim_end_matches('/'),
            credentials.installation_id
        );
        Installation {
            credentials,
            url,
            cached: Mutex::new(None),
        }
    }

    pub fn app_id(&self) -> u64 {
        self.credentials.app_id
    }

    /// The token to use now, fetched with `http` when there is none or it is due.
    pub async fn token(&self, http: &reqwest::Client) -> Result<SecretString, PostError> {
        // Held across the exchange, so concurrent requests wait for one exchange.
        let mut cached = self.cached.lock().await;
        if let Some(current) = cached.as_ref().filter(|c| c.refresh_at > Instant::now()) {
            return Ok(current.token.clone());
        }
        let fresh = self.exchange(http).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Forgets `refused` (GitHub answered 401 with it), unless a newer token replaced it.
    pub async fn forget(&self, refused: &SecretString) {
        let mut cached = self.cached.lock().await;
        if cached
            .as_ref()
            .is_some_and(|c| c.token.expose_secret() == refused.expose_secret())
        {
            *cached = None;
        }
    }

    async fn exchange(&self, http: &reqwest::Client) -> Result<Cached, PostError> {
        let jwt = self.credentials.jwt(now_epoch())?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {}", jwt.expose_secret()))
            .expect("a JWT is header-safe base64url");
        authorization.set_sensitive(true);
        let received = Instant::now();
        let response = http
            .post(&self.url)
            .header(AUTHORIZATION, authorization)
            .send()
            .await
            .map_err(PostError::transport)?;
        let code = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(PostError::transport)?;
        if !code.is_success() {
            let message = format!(
                "installation token of GITHUB_APP_INSTALLATION_ID {}: {}",
                self.credentials.installation_id,
                github_message(&body)
            );
            classify(code, &headers, &message, now_epoch())?;
        }
        let answer: AccessToken =
            serde_json::from_slice(&body).map_err(|e| PostError::Transient {
                reason: "server_error",
                detail: format!("unreadable installation token answer: {e}"),
                code: Some(code.as_u16()),
            })?;
        let expires_in = time::OffsetDateTime::parse(
            &answer.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map(|at| (at.unix_timestamp().max(0) as u64).saturating_sub(now_epoch()))
        .unwrap_or(0);
        tracing::info!(
            installation_id = self.credentials.installation_id,
            expires_in_secs = expires_in,
            "received a GitHub App installation token"
        );
        Ok(Cached {
            token: SecretString::from(answer.token),
            refresh_at: received + refresh_after(Duration::from_secs(expires_in)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_is_backdated_a_minute_and_expires_within_ten() {
        let claims = JwtClaims::at(42, 1_000_000);
        assert_eq!(claims.iat, 1_000_000 - 60);
        assert!(claims.exp > 1_000_000 && claims.exp <= 1_000_000 + 600);
        assert_eq!(claims.iss, "42");
    }

    #[test]
    fn tokens_are_refreshed_before_they_expire_short_lived_ones_too() {
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_after(hour), hour - REFRESH_AHEAD);
        assert_eq!(
            refresh_after(Duration::from_secs(8)),
            Duration::from_secs(6)
        );
        assert_eq!(refresh_after(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn a_missing_or_malformed_key_file_is_named() {
        let err = AppCredentials::load(1, 2, Path::new("/nonexistent/app.pem")).unwrap_err();
        assert!(
            err.to_string().contains("GITHUB_APP_PRIVATE_KEY_FILE"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("iac-app-key-{}", std::process::id()));
        std::fs::write(&dir, "not a key").unwrap();
        let err = AppCredentials::load(1, 2, &dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(err.to_string().contains("not an RSA private key"), "{err}");
    }
}
