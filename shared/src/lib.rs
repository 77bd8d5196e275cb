//! The contract between the iac-runner services.
//!
//! - [`cli`]: the command-line shape of the worker and reporter: serve, or an operator command.
//! - [`deploy`]: deployments to named environments: ids, requests, summaries, env names.
//! - [`env`]: environment variables set to the empty string count as unset.
//! - [`names`]: streams, subjects, consumers, the status bucket and headers, as constants.
//! - [`events`]: the JSON messages on `IAC_EVENTS` and `IAC_RESULTS`, and request validation.
//! - [`history`]: the last syncs and the queue depth, read from the streams.
//! - [`signature`]: GitHub's `X-Hub-Signature-256` HMAC, signed and verified.
//! - [`rules`]: which services a changed path affects, and service discovery by `deploy.py`.
//! - [`dependencies`]: declared fan-out and order (`DEPENDENCIES_FILE`), and why each service
//!   of a sync was selected.
//! - [`nats`]: NATS connection settings, stream and consumer provisioning.
//! - [`provision`]: `iac-worker provision`, the operator's provisioning as the NATS admin user.
//! - [`runtime`]: what every service loop shares: starting durable consumers, retry with
//!   backoff until shutdown, progress acknowledgements, the event envelope from headers.
//! - [`replay`]: re-publishing selected stream messages (the `replay` subcommands).
//! - [`shutdown`]: the shutdown signal every service loop watches.
//! - [`telemetry`]: `LOG_FORMAT` / `RUST_LOG` logging set-up.
//! - [`ops`]: the `/metrics`, `/health`, `/ready` endpoint of the worker and reporter.

pub mod cli;
pub mod dependencies;
pub mod deploy;
pub mod env;
pub mod events;
pub mod history;
pub mod names;
pub mod nats;
pub mod ops;
pub mod provision;
pub mod replay;
pub mod rules;
pub mod runtime;
pub mod shutdown;
pub mod signature;
pub mod telemetry;
