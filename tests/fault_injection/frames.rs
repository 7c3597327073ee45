//! A fake migration source: hand-made frames (`vm-migration/src/protocol/`) for a receiving VMM.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

/// A request header: magic "VMMQ", version 1, the command, 8 reserved bytes, the length.
pub fn header(command: u16, length: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(24);
    h.extend_from_slice(b"VMMQ");
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&command.to_le_bytes());
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&length.to_le_bytes());
    h
}

/// A request with its payload.
pub fn request(command: u16, payload: &[u8]) -> Vec<u8> {
    let mut r = header(command, payload.len() as u64);
    r.extend_from_slice(payload);
    r
}

/// A range table of `(gpa, length)` entries.
pub fn table(ranges: &[(u64, u64)]) -> Vec<u8> {
    ranges
        .iter()
        .flat_map(|(gpa, len)| gpa.to_le_bytes().into_iter().chain(len.to_le_bytes()))
        .collect()
}

/// An answer: `Ok(())`, or `Err((reason, message))`.
pub fn read_answer(conn: &mut UnixStream) -> std::io::Result<Result<(), (u16, String)>> {
    let mut h = [0u8; 16];
    conn.read_exact(&mut h)?;
    assert_eq!(&h[..4], b"VMMR", "response magic");
    let status = u16::from_le_bytes([h[6], h[7]]);
    let reason = u16::from_le_bytes([h[8], h[9]]);
    let len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
    let mut message = vec![0u8; len];
    conn.read_exact(&mut message)?;
    Ok(match status {
        1 => Ok(()),
        _ => Err((reason, String::from_utf8_lossy(&message).into_owned())),
    })
}

/// Sends `bytes` and reads the answer.
pub fn exchange(conn: &mut UnixStream, bytes: &[u8]) -> Result<(), (u16, String)> {
    conn.write_all(bytes).expect("send a frame");
    read_answer(conn).expect("read the answer")
}
