//! Several connections for one migration (`connections=<n>`): how the added connections join,
//! and how a round's pages are split across them.
//!
//! ```text
//!  source                                                destination
//!  Start, Config on connection 0 (as with one connection) ─▶
//!  Connections [extra = n-1, token] ─────────────────────▶ builds the VM's memory
//!  connect n-1 more (TLS too when tls_dir is set);
//!  on each: Join [index, token] ─────────────────────────▶ accept, check token and index
//!                                ◀──────────────────────── Ok (on each added connection)
//!                                ◀──────────────────────── Ok to Connections (connection 0)
//!  every round: split the table in n parts by pages
//!    part 0 on connection 0, part i on connection i,       one thread per connection writes
//!    each a normal Memory request, each on its own thread  its part straight into RAM
//!                                ◀──────────────────────── Ok per part
//!  the round ends when every part is acknowledged;
//!  State, Complete on connection 0 only
//! ```
//!
//! A page is in one part of a round only, and a round starts only after every part of the
//! previous one was acknowledged (written into guest memory), so a page sent again in a later
//! round can never be overtaken by its older copy. With one connection nothing here is used and
//! the wire is exactly the one-connection protocol.

use thiserror::Error;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ranges::{MemoryRange, MemoryRangeTable, PAGE_SIZE};

/// Most connections one migration may use.
pub const MAX_CONNECTIONS: u32 = 16;

/// Size of the Connections and Join payloads.
pub const STRIPE_PAYLOAD_BYTES: u64 = 16;

/// A round is not split into parts smaller than this many pages (1 MiB): below it, another
/// connection costs more than it brings.
pub const MIN_PART_PAGES: u64 = 256;

/// Errors decoding the Connections and Join payloads.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StripeError {
    /// The payload has the wrong size.
    #[error("connection payload of {0} bytes (expected 16)")]
    BadLength(usize),
    /// Reserved bytes are not zero.
    #[error("reserved bytes of a connection payload are not zero")]
    ReservedNotZero,
    /// The number of added connections is out of range.
    #[error("{0} added connections asked for (at most {max})", max = MAX_CONNECTIONS - 1)]
    BadCount(u32),
    /// A Join names a connection that was not announced, or one that already joined.
    #[error("connection index {0} was not expected")]
    BadIndex(u32),
    /// A Join carries another migration's token.
    #[error("a connection joined with the wrong token")]
    WrongToken,
}

#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct StripeWire {
    /// Connections: how many are added; Join: this connection's index (1..n).
    number: U32,
    reserved: U32,
    token: U64,
}

fn encode(number: u32, token: u64) -> [u8; 16] {
    let wire = StripeWire {
        number: number.into(),
        reserved: 0.into(),
        token: token.into(),
    };
    let mut out = [0u8; 16];
    out.copy_from_slice(wire.as_bytes());
    out
}

fn decode(bytes: &[u8]) -> Result<(u32, u64), StripeError> {
    let wire =
        StripeWire::read_from_bytes(bytes).map_err(|_| StripeError::BadLength(bytes.len()))?;
    if wire.reserved.get() != 0 {
        return Err(StripeError::ReservedNotZero);
    }
    Ok((wire.number.get(), wire.token.get()))
}

/// The Connections request's payload: `extra` more connections will join with `token`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionsRequest {
    /// Connections added to the first one (1 to `MAX_CONNECTIONS - 1`).
    pub extra: u32,
    /// Random, chosen by the source; every added connection must present it.
    pub token: u64,
}

impl ConnectionsRequest {
    /// A request for `connections - 1` added connections with a fresh random token.
    pub fn new(connections: u32) -> Result<Self, StripeError> {
        let request = ConnectionsRequest {
            extra: connections.saturating_sub(1),
            token: random_u64(),
        };
        request.check()?;
        Ok(request)
    }

    fn check(&self) -> Result<(), StripeError> {
        if self.extra == 0 || self.extra >= MAX_CONNECTIONS {
            return Err(StripeError::BadCount(self.extra));
        }
        Ok(())
    }

    /// The wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        encode(self.extra, self.token)
    }

    /// Decodes and checks a payload received from the source.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StripeError> {
        let (extra, token) = decode(bytes)?;
        let request = ConnectionsRequest { extra, token };
        request.check()?;
        Ok(request)
    }

    /// Checks a Join received on an added connection: the token, and an index in `1..=extra`
    /// that has not joined yet (`joined[i - 1]`), which it then marks.
    pub fn admit(&self, join: &JoinRequest, joined: &mut [bool]) -> Result<usize, StripeError> {
        if join.token != self.token {
            return Err(StripeError::WrongToken);
        }
        let slot = (join.index as usize)
            .checked_sub(1)
            .filter(|&i| join.index <= self.extra && !joined.get(i).copied().unwrap_or(true))
            .ok_or(StripeError::BadIndex(join.index))?;
        joined[slot] = true;
        Ok(slot)
    }
}

/// The Join request's payload, the first thing sent on an added connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    /// This connection's index: 1 for the first added one.
    pub index: u32,
    /// The token of the Connections request.
    pub token: u64,
}

impl JoinRequest {
    /// The wire form.
    pub fn to_bytes(&self) -> [u8; 16] {
        encode(self.index, self.token)
    }

    /// Decodes a payload (its index and token are checked by [`ConnectionsRequest::admit`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StripeError> {
        let (index, token) = decode(bytes)?;
        Ok(JoinRequest { index, token })
    }
}

/// Splits a round into at most `connections` consecutive parts of (nearly) equal page counts,
/// each at least `min_part_pages` long, cutting ranges at page boundaries. Always returns at
/// least one table (empty for an empty round); together the parts are exactly `table`.
pub fn split_round(
    table: &MemoryRangeTable,
    connections: usize,
    min_part_pages: u64,
) -> Vec<MemoryRangeTable> {
    let total = table.total_pages();
    let by_size = (total / min_part_pages.max(1)).max(1);
    let parts = (connections.max(1) as u64).min(by_size);
    let mut out = Vec::with_capacity(parts as usize);
    let mut current = MemoryRangeTable::new();
    let mut done = 0u64; // pages placed in earlier parts and `current`
                         // Part i ends after floor((i + 1) * total / parts) pages.
    let end_of = |i: u64| ((i + 1) as u128 * total as u128 / parts as u128) as u64;
    let mut boundary = end_of(0);
    for range in table {
        let mut gpa = range.gpa;
        let mut left = range.pages();
        while left > 0 {
            let take = left.min(boundary - done);
            if take > 0 {
                // Pieces of one sorted table stay sorted and apart: this cannot fail.
                let _ = current.push(MemoryRange::new(gpa, take * PAGE_SIZE));
                gpa += take * PAGE_SIZE;
                left -= take;
                done += take;
            }
            if done == boundary && (out.len() as u64) + 1 < parts {
                out.push(std::mem::take(&mut current));
                boundary = end_of(out.len() as u64);
            }
        }
    }
    out.push(current);
    out
}

/// 64 random bits from the kernel (the `getrandom` system call, which every seccomp list
/// allows); the clock and process id should the kernel say no (a token guards against a
/// confused peer, not an attacker: TLS does that).
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: the buffer is 8 writable bytes that live across the call.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got == 8 {
        return u64::from_le_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn table(ranges: &[(u64, u64)]) -> MemoryRangeTable {
        MemoryRangeTable::from_ranges(ranges.iter().map(|&(p, n)| MemoryRange::new(p * P, n * P)))
            .unwrap()
    }

    /// The parts, glued back together, are the table; returns the page count of each part.
    fn check_parts(t: &MemoryRangeTable, parts: &[MemoryRangeTable]) -> Vec<u64> {
        let mut glued = MemoryRangeTable::new();
        for part in parts {
            glued.append(part).unwrap();
        }
        assert_eq!(&glued, t);
        parts.iter().map(|p| p.total_pages()).collect()
    }

    #[test]
    fn a_round_is_split_evenly_across_connections() {
        let t = table(&[(0, 1000), (2000, 24), (5000, 3)]);
        let parts = split_round(&t, 4, 1);
        assert_eq!(check_parts(&t, &parts), vec![256, 257, 257, 257]);
        // The cuts fall inside the first range; the last part has the tail ranges.
        assert_eq!(parts[0].ranges(), &[MemoryRange::new(0, 256 * P)]);
        assert_eq!(parts[3].len(), 3);
        let parts = split_round(&t, 3, 1);
        assert_eq!(check_parts(&t, &parts), vec![342, 342, 343]);
    }

    #[test]
    fn one_connection_or_a_small_round_is_one_part() {
        let t = table(&[(0, 100), (300, 100)]);
        assert_eq!(split_round(&t, 1, 1), vec![t.clone()]);
        // 200 pages with a minimum of 256 per part: not worth splitting.
        assert_eq!(split_round(&t, 8, MIN_PART_PAGES), vec![t.clone()]);
        // 600 pages: two parts of at least 256, not four.
        let t = table(&[(0, 600)]);
        let parts = split_round(&t, 4, MIN_PART_PAGES);
        assert_eq!(check_parts(&t, &parts), vec![300, 300]);
    }

    #[test]
    fn an_empty_round_is_one_empty_part() {
        let parts = split_round(&MemoryRangeTable::new(), 4, MIN_PART_PAGES);
        assert_eq!(parts, vec![MemoryRangeTable::new()]);
    }

    #[test]
    fn single_pages_are_never_cut() {
        // 5 ranges of one page over 3 connections: 1, 2, 2 whole pages.
        let t = table(&[(1, 1), (3, 1), (5, 1), (7, 1), (9, 1)]);
        let parts = split_round(&t, 3, 1);
        assert_eq!(check_parts(&t, &parts), vec![1, 2, 2]);
        // More connections than pages: one page each.
        let parts = split_round(&t, 16, 1);
        assert_eq!(check_parts(&t, &parts), vec![1; 5]);
    }

    #[test]
    fn payloads_round_trip_and_reject() {
        let c = ConnectionsRequest::new(4).unwrap();
        assert_eq!(c.extra, 3);
        assert_eq!(ConnectionsRequest::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_ne!(ConnectionsRequest::new(4).unwrap().token, c.token);
        for n in [0, 1, MAX_CONNECTIONS + 1] {
            assert!(ConnectionsRequest::new(n).is_err(), "{n}");
        }
        let j = JoinRequest {
            index: 2,
            token: c.token,
        };
        assert_eq!(JoinRequest::from_bytes(&j.to_bytes()).unwrap(), j);
        assert_eq!(
            JoinRequest::from_bytes(&[0; 15]),
            Err(StripeError::BadLength(15))
        );
        let mut reserved = j.to_bytes();
        reserved[5] = 1;
        assert_eq!(
            JoinRequest::from_bytes(&reserved),
            Err(StripeError::ReservedNotZero)
        );
        let too_many = encode(MAX_CONNECTIONS, 7);
        assert_eq!(
            ConnectionsRequest::from_bytes(&too_many),
            Err(StripeError::BadCount(MAX_CONNECTIONS))
        );
    }

    #[test]
    fn joins_are_admitted_once_with_the_right_token() {
        let c = ConnectionsRequest {
            extra: 2,
            token: 42,
        };
        let mut joined = vec![false; 2];
        let join = |index, token| JoinRequest { index, token };
        assert_eq!(
            c.admit(&join(1, 41), &mut joined),
            Err(StripeError::WrongToken)
        );
        assert_eq!(
            c.admit(&join(0, 42), &mut joined),
            Err(StripeError::BadIndex(0))
        );
        assert_eq!(
            c.admit(&join(3, 42), &mut joined),
            Err(StripeError::BadIndex(3))
        );
        assert_eq!(c.admit(&join(2, 42), &mut joined), Ok(1));
        assert_eq!(
            c.admit(&join(2, 42), &mut joined),
            Err(StripeError::BadIndex(2))
        );
        assert_eq!(c.admit(&join(1, 42), &mut joined), Ok(0));
        assert_eq!(joined, vec![true, true]);
    }
}
