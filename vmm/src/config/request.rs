//! Bodies of the API requests other than `vm.create`, with the `ch-remote` option strings that
//! build them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_migration::striping::MAX_CONNECTIONS;

use super::{ConfigError, OptionParser};

/// `vm.send-migration` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationData {
    /// `unix:<path>` or `tcp:<host>:<port>`.
    pub destination_url: String,
    /// Local migration: guest memory is handed over as file descriptors, not copied. Default false.
    #[serde(default)]
    pub local: bool,
    /// Downtime target for the final round, in milliseconds. Default 300.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Seconds of dirty rounds before `timeout_strategy` applies. Default 3600.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Use free page hints from the guest to skip free pages in round 0. Default true.
    #[serde(default = "default_true")]
    pub free_page_hints: bool,
    /// Skip all-zero pages. Default true.
    #[serde(default = "default_true")]
    pub zero_pages: bool,
    /// Longest wait for a hint round, in milliseconds. The round ends earlier at the driver's
    /// STOP, or once no new hint came for half a second. Default 10000.
    #[serde(default = "default_hint_wait_ms")]
    pub hint_wait_ms: u64,
    /// Directory of TLS files (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`): encrypt the
    /// TCP connections and authenticate both VMMs. Default none (plain TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Connections carrying guest memory, 1 to 16, each with its own thread. Default 1.
    #[serde(default = "default_connections", skip_serializing_if = "is_one")]
    pub connections: u32,
    /// What to do when `timeout_s` passes before the rounds fit `downtime_ms`. Default
    /// `cancel`, as in Cloud Hypervisor (and left out of the JSON then).
    #[serde(default, skip_serializing_if = "TimeoutStrategy::is_default")]
    pub timeout_strategy: TimeoutStrategy,
}

fn default_connections() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// `timeout_strategy` of `vm.send-migration`: Cloud Hypervisor's values (`Cancel`, `Ignore`),
/// lower case accepted too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Give up: the VM keeps running here, the migration ends `cancelled`.
    #[default]
    #[serde(alias = "cancel")]
    Cancel,
    /// Pause the VM and finish, whatever the downtime.
    #[serde(alias = "ignore")]
    Ignore,
}

impl TimeoutStrategy {
    fn is_default(&self) -> bool {
        *self == TimeoutStrategy::default()
    }

    /// Parses `cancel` or `ignore` (any case).
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        match value.to_ascii_lowercase().as_str() {
            "cancel" => Ok(TimeoutStrategy::Cancel),
            "ignore" => Ok(TimeoutStrategy::Ignore),
            _ => Err(ConfigError::InvalidValue {
                flag: "send-migration",
                value: value.to_string(),
                expected: "timeout_strategy=cancel or timeout_strategy=ignore",
            }),
        }
    }
}

fn default_downtime_ms() -> u64 {
    300
}

fn default_timeout_s() -> u64 {
    3600
}

fn default_hint_wait_ms() -> u64 {
    10_000
}

fn default_true() -> bool {
    true
}

impl SendMigrationData {
    /// Options with their defaults for a migration to `destination_url`.
    pub fn new(destination_url: impl Into<String>) -> Self {
        SendMigrationData {
            destination_url: destination_url.into(),
            local: false,
            downtime_ms: default_downtime_ms(),
            timeout_s: default_timeout_s(),
            free_page_hints: true,
            zero_pages: true,
            hint_wait_ms: default_hint_wait_ms(),
            tls_dir: None,
            connections: default_connections(),
            timeout_strategy: TimeoutStrategy::default(),
        }
    }

    /// Parses `ch-remote send-migration`'s argument: either a bare URL, or
    /// `destination_url=<url>[,downtime_ms=<n>][,timeout_s=<n>][,free_page_hints=on|off]
    /// [,zero_pages=on|off][,hint_wait_ms=<n>][,local=on|off][,tls_dir=<dir>][,connections=<n>]`.
    /// [,zero_pages=on|off][,hint_wait_ms=<n>][,local=on|off][,timeout_strategy=cancel|ignore]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        const FLAG: &str = "send-migration";
        if !is_key_value(input) {
            let data = SendMigrationData::new(input);
            data.validate()?;
            return Ok(data);
        }
        let p = OptionParser::parse(
            FLAG,
            input,
            &[
                "destination_url",
                "local",
                "downtime_ms",
                "timeout_s",
                "free_page_hints",
                "zero_pages",
                "hint_wait_ms",
                "tls_dir",
                "connections",
                "timeout_strategy",
            ],
        )?;
        let url = p.get("destination_url").ok_or(ConfigError::MissingKey {
            flag: FLAG,
            key: "destination_url",
        })?;
        let defaults = SendMigrationData::new(url);
        let data = SendMigrationData {
            local: p.toggle("local")?.unwrap_or(defaults.local),
            downtime_ms: p.number("downtime_ms")?.unwrap_or(defaults.downtime_ms),
            timeout_s: p.number("timeout_s")?.unwrap_or(defaults.timeout_s),
            free_page_hints: p
                .toggle("free_page_hints")?
                .unwrap_or(defaults.free_page_hints),
            zero_pages: p.toggle("zero_pages")?.unwrap_or(defaults.zero_pages),
            hint_wait_ms: p.number("hint_wait_ms")?.unwrap_or(defaults.hint_wait_ms),
            tls_dir: p.get("tls_dir").map(PathBuf::from),
            connections: p.number("connections")?.unwrap_or(defaults.connections),
            timeout_strategy: match p.get("timeout_strategy") {
                Some(v) => TimeoutStrategy::parse(v)?,
                None => defaults.timeout_strategy,
            },
            ..defaults
        };
        data.validate()?;
        Ok(data)
    }

    /// Checks the destination URL, and that the connection count and TLS fit it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const FLAG: &str = "send-migration";
        check_url("destination_url", &self.destination_url)?;
        check_tls_dir(FLAG, self.tls_dir.as_deref(), &self.destination_url)?;
        let bad = |problem: String| {
            Err(ConfigError::MigrationOption {
                flag: FLAG,
                problem,
            })
        };
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return bad(format!(
                "connections must be 1 to {MAX_CONNECTIONS} (got {})",
                self.connections
            ));
        }
        if self.local && self.connections > 1 {
            return bad(
                "connections cannot be used with local migration (no memory is copied)".into(),
            );
        }
        Ok(())
    }
}

/// `vm.receive-migration` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationData {
    /// `unix:<path>` or `tcp:<host>:<port>` to listen on.
    pub receiver_url: String,
    /// Directory of TLS files (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`): accept only
    /// an encrypted connection from a source whose certificate chains to the CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
}

impl ReceiveMigrationData {
    /// Parses `ch-remote receive-migration`'s argument: a bare URL or
    /// `receiver_url=<url>[,tls_dir=<dir>]`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let data = if is_key_value(input) {
            let p = OptionParser::parse("receive-migration", input, &["receiver_url", "tls_dir"])?;
            ReceiveMigrationData {
                receiver_url: p.get("receiver_url").unwrap_or_default().to_string(),
                tls_dir: p.get("tls_dir").map(PathBuf::from),
            }
        } else {
            ReceiveMigrationData {
                receiver_url: input.to_string(),
                tls_dir: None,
            }
        };
        data.validate()?;
        Ok(data)
    }

    /// Checks the receiver URL, and that TLS comes with a TCP one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url("receiver_url", &self.receiver_url)?;
        check_tls_dir(
            "receive-migration",
            self.tls_dir.as_deref(),
            &self.receiver_url,
        )
    }
}

/// `vm.resize` body. Only the balloon can be resized; the other Cloud Hypervisor fields are
/// accepted so that [`VmResizeData::validate`] can say they are not supported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResizeData {
    /// New vCPU count: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u8>,
    /// New RAM size: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    /// New balloon size, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}

impl VmResizeData {
    /// Checks that the request resizes the balloon and nothing else.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.desired_vcpus.is_some() {
            return Err(ConfigError::Unsupported("resizing vCPUs"));
        }
        if self.desired_ram.is_some() {
            return Err(ConfigError::Unsupported("resizing RAM"));
        }
        if self.desired_balloon.is_none() {
            return Err(ConfigError::NothingToResize);
        }
        Ok(())
    }
}

/// A step of a free page hinting round run outside a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HintAction {
    /// Ask the guest for hints (a new command id).
    Start,
    /// Stop the round (the STOP command id).
    Stop,
    /// Tell the guest it may reuse the hinted pages (the DONE command id).
    Done,
}

impl HintAction {
    /// Parses `start`, `stop` or `done`.
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        match input {
            "start" => Ok(HintAction::Start),
            "stop" => Ok(HintAction::Stop),
            "done" => Ok(HintAction::Done),
            _ => Err(ConfigError::InvalidValue {
                flag: "balloon-hints",
                value: input.to_string(),
                expected: "start, stop or done",
            }),
        }
    }
}

/// `PUT vm.balloon-hints` body: `{"action": "start"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonHintsAction {
    /// What to do.
    pub action: HintAction,
}

/// Whether `input` is a `key=value` list rather than a bare URL: the text before the first `=`
/// is a plain identifier (a URL has a `:` there).
fn is_key_value(input: &str) -> bool {
    input.split_once('=').is_some_and(|(key, _)| {
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// Checks that a `tls_dir` is a non-empty path and comes with a `tcp:` URL.
fn check_tls_dir(flag: &'static str, dir: Option<&Path>, url: &str) -> Result<(), ConfigError> {
    let problem = match dir {
        None => return Ok(()),
        Some(dir) if dir.as_os_str().is_empty() => "tls_dir is empty",
        Some(_) if !url.starts_with("tcp:") => "tls_dir needs a tcp: URL (TLS runs over TCP)",
        Some(_) => return Ok(()),
    };
    Err(ConfigError::MigrationOption {
        flag,
        problem: problem.into(),
    })
}

/// Checks that `url` is `unix:<path>` or `tcp:<host>:<port>`.
fn check_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let ok = if let Some(path) = url.strip_prefix("unix:") {
        !path.is_empty()
    } else if let Some(address) = url.strip_prefix("tcp:") {
        address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && super::parser::parse_decimal::<u16>(port).is_some()
        })
    } else {
        false
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidUrl {
            key,
            url: url.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_migration_bare_url() {
        let d = SendMigrationData::parse("unix:/tmp/mig.sock").unwrap();
        assert_eq!(d, SendMigrationData::new("unix:/tmp/mig.sock"));
        assert_eq!(d.downtime_ms, 300);
        assert_eq!(d.timeout_s, 3600);
        assert_eq!(d.hint_wait_ms, 10_000);
        assert!(d.free_page_hints && d.zero_pages && !d.local);
        // A '=' inside a URL's path does not make it a key=value list.
        assert_eq!(
            SendMigrationData::parse("unix:/tmp/a=b")
                .unwrap()
                .destination_url,
            "unix:/tmp/a=b"
        );
        SendMigrationData::parse("tcp:127.0.0.1:6000").unwrap();
        SendMigrationData::parse("tcp:[::1]:6000").unwrap();
    }

    #[test]
    fn send_migration_key_value() {
        let d = SendMigrationData::parse(
            "destination_url=tcp:host:1234,downtime_ms=50,timeout_s=10,free_page_hints=off,\
             zero_pages=off,hint_wait_ms=7,local=on,timeout_strategy=ignore",
        )
        .unwrap();
        assert_eq!(
            d,
            SendMigrationData {
                destination_url: "tcp:host:1234".into(),
                local: true,
                downtime_ms: 50,
                timeout_s: 10,
                free_page_hints: false,
                zero_pages: false,
                hint_wait_ms: 7,
                tls_dir: None,
                connections: 1,
                timeout_strategy: TimeoutStrategy::Ignore,
            }
        );
    }

    #[test]
    fn timeout_strategy_defaults_to_cancel_like_cloud_hypervisor() {
        let d = SendMigrationData::parse("destination_url=unix:/x").unwrap();
        assert_eq!(d.timeout_strategy, TimeoutStrategy::Cancel);
        // Left out of the JSON when it is the default; both spellings read.
        let json = serde_json::to_value(&d).unwrap();
        assert!(json.get("timeout_strategy").is_none(), "{json}");
        for (text, want) in [
            ("Cancel", TimeoutStrategy::Cancel),
            ("cancel", TimeoutStrategy::Cancel),
            ("Ignore", TimeoutStrategy::Ignore),
            ("ignore", TimeoutStrategy::Ignore),
        ] {
            let body = format!(r#"{{"destination_url":"unix:/x","timeout_strategy":"{text}"}}"#);
            let d: SendMigrationData = serde_json::from_str(&body).unwrap();
            assert_eq!(d.timeout_strategy, want, "{text}");
        }
        let ignore = SendMigrationData {
            timeout_strategy: TimeoutStrategy::Ignore,
            ..d
        };
        assert_eq!(
            serde_json::to_value(&ignore).unwrap()["timeout_strategy"],
            "Ignore"
        );
        assert!(
            SendMigrationData::parse("destination_url=unix:/x,timeout_strategy=later").is_err()
        );
    }

    #[test]
    fn send_migration_rejects() {
        for bad in [
            "",
            "foo",
            "unix:",
            "tcp:host",
            "tcp:host:port",
            "tcp::80",
            "tcp:host:70000",
            "http://x",
            "downtime_ms=5",
            "destination_url=unix:/x,downtime_ms=-1",
            "destination_url=unix:/x,zero_pages=maybe",
            "destination_url=unix:/x,bogus=1",
            "destination_url=unix:/x,local=on,local=off",
            "destination_url=unix:/x,timeout_strategy=never",
        ] {
            assert!(SendMigrationData::parse(bad).is_err(), "{bad}");
        }
        let e = SendMigrationData::parse("downtime_ms=5").unwrap_err();
        assert_eq!(
            e.to_string(),
            "send-migration: \"destination_url\" is required"
        );
    }

    #[test]
    fn send_migration_json() {
        let d: SendMigrationData =
            serde_json::from_str(r#"{"destination_url": "unix:/x"}"#).unwrap();
        assert_eq!(d, SendMigrationData::new("unix:/x"));
        let full = serde_json::to_value(&d).unwrap();
        assert_eq!(
            full,
            serde_json::json!({"destination_url": "unix:/x", "local": false, "downtime_ms": 300,
                "timeout_s": 3600, "free_page_hints": true, "zero_pages": true, "hint_wait_ms": 10000})
        );
        assert_eq!(
            serde_json::from_value::<SendMigrationData>(full).unwrap(),
            d
        );
        assert!(serde_json::from_str::<SendMigrationData>(
            r#"{"destination_url": "unix:/x", "x": 1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<SendMigrationData>(r#"{"local": true}"#).is_err());
        assert!(serde_json::from_str::<SendMigrationData>(
            r#"{"destination_url": "unix:/x", "downtime_ms": -1}"#
        )
        .is_err());
    }

    #[test]
    fn receive_migration() {
        let d = ReceiveMigrationData::parse("unix:/tmp/r").unwrap();
        assert_eq!(d.receiver_url, "unix:/tmp/r");
        assert_eq!(
            ReceiveMigrationData::parse("receiver_url=tcp:0.0.0.0:6000")
                .unwrap()
                .receiver_url,
            "tcp:0.0.0.0:6000"
        );
        assert!(ReceiveMigrationData::parse("receiver_url=").is_err());
        assert!(ReceiveMigrationData::parse("url=unix:/x").is_err());
        assert!(ReceiveMigrationData::parse("/tmp/x").is_err());
        assert!(
            serde_json::from_str::<ReceiveMigrationData>(r#"{"receiver_url": "unix:/x"}"#).is_ok()
        );
        assert!(serde_json::from_str::<ReceiveMigrationData>(
            r#"{"receiver_url": "unix:/x", "y": 1}"#
        )
        .is_err());
    }

    #[test]
    fn send_migration_tls_and_connections() {
        let d = SendMigrationData::parse(
            "destination_url=tcp:host:1234,tls_dir=/etc/ch/tls,connections=4",
        )
        .unwrap();
        assert_eq!(d.tls_dir.as_deref(), Some(Path::new("/etc/ch/tls")));
        assert_eq!(d.connections, 4);
        assert_eq!(SendMigrationData::parse("tcp:h:1").unwrap().connections, 1);
        // Several connections over a UNIX socket are allowed (the same striping).
        SendMigrationData::parse("destination_url=unix:/x,connections=2").unwrap();
        for (bad, message) in [
            (
                "destination_url=tcp:h:1,connections=0",
                "send-migration: connections must be 1 to 16 (got 0)",
            ),
            (
                "destination_url=tcp:h:1,connections=17",
                "send-migration: connections must be 1 to 16 (got 17)",
            ),
            (
                "destination_url=unix:/x,tls_dir=/d",
                "send-migration: tls_dir needs a tcp: URL (TLS runs over TCP)",
            ),
            (
                "destination_url=unix:/x,local=on,connections=2",
                "send-migration: connections cannot be used with local migration (no memory is \
                 copied)",
            ),
        ] {
            assert_eq!(
                SendMigrationData::parse(bad).unwrap_err().to_string(),
                message
            );
        }
        assert!(SendMigrationData::parse("destination_url=tcp:h:1,connections=x").is_err());
        // JSON: the new fields are optional, and left out of the body when not set.
        let d: SendMigrationData = serde_json::from_str(
            r#"{"destination_url": "tcp:h:1", "tls_dir": "/d", "connections": 3}"#,
        )
        .unwrap();
        assert_eq!(
            (d.tls_dir.as_deref(), d.connections),
            (Some(Path::new("/d")), 3)
        );
        let json = serde_json::to_value(SendMigrationData::new("tcp:h:1")).unwrap();
        assert!(json.get("tls_dir").is_none() && json.get("connections").is_none());
        let d: SendMigrationData =
            serde_json::from_str(r#"{"destination_url": "tcp:h:1", "connections": 20}"#).unwrap();
        assert!(d.validate().is_err());
    }

    #[test]
    fn receive_migration_tls() {
        let d = ReceiveMigrationData::parse("receiver_url=tcp:0.0.0.0:6000,tls_dir=/d").unwrap();
        assert_eq!(d.tls_dir.as_deref(), Some(Path::new("/d")));
        assert_eq!(
            ReceiveMigrationData::parse("tcp:0.0.0.0:6000")
                .unwrap()
                .tls_dir,
            None
        );
        assert_eq!(
            ReceiveMigrationData::parse("receiver_url=unix:/x,tls_dir=/d")
                .unwrap_err()
                .to_string(),
            "receive-migration: tls_dir needs a tcp: URL (TLS runs over TCP)"
        );
        let d: ReceiveMigrationData =
            serde_json::from_str(r#"{"receiver_url": "tcp:h:1", "tls_dir": "/d"}"#).unwrap();
        assert!(d.validate().is_ok());
        assert_eq!(
            serde_json::to_string(&ReceiveMigrationData::parse("tcp:h:1").unwrap()).unwrap(),
            r#"{"receiver_url":"tcp:h:1"}"#
        );
    }

    #[test]
    fn resize() {
        let r: VmResizeData = serde_json::from_str(r#"{"desired_balloon": 1048576}"#).unwrap();
        assert_eq!(r.desired_balloon, Some(1 << 20));
        r.validate().unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"desired_balloon":1048576}"#
        );
        let r: VmResizeData = serde_json::from_str(
            r#"{"desired_vcpus": 2, "desired_ram": null, "desired_balloon": null}"#,
        )
        .unwrap();
        assert!(matches!(r.validate(), Err(ConfigError::Unsupported(_))));
        let r: VmResizeData = serde_json::from_str(r#"{"desired_ram": 1}"#).unwrap();
        assert_eq!(
            r.validate().unwrap_err().to_string(),
            "resizing RAM is not supported"
        );
        let r: VmResizeData = serde_json::from_str("{}").unwrap();
        assert!(matches!(r.validate(), Err(ConfigError::NothingToResize)));
        assert!(serde_json::from_str::<VmResizeData>(r#"{"desired_disk": 1}"#).is_err());
    }

    #[test]
    fn hints_action() {
        let a: BalloonHintsAction = serde_json::from_str(r#"{"action":"start"}"#).unwrap();
        assert_eq!(a.action, HintAction::Start);
        assert_eq!(
            serde_json::to_string(&BalloonHintsAction {
                action: HintAction::Done
            })
            .unwrap(),
            r#"{"action":"done"}"#
        );
        assert!(serde_json::from_str::<BalloonHintsAction>(r#"{"action":"Start"}"#).is_err());
        assert!(serde_json::from_str::<BalloonHintsAction>(r#"{"action":"go"}"#).is_err());
        assert!(serde_json::from_str::<BalloonHintsAction>(r#"{}"#).is_err());
        assert_eq!(HintAction::parse("stop").unwrap(), HintAction::Stop);
        assert!(HintAction::parse("STOP").is_err());
    }
}
