//! Randomness that must not be guessed (the account-hash key, `unique_id`s the proxy
//! adds, request ids) comes from the OS CSPRNG, not a fast seeded generator.

use ring::rand::{SecureRandom, SystemRandom};

/// `N` bytes from the OS CSPRNG.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    fill(&mut out);
    out
}

fn fill(out: &mut [u8]) {
    // The OS generator fails only when the OS cannot give randomness at all, and then
    // nothing secret can be made: stop rather than go on with a guessable key.
    SystemRandom::new().fill(out).expect("the OS random number generator failed");
}

/// OS randomness fetched a page at a time, per thread: a request id must not cost a
/// system call. Every byte is handed out once; none is derived from another.
struct Pool {
    buf: [u8; 4096],
    used: usize,
}

thread_local! {
    static POOL: std::cell::RefCell<Pool> = const { std::cell::RefCell::new(Pool { buf: [0; 4096], used: 4096 }) };
}

/// 16 bytes from the OS CSPRNG, through this thread's pool.
fn pooled16() -> [u8; 16] {
    POOL.with_borrow_mut(|pool| {
        if pool.used + 16 > pool.buf.len() {
            fill(&mut pool.buf);
            pool.used = 0;
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&pool.buf[pool.used..pool.used + 16]);
        // Handed out: never again, not even to a later caller on this thread.
        pool.buf[pool.used..pool.used + 16].fill(0);
        pool.used += 16;
        out
    })
}

/// 128 random bits as 32 lower-case hex digits, without an allocation.
pub fn hex128_bytes() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (pair, b) in out.chunks_exact_mut(2).zip(pooled16()) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    out
}

/// 128 random bits as 32 lower-case hex digits.
pub fn hex128() -> String {
    String::from_utf8(hex128_bytes().to_vec()).expect("hex digits are ASCII")
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
        // Past one pool's worth, ids stay distinct (the pool refills, never repeats).
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| hex128()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
