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
//! it again. The claim also counts the failed posts of its status since the first, whoever made
//! them, so that a status is given up after `STATUS_GIVE_UP_AFTER` of attempts however many
//! messages and reporters tried it; a status given up stays claimed, so older ones still lose to
//! it, and only an operator's replay posts it again.

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
    /// The event the status is about (empty in claims written before it was recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_id: String,
    /// GitHub may show an older status than this one: post it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    /// A post of `status` may be in flight until this moment (milliseconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased_until: Option<u64>,
    /// The failed posts of `status` so far; cleared once GitHub accepts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<Attempts>,
    /// `status` was given up and kept in `IAC_UNDELIVERED`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub given_up: bool,
}

/// The failed posts of one status, across reporters and redeliveries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempts {
    pub count: u32,
    /// Milliseconds since the epoch.
    pub first_ms: u64,
    pub last_ms: u64,
    /// GitHub's answer to the last one, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_http_status: Option<u16>,
    pub last_error: String,
}

impl Attempts {
    /// `previous` and one more failure at `now_ms`.
    pub fn after(
        previous: Option<&Attempts>,
        now_ms: u64,
        last_http_status: Option<u16>,
        last_error: String,
    ) -> Self {
        Attempts {
            count: previous.map_or(0, |p| p.count) + 1,
            first_ms: previous.map_or(now_ms, |p| p.first_ms),
            last_ms: now_ms,
            last_http_status,
            last_error,
        }
    }

    /// How long the status has been failing, by the attempts' own clock.
    pub fn span(&self) -> Duration {
        Duration::from_millis(self.last_ms.saturating_sub(self.first_ms))
    }
}

impl Claim {
    pub fn of(planned: &PlannedStatus) -> Self {
        Claim {
            order: planned.order,
            repository: planned.repository.clone(),
            commit: planned.commit.clone(),
            status: planned.status.clone(),
            event_id: planned.event_id.clone(),
            unconfirmed: false,
            leased_until: None,
            failing: None,
            given_up: false,
        }
    }

    /// The status this claim is for, to post (or keep as a dead letter).
    pub fn planned(&self) -> PlannedStatus {
        PlannedStatus {
            repository: self.repository.clone(),
            commit: self.commit.clone(),
            order: self.order,
            status: self.status.clone(),
            event_id: self.event_id.clone(),
        }
    }

    /// This claim with a lease until `until_ms`: unconfirmed until the post is answered.
    pub fn leased(&self, until_ms: u64) -> Self {
        Claim {
            unconfirmed: true,
            leased_until: Some(until_ms),
            given_up: false,
            ..self.clone()
        }
    }

    /// This claim with its lease given back.
    pub fn released(&self, unconfirmed: bool) -> Self {
        Claim {
            unconfirmed,
            leased_until: None,
            failing: if unconfirmed {
                self.failing.clone()
            } else {
                None
            },
            ..self.clone()
        }
    }

    /// This claim with its lease given back after a failed post: to be posted again.
    pub fn failed(&self, attempts: Attempts) -> Self {
        Claim {
            failing: Some(attempts),
            ..self.released(true)
        }
    }

    /// This claim with its lease given back, its status given up: nothing posts it again but
    /// an operator's replay, and older statuses still lose to it.
    pub fn given_up(&self, attempts: Attempts) -> Self {
        Claim {
            unconfirmed: false,
            leased_until: None,
            failing: Some(attempts),
            given_up: true,
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
    /// This very status was given up (and kept in `IAC_UNDELIVERED`): no request.
    GivenUp,
    /// A post is in flight: read again within this time (when the lease expires at the latest).
    Wait(Duration),
    /// Take the lease with this claim (compare-and-set), then post its status: mine when it is
    /// the newest, or a newer stored one that GitHub may not show.
    Post(Box<Claim>),
}

/// `replayed`: the message was replayed by an operator (`iac-reporter replay`, or
/// `iac-reporter undelivered replay`), who asks for its statuses to be posted again: the very
/// status already accepted or given up is posted once more, with a fresh budget of attempts,
/// but never an older one.
pub fn decide(stored: Option<&Claim>, mine: &Claim, now_ms: u64, replayed: bool) -> Decision {
    let Some(stored) = stored else {
        return Decision::Post(Box::new(mine.clone()));
    };
    if !stored.unconfirmed {
        if stored.order > mine.order {
            return Decision::Superseded;
        }
        if stored.order == mine.order && !replayed {
            return if stored.given_up {
                Decision::GivenUp
            } else {
                Decision::AlreadyPosted
            };
        }
    }
    if let Some(until) = stored.leased_until.filter(|&until| until > now_ms) {
        return Decision::Wait(Duration::from_millis(until - now_ms));
    }
    if stored.order == mine.order && replayed {
        Decision::Post(Box::new(mine.clone()))
    } else if stored.order >= mine.order {
        Decision::Post(Box::new(stored.clone()))
    } else {
        Decision::Post(Box::new(mine.clone()))
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
            event_id: "e-1".into(),
            unconfirmed: false,
            leased_until: None,
            failing: None,
            given_up: false,
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
            Decision::Post(Box::new(mine.clone()))
        );
        let older = claim(key(5, Phase::Started));
        assert_eq!(
            decide(Some(&older), &mine, NOW, false),
            Decision::Post(Box::new(mine.clone()))
        );
        // A lease whose holder died has expired.
        let expired = older.leased(NOW - 1);
        assert_eq!(
            decide(Some(&expired), &mine, NOW, false),
            Decision::Post(Box::new(mine))
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
            Decision::Post(Box::new(accepted.clone())),
            "a replay posts the accepted status again"
        );
        let failed = mine.leased(NOW - 1).released(true);
        assert_eq!(
            decide(Some(&failed), &mine, NOW, false),
            Decision::Post(Box::new(failed.clone()))
        );
        // A holder that died before the answer left its lease to expire, unconfirmed.
        let abandoned = mine.leased(NOW - 1);
        assert_eq!(
            decide(Some(&abandoned), &mine, NOW, false),
            Decision::Post(Box::new(abandoned.clone()))
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
            Decision::Post(Box::new(stored.clone()))
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
                code: None,
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
                wait: Duration::from_secs(60),
                code: Some(429),
            })),
            AfterPost::Release { unconfirmed: true }
        );
        assert_eq!(
            after_post(&Err(PostError::Refused {
                code: 422,
                message: "No commit found".into()
            })),
            AfterPost::Release { unconfirmed: true },
            "a refused status is tried again until it is given up"
        );
    }

    #[test]
    fn a_given_up_status_is_not_posted_again_unless_replayed_and_older_ones_still_lose() {
        let mine = claim(key(5, Phase::Finished));
        let attempts = Attempts::after(None, NOW, Some(404), "Not Found".into());
        let given_up = mine.leased(NOW - 1).given_up(attempts);
        assert_eq!(
            decide(Some(&given_up), &mine, NOW, false),
            Decision::GivenUp
        );
        assert_eq!(
            decide(Some(&given_up), &claim(key(5, Phase::Started)), NOW, true),
            Decision::Superseded,
            "a replayed older status"
        );
        // A replay starts a fresh budget; a newer status replaces it.
        assert_eq!(
            decide(Some(&given_up), &mine, NOW, true),
            Decision::Post(Box::new(mine.clone()))
        );
        let newer = claim(key(6, Phase::Queued));
        assert_eq!(
            decide(Some(&given_up), &newer, NOW, false),
            Decision::Post(Box::new(newer))
        );
        assert!(!given_up.leased(NOW).given_up);
    }

    #[test]
    fn failed_attempts_add_up_from_the_first_and_clear_once_accepted() {
        let first = Attempts::after(None, NOW, Some(422), "No commit found".into());
        let second = Attempts::after(Some(&first), NOW + 90_000, None, "timeout".into());
        assert_eq!((second.count, second.first_ms), (2, NOW));
        assert_eq!(second.span(), Duration::from_secs(90));
        assert_eq!(second.last_http_status, None);
        let failed = claim(key(1, Phase::Queued)).leased(NOW).failed(second);
        assert!(failed.unconfirmed && failed.leased_until.is_none());
        assert_eq!(failed.leased(NOW).failing, failed.failing);
        assert_eq!(failed.released(false).failing, None);
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
