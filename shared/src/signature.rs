//! GitHub's `X-Hub-Signature-256`: HMAC-SHA256 of the raw body, hex encoded, prefixed `sha256=`;
//! and the timestamped form the original runner's clients send to `/deploy` (and may send to
//! `/sync`): the same header over `{timestamp}.{nonce}.{body}`, with `X-IAC-Timestamp` and
//! `X-IAC-Nonce`, so that a captured request is refused once its window has passed and, the
//! nonce being recorded, also within it.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The header GitHub signs with (and `POST /sync` callers must send).
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

/// Unix seconds at which a timestamped request was signed.
pub const TIMESTAMP_HEADER: &str = "X-IAC-Timestamp";
/// A value the client never uses twice: `[A-Za-z0-9._:-]{8,128}`.
pub const NONCE_HEADER: &str = "X-IAC-Nonce";
/// How far, in seconds, a request's timestamp may be from the server's clock, either way.
pub const TIMESTAMP_WINDOW_SECS: u64 = 300;

/// The header value for `body` under `secret`: `sha256=<64 hex digits>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(digest(secret, &[body])))
}

/// The `X-Hub-Signature-256` value of a timestamped request: the MAC of
/// `{timestamp}.{nonce}.{body}`, as the original runner's client computes it.
pub fn sign_timestamped(secret: &[u8], timestamp: &str, nonce: &str, body: &[u8]) -> String {
    let parts = timestamped_parts(timestamp, nonce, body);
    format!("sha256={}", hex::encode(digest(secret, &parts)))
}

/// Why a timestamped request was refused (answered 401 with this message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimestampedError {
    #[error("X-IAC-Timestamp is missing or not unix seconds")]
    BadTimestamp,
    #[error("X-IAC-Timestamp is more than 300 seconds away from the server's clock")]
    OutsideWindow,
    #[error("X-IAC-Nonce is missing or not 8 to 128 of A-Z a-z 0-9 . _ : -")]
    BadNonce,
    #[error("Invalid signature")]
    BadSignature,
}

/// Whether `nonce` has the accepted shape: 8 to 128 of `A-Z a-z 0-9 . _ : -`.
pub fn is_valid_nonce(nonce: &str) -> bool {
    (8..=128).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Checks a timestamped request at `now` (unix seconds): the timestamp within
/// [`TIMESTAMP_WINDOW_SECS`], the nonce's shape, then the signature. Whether the nonce was
/// used before is the caller's to check, and only after this succeeded, so that unsigned
/// requests cannot use up nonces.
pub fn verify_timestamped(
    secret: &[u8],
    body: &[u8],
    signature: Option<&str>,
    timestamp: Option<&str>,
    nonce: Option<&str>,
    now: u64,
) -> Result<(), TimestampedError> {
    let timestamp = timestamp.map(str::trim).unwrap_or_default();
    let seconds: u64 = timestamp
        .parse()
        .ok()
        .filter(|_| timestamp.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(TimestampedError::BadTimestamp)?;
    if seconds.abs_diff(now) > TIMESTAMP_WINDOW_SECS {
        return Err(TimestampedError::OutsideWindow);
    }
    let nonce = nonce.map(str::trim).unwrap_or_default();
    if !is_valid_nonce(nonce) {
        return Err(TimestampedError::BadNonce);
    }
    if !verify_parts(
        secret,
        &timestamped_parts(timestamp, nonce, body),
        signature,
    ) {
        return Err(TimestampedError::BadSignature);
    }
    Ok(())
}

/// The key a nonce is recorded under in `IAC_NONCES`: the hex SHA-256 of the nonce, since a
/// nonce may hold `:`, which is not a key character.
pub fn nonce_key(nonce: &str) -> String {
    hex::encode(Sha256::digest(nonce.trim().as_bytes()))
}

fn timestamped_parts<'a>(timestamp: &'a str, nonce: &'a str, body: &'a [u8]) -> [&'a [u8]; 5] {
    [timestamp.as_bytes(), b".", nonce.as_bytes(), b".", body]
}

/// Whether `header` is a valid signature of `body` under `secret`.
///
/// The comparison is constant time (`Mac::verify_slice`). Anything but `sha256=` followed by
/// exactly 64 hex digits is rejected before the MAC is computed.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    verify_parts(secret, &[body], header)
}

/// Whether `header` is a valid signature of the concatenated `parts`.
fn verify_parts(secret: &[u8], parts: &[&[u8]], header: Option<&str>) -> bool {
    let Some(hex_digest) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    if hex_digest.len() != 64 {
        return false;
    }
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    mac(secret, parts).verify_slice(&expected).is_ok()
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

fn digest(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    mac(secret, parts).finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from GitHub's "Validating webhook deliveries" documentation.
    const GITHUB_SECRET: &[u8] = b"It's a Secret to Everybody";
    const GITHUB_BODY: &[u8] = b"Hello, World!";
    const GITHUB_SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_documented_test_vector_verifies() {
        assert_eq!(sign(GITHUB_SECRET, GITHUB_BODY), GITHUB_SIGNATURE);
        assert!(verify(GITHUB_SECRET, GITHUB_BODY, Some(GITHUB_SIGNATURE)));
    }

    #[test]
    fn uppercase_hex_is_accepted_like_github_tools_send_it() {
        let upper = format!("sha256={}", GITHUB_SIGNATURE[7..].to_uppercase());
        assert!(verify(GITHUB_SECRET, GITHUB_BODY, Some(&upper)));
    }

    #[test]
    fn wrong_missing_or_malformed_signatures_are_rejected() {
        let other_body = sign(GITHUB_SECRET, b"Hello, World?");
        let sha1_style = format!("sha1={}", &GITHUB_SIGNATURE[7..]);
        let short = &GITHUB_SIGNATURE[..GITHUB_SIGNATURE.len() - 2];
        let not_hex = format!("sha256={}", "z".repeat(64));
        for bad in [
            None,
            Some(""),
            Some("sha256="),
            Some(&GITHUB_SIGNATURE[7..]),
            Some(short),
            Some(&sha1_style),
            Some(&other_body),
            Some(&not_hex),
        ] {
            assert!(!verify(GITHUB_SECRET, GITHUB_BODY, bad), "{bad:?} verified");
        }
        assert!(!verify(
            b"another secret",
            GITHUB_BODY,
            Some(GITHUB_SIGNATURE)
        ));
    }

    const NOW: u64 = 1_767_225_600;

    #[test]
    fn the_timestamped_form_signs_timestamp_nonce_and_body_as_the_original_client() {
        // The client signs the text `{timestamp}.{nonce}.{body}`.
        let signature = sign_timestamped(b"s3cret", "1767225600", "abcdef0123456789", b"{}");
        assert_eq!(
            signature,
            sign(b"s3cret", b"1767225600.abcdef0123456789.{}"),
            "the MAC of the joined parts"
        );
        let ok = verify_timestamped(
            b"s3cret",
            b"{}",
            Some(&signature),
            Some("1767225600"),
            Some("abcdef0123456789"),
            NOW + 300,
        );
        assert_eq!(ok, Ok(()));
    }

    #[test]
    fn stale_future_malformed_or_wrongly_signed_timestamped_requests_are_refused() {
        let secret = b"s3cret";
        let check = |ts: Option<&str>, nonce: Option<&str>, signature: &str, now: u64| {
            verify_timestamped(secret, b"{}", Some(signature), ts, nonce, now)
        };
        let nonce = "nonce:0001";
        let ts = NOW.to_string();
        let good = sign_timestamped(secret, &ts, nonce, b"{}");
        assert_eq!(check(Some(&ts), Some(nonce), &good, NOW), Ok(()));
        use TimestampedError::*;
        assert_eq!(
            check(Some(&ts), Some(nonce), &good, NOW + 301),
            Err(OutsideWindow)
        );
        assert_eq!(
            check(Some(&ts), Some(nonce), &good, NOW - 301),
            Err(OutsideWindow)
        );
        for bad in [
            None,
            Some(""),
            Some("-5"),
            Some("+5"),
            Some("1.5"),
            Some("soon"),
        ] {
            assert_eq!(
                check(bad, Some(nonce), &good, NOW),
                Err(BadTimestamp),
                "{bad:?}"
            );
        }
        let long = "n".repeat(129);
        for bad in [
            None,
            Some("short"),
            Some("has space1"),
            Some("slash/123"),
            Some(&*long),
        ] {
            assert_eq!(check(Some(&ts), bad, &good, NOW), Err(BadNonce), "{bad:?}");
        }
        let other_nonce = sign_timestamped(secret, &ts, "nonce:0002", b"{}");
        assert_eq!(
            check(Some(&ts), Some(nonce), &other_nonce, NOW),
            Err(BadSignature)
        );
        let body_only = sign(secret, b"{}");
        assert_eq!(
            check(Some(&ts), Some(nonce), &body_only, NOW),
            Err(BadSignature)
        );
    }

    #[test]
    fn nonces_of_every_accepted_shape_become_valid_bucket_keys() {
        assert!(is_valid_nonce("A.b_c:d-9"));
        let key = nonce_key("A.b_c:d-9");
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(key, nonce_key("A.b_c:d-8"));
    }

    proptest::proptest! {
        /// Any header, body and secret: no panic, and only the true signature verifies.
        #[test]
        fn arbitrary_headers_never_panic_and_only_the_signature_verifies(
            secret in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            header in proptest::option::of(".{0,80}"),
        ) {
            let good = sign(&secret, &body);
            proptest::prop_assert!(verify(&secret, &body, Some(&good)));
            if let Some(header) = &header {
                let expected = header
                    .trim()
                    .strip_prefix("sha256=")
                    .is_some_and(|hex| hex.eq_ignore_ascii_case(&good[7..]));
                proptest::prop_assert_eq!(verify(&secret, &body, Some(header)), expected);
            }
        }
    }
}
