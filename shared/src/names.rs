//! Names operators script against: streams, subjects, consumers, buckets and headers.
//!
//! They are part of the product: the README lists each one, and a test checks that the README
//! and these constants agree.

/// Stream holding every accepted event (verified pushes and manual sync requests).
pub const EVENTS_STREAM: &str = "IAC_EVENTS";
/// Subjects of [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "iac.events.>";
/// A verified GitHub push to the deployed branch.
pub const PUSH_SUBJECT: &str = "iac.events.push";
/// A manual sync request (signed `POST /sync`, or `nats pub`).
pub const SYNC_SUBJECT: &str = "iac.events.sync";
/// A deployment of an exact commit to an environment: `iac.events.deploy.<env>` (signed
/// `POST /deploy`, or `nats pub`).
pub const DEPLOY_SUBJECT_PREFIX: &str = "iac.events.deploy";

/// Stream holding what the worker did.
pub const RESULTS_STREAM: &str = "IAC_RESULTS";
/// Subjects of [`RESULTS_STREAM`].
pub const RESULTS_SUBJECTS: &str = "iac.results.>";
/// A sync began: commit and services decided.
pub const STARTED_SUBJECT: &str = "iac.results.started";
/// A sync ended: per-service outcomes and totals, or an error.
pub const FINISHED_SUBJECT: &str = "iac.results.finished";
/// One service's task is starting (`TaskStarted`): with `SYNC_PARALLELISM` and `after`, the
/// services of one sync start one after another.
pub const TASK_STARTED_SUBJECT: &str = "iac.results.task";

/// The one durable consumer that serializes syncs (`max_ack_pending = 1`).
pub const WORKER_CONSUMER: &str = "iac-worker";
/// The durable pull consumer shared by every reporter process on [`RESULTS_STREAM`].
pub const REPORTER_CONSUMER: &str = "iac-reporter";
/// The reporter's own durable consumer on pushes in [`EVENTS_STREAM`] (the "queued" status).
pub const REPORTER_EVENTS_CONSUMER: &str = "iac-reporter-events";
/// Key-value bucket with the last status claimed per (repository, commit, context).
pub const STATUS_BUCKET: &str = "IAC_STATUSES";

/// Key-value bucket with the last notified state per (environment, service), and the
/// notification a state change asked for until it is sent (`NOTIFY_URL`).
pub const NOTIFY_BUCKET: &str = "IAC_NOTIFY";

/// Key-value bucket of deployment summaries, keyed by deployment id (`POST /deploy/status`).
pub const DEPLOYMENTS_BUCKET: &str = "IAC_DEPLOYMENTS";
/// Key-value bucket of the nonces of signed requests, each kept past the timestamp window, so a
/// captured request is accepted once across restarts and gateways.
pub const NONCES_BUCKET: &str = "IAC_NONCES";

/// Key-value bucket of what each environment last synced: `head.<env>` (the commit of its last
/// push sync), `service.<env>.<service>` (each service's last commit, outcome and time) and
/// `covered.<seq>` (an event a newer push's sync covered). `<env>` is `-` when `PUSH_ENV=`.
pub const APPLIED_BUCKET: &str = "IAC_APPLIED";
/// The source a push-equivalent event published by reconciliation carries (`Iac-Source`).
pub const RECONCILE_SOURCE: &str = "reconcile";
/// Says who published an event when it is not GitHub's webhook (`reconcile`).
pub const SOURCE_HEADER: &str = "Iac-Source";

/// Correlation id of an event; carried by the event and by every result about it.
pub const EVENT_ID_HEADER: &str = "Iac-Event-Id";
/// Set on a replayed message: the stream sequence of the original.
pub const REPLAY_OF_HEADER: &str = "Iac-Replay-Of";
/// Set on a replayed event whose tasks must run even where they would be skipped.
pub const FORCE_HEADER: &str = "Iac-Force";
/// JetStream's de-duplication header.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Stream holding every status the reporter gave up on (a 401, or its retries ran out), with
/// what is needed to post it again (`iac-reporter undelivered list|replay`).
pub const UNDELIVERED_STREAM: &str = "IAC_UNDELIVERED";
/// Subjects of [`UNDELIVERED_STREAM`].
pub const UNDELIVERED_SUBJECTS: &str = "iac.undelivered.>";
/// A commit status given up (`UndeliveredStatus`).
pub const UNDELIVERED_STATUS_SUBJECT: &str = "iac.undelivered.status";

/// Stream holding every task's masked output, in chunks, for the run pages.
pub const RUNLOGS_STREAM: &str = "IAC_RUNLOGS";
/// Subjects of [`RUNLOGS_STREAM`].
pub const RUNLOGS_SUBJECTS: &str = "iac.runlogs.>";
/// The output of one run: `iac.runlogs.<hex of the event id>` (see `nats::run_log_subject`).
pub const RUNLOGS_SUBJECT_PREFIX: &str = "iac.runlogs";
/// Key-value bucket holding the secret run links are signed with when `RUN_LINK_SECRET` is unset.
pub const RUN_LINKS_BUCKET: &str = "IAC_RUN_LINKS";
/// The service a run-log chunk belongs to.
pub const SERVICE_HEADER: &str = "Iac-Service";
/// Which delivery of the event printed a run-log chunk (1 for the first).
pub const ATTEMPT_HEADER: &str = "Iac-Attempt";
