//! Decoding the receiving side's JSON payloads, apart from any socket or VM, so they can be
//! tested and fuzzed on plain bytes: the VM configuration of a Config request and the CPU and
//! device state of a State request.

use super::MigrationError;
use crate::config::VmConfig;
use crate::vm::VmSnapshot;

/// Decodes a Config payload and checks that its resources can be used on this host.
pub fn decode_config(payload: &[u8]) -> Result<VmConfig, MigrationError> {
    let config: VmConfig =
        serde_json::from_slice(payload).map_err(|e| MigrationError::Json("config", e))?;
    config
        .validate_resources()
        .map_err(MigrationError::Config)?;
    Ok(config)
}

/// Decodes a State payload (checked further when the VM restores it).
pub fn decode_state(payload: &[u8]) -> Result<VmSnapshot, MigrationError> {
    serde_json::from_slice(payload).map_err(|e| MigrationError::Json("state", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_migration::ErrorReason;

    #[test]
    fn config_round_trips_and_rejects() {
        let config = VmConfig::default();
        let bytes = serde_json::to_vec(&config).unwrap();
        let back = decode_config(&bytes).unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), bytes);
        let too_small = br#"{"memory":{"size":4096}}"#;
        for bad in [&b""[..], b"{", b"{\"cpus\":\"x\"}", b"\xff\xfe", too_small] {
            let err = decode_config(bad).unwrap_err();
            assert_eq!(err.reason(), ErrorReason::Config, "{bad:?}");
        }
    }

    #[test]
    fn state_rejects_garbage() {
        for bad in [&b""[..], b"{", b"null", b"{\"vcpus\":7}"] {
            let err = decode_state(bad).unwrap_err();
            assert_eq!(err.reason(), ErrorReason::State, "{bad:?}");
        }
    }
}
