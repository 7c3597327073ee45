//! Mapping between HTTP requests (method, path, body) and [`ApiRequest`]s, both ways.

use serde::de::DeserializeOwned;

use super::{ApiError, ApiRequest};
use crate::config::{ConfigError, VmConfig};

/// Prefix of every endpoint path.
pub const API_PREFIX: &str = "/api/v1/";

/// Which methods an endpoint takes.
#[derive(Clone, Copy)]
enum Methods {
    Get,
    Put,
    GetPut,
}

impl Methods {
    fn allows(self, method: &str) -> bool {
        matches!(
            (self, method),
            (Methods::Get | Methods::GetPut, "GET") | (Methods::Put | Methods::GetPut, "PUT")
        )
    }

    fn allow_header(self) -> &'static str {
        match self {
            Methods::Get => "GET",
            Methods::Put => "PUT",
            Methods::GetPut => "GET, PUT",
        }
    }
}

/// Every endpoint and the methods it takes.
const ENDPOINTS: &[(&str, Methods)] = &[
    ("vmm.ping", Methods::Get),
    ("vmm.shutdown", Methods::Put),
    ("vm.create", Methods::Put),
    ("vm.boot", Methods::Put),
    ("vm.info", Methods::Get),
    ("vm.counters", Methods::Get),
    ("vm.pause", Methods::Put),
    ("vm.resume", Methods::Put),
    ("vm.shutdown", Methods::Put),
    ("vm.delete", Methods::Put),
    ("vm.resize", Methods::Put),
    ("vm.send-migration", Methods::Put),
    ("vm.receive-migration", Methods::Put),
    ("vm.migration-progress", Methods::Get),
    ("vm.migration-cancel", Methods::Put),
    ("vm.balloon-hints", Methods::GetPut),
];

/// Decodes an HTTP request into an [`ApiRequest`].
///
/// `path` may carry a query string, which is ignored. Bodies of endpoints that take none are
/// ignored too, as Cloud Hypervisor does. Bodies are checked beyond their JSON shape:
/// `vm.create` with [`VmConfig::validate`], the others with their own `validate`.
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let name = path
        .strip_prefix(API_PREFIX)
        .ok_or_else(|| ApiError::NotFound(printable(path)))?;
    let &(endpoint, methods) = ENDPOINTS
        .iter()
        .find(|(e, _)| *e == name)
        .ok_or_else(|| ApiError::NotFound(printable(path)))?;
    if !methods.allows(method) {
        return Err(ApiError::MethodNotAllowed {
            method: printable(method),
            endpoint,
            allowed: methods.allow_header(),
        });
    }
    let check = |result: Result<(), ConfigError>| {
        result.map_err(|source| ApiError::InvalidConfig { endpoint, source })
    };
    Ok(match (endpoint, method) {
        ("vmm.ping", _) => ApiRequest::VmmPing,
        ("vmm.shutdown", _) => ApiRequest::VmmShutdown,
        ("vm.create", _) => {
            let config: VmConfig = json_body(endpoint, body)?;
            check(config.validate())?;
            ApiRequest::VmCreate(Box::new(config))
        }
        ("vm.boot", _) => ApiRequest::VmBoot,
        ("vm.info", _) => ApiRequest::VmInfo,
        ("vm.counters", _) => ApiRequest::VmCounters,
        ("vm.pause", _) => ApiRequest::VmPause,
        ("vm.resume", _) => ApiRequest::VmResume,
        ("vm.shutdown", _) => ApiRequest::VmShutdown,
        ("vm.delete", _) => ApiRequest::VmDelete,
        ("vm.resize", _) => {
            let data: crate::config::VmResizeData = json_body(endpoint, body)?;
            check(data.validate())?;
            ApiRequest::VmResize(data)
        }
        ("vm.send-migration", _) => {
            let data: crate::config::SendMigrationData = json_body(endpoint, body)?;
            check(data.validate())?;
            ApiRequest::VmSendMigration(data)
        }
        ("vm.receive-migration", _) => {
            let data: crate::config::ReceiveMigrationData = json_body(endpoint, body)?;
            check(data.validate())?;
            ApiRequest::VmReceiveMigration(data)
        }
        ("vm.migration-progress", _) => ApiRequest::VmMigrationProgress,
        ("vm.migration-cancel", _) => ApiRequest::VmMigrationCancel,
        ("vm.balloon-hints", "GET") => ApiRequest::VmBalloonHintsGet,
        ("vm.balloon-hints", _) => ApiRequest::VmBalloonHintsPut(json_body(endpoint, body)?),
        _ => return Err(ApiError::NotFound(printable(path))),
    })
}

/// Parses a required JSON body.
fn json_body<T: DeserializeOwned>(endpoint: &'static str, body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(format!(
            "{endpoint} needs a JSON body"
        )));
    }
    serde_json::from_slice(body).map_err(|source| ApiError::InvalidBody { endpoint, source })
}

/// Makes untrusted text safe to put in an error message: at most 100 characters, control
/// characters replaced.
fn printable(text: &str) -> String {
    text.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl ApiRequest {
    /// The HTTP method of this request: `GET` or `PUT`.
    pub fn method(&self) -> &'static str {
        match self {
            ApiRequest::VmmPing
            | ApiRequest::VmInfo
            | ApiRequest::VmCounters
            | ApiRequest::VmMigrationProgress
            | ApiRequest::VmBalloonHintsGet => "GET",
            _ => "PUT",
        }
    }

    /// The endpoint name, e.g. `vm.info`.
    pub fn endpoint(&self) -> &'static str {
        match self {
            ApiRequest::VmmPing => "vmm.ping",
            ApiRequest::VmmShutdown => "vmm.shutdown",
            ApiRequest::VmCreate(_) => "vm.create",
            ApiRequest::VmBoot => "vm.boot",
            ApiRequest::VmInfo => "vm.info",
            ApiRequest::VmCounters => "vm.counters",
            ApiRequest::VmPause => "vm.pause",
            ApiRequest::VmResume => "vm.resume",
            ApiRequest::VmShutdown => "vm.shutdown",
            ApiRequest::VmDelete => "vm.delete",
            ApiRequest::VmResize(_) => "vm.resize",
            ApiRequest::VmSendMigration(_) => "vm.send-migration",
            ApiRequest::VmReceiveMigration(_) => "vm.receive-migration",
            ApiRequest::VmMigrationProgress => "vm.migration-progress",
            ApiRequest::VmMigrationCancel => "vm.migration-cancel",
            ApiRequest::VmBalloonHintsGet | ApiRequest::VmBalloonHintsPut(_) => "vm.balloon-hints",
        }
    }

    /// The full path, e.g. `/api/v1/vm.info`.
    pub fn path(&self) -> String {
        format!("{API_PREFIX}{}", self.endpoint())
    }

    /// The JSON body of this request, if it has one.
    pub fn body(&self) -> Option<Vec<u8>> {
        let value = match self {
            ApiRequest::VmCreate(config) => serde_json::to_vec(config),
            ApiRequest::VmResize(data) => serde_json::to_vec(data),
            ApiRequest::VmSendMigration(data) => serde_json::to_vec(data),
            ApiRequest::VmReceiveMigration(data) => serde_json::to_vec(data),
            ApiRequest::VmBalloonHintsPut(data) => serde_json::to_vec(data),
            _ => return None,
        };
        // These types serialize to JSON objects with string keys: this cannot fail.
        value.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        BalloonHintsAction, HintAction, ReceiveMigrationData, SendMigrationData, VmResizeData,
    };

    fn kernel() -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("vmm-routes-{}-vmlinux", std::process::id()));
        std::fs::write(&path, b"\x7fELF\x02\x01\x01\x00").unwrap();
        path
    }

    #[test]
    fn body_less_requests() {
        for (method, endpoint, request) in [
            ("GET", "vmm.ping", ApiRequest::VmmPing),
            ("PUT", "vmm.shutdown", ApiRequest::VmmShutdown),
            ("PUT", "vm.boot", ApiRequest::VmBoot),
            ("GET", "vm.info", ApiRequest::VmInfo),
            ("GET", "vm.counters", ApiRequest::VmCounters),
            ("PUT", "vm.pause", ApiRequest::VmPause),
            ("PUT", "vm.resume", ApiRequest::VmResume),
            ("PUT", "vm.shutdown", ApiRequest::VmShutdown),
            ("PUT", "vm.delete", ApiRequest::VmDelete),
            ("GET", "vm.balloon-hints", ApiRequest::VmBalloonHintsGet),
            (
                "GET",
                "vm.migration-progress",
                ApiRequest::VmMigrationProgress,
            ),
            ("PUT", "vm.migration-cancel", ApiRequest::VmMigrationCancel),
        ] {
            let path = format!("/api/v1/{endpoint}");
            assert_eq!(parse_request(method, &path, b"").unwrap(), request);
            // Bodies and query strings are ignored.
            assert_eq!(
                parse_request(method, &format!("{path}?x=1"), b"{}").unwrap(),
                request
            );
            assert_eq!(request.method(), method);
            assert_eq!(request.path(), path);
            assert_eq!(request.body(), None);
        }
    }

    #[test]
    fn round_trip_with_bodies() {
        let mut config = VmConfig::default();
        config.payload.kernel = Some(kernel());
        let requests = [
            ApiRequest::VmCreate(Box::new(config)),
            ApiRequest::VmResize(VmResizeData {
                desired_balloon: Some(1 << 20),
                ..Default::default()
            }),
            ApiRequest::VmSendMigration(SendMigrationData::new("unix:/tmp/m")),
            ApiRequest::VmReceiveMigration(ReceiveMigrationData {
                receiver_url: "tcp:0.0.0.0:1".into(),
                tls_dir: Some("/etc/tls".into()),
            }),
            ApiRequest::VmBalloonHintsPut(BalloonHintsAction {
                action: HintAction::Stop,
            }),
        ];
        for request in requests {
            let body = request.body().unwrap();
            assert_eq!(
                parse_request(request.method(), &request.path(), &body).unwrap(),
                request
            );
        }
    }

    #[test]
    fn errors() {
        let status = |m: &str, p: &str, b: &[u8]| parse_request(m, p, b).unwrap_err().status();
        assert_eq!(status("GET", "/api/v1/vm.nope", b""), 404);
        assert_eq!(status("GET", "/api/v2/vmm.ping", b""), 404);
        assert_eq!(status("GET", "/", b""), 404);
        assert_eq!(status("GET", "/api/v1/", b""), 404);
        assert_eq!(status("GET", "/api/v1/vmm.ping/", b""), 404);
        assert_eq!(status("PUT", "/api/v1/vmm.ping", b""), 405);
        assert_eq!(status("GET", "/api/v1/vm.boot", b""), 405);
        assert_eq!(status("POST", "/api/v1/vm.balloon-hints", b""), 405);
        assert_eq!(status("DELETE", "/api/v1/vm.delete", b""), 405);
        assert_eq!(status("PUT", "/api/v1/vm.create", b""), 400);
        assert_eq!(status("PUT", "/api/v1/vm.create", b"{"), 400);
        assert_eq!(status("PUT", "/api/v1/vm.create", b"{}"), 400); // no kernel
        assert_eq!(status("PUT", "/api/v1/vm.create", b"\xff\xfe"), 400);
        assert_eq!(
            status("PUT", "/api/v1/vm.resize", br#"{"desired_vcpus": 2}"#),
            400
        );
        assert_eq!(status("PUT", "/api/v1/vm.resize", br#"{}"#), 400);
        assert_eq!(
            status(
                "PUT",
                "/api/v1/vm.send-migration",
                br#"{"destination_url": "x"}"#
            ),
            400
        );
        assert_eq!(
            status(
                "PUT",
                "/api/v1/vm.send-migration",
                br#"{"destination_url": "unix:/x", "foo": 1}"#
            ),
            400
        );
        assert_eq!(
            status(
                "PUT",
                "/api/v1/vm.receive-migration",
                br#"{"receiver_url": 5}"#
            ),
            400
        );
        assert_eq!(
            status("PUT", "/api/v1/vm.balloon-hints", br#"{"action": "pause"}"#),
            400
        );

        let e = parse_request(
            "PUT",
            "/api/v1/vm.send-migration",
            br#"{"destination_url": "unix:/x", "foo": 1}"#,
        )
        .unwrap_err();
        assert!(
            e.message()
                .starts_with("invalid vm.send-migration body: unknown field `foo`"),
            "{}",
            e.message()
        );
        let e = parse_request("PATCH", "/api/v1/vm.info", b"").unwrap_err();
        assert_eq!(e.message(), "method PATCH not allowed on vm.info (use GET)");
        let e = parse_request("GET", "/api/v1/x\u{1b}[2J", b"").unwrap_err();
        assert_eq!(e.message(), "unknown endpoint /api/v1/x?[2J");
    }
}
