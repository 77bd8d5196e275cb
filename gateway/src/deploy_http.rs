//! `POST /deploy` and `POST /deploy/status`: a signed, timestamped request, checked once, then
//! answered from the summaries in `IAC_DEPLOYMENTS`; an accepted deployment is stored on
//! `iac.events.deploy.<env>` for the worker serving that environment.

use std::time::{Duration, Instant};

use bytes::Buf;
use futures::Stream;
use iac_shared::deploy::{DeployRequest, DeploymentStatus, DeploymentSummary};
use iac_shared::events::now_rfc3339;
use serde_json::{Value, json};
use warp::http::{HeaderMap, StatusCode};

use crate::deploy::{
    DeployCall, LegacyLookup, in_progress_answer, legacy_lookup, not_found_answer, parse_call,
    summary_answer,
};
use crate::deployments::StoredSummary;
use crate::error::GatewayError;
use crate::http::{Answer, App, publish, timestamped_body};

/// How often a held (`wait: true`) request reads its summary.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// Attempts to accept a deployment while other gateways write the same summary.
const CLAIM_ATTEMPTS: usize = 3;

pub(crate) async fn handle_deploy<S, B>(
    app: &App,
    headers: &HeaderMap,
    body: S,
) -> Result<Answer, GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let body = timestamped_body(app, headers, body, &app.deploy_secret).await?;
    let call = parse_call(&body, &app.envs)?;
    let id = call.deployment_id();
    tracing::Span::current().record("deployment_id", id.as_str());
    let services = call.normalized_services();
    let now = now_rfc3339();
    let summary = DeploymentSummary {
        status: DeploymentStatus::InProgress,
        deployment_id: id.clone(),
        env: call.env.clone(),
        commit: call.commit.clone(),
        triggered_by: Some(call.triggered_by.clone()),
        requested_services: services.clone(),
        accepted_at: now.clone(),
        updated_at: now,
        result: None,
    };
    // A new deployment is the common case: create its summary first, and read what is there
    // only when the create finds one (in progress, recently final, or final long ago).
    let mut replacing: Option<StoredSummary> = None;
    for _ in 0..CLAIM_ATTEMPTS {
        let claimed = app
            .deployments
            .claim(&summary, replacing.as_ref().map(|s| s.revision))
            .await?;
        if let Some(revision) = claimed {
            let previous = replacing.map(|s| s.raw);
            if let Err(e) = store_deployment(app, &call, &id, &services, revision).await {
                app.deployments.release(&id, revision, previous).await;
                return Err(e);
            }
            return Ok(accepted(app, &call, &id, &services).await);
        }
        match app.deployments.summary(&id).await? {
            None => replacing = None,
            Some(stored) if !stored.is_final() => {
                tracing::info!("deployment already in progress");
                return Ok(duplicate(&call, &id, &services));
            }
            Some(stored) if stored.age < app.cache_ttl => {
                tracing::info!(status = ?stored.summary.status, "deployment finished recently: answered from its summary");
                return Ok(cached(&call, &stored));
            }
            Some(stored) => replacing = Some(stored),
        }
    }
    // Other gateways keep writing the same summary: it is being accepted.
    Ok(duplicate(&call, &id, &services))
}

/// Records the id for status questions without services, then stores the event; a message id
/// unique to this acceptance lets a retried publish be stored once.
async fn store_deployment(
    app: &App,
    call: &DeployCall,
    id: &str,
    services: &[String],
    revision: u64,
) -> Result<(), GatewayError> {
    app.deployments.index(&call.env, &call.commit, id).await?;
    let request = DeployRequest {
        deployment_id: id.to_string(),
        env: call.env.clone(),
        commit: call.commit.clone(),
        services: services.to_vec(),
        triggered_by: Some(call.triggered_by.clone()),
        force: false,
    };
    let subject = app
        .envs
        .iter()
        .position(|env| *env == call.env)
        .map(|i| app.deploy_subjects[i])
        .expect("the environment was checked against DEPLOY_ENVS");
    let payload = serde_json::to_vec(&request).expect("a DeployRequest serializes");
    let event_id = format!("deploy-{id}-{revision}");
    let stored = publish(app, subject, &event_id, payload).await?;
    tracing::info!(
        env = %call.env,
        commit = %call.commit,
        services = ?services,
        triggered_by = %call.triggered_by,
        sequence = stored.sequence,
        "deployment stored"
    );
    Ok(())
}

/// The answer to an accepted deployment: 202 at once, or held until final (`wait: true`).
async fn accepted(app: &App, call: &DeployCall, id: &str, services: &[String]) -> Answer {
    let in_progress = in_progress_answer(id, &call.env, &call.commit, &call.triggered_by, services);
    if call.wait {
        return hold(app, id, in_progress).await;
    }
    let mut body = in_progress;
    body["wait"] = json!(false);
    Answer {
        outcome: "accepted",
        status: StatusCode::ACCEPTED,
        body,
    }
}

fn duplicate(call: &DeployCall, id: &str, services: &[String]) -> Answer {
    let mut body = in_progress_answer(id, &call.env, &call.commit, &call.triggered_by, services);
    body["duplicate"] = json!(true);
    Answer {
        outcome: "duplicate",
        status: StatusCode::ACCEPTED,
        body,
    }
}

/// A recent final summary: 200 with `cached`, or, for a caller waiting on the outcome, 500 when
/// it failed (as the original).
fn cached(call: &DeployCall, stored: &StoredSummary) -> Answer {
    let mut body = summary_answer(&stored.summary);
    body["cached"] = json!(true);
    let failed = stored.summary.status == DeploymentStatus::Failed;
    Answer {
        outcome: "cached",
        status: if call.wait && failed {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        },
        body,
    }
}

/// Holds a `wait: true` request until the summary of `id` is final (200 completed, 500
/// failed), or until `DEPLOY_WAIT_TIMEOUT` or shutdown: then `in_progress` (202), and the
/// caller polls `/deploy/status`. The summary is read by key: the gateway may not create the
/// consumer a watch would need.
async fn hold(app: &App, id: &str, in_progress: Value) -> Answer {
    let deadline = Instant::now() + app.wait_timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || app.shutdown.sleep_or_shutdown(left.min(WAIT_POLL)).await {
            tracing::info!("deployment still in progress; answered 202 to poll");
            return Answer {
                outcome: "in_progress",
                status: StatusCode::ACCEPTED,
                body: in_progress.clone(),
            };
        }
        match app.deployments.summary(id).await {
            Ok(Some(stored)) if stored.is_final() => return final_answer(&stored),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "reading the summary of a held deployment"),
        }
    }
}

fn final_answer(stored: &StoredSummary) -> Answer {
    let completed = stored.summary.status == DeploymentStatus::Completed;
    Answer {
        outcome: if completed { "completed" } else { "failed" },
        status: if completed {
            StatusCode::OK
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        },
        body: summary_answer(&stored.summary),
    }
}

pub(crate) async fn handle_status<S, B>(
    app: &App,
    headers: &HeaderMap,
    body: S,
) -> Result<Answer, GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let body = timestamped_body(app, headers, body, &app.deploy_secret).await?;
    let call = parse_call(&body, &app.envs)?;
    let id = if call.services.is_some() {
        call.deployment_id()
    } else {
        match legacy_candidates(app, &call).await? {
            LegacyLookup::One(id) => id,
            LegacyLookup::Ambiguous(ids) => {
                return Ok(Answer {
                    outcome: "ambiguous",
                    status: StatusCode::CONFLICT,
                    body: json!({
                        "error": "Ambiguous deployment; deployment_id and services are required",
                        "candidate_deployment_ids": ids,
                    }),
                });
            }
        }
    };
    tracing::Span::current().record("deployment_id", id.as_str());
    if call
        .deployment_id
        .as_ref()
        .is_some_and(|asked| *asked != id)
    {
        return Ok(Answer {
            outcome: "mismatch",
            status: StatusCode::CONFLICT,
            body: json!({
                "error": "deployment_id does not match env/ref/services",
                "expected_deployment_id": id,
            }),
        });
    }
    Ok(match app.deployments.summary(&id).await? {
        Some(stored) => Answer::ok("found", summary_answer(&stored.summary)),
        None => Answer {
            outcome: "not_found",
            status: StatusCode::NOT_FOUND,
            body: not_found_answer(&id, &call.env, &call.commit),
        },
    })
}

/// The deployments of the call's environment and commit a status question without services may
/// mean, live ones (in progress, or final within the cache window) first.
async fn legacy_candidates(app: &App, call: &DeployCall) -> Result<LegacyLookup, GatewayError> {
    let recorded = app.deployments.indexed(&call.env, &call.commit).await?;
    let mut live = Vec::new();
    for id in &recorded {
        if let Some(stored) = app.deployments.summary(id).await?
            && (!stored.is_final() || stored.age < app.cache_ttl)
        {
            live.push(id.clone());
        }
    }
    Ok(legacy_lookup(call, &live, &recorded))
}
