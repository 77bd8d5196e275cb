//! Everything a request can fail with, mapped to an HTTP status in one place.

use std::time::Duration;

use iac_shared::events::RequestError;
use iac_shared::signature::TimestampedError;
use warp::http::StatusCode;

use crate::deploy::DeployRequestError;
use crate::deployments::DeploymentsError;
use crate::store::StoreError;
use crate::webhook::BodyError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("Invalid signature")]
    InvalidSignature,
    #[error("{0}")]
    Timestamped(#[from] TimestampedError),
    #[error("X-IAC-Nonce was used before: a request is accepted once")]
    ReplayedNonce,
    #[error("Legacy sync endpoint disabled")]
    SyncDisabled,
    #[error("Request body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("Request body did not arrive within {}", humantime::format_duration(*.0))]
    BodyTimeout(Duration),
    #[error("Too many request bodies are being received; retry later")]
    Busy,
    #[error("Request body could not be read")]
    BodyRead,
    #[error("Invalid X-GitHub-Delivery header: at most 128 visible ASCII characters")]
    BadDelivery,
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Deploy(#[from] DeployRequestError),
    #[error("Event store unavailable: {0}")]
    Unavailable(#[from] StoreError),
    #[error("Deployment store unavailable: {0}")]
    DeploymentsUnavailable(#[from] DeploymentsError),
}

impl warp::reject::Reject for GatewayError {}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidSignature
            | GatewayError::Timestamped(_)
            | GatewayError::ReplayedNonce => StatusCode::UNAUTHORIZED,
            GatewayError::SyncDisabled => StatusCode::NOT_FOUND,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::BodyRead
            | GatewayError::BadDelivery
            | GatewayError::Body(_)
            | GatewayError::Request(_)
            | GatewayError::Deploy(_) => StatusCode::BAD_REQUEST,
            GatewayError::Unavailable(_)
            | GatewayError::DeploymentsUnavailable(_)
            | GatewayError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `outcome` label of `iac_gateway_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            GatewayError::InvalidSignature | GatewayError::Timestamped(_) => "invalid_signature",
            GatewayError::ReplayedNonce => "replayed",
            GatewayError::SyncDisabled => "disabled",
            GatewayError::TooLarge(_) => "too_large",
            GatewayError::BodyTimeout(_) => "body_timeout",
            GatewayError::BodyRead
            | GatewayError::BadDelivery
            | GatewayError::Body(_)
            | GatewayError::Request(_)
            | GatewayError::Deploy(_) => "bad_request",
            GatewayError::Unavailable(_) | GatewayError::DeploymentsUnavailable(_) => "unavailable",
            GatewayError::Busy => "busy",
        }
    }
}
