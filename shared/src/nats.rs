//! Connecting to NATS and provisioning the streams and consumers every service relies on.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{ConnectOptions, ServerAddr};
use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use crate::deploy::{Environments, deploy_subject};
use crate::names::*;
use crate::shutdown::Shutdown;

/// NATS connection and stream settings shared by every service. Global: an operator command
/// takes them before or after its name.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated (give every node of a cluster).
    #[arg(
        global = true,
        long = "nats-url",
        env = "NATS_URL",
        value_name = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ',',
        value_parser = parse_server_addr
    )]
    pub urls: Vec<ServerAddr>,

    /// Credentials file (JWT + NKey) for NATS.
    #[arg(
        global = true,
        long = "nats-creds",
        env = "NATS_CREDS",
        value_name = "NATS_CREDS"
    )]
    pub creds: Option<PathBuf>,

    /// NATS user name (with NATS_PASSWORD).
    #[arg(
        global = true,
        long = "nats-user",
        env = "NATS_USER",
        value_name = "NATS_USER",
        requires = "password"
    )]
    pub user: Option<String>,

    /// NATS password.
    #[arg(
        global = true,
        long = "nats-password",
        env = "NATS_PASSWORD",
        value_name = "NATS_PASSWORD",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub password: Option<SecretString>,

    /// NATS token.
    #[arg(
        global = true,
        long = "nats-token",
        env = "NATS_TOKEN",
        value_name = "NATS_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub token: Option<SecretString>,

    /// CA certificate (PEM) to verify the NATS server's TLS certificate.
    #[arg(
        global = true,
        long = "nats-ca",
        env = "NATS_CA",
        value_name = "NATS_CA"
    )]
    pub ca: Option<PathBuf>,

    #[command(flatten)]
    pub streams: StreamSettings,
}

/// Settings of `IAC_EVENTS` and `IAC_RESULTS`.
#[derive(Debug, Clone, Args)]
pub struct StreamSettings {
    /// Replicas of each stream (3 on a three-node cluster).
    #[arg(
        global = true,
        long = "stream-replicas",
        env = "STREAM_REPLICAS",
        value_name = "STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub replicas: u8,

    /// How long events and results are kept (the audit log), e.g. `30d`.
    #[arg(
        global = true,
        long = "stream-max-age",
        env = "STREAM_MAX_AGE",
        value_name = "STREAM_MAX_AGE",
        default_value = "30d",
        value_parser = parse_positive_duration
    )]
    pub max_age: Duration,

    /// Window in which a repeated `Nats-Msg-Id` (GitHub delivery id) is stored once, e.g. `2m`.
    #[arg(
        global = true,
        long = "duplicate-window",
        env = "DUPLICATE_WINDOW",
        value_name = "DUPLICATE_WINDOW",
        default_value = "2m",
        value_parser = parse_positive_duration
    )]
    pub duplicate_window: Duration,

    /// How long the tasks' output is kept in `IAC_RUNLOGS` (the run pages), e.g. `30d`.
    #[arg(
        global = true,
        long = "run-log-max-age",
        env = "RUN_LOG_MAX_AGE",
        value_name = "RUN_LOG_MAX_AGE",
        default_value = "30d",
        value_parser = parse_positive_duration
    )]
    pub run_log_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            run_log_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

fn parse_server_addr(s: &str) -> Result<ServerAddr, String> {
    s.trim()
        .parse::<ServerAddr>()
        .map_err(|e| format!("not a NATS URL: {e}"))
}

/// Parses a secret without ever putting its value into an error.
pub fn parse_secret(s: &str) -> Result<SecretString, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(SecretString::from(s))
}

/// A duration such as `30s`, `5m`, `30d`, or bare seconds (`1800`) as the Python runner took.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(seconds) = s.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 5m, 30d, 1800)"))
}

/// A duration as [`parse_duration`] reads it; zero is refused.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Connects with the configured auth. The client keeps reconnecting forever, also when the
/// first attempt fails, so a service can start before NATS and recover when NATS comes back.
pub async fn connect(args: &NatsArgs, name: &str) -> Result<async_nats::Client, ConnectError> {
    connect_with(args, name, ConnectOptions::new().retry_on_initial_connect()).await
}

/// Connects once, failing at once when no server answers (the operator commands).
pub async fn connect_once(args: &NatsArgs, name: &str) -> Result<async_nats::Client, ConnectError> {
    connect_with(args, name, ConnectOptions::new()).await
}

async fn connect_with(
    args: &NatsArgs,
    name: &str,
    options: ConnectOptions,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = options
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * 2u64.saturating_pow(attempts.min(6) as u32)).min(2_000))
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::debug!(event = %other, "NATS client event"),
            }
        });
    if let Some(path) = &args.creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ConnectError::Creds(path.display().to_string(), e.to_string()))?;
    }
    if let (Some(user), Some(password)) = (&args.user, &args.password) {
        options = options.user_and_password(user.clone(), password.expose_secret().to_string());
        if let Some(prefix) = inbox_prefix(user) {
            options = options.custom_inbox_prefix(prefix);
        }
    }
    if let Some(token) = &args.token {
        options = options.token(token.expose_secret().to_string());
    }
    if let Some(ca) = &args.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    options
        .connect(args.urls.clone())
        .await
        .map_err(|e| ConnectError::Connect(e.to_string()))
}

/// The inbox prefix of a NATS user: `_INBOX.<user>`, so that `deploy/nats/permissions.conf` can
/// let each user subscribe to its own replies only (with the shared `_INBOX.>`, one service could
/// read the answers another gets: the events the worker pulls, the entries the reporter reads).
/// `None` for a name that is not one subject token; such a user keeps the default prefix.
pub fn inbox_prefix(user: &str) -> Option<String> {
    let token = !user.is_empty()
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    token.then(|| format!("_INBOX.{user}"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NATS_CREDS: cannot read credentials file {0}: {1}")]
    Creds(String, String),
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
}

/// Why the streams or consumers could not be brought to the configuration the code expects.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("JetStream request failed for {what}: {reason}")]
    JetStream { what: String, reason: String },
    #[error(
        "{what} does not exist and creating it got no answer: this NATS user may not create it \
         (run `iac-worker provision` as the admin user), or JetStream is not ready yet"
    )]
    Missing { what: String },
    #[error(
        "{what} differs from the expected configuration in {fields} and could not be updated: {reason}"
    )]
    Drift {
        what: String,
        fields: String,
        reason: String,
    },
}

fn js_err(what: &str, e: impl std::fmt::Display) -> ProvisionError {
    ProvisionError::JetStream {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// Whether a create or update was refused for lack of permission, as far as the client can
/// tell. nats-server drops a request to a subject the user may not publish to and tells the
/// connection only (`Permissions Violation for Publish to ...`, an event async-nats does not
/// tie to the request), so a refused change ends as a request that timed out. A JetStream
/// error, by contrast, is an answer: the server saw the request and said no.
fn refused_or_unanswered<K: PartialEq>(kind: K, timed_out: K) -> bool {
    kind == timed_out
}

/// What an update meant to correct drift came to: `Some` with the result when it was applied,
/// `None` when NATS did not let this user make it (the drift is kept, with a warning), and a
/// `Drift` error for any other failure.
fn correct_drift<T, K>(
    updated: Result<T, async_nats::error::Error<K>>,
    timed_out: K,
    what: &str,
    fields: &str,
) -> Result<Option<T>, ProvisionError>
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq,
{
    match updated {
        Ok(updated) => Ok(Some(updated)),
        Err(e) if refused_or_unanswered(e.kind(), timed_out) => {
            warn_drift_kept(what, fields);
            Ok(None)
        }
        Err(e) => Err(ProvisionError::Drift {
            what: what.to_string(),
            fields: fields.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Logs drift this connection could not correct because NATS did not let it: the service goes
/// on with the configuration the operator provisioned.
fn warn_drift_kept(what: &str, fields: &str) {
    tracing::warn!(
        %fields,
        "{what} differs from this service's configuration in {fields}; this NATS user may not \
         change it, so the service runs with it as provisioned (run `iac-worker provision` as the \
         admin user, with this service's settings, to apply them)"
    );
}

/// `IAC_EVENTS`: limits retention (replayable audit log), file storage.
pub fn events_stream_config(settings: &StreamSettings) -> stream::Config {
    stream_config(
        EVENTS_STREAM,
        EVENTS_SUBJECTS,
        "Accepted iac-runner events",
        settings,
    )
}

/// `IAC_RESULTS`: what the worker did, same retention rules.
pub fn results_stream_config(settings: &StreamSettings) -> stream::Config {
    stream_config(
        RESULTS_STREAM,
        RESULTS_SUBJECTS,
        "iac-runner sync results",
        settings,
    )
}

/// `IAC_UNDELIVERED`: the statuses the reporter gave up on, kept as long as the results they
/// came from, for an operator to list and post again.
pub fn undelivered_stream_config(settings: &StreamSettings) -> stream::Config {
    stream_config(
        UNDELIVERED_STREAM,
        UNDELIVERED_SUBJECTS,
        "iac-runner statuses the reporter gave up on",
        settings,
    )
}

// Run logs: the tasks' output behind the run pages.

/// `IAC_RUNLOGS`: every task's masked output in chunks, kept `RUN_LOG_MAX_AGE`. The worker
/// writes it and the reporter reads it; it is never replayed, so it needs no de-duplication
/// beyond the default.
pub fn runlogs_stream_config(settings: &StreamSettings) -> stream::Config {
    stream::Config {
        max_age: settings.run_log_max_age,
        ..stream_config(
            RUNLOGS_STREAM,
            RUNLOGS_SUBJECTS,
            "iac-runner task output, for the run pages",
            settings,
        )
    }
}

/// The subject of one run's output: the event id hex-encoded, since an event id (a GitHub
/// delivery id) may hold `.`, `*` or `>`, which a subject token may not.
pub fn run_log_subject(event_id: &str) -> String {
    format!("{RUNLOGS_SUBJECT_PREFIX}.{}", hex::encode(event_id))
}

/// `IAC_RUN_LINKS`: the generated secret of the run links, written once (create-if-absent) so
/// every reporter signs alike; kept forever, or old links would break.
pub fn run_links_bucket_config(settings: &StreamSettings) -> kv::Config {
    bucket_config(
        RUN_LINKS_BUCKET,
        "iac-runner: the secret run links are signed with",
        settings,
        Duration::ZERO,
    )
}

/// A key-value bucket of the runner: the newest value per key only, `settings`' replicas, and
/// entries kept `max_age` (`Duration::ZERO`: for ever).
fn bucket_config(
    bucket: &str,
    description: &str,
    settings: &StreamSettings,
    max_age: Duration,
) -> kv::Config {
    kv::Config {
        bucket: bucket.to_string(),
        description: description.to_string(),
        history: 1,
        num_replicas: settings.replicas.into(),
        max_age,
        ..Default::default()
    }
}

fn stream_config(
    name: &str,
    subjects: &str,
    description: &str,
    settings: &StreamSettings,
) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        description: Some(description.to_string()),
        subjects: vec![subjects.to_string()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: settings.max_age,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas as usize,
        allow_direct: true,
        ..Default::default()
    }
}

/// The fields of a stream the runner depends on, compared to find drift.
fn stream_drift(want: &stream::Config, have: &stream::Config) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if want.subjects != have.subjects {
        fields.push("subjects");
    }
    if want.retention != have.retention {
        fields.push("retention");
    }
    if want.storage != have.storage {
        fields.push("storage");
    }
    if want.max_age != have.max_age {
        fields.push("max_age");
    }
    if want.duplicate_window != have.duplicate_window {
        fields.push("duplicate_window");
    }
    if want.num_replicas != have.num_replicas.max(1) {
        fields.push("num_replicas");
    }
    if want.allow_direct != have.allow_direct {
        fields.push("allow_direct");
    }
    fields
}

/// Creates the stream, or corrects a drifted one (logged). A correction NATS does not let this
/// user make is logged and the stream used as it is (the operator provisioned it); a correction
/// JetStream refuses (a field that cannot change) is an error.
pub async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
) -> Result<stream::Stream, ProvisionError> {
    let what = format!("stream {}", want.name);
    match js.get_stream(&want.name).await {
        Ok(mut existing) => {
            let have = existing
                .info()
                .await
                .map_err(|e| js_err(&what, e))?
                .config
                .clone();
            let drift = stream_drift(&want, &have);
            if !drift.is_empty() {
                let fields = drift.join(", ");
                let updated = js.update_stream(&want).await;
                let timed_out = jetstream::context::UpdateStreamErrorKind::TimedOut;
                if correct_drift(updated, timed_out, &what, &fields)?.is_some() {
                    tracing::warn!(stream = %want.name, %fields, "corrected stream configuration drift");
                }
            }
            Ok(existing)
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            let stream = js.create_stream(want.clone()).await.map_err(|e| {
                if refused_or_unanswered(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::TimedOut,
                ) {
                    ProvisionError::Missing { what: what.clone() }
                } else {
                    js_err(&what, e)
                }
            })?;
            tracing::info!(stream = %want.name, replicas = want.num_replicas, "created stream");
            Ok(stream)
        }
        Err(e) => Err(js_err(&what, e)),
    }
}

/// `iac-worker` on `IAC_EVENTS`, serving the push environment: pushes, manual syncs and
/// deployments to `PUSH_ENV`. Explicit ack, one message in flight across all workers.
pub fn worker_consumer_config(
    ack_wait: Duration,
    max_deliver: i64,
    envs: &Environments,
) -> consumer::pull::Config {
    let mut subjects = vec![PUSH_SUBJECT.to_string(), SYNC_SUBJECT.to_string()];
    subjects.extend(envs.push.as_deref().map(deploy_subject));
    consumer::pull::Config {
        durable_name: Some(WORKER_CONSUMER.to_string()),
        description: Some("iac-runner worker: one sync at a time".into()),
        filter_subjects: subjects,
        ..worker_consumer_base(ack_wait, max_deliver)
    }
}

/// `iac-worker-<env>` on `IAC_EVENTS`: deployments to `env`, an environment other than the
/// push environment, one at a time, beside those of every other environment.
pub fn worker_env_consumer_config(
    ack_wait: Duration,
    max_deliver: i64,
    env: &str,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(worker_env_consumer(env)),
        description: Some(format!(
            "iac-runner worker: deployments to {env}, one at a time"
        )),
        filter_subject: deploy_subject(env),
        ..worker_consumer_base(ack_wait, max_deliver)
    }
}

/// Every consumer the worker reads, the push environment's first, each with the environment
/// it serves (`None`: the push consumer when `PUSH_ENV=`).
pub fn worker_consumer_configs(
    ack_wait: Duration,
    max_deliver: i64,
    envs: &Environments,
) -> Vec<(Option<String>, consumer::pull::Config)> {
    let push = (
        envs.push.clone(),
        worker_consumer_config(ack_wait, max_deliver, envs),
    );
    let separate = envs.separate().map(|env| {
        (
            Some(env.to_string()),
            worker_env_consumer_config(ack_wait, max_deliver, env),
        )
    });
    std::iter::once(push).chain(separate).collect()
}

/// The durable name of the consumer of deployments to `env`: `iac-worker-<env>`.
pub fn worker_env_consumer(env: &str) -> String {
    format!("{WORKER_CONSUMER}-{env}")
}

fn worker_consumer_base(ack_wait: Duration, max_deliver: i64) -> consumer::pull::Config {
    consumer::pull::Config {
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver,
        max_ack_pending: 1,
        ..Default::default()
    }
}

/// Default attempts of one event (the last delivery is turned into an `error` result).
pub const WORKER_DEFAULT_ATTEMPTS: i64 = 3;
/// Default ack wait of the worker consumer; the worker sends progress every third of it.
pub const WORKER_DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// `iac-reporter` on `IAC_RESULTS`: explicit ack, pull, shared by every reporter process.
pub fn reporter_consumer_config(ack_wait: Duration) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(REPORTER_CONSUMER.to_string()),
        description: Some("iac-runner reporter: GitHub statuses from results".into()),
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: REPORTER_MAX_DELIVER,
        max_ack_pending: 1024,
        ..Default::default()
    }
}

/// `iac-reporter-events` on pushes in `IAC_EVENTS`: the "queued" status.
pub fn reporter_events_consumer_config(ack_wait: Duration) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(REPORTER_EVENTS_CONSUMER.to_string()),
        description: Some("iac-runner reporter: queued statuses for pushes".into()),
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: REPORTER_MAX_DELIVER,
        max_ack_pending: 1024,
        filter_subject: PUSH_SUBJECT.to_string(),
        ..Default::default()
    }
}

/// Deliveries of one result before the reporter gives up on it (with backoff, about an hour).
pub const REPORTER_MAX_DELIVER: i64 = 30;
/// Default ack wait of the reporter consumers.
pub const REPORTER_DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

fn consumer_drift(want: &consumer::pull::Config, have: &consumer::Config) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if want.ack_policy != have.ack_policy {
        fields.push("ack_policy");
    }
    if want.ack_wait != have.ack_wait {
        fields.push("ack_wait");
    }
    if want.max_deliver != have.max_deliver {
        fields.push("max_deliver");
    }
    if want.max_ack_pending != have.max_ack_pending {
        fields.push("max_ack_pending");
    }
    if want.filter_subject != have.filter_subject {
        fields.push("filter_subject");
    }
    if want.filter_subjects != have.filter_subjects {
        fields.push("filter_subjects");
    }
    if have.deliver_subject.is_some() {
        fields.push("deliver_subject (a push consumer)");
    }
    fields
}

/// Creates a durable pull consumer, or (when `owner`) corrects its drifted configuration.
///
/// Every service creates the consumers that are missing before it publishes anything, so no
/// event is ever stored without the consumers that must see it; only the service that uses a
/// consumer corrects it, so two services never fight over its settings. Under the NATS users
/// of `deploy/nats/permissions.conf` no service may create or change a consumer: a missing one
/// is an error (retried until the operator provisions it) and drift is logged and kept.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    want: consumer::pull::Config,
    owner: bool,
) -> Result<consumer::PullConsumer, ProvisionError> {
    let name = want.durable_name.clone().unwrap_or_default();
    let what = format!("consumer {name} on {stream}");
    let stream_handle = js.get_stream(stream).await.map_err(|e| js_err(&what, e))?;
    match stream_handle.consumer_info(&name).await {
        Ok(info) => {
            let existing = stream_handle
                .get_consumer::<consumer::pull::Config>(&name)
                .await
                .map_err(|e| js_err(&what, e))?;
            if owner {
                let have = info.config;
                let drift = consumer_drift(&want, &have);
                if !drift.is_empty() {
                    let fields = drift.join(", ");
                    let updated = stream_handle.update_consumer(want).await;
                    let timed_out = jetstream::stream::ConsumerUpdateErrorKind::TimedOut;
                    if let Some(updated) = correct_drift(updated, timed_out, &what, &fields)? {
                        tracing::warn!(consumer = %name, %stream, %fields, "corrected consumer configuration drift");
                        return Ok(updated);
                    }
                }
            }
            Ok(existing)
        }
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            let created = stream_handle.create_consumer(want).await.map_err(|e| {
                if refused_or_unanswered(e.kind(), jetstream::stream::ConsumerErrorKind::TimedOut) {
                    ProvisionError::Missing { what: what.clone() }
                } else {
                    js_err(&what, e)
                }
            })?;
            tracing::info!(consumer = %name, %stream, "created consumer");
            Ok(created)
        }
        Err(e) => Err(js_err(&what, e)),
    }
}

/// Creates or corrects both streams, and creates every missing consumer (for the default
/// environments) and bucket with its defaults.
pub async fn provision(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), ProvisionError> {
    provision_with(js, settings, &ConsumerSettings::default()).await
}

/// [`provision`] with the consumers of `consumers` (its environments): a service that knows
/// `DEPLOY_ENVS` and `PUSH_ENV` creates the consumers those need before it stores an event.
pub async fn provision_with(
    js: &jetstream::Context,
    settings: &StreamSettings,
    consumers: &ConsumerSettings,
) -> Result<(), ProvisionError> {
    ensure_stream(js, events_stream_config(settings)).await?;
    ensure_stream(js, results_stream_config(settings)).await?;
    for (stream, config) in consumer_configs(consumers) {
        ensure_consumer(js, stream, config, false).await?;
    }
    Ok(())
}

/// The durable consumers (the worker's, one per environment served apart, and the reporter's
/// two), each with the stream it reads.
fn consumer_configs(settings: &ConsumerSettings) -> Vec<(&'static str, consumer::pull::Config)> {
    let workers = worker_consumer_configs(
        settings.worker_ack_wait,
        settings.worker_max_deliver,
        &settings.environments,
    );
    let mut configs: Vec<_> = workers
        .into_iter()
        .map(|(_, config)| (EVENTS_STREAM, config))
        .collect();
    configs.push((
        RESULTS_STREAM,
        reporter_consumer_config(settings.reporter_ack_wait),
    ));
    configs.push((
        EVENTS_STREAM,
        reporter_events_consumer_config(settings.reporter_ack_wait),
    ));
    configs
}

/// `IAC_STATUSES`: the newest status claimed per (repository, commit, context), kept as long as
/// the streams.
pub fn status_bucket_config(settings: &StreamSettings) -> kv::Config {
    bucket_config(
        STATUS_BUCKET,
        "iac-runner: newest status claimed per commit and context",
        settings,
        settings.max_age,
    )
}

/// Creates the status bucket, or corrects its drifted limits, like [`ensure_stream`].
pub async fn ensure_status_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<kv::Store, ProvisionError> {
    ensure_bucket(js, status_bucket_config(settings)).await
}

/// How long a nonce is kept: past the whole window in which its timestamp is accepted (300 s
/// either way), with room for the gateway's and the NATS server's clocks to differ.
pub const NONCE_RETENTION: Duration = Duration::from_secs(15 * 60);

/// `IAC_DEPLOYMENTS`: one summary per deployment id (and the ids per environment and commit,
/// under `ref.<env>.<commit>`), kept as long as the streams.
pub fn deployments_bucket_config(settings: &StreamSettings) -> kv::Config {
    bucket_config(
        DEPLOYMENTS_BUCKET,
        "iac-runner: deployment summaries by deployment id",
        settings,
        settings.max_age,
    )
}

/// `IAC_NONCES`: the nonces of accepted signed requests, each kept [`NONCE_RETENTION`].
pub fn nonces_bucket_config(settings: &StreamSettings) -> kv::Config {
    bucket_config(
        NONCES_BUCKET,
        "iac-runner: nonces of accepted signed requests",
        settings,
        NONCE_RETENTION,
    )
}

/// The deployment summaries and the nonces, created or corrected like [`ensure_bucket`]: the
/// buckets the gateway's `/deploy` relies on.
pub async fn ensure_deploy_buckets(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(kv::Store, kv::Store), ProvisionError> {
    let deployments = ensure_bucket(js, deployments_bucket_config(settings)).await?;
    let nonces = ensure_bucket(js, nonces_bucket_config(settings)).await?;
    Ok((deployments, nonces))
}

/// Creates the deployments bucket, or corrects its drifted limits, like [`ensure_stream`].
pub async fn ensure_deployments_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<kv::Store, ProvisionError> {
    ensure_bucket(js, deployments_bucket_config(settings)).await
}

/// `IAC_NOTIFY`: the last notified state per (environment, service). Kept without an age limit:
/// a record that expired while a service was failing would lose its recovery.
pub fn notify_bucket_config(settings: &StreamSettings) -> kv::Config {
    bucket_config(
        NOTIFY_BUCKET,
        "iac-runner: last notified state per environment and service",
        settings,
        Duration::ZERO,
    )
}

/// `IAC_APPLIED`: what each environment and service last synced, and the events a newer
/// push's sync covered, kept as long as the streams (an entry is rewritten on every sync, so
/// only the covered marks of old events ever age out).
pub fn applied_bucket_config(settings: &StreamSettings) -> kv::Config {
    bucket_config(
        APPLIED_BUCKET,
        "iac-runner: last synced commit per environment and service",
        settings,
        settings.max_age,
    )
}

/// Creates the notification bucket, or corrects its drifted limits, like [`ensure_stream`].
pub async fn ensure_notify_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<kv::Store, ProvisionError> {
    ensure_bucket(js, notify_bucket_config(settings)).await
}

/// Creates a key-value bucket, or corrects its drifted limits, like [`ensure_stream`]: a
/// correction this user may not make is logged and the bucket used as provisioned.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    want: kv::Config,
) -> Result<kv::Store, ProvisionError> {
    use jetstream::context::CreateKeyValueErrorKind;
    let bucket = want.bucket.clone();
    let what = format!("bucket {bucket}");
    match js.get_stream(format!("KV_{bucket}")).await {
        Ok(existing) => {
            let have = &existing.cached_info().config;
            let mut drift = Vec::new();
            if have.max_age != want.max_age {
                drift.push("max_age");
            }
            if have.num_replicas.max(1) != want.num_replicas {
                drift.push("num_replicas");
            }
            if have.max_messages_per_subject != want.history {
                drift.push("history");
            }
            if !drift.is_empty() {
                let fields = drift.join(", ");
                // The bucket's stream, updated as a stream: a refused update then ends as a
                // timed-out request, which `correct_drift` recognizes (the key-value call
                // reports it as any JetStream error).
                let corrected = stream::Config {
                    max_age: want.max_age,
                    num_replicas: want.num_replicas,
                    max_messages_per_subject: want.history,
                    ..have.clone()
                };
                let updated = js.update_stream(&corrected).await;
                let timed_out = jetstream::context::UpdateStreamErrorKind::TimedOut;
                if correct_drift(updated, timed_out, &what, &fields)?.is_some() {
                    tracing::warn!(%bucket, %fields, "corrected bucket configuration drift");
                }
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_key_value(want).await.map_err(|e| {
                if refused_or_unanswered(e.kind(), CreateKeyValueErrorKind::TimedOut) {
                    ProvisionError::Missing { what: what.clone() }
                } else {
                    js_err(&what, e)
                }
            })?;
            tracing::info!(%bucket, "created bucket");
        }
        Err(e) => return Err(js_err(&what, e)),
    }
    js.get_key_value(&bucket)
        .await
        .map_err(|e| js_err(&what, e))
}

/// The settings of the `iac-worker` consumer, read by the worker and by `iac-worker provision`
/// alike.
#[derive(Debug, Clone, Args)]
pub struct WorkerConsumerArgs {
    /// How long an event may go without an acknowledgement or a progress note before it is
    /// delivered again (to a standby worker).
    #[arg(
        long = "worker-ack-wait",
        env = "WORKER_ACK_WAIT",
        value_name = "WORKER_ACK_WAIT",
        default_value = "30s",
        value_parser = parse_ack_wait
    )]
    pub ack_wait: Duration,

    /// Attempts of one event before it is given up with an `error` result.
    #[arg(
        long = "sync-max-attempts",
        env = "SYNC_MAX_ATTEMPTS",
        value_name = "SYNC_MAX_ATTEMPTS",
        default_value_t = 3,
        value_parser = clap::value_parser!(i64).range(1..=100)
    )]
    pub max_attempts: i64,
}

impl WorkerConsumerArgs {
    /// Deliveries allowed by the consumer: the attempts plus the one that reports giving up.
    pub fn max_deliver(&self) -> i64 {
        self.max_attempts + 1
    }
}

/// An ack wait of at least a second: progress notes go out every third of it.
fn parse_ack_wait(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

/// The consumers' settings the operator provisions with: the worker's and the reporter's, so
/// what `iac-worker provision` creates is what the services expect.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub worker_ack_wait: Duration,
    pub worker_max_deliver: i64,
    pub reporter_ack_wait: Duration,
    /// Which worker consumers there are and what each filters.
    pub environments: Environments,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            worker_ack_wait: WORKER_DEFAULT_ACK_WAIT,
            worker_max_deliver: WORKER_DEFAULT_ATTEMPTS + 1,
            reporter_ack_wait: REPORTER_DEFAULT_ACK_WAIT,
            environments: Environments::default(),
        }
    }
}

/// Everything the services rely on, created or corrected: the streams, the consumers, the
/// status, deployment, nonce, notification, applied-state and run-link buckets, the run logs and
/// the reporter's dead letters. The operator's provisioning (`iac-worker provision`, as the admin
/// user), so unlike [`provision`] it corrects every consumer.
pub async fn provision_all(
    js: &jetstream::Context,
    streams: &StreamSettings,
    consumers: &ConsumerSettings,
) -> Result<(), ProvisionError> {
    ensure_stream(js, events_stream_config(streams)).await?;
    ensure_stream(js, results_stream_config(streams)).await?;
    for (stream, config) in consumer_configs(consumers) {
        ensure_consumer(js, stream, config, true).await?;
    }
    ensure_status_bucket(js, streams).await?;
    ensure_stream(js, undelivered_stream_config(streams)).await?;
    ensure_deploy_buckets(js, streams).await?;
    ensure_notify_bucket(js, streams).await?;
    ensure_bucket(js, applied_bucket_config(streams)).await?;
    ensure_stream(js, runlogs_stream_config(streams)).await?;
    ensure_bucket(js, run_links_bucket_config(streams)).await?;
    Ok(())
}

/// [`provision`], retried with backoff until it succeeds or `shutdown` fires (NATS may be
/// starting, or a cluster may be electing a leader).
pub async fn provision_until_ready(
    js: &jetstream::Context,
    settings: &StreamSettings,
    shutdown: &Shutdown,
) -> Result<(), ProvisionError> {
    provision_until_ready_with(js, settings, &ConsumerSettings::default(), shutdown).await
}

/// [`provision_with`], retried like [`provision_until_ready`].
pub async fn provision_until_ready_with(
    js: &jetstream::Context,
    settings: &StreamSettings,
    consumers: &ConsumerSettings,
    shutdown: &Shutdown,
) -> Result<(), ProvisionError> {
    crate::runtime::retry_until_shutdown(
        shutdown,
        Duration::from_millis(200),
        || provision_with(js, settings, consumers),
        |e, delay| {
            if matches!(e, ProvisionError::Drift { .. }) {
                return false;
            }
            tracing::warn!(error = %e, retry_in = ?delay, "streams not ready yet");
            true
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_configs_follow_the_contract() {
        let settings = StreamSettings {
            replicas: 3,
            ..Default::default()
        };
        let events = events_stream_config(&settings);
        assert_eq!(events.name, "IAC_EVENTS");
        assert_eq!(events.subjects, ["iac.events.>"]);
        assert_eq!(events.retention, stream::RetentionPolicy::Limits);
        assert_eq!(events.storage, stream::StorageType::File);
        assert_eq!(events.max_age, Duration::from_secs(30 * 86400));
        assert_eq!(events.duplicate_window, Duration::from_secs(120));
        assert_eq!(events.num_replicas, 3);
        let results = results_stream_config(&settings);
        assert_eq!(results.subjects, ["iac.results.>"]);
        assert!(stream_drift(&events, &events).is_empty());
        assert_eq!(stream_drift(&events, &results), ["subjects"]);
        let undelivered = undelivered_stream_config(&settings);
        assert_eq!(undelivered.name, "IAC_UNDELIVERED");
        assert_eq!(undelivered.subjects, ["iac.undelivered.>"]);
        assert_eq!(undelivered.max_age, events.max_age);
    }

    #[test]
    fn each_user_gets_an_inbox_of_its_own() {
        assert_eq!(inbox_prefix("worker").as_deref(), Some("_INBOX.worker"));
        assert_eq!(inbox_prefix("ci-bot_2").as_deref(), Some("_INBOX.ci-bot_2"));
        for not_a_token in ["", "a.b", "a b", "a*", "a>"] {
            assert_eq!(inbox_prefix(not_a_token), None, "{not_a_token:?}");
        }
    }

    #[test]
    fn durations_are_also_bare_seconds_as_the_python_runner_took() {
        assert_eq!(parse_duration("1800"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration(" 90 "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_positive_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_positive_duration("0").is_err());
        assert!(parse_duration("-5").is_err());
        assert!(parse_duration("1.5").is_err());
    }

    #[test]
    fn durations_must_be_positive_and_readable() {
        assert_eq!(parse_positive_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_positive_duration("0s").is_err());
        assert!(
            parse_positive_duration("soon")
                .unwrap_err()
                .contains("examples")
        );
    }
}
