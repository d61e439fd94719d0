//! Randomness that must not be guessed (the account-hash key, `unique_id`s the proxy
//! adds, request ids) comes from the OS CSPRNG, not a fast seeded generator.

use ring::rand::{SecureRandom, SystemRandom};

/// `N` bytes from the OS CSPRNG.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The OS generator fails only when the OS cannot give randomness at all, and then
    // nothing secret can be made: stop rather than go on with a guessable key.
    SystemRandom::new().fill(&mut out).expect("the OS random number generator failed");
    out
}

/// 128 random bits as 32 lower-case hex digits.
pub fn hex128() -> String {
    bytes::<16>().iter().map(|b| format!("{b:02x}")).collect()
}

/// Secret bytes (a generated key) that `Debug` never prints.
#[derive(Clone)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Wraps `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(bytes)
    }

    /// The bytes, for the one place that uses them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_and_hex() {
        let (a, b) = (hex128(), hex128());
        assert_ne!(a, b);
        assert!(a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(bytes::<32>(), bytes::<32>());
    }
}
