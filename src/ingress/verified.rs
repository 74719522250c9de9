//! A body is parsed only after its signature holds: the type says so. The
//! ingress hands a handler its body as [`Unverified`]; the only way to
//! [`Verified`] is a signature check, and every parser takes `&Verified`.

use axum::body::Bytes;

use super::ApiError;
use crate::verify::VerifyError;

/// A body as received: its bytes are for computing a signature, nothing else.
pub struct Unverified(Bytes);

/// A body whose signature held.
pub struct Verified(Bytes);

impl Unverified {
    pub(super) fn new(bytes: Bytes) -> Self {
        Unverified(bytes)
    }

    /// The exact bytes the sender signed, for the signature check only.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Runs a signature check over the bytes; the body is usable once it holds.
    pub fn verify(self, check: impl FnOnce(&[u8]) -> Result<(), VerifyError>) -> Result<Verified, ApiError> {
        check(&self.0)?;
        Ok(Verified(self.0))
    }

    /// After a check done elsewhere in this module tree (`verify_with_business_secrets`).
    pub(super) fn verified(self) -> Verified {
        Verified(self.0)
    }
}

impl Verified {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}
