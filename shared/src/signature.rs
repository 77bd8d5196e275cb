//! GitHub's `X-Hub-Signature-256`: HMAC-SHA256 of the raw body, hex encoded, prefixed `sha256=`.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The header GitHub signs with (and `POST /sync` callers must send).
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

/// The header value for `body` under `secret`: `sha256=<64 hex digits>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(digest(secret, body)))
}

/// Whether `header` is a valid signature of `body` under `secret`.
///
/// The comparison is constant time (`Mac::verify_slice`). Anything but `sha256=` followed by
/// exactly 64 hex digits is rejected before the MAC is computed.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_digest) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    if hex_digest.len() != 64 {
        return false;
    }
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn digest(secret: &[u8], body: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
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
