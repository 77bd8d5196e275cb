//! Keeping GitHub's status in order across racing reporters: the claim stored per
//! (repository, commit, context) in `IAC_STATUSES`, and the pure decisions taken on it.
//!
//! GitHub shows the last request it applied, so ordering the claims is not enough: the posts
//! themselves must not overlap. The claim therefore carries a lease: a reporter takes it with
//! compare-and-set, together with the status it is about to post, and posts only while holding
//! it. Anyone else waits until the lease is released or expires; an older status whose turn
//! comes after a newer one was claimed is dropped. A lease is taken for the client's timeout
//! plus [`LEASE_MARGIN`], so the post has ended (answered or timed out) before the lease can
//! expire; a post that timed out keeps its lease until then, because GitHub may still apply it.
//! While a post may have failed, the claim stays `unconfirmed`, and whoever reads it next posts
//! it again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::github::PostError;
use crate::status::{OrderKey, PlannedStatus, Status};

/// How long a lease outlives the client's timeout: room for the bucket writes around the post,
/// for clocks that differ a little between reporters, and for a request GitHub applies after
/// the client gave up on it.
pub const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// The newest status claimed for one (repository, commit, context).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub order: OrderKey,
    pub repository: String,
    pub commit: String,
    pub status: Status,
    /// GitHub may show an older status than this one: post it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    /// A post of `status` may be in flight until this moment (milliseconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_until: Option<u64>,
}

impl Claim {
    pub fn of(planned: &PlannedStatus) -> Self {
        Claim {
            order: planned.order,
            repository: planned.repository.clone(),
            commit: planned.commit.clone(),
            status: planned.status.clone(),
            unconfirmed: false,
            leased_until: None,
        }
    }

    /// This claim with a lease until `until_ms`: unconfirmed until the post is answered.
    pub fn leased(&self, until_ms: u64) -> Self {
        Claim {
            unconfirmed: true,
            leased_until: Some(until_ms),
            ..self.clone()
        }
    }

    /// This claim with its lease given back.
    pub fn released(&self, unconfirmed: bool) -> Self {
        Claim {
            unconfirmed,
            leased_until: None,
            ..self.clone()
        }
    }
}

/// What to do with my status given the stored claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A newer status is claimed, and posted or being posted: no request.
    Superseded,
    /// This very status was posted and GitHub accepted it (a redelivery): no request.
    AlreadyPosted,
    /// A post is in flight: read again within this time (when the lease expires at the latest).
    Wait(Duration),
    /// Take the lease with this claim (compare-and-set), then post its status: mine when it is
    /// the newest, or a newer stored one that GitHub may not show.
    Post(Claim),
}

/// `replayed`: the message was replayed by an operator (`iac-reporter replay`), who asks for
/// its statuses to be posted again: the very status already accepted is posted once more, but
/// never an older one.
pub fn decide(stored: Option<&Claim>, mine: &Claim, now_ms: u64, replayed: bool) -> Decision {
    let Some(stored) = stored else {
        return Decision::Post(mine.clone());
    };
    if !stored.unconfirmed {
        if stored.order > mine.order {
            return Decision::Superseded;
        }
        if stored.order == mine.order && !replayed {
            return Decision::AlreadyPosted;
        }
    }
    if let Some(until) = stored.leased_until.filter(|&until| until > now_ms) {
        return Decision::Wait(Duration::from_millis(until - now_ms));
    }
    if stored.order >= mine.order {
        Decision::Post(stored.clone())
    } else {
        Decision::Post(mine.clone())
    }
}

/// What to do with the lease once GitHub answered (or did not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPost {
    /// Give the lease back; `unconfirmed` when GitHub may not show the status.
    Release { unconfirmed: bool },
    /// The request may still be applied: hold the lease until it expires.
    Keep,
}

pub fn after_post(result: &Result<(), PostError>) -> AfterPost {
    match result {
        Ok(()) => AfterPost::Release { unconfirmed: false },
        // Sent, but no answer: GitHub may apply it later, so nothing may be posted before.
        Err(PostError::Transient {
            reason: "timeout" | "transport",
            ..
        }) => AfterPost::Keep,
        // Posting a refused status again would be refused again.
        Err(PostError::Permanent { .. }) => AfterPost::Release { unconfirmed: false },
        Err(_) => AfterPost::Release { unconfirmed: true },
    }
}

/// Milliseconds since the epoch, the clock leases are written in.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The bucket key: KV keys allow few characters, so a hex sha256 of the three parts.
pub fn status_key(repository: &str, commit: &str, context: &str) -> String {
    let digest = Sha256::digest(format!("{repository}\n{commit}\n{context}"));
    hex::encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Phase, StatusState};

    fn key(event_seq: u64, phase: Phase) -> OrderKey {
        OrderKey { event_seq, phase }
    }

    fn claim(order: OrderKey) -> Claim {
        Claim {
            order,
            repository: "acme/infra".into(),
            commit: "abc1234".into(),
            status: Status {
                state: StatusState::Pending,
                description: format!("{order:?}"),
                context: "IaC Runner / Sync".into(),
                target_url: None,
            },
            unconfirmed: false,
            leased_until: None,
        }
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn a_status_older_than_a_posted_claim_makes_no_request_even_while_it_is_posted() {
        let stored = claim(key(5, Phase::Finished));
        for mine in [key(5, Phase::Started), key(4, Phase::Finished)] {
            assert_eq!(
                decide(Some(&stored), &claim(mine), NOW, false),
                Decision::Superseded
            );
            assert_eq!(
                decide(Some(&stored.released(false)), &claim(mine), NOW, false),
                Decision::Superseded
            );
        }
    }

    #[test]
    fn a_newer_status_is_posted_when_no_post_is_in_flight() {
        let mine = claim(key(5, Phase::Finished));
        assert_eq!(
            decide(None, &mine, NOW, false),
            Decision::Post(mine.clone())
        );
        let older = claim(key(5, Phase::Started));
        assert_eq!(
            decide(Some(&older), &mine, NOW, false),
            Decision::Post(mine.clone())
        );
        // A lease whose holder died has expired.
        let expired = older.leased(NOW - 1);
        assert_eq!(
            decide(Some(&expired), &mine, NOW, false),
            Decision::Post(mine)
        );
    }

    #[test]
    fn a_status_github_accepted_is_not_posted_again_but_one_that_may_have_failed_is() {
        let mine = claim(key(5, Phase::Started));
        let accepted = mine.leased(NOW - 1).released(false);
        assert_eq!(
            decide(Some(&accepted), &mine, NOW, false),
            Decision::AlreadyPosted
        );
        assert_eq!(
            decide(Some(&accepted), &mine, NOW, true),
            Decision::Post(accepted.clone()),
            "a replay posts the accepted status again"
        );
        let failed = mine.leased(NOW - 1).released(true);
        assert_eq!(
            decide(Some(&failed), &mine, NOW, false),
            Decision::Post(failed.clone())
        );
        // A holder that died before the answer left its lease to expire, unconfirmed.
        let abandoned = mine.leased(NOW - 1);
        assert_eq!(
            decide(Some(&abandoned), &mine, NOW, false),
            Decision::Post(abandoned.clone())
        );
    }

    #[test]
    fn a_newer_status_waits_for_the_post_in_flight_until_its_lease_expires() {
        let in_flight = claim(key(5, Phase::Started)).leased(NOW + 1500);
        for mine in [key(5, Phase::Finished), key(5, Phase::Started)] {
            assert_eq!(
                decide(Some(&in_flight), &claim(mine), NOW, false),
                Decision::Wait(Duration::from_millis(1500))
            );
        }
    }

    #[test]
    fn a_newer_claim_that_github_may_not_show_is_posted_by_whoever_sees_it() {
        let stored = claim(key(5, Phase::Finished)).released(true);
        let mine = claim(key(5, Phase::Started));
        assert_eq!(
            decide(Some(&stored), &mine, NOW, false),
            Decision::Post(stored.clone())
        );
        // Unless it is being posted right now.
        let leased = stored.leased(NOW + 10);
        assert!(matches!(
            decide(Some(&leased), &mine, NOW, false),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn a_taken_lease_is_unconfirmed_until_released_after_the_answer() {
        let leased = claim(key(1, Phase::Queued)).leased(NOW);
        assert!(leased.unconfirmed);
        assert_eq!(leased.leased_until, Some(NOW));
        let released = leased.released(false);
        assert!(!released.unconfirmed);
        assert_eq!(released.leased_until, None);
    }

    #[test]
    fn a_post_without_an_answer_keeps_its_lease_and_other_failures_release_it() {
        let transient = |reason| {
            Err(PostError::Transient {
                reason,
                detail: String::new(),
            })
        };
        assert_eq!(
            after_post(&Ok(())),
            AfterPost::Release { unconfirmed: false }
        );
        assert_eq!(after_post(&transient("timeout")), AfterPost::Keep);
        assert_eq!(
            after_post(&transient("server_error")),
            AfterPost::Release { unconfirmed: true }
        );
        assert_eq!(
            after_post(&Err(PostError::RateLimited {
                wait: Duration::from_secs(60)
            })),
            AfterPost::Release { unconfirmed: true }
        );
        assert_eq!(
            after_post(&Err(PostError::Permanent {
                code: 422,
                message: "No commit found".into()
            })),
            AfterPost::Release { unconfirmed: false }
        );
    }

    #[test]
    fn keys_are_bucket_safe_and_distinct_per_context() {
        let a = status_key("acme/infra", "abc", "IaC Runner / Sync");
        let b = status_key("acme/infra", "abc", "IaC Runner / platform/postgres");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn claims_round_trip_through_json_and_old_claims_still_read() {
        let stored = claim(key(3, Phase::Queued)).leased(NOW);
        let json = serde_json::to_vec(&stored).unwrap();
        assert_eq!(serde_json::from_slice::<Claim>(&json).unwrap(), stored);
        let old = serde_json::to_value(claim(key(3, Phase::Queued))).unwrap();
        assert!(old.get("leased_until").is_none());
    }
}
