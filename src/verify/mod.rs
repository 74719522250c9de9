//! Signature verification, one file per provider. Pure functions over bytes: no I/O, no clock.

pub mod standard_webhooks;
pub mod stripe;
pub mod twilio;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{KeyInit, Mac};

/// Why a request's signature was refused. Never carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    #[error("the {0} header is malformed")]
    MalformedHeader(&'static str),
    #[error("the timestamp is outside the {0} s tolerance")]
    TimestampOutOfTolerance(i64),
    #[error("no signature matches")]
    Mismatch,
    #[error("the bodySHA256 query parameter does not match the body")]
    BodyHashMismatch,
    /// The request says it is signed with a Twilio shared key, and the business has none.
    #[error("the request names a Twilio shared key, and the business has none in config.shared_keys")]
    NoSharedKey,
}

impl VerifyError {
    /// Stable machine code for responses and logs. A body-hash mismatch shares
    /// `invalid_signature` because, to the sender, both mean "this request is not authentic".
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_signature",
            Self::MalformedHeader(_) => "malformed_signature",
            Self::TimestampOutOfTolerance(_) => "timestamp_out_of_tolerance",
            Self::Mismatch | Self::BodyHashMismatch => "invalid_signature",
            Self::NoSharedKey => "no_shared_key",
        }
    }
}

/// A MAC keyed with `key` that has absorbed `parts` in order. Feeding parts
/// separately avoids copying large bodies just to prepend a short prefix.
/// `None` only if the MAC refuses the key length, which HMAC never does; it
/// exists so that no code path can panic.
pub(crate) fn keyed_mac<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Option<M> {
    count_mac();
    let mut mac = <M as KeyInit>::new_from_slice(key).ok()?;
    for part in parts {
        mac.update(part);
    }
    Some(mac)
}

static MACS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_MACS: Cell<u64> = const { Cell::new(0) };
}

fn count_mac() {
    MACS.fetch_add(1, Ordering::Relaxed);
    THREAD_MACS.with(|n| n.set(n.get() + 1));
}

/// MACs computed by this process so far: the unit of work a refusal costs, exported as a
/// metric so that a flood's cost can be watched (and asserted on by the tests).
pub fn macs_computed() -> u64 {
    MACS.load(Ordering::Relaxed)
}

/// MACs computed by the calling thread so far (verification is synchronous, so a property
/// test can count exactly what one call cost, whatever runs beside it).
pub fn macs_computed_by_this_thread() -> u64 {
    THREAD_MACS.with(Cell::get)
}

/// Constant-time check of `tag` against the MAC of `parts` under `key`.
pub(crate) fn mac_matches<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    keyed_mac::<M>(key, parts).is_some_and(|mac| mac.verify_slice(tag).is_ok())
}

/// The raw MAC of `parts` under `key` (empty in the impossible case of a refused key).
pub(crate) fn mac_bytes<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    keyed_mac::<M>(key, parts).map_or_else(Vec::new, |mac| mac.finalize().into_bytes().to_vec())
}

#[cfg(test)]
pub(crate) mod test_support {
    /// XOR masks applied at every byte position: a low bit, an ASCII case bit
    /// and the high bit (which also yields invalid UTF-8).
    const MASKS: [u8; 3] = [0x01, 0x20, 0x80];

    /// Every single-byte corruption of `input`, deterministically, with the position for messages.
    pub(crate) fn byte_flips(input: &[u8]) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
        (0..input.len()).flat_map(move |i| {
            MASKS.iter().map(move |mask| {
                let mut out = input.to_vec();
                out[i] ^= mask;
                (i, out)
            })
        })
    }

    /// Same as [`byte_flips`] for header-like strings; invalid UTF-8 becomes U+FFFD,
    /// which is still a corruption.
    pub(crate) fn str_flips(input: &str) -> impl Iterator<Item = (usize, String)> + '_ {
        byte_flips(input.as_bytes()).map(|(i, bytes)| (i, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        assert_eq!(VerifyError::MissingHeader("x").code(), "missing_signature");
        assert_eq!(VerifyError::MalformedHeader("x").code(), "malformed_signature");
        assert_eq!(VerifyError::TimestampOutOfTolerance(300).code(), "timestamp_out_of_tolerance");
        assert_eq!(VerifyError::Mismatch.code(), "invalid_signature");
        assert_eq!(VerifyError::BodyHashMismatch.code(), "invalid_signature");
    }

    #[test]
    fn messages_name_the_header_only() {
        assert_eq!(
            VerifyError::MissingHeader("stripe-signature").to_string(),
            "the stripe-signature header is missing"
        );
        assert_eq!(
            VerifyError::TimestampOutOfTolerance(300).to_string(),
            "the timestamp is outside the 300 s tolerance"
        );
    }

    #[test]
    fn byte_flips_cover_every_position() {
        let flips: Vec<_> = test_support::byte_flips(b"ab").collect();
        assert_eq!(flips.len(), 6);
        assert!(flips.iter().all(|(_, v)| v.as_slice() != b"ab"));
    }
}
