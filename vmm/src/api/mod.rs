//! The REST API: requests, errors, the HTTP server on the API socket and a small client.
//!
//! Endpoints live under `/api/v1/` on a UNIX socket, as in Cloud Hypervisor:
//!
//! | endpoint | method | body | request |
//! |---|---|---|---|
//! | `vmm.ping` | GET | | [`ApiRequest::VmmPing`] |
//! | `vmm.shutdown` | PUT | | [`ApiRequest::VmmShutdown`] |
//! | `vm.create` | PUT | [`VmConfig`] | [`ApiRequest::VmCreate`] |
//! | `vm.boot`, `vm.pause`, `vm.resume`, `vm.shutdown`, `vm.delete` | PUT | | |
//! | `vm.info`, `vm.counters` | GET | | |
//! | `vm.resize` | PUT | [`VmResizeData`] | [`ApiRequest::VmResize`] |
//! | `vm.send-migration` | PUT | [`SendMigrationData`] | [`ApiRequest::VmSendMigration`] |
//! | `vm.receive-migration` | PUT | [`ReceiveMigrationData`] | [`ApiRequest::VmReceiveMigration`] |
//! | `vm.migration-progress` | GET | | [`ApiRequest::VmMigrationProgress`] |
//! | `vm.migration-cancel` | PUT | | [`ApiRequest::VmMigrationCancel`] |
//! | `vm.balloon-hints` | GET / PUT | PUT: [`BalloonHintsAction`] | |
//!
//! A request is answered `200` with the JSON the handler returns, `204` when it returns nothing,
//! `202` with the progress when it started something that goes on (`vm.send-migration`), or
//! the status of its [`ApiError`] with a body `{"error": "<one line>"}`:
//!
//! | status | meaning |
//! |---|---|
//! | 400 | malformed HTTP, bad JSON, unknown field, invalid configuration ([`ApiError::BadRequest`], [`ApiError::InvalidBody`], [`ApiError::InvalidConfig`]) |
//! | 404 | unknown endpoint |
//! | 405 | known endpoint, wrong method (with an `Allow` header) |
//! | 408 | the request did not arrive in time |
//! | 409 | the VM is not in a state that allows the request ([`ApiError::InvalidState`]) |
//! | 413 | body over [`MAX_BODY_SIZE`] |
//! | 431 | headers over [`MAX_HEADER_SIZE`] or too many of them |
//! | 500 | the request failed ([`ApiError::Internal`]) |
//! | 501 | a feature this VMM does not have, chunked bodies ([`ApiError::Unsupported`]) |
//!
//! Requests are served one at a time. `vm.send-migration` is answered `202` with the progress as
//! soon as the migration has started; it runs on meanwhile (follow it with
//! `vm.migration-progress`, stop it with `vm.migration-cancel`, which is answered once it has
//! stopped). A `vm.receive-migration` is answered when the migration has arrived (or failed),
//! and other requests are served meanwhile (`vm.info` then shows the state `Receiving`).

pub mod client;
mod http;
mod routes;

use std::error::Error;

use crate::config::{
    BalloonHintsAction, ConfigError, ReceiveMigrationData, SendMigrationData, VmConfig,
    VmResizeData,
};

pub use http::{
    decode_request, start_http_server, ApiHandler, ApiReply, DecodedRequest, HttpServerError,
    MAX_BODY_SIZE, MAX_HEADER_SIZE,
};
pub use routes::{parse_request, API_PREFIX};

/// A request to the VMM, decoded from the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET vmm.ping`.
    VmmPing,
    /// `PUT vmm.shutdown`: answered before the handler sees it; the server then stops.
    VmmShutdown,
    /// `PUT vm.create`, with a configuration that passed [`VmConfig::validate`].
    VmCreate(Box<VmConfig>),
    /// `PUT vm.boot`.
    VmBoot,
    /// `GET vm.info`.
    VmInfo,
    /// `GET vm.counters`.
    VmCounters,
    /// `PUT vm.pause`.
    VmPause,
    /// `PUT vm.resume`.
    VmResume,
    /// `PUT vm.shutdown`.
    VmShutdown,
    /// `PUT vm.delete`.
    VmDelete,
    /// `PUT vm.resize`, with only `desired_balloon` set.
    VmResize(VmResizeData),
    /// `PUT vm.send-migration`: answered `202` once the migration has started.
    VmSendMigration(SendMigrationData),
    /// `GET vm.migration-progress`: where the migration being sent or received is, or how the
    /// last one ended.
    VmMigrationProgress,
    /// `PUT vm.migration-cancel`: stops the migration being sent (answered once it has
    /// stopped) or received.
    VmMigrationCancel,
    /// `PUT vm.receive-migration`: answered once the migration has arrived; other requests are
    /// served meanwhile.
    VmReceiveMigration(ReceiveMigrationData),
    /// `GET vm.balloon-hints`: state and counters of the last hinting round.
    VmBalloonHintsGet,
    /// `PUT vm.balloon-hints`: a step of a hinting round outside a migration.
    VmBalloonHintsPut(BalloonHintsAction),
}

/// Why a request failed. Each variant maps to one HTTP status ([`ApiError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 400: the body is not the JSON the endpoint takes.
    #[error("invalid {endpoint} body")]
    InvalidBody {
        /// The endpoint.
        endpoint: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// 400: the body parses but its content is invalid.
    #[error("invalid {endpoint} request")]
    InvalidConfig {
        /// The endpoint.
        endpoint: &'static str,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
    /// 404: no such endpoint.
    #[error("unknown endpoint {0}")]
    NotFound(String),
    /// 405: the endpoint exists but not with this method.
    #[error("method {method} not allowed on {endpoint} (use {allowed})")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The endpoint.
        endpoint: &'static str,
        /// The methods it takes, comma separated (the `Allow` header).
        allowed: &'static str,
    },
    /// 408: the request did not arrive in time.
    #[error("timed out reading the request")]
    RequestTimeout,
    /// 409: the VM's state does not allow the request (e.g. "VM is not running").
    #[error("{0}")]
    InvalidState(String),
    /// 413: the body is too large.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// 431: the headers are too large or too many.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// 500: the request was valid but failed.
    #[error("{message}")]
    Internal {
        /// What failed.
        message: String,
        /// Why, if there is an underlying error.
        #[source]
        source: Option<Box<dyn Error + Send + Sync>>,
    },
    /// 501: something this VMM does not implement.
    #[error("{0} is not supported")]
    Unsupported(String),
    /// 503: too many connections are sending their requests at the same time.
    #[error("too many API connections at once (at most {limit}); try again")]
    TooManyConnections {
        /// The limit.
        limit: usize,
    },
}

/// What a request handler returns: `Some(body)` answers 200 with the JSON body, `None` 204.
pub type ApiResult = Result<Option<serde_json::Value>, ApiError>;

impl ApiError {
    /// A 500 error with a message and the error that caused it.
    pub fn internal(
        message: impl Into<String>,
        source: impl Error + Send + Sync + 'static,
    ) -> Self {
        ApiError::Internal {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A 500 error with only a message.
    pub fn internal_msg(message: impl Into<String>) -> Self {
        ApiError::Internal {
            message: message.into(),
            source: None,
        }
    }

    /// The HTTP status code of this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_)
            | ApiError::InvalidBody { .. }
            | ApiError::InvalidConfig { .. } => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout => 408,
            ApiError::InvalidState(_) => 409,
            ApiError::PayloadTooLarge { .. } => 413,
            ApiError::HeadersTooLarge => 431,
            ApiError::Internal { .. } => 500,
            ApiError::Unsupported(_) => 501,
            ApiError::TooManyConnections { .. } => 503,
        }
    }

    /// The error and its causes on one line, `: ` separated: the `error` of the JSON body.
    pub fn message(&self) -> String {
        error_chain(self)
    }

    /// The JSON error body: `{"error": "<one line>"}`.
    pub fn to_body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message() })
    }
}

/// Formats an error and its `source()` chain on one line, `: ` separated, with any line breaks
/// replaced by spaces.
pub fn error_chain(error: &dyn Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        // Some errors (e.g. io::Error from a custom error) repeat their source in their message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(ApiError::BadRequest("x".into()).status(), 400);
        assert_eq!(ApiError::NotFound("x".into()).status(), 404);
        assert_eq!(
            ApiError::InvalidState("VM is not running".into()).status(),
            409
        );
        assert_eq!(ApiError::internal_msg("boom").status(), 500);
        assert_eq!(ApiError::Unsupported("x".into()).status(), 501);
        assert_eq!(ApiError::HeadersTooLarge.status(), 431);
        assert_eq!(ApiError::PayloadTooLarge { limit: 1 }.status(), 413);
        assert_eq!(ApiError::RequestTimeout.status(), 408);
    }

    #[test]
    fn one_line_chain() {
        let io = std::io::Error::other("connection\nrefused");
        let e = ApiError::internal("migration failed", io);
        assert_eq!(e.to_string(), "migration failed");
        assert_eq!(e.message(), "migration failed: connection refused");
        assert_eq!(
            e.to_body(),
            serde_json::json!({"error": "migration failed: connection refused"})
        );
        let e = ApiError::InvalidConfig {
            endpoint: "vm.create",
            source: ConfigError::NoKernel,
        };
        assert_eq!(
            e.message(),
            "invalid vm.create request: no kernel given (--kernel)"
        );
    }
}
