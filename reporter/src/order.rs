//! Keeping GitHub's status in order across racing reporters: the claim stored per
//! (repository, commit, context) in `IAC_STATUSES`, and the pure decisions taken on it.
//!
//! A reporter claims a status (compare-and-set) before posting it, and after posting checks that
//! its claim is still the newest; if not, its post may have landed after a newer one, so it posts
//! the newest claim's status again. A reporter that could not finish that repair marks the claim
//! `unconfirmed`, and whoever reads it next posts it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::status::{OrderKey, PlannedStatus, Status};

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
}

impl Claim {
    pub fn of(planned: &PlannedStatus) -> Self {
        Claim {
            order: planned.order,
            repository: planned.repository.clone(),
            commit: planned.commit.clone(),
            status: planned.status.clone(),
            unconfirmed: false,
        }
    }
}

/// What to do with my status given the stored claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A newer status is claimed and posted: no request.
    Superseded,
    /// A newer status is claimed but may not be what GitHub shows: post the stored status.
    RepairNewer,
    /// My own status is the claim (a redelivery or a second reporter): post it.
    Post,
    /// Nothing newer is claimed: claim mine with compare-and-set, then post.
    Claim,
}

pub fn decide(stored: Option<&Claim>, mine: OrderKey) -> Decision {
    match stored {
        Some(claim) if claim.order > mine && claim.unconfirmed => Decision::RepairNewer,
        Some(claim) if claim.order > mine => Decision::Superseded,
        Some(claim) if claim.order == mine => Decision::Post,
        _ => Decision::Claim,
    }
}

/// What to do after a post, given the revision posted and the entry read afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPost {
    /// The posted claim is still the newest: done.
    Done,
    /// The posted claim is newest but was marked unconfirmed: clear the mark.
    Confirm,
    /// Someone claimed a newer status while I posted: post the stored status again.
    PostStored,
}

pub fn after_post(posted_revision: u64, stored: Option<(u64, &Claim)>) -> AfterPost {
    match stored {
        None => AfterPost::Done,
        Some((revision, claim)) if revision == posted_revision && claim.unconfirmed => {
            AfterPost::Confirm
        }
        Some((revision, _)) if revision == posted_revision => AfterPost::Done,
        Some(_) => AfterPost::PostStored,
    }
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

    fn claim(order: OrderKey, unconfirmed: bool) -> Claim {
        Claim {
            order,
            repository: "acme/infra".into(),
            commit: "abc1234".into(),
            status: Status {
                state: StatusState::Pending,
                description: "x".into(),
                context: "IaC Runner / Sync".into(),
                target_url: None,
            },
            unconfirmed,
        }
    }

    #[test]
    fn a_status_older_than_the_claim_makes_no_request() {
        let stored = claim(key(5, Phase::Finished), false);
        assert_eq!(
            decide(Some(&stored), key(5, Phase::Started)),
            Decision::Superseded
        );
        assert_eq!(
            decide(Some(&stored), key(4, Phase::Finished)),
            Decision::Superseded
        );
    }

    #[test]
    fn a_newer_status_claims_and_an_equal_one_posts_again() {
        let stored = claim(key(5, Phase::Started), false);
        assert_eq!(decide(None, key(1, Phase::Queued)), Decision::Claim);
        assert_eq!(
            decide(Some(&stored), key(5, Phase::Finished)),
            Decision::Claim
        );
        assert_eq!(
            decide(Some(&stored), key(6, Phase::Queued)),
            Decision::Claim
        );
        assert_eq!(
            decide(Some(&stored), key(5, Phase::Started)),
            Decision::Post
        );
    }

    #[test]
    fn an_unconfirmed_newer_claim_is_posted_by_whoever_sees_it() {
        let stored = claim(key(5, Phase::Finished), true);
        assert_eq!(
            decide(Some(&stored), key(5, Phase::Started)),
            Decision::RepairNewer
        );
    }

    #[test]
    fn a_claim_replaced_during_the_post_is_posted_again() {
        let mine = claim(key(5, Phase::Started), false);
        let newer = claim(key(5, Phase::Finished), false);
        assert_eq!(after_post(10, Some((10, &mine))), AfterPost::Done);
        assert_eq!(after_post(10, Some((11, &newer))), AfterPost::PostStored);
        assert_eq!(after_post(10, None), AfterPost::Done);
        let marked = claim(key(5, Phase::Started), true);
        assert_eq!(after_post(10, Some((10, &marked))), AfterPost::Confirm);
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
    fn claims_round_trip_through_json() {
        let stored = claim(key(3, Phase::Queued), true);
        let json = serde_json::to_vec(&stored).unwrap();
        assert_eq!(serde_json::from_slice::<Claim>(&json).unwrap(), stored);
    }
}
