//! Run links that carry their own proof: `/runs/<id>?t=<token>`, the token an HMAC of the run
//! id, so a link works for whoever clicks it from GitHub and an altered one shows nothing.

use async_nats::jetstream::{self, kv};
use iac_shared::names::RUN_LINKS_BUCKET;
use iac_shared::nats::{ProvisionError, StreamSettings, ensure_bucket, run_links_bucket_config};
use iac_shared::signature;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};

/// The key of the generated secret in [`RUN_LINKS_BUCKET`].
const SECRET_KEY: &str = "secret";

/// Left as they are in a run id in a link: unreserved characters.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Signs and checks run links.
#[derive(Clone)]
pub struct LinkSigner {
    secret: SecretString,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner(..)")
    }
}

impl LinkSigner {
    pub fn new(secret: SecretString) -> Self {
        LinkSigner { secret }
    }

    /// The token of a run: the hex HMAC-SHA256 of its id.
    pub fn token(&self, run_id: &str) -> String {
        let signed = signature::sign(self.secret.expose_secret().as_bytes(), run_id.as_bytes());
        signed.trim_start_matches("sha256=").to_string()
    }

    /// Whether `token` is the token of `run_id` (compared in constant time).
    pub fn verify(&self, run_id: &str, token: &str) -> bool {
        signature::verify(
            self.secret.expose_secret().as_bytes(),
            run_id.as_bytes(),
            Some(&format!("sha256={token}")),
        )
    }

    /// The path and query of a run's page: `/runs/<id>?t=<token>`.
    pub fn path(&self, run_id: &str) -> String {
        format!(
            "/runs/{}?t={}",
            utf8_percent_encode(run_id, PATH_SEGMENT),
            self.token(run_id)
        )
    }
}

/// The links statuses carry: `PUBLIC_URL` and the signer.
#[derive(Debug, Clone)]
pub struct RunLinks {
    base: String,
    signer: LinkSigner,
}

impl RunLinks {
    pub fn new(public_url: &reqwest::Url, signer: LinkSigner) -> Self {
        RunLinks {
            base: public_url.as_str().trim_end_matches('/').to_string(),
            signer,
        }
    }

    /// The whole link to a run's page.
    pub fn url(&self, run_id: &str) -> String {
        format!("{}{}", self.base, self.signer.path(run_id))
    }
}

/// The secret: `RUN_LINK_SECRET`, or the one kept in [`RUN_LINKS_BUCKET`], created by the
/// first reporter that finds none (create-if-absent, so every reporter ends with the same).
pub async fn secret(
    js: &jetstream::Context,
    settings: &StreamSettings,
    configured: Option<&SecretString>,
) -> Result<SecretString, ProvisionError> {
    if let Some(secret) = configured {
        return Ok(secret.clone());
    }
    let bucket = ensure_bucket(js, run_links_bucket_config(settings)).await?;
    let failed = |e: &dyn std::fmt::Display| ProvisionError::Missing {
        what: format!("the run link secret in bucket {RUN_LINKS_BUCKET} ({e})"),
    };
    let generated = hex::encode(rand::random::<[u8; 32]>());
    match bucket.create(SECRET_KEY, generated.clone().into()).await {
        Ok(_) => {
            tracing::info!("generated the run link secret, kept in {RUN_LINKS_BUCKET}");
            return Ok(SecretString::from(generated));
        }
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed(&e)),
    }
    let kept = bucket
        .get(SECRET_KEY)
        .await
        .map_err(|e| failed(&e))?
        .ok_or_else(|| failed(&"it vanished"))?;
    let kept = String::from_utf8(kept.to_vec()).map_err(|e| failed(&e))?;
    Ok(SecretString::from(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> LinkSigner {
        LinkSigner::new(SecretString::from("link secret"))
    }

    #[test]
    fn a_run_token_verifies_and_an_altered_one_does_not() {
        let token = signer().token("delivery-1");
        assert_eq!(token.len(), 64);
        assert!(signer().verify("delivery-1", &token));
        assert!(!signer().verify("delivery-2", &token));
        let mut altered = token.clone().into_bytes();
        altered[0] = if altered[0] == b'0' { b'1' } else { b'0' };
        assert!(!signer().verify("delivery-1", std::str::from_utf8(&altered).unwrap()));
        assert!(!signer().verify("delivery-1", ""));
        let other = LinkSigner::new(SecretString::from("another secret"));
        assert!(!other.verify("delivery-1", &token));
    }

    #[test]
    fn a_run_link_encodes_its_id_and_never_shows_the_secret() {
        let url = reqwest::Url::parse("https://ci.example.com/").unwrap();
        let links = RunLinks::new(&url, signer());
        let link = links.url("a b/../c?d");
        assert!(
            link.starts_with("https://ci.example.com/runs/a%20b%2F..%2Fc%3Fd?t="),
            "{link}"
        );
        assert!(!format!("{links:?}").contains("link secret"));
    }
}
