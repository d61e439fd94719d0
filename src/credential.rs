//! The `Authorization` value as Klaviyo reads it, normalised before anything is hashed,
//! cached or looked up, so that spellings of one credential never make two accounts.
//!
//! Accepted forms ([`parse`]):
//! - `Klaviyo-API-Key <key>`: a private key ([`Kind::Private`]);
//! - `Bearer <token>`: an OAuth access token ([`Kind::OAuth`]);
//! - the scheme in any ASCII case, surrounding spaces and tabs trimmed, one or more
//!   spaces or tabs between scheme and token. The token is kept exactly (keys are case
//!   sensitive) and must be visible ASCII without spaces.
//!
//! Anything else is [`Kind::Malformed`]: it is forwarded unchanged so that Klaviyo
//! answers 401 itself, and it is normalised too (trimmed, whitespace runs collapsed to
//! one space, the first word lowercased), so that it never creates more than one bucket
//! per distinct normalised value.

use std::fmt;

/// What kind of credential a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `Klaviyo-API-Key pk_...`: every private key of an account shares its quota.
    Private,
    /// `Bearer ...`: an OAuth app's quota in the installing account.
    OAuth,
    /// Neither: Klaviyo will refuse it.
    Malformed,
}

impl Kind {
    /// A bounded label: `private`, `oauth` or `malformed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Private => "private",
            Kind::OAuth => "oauth",
            Kind::Malformed => "malformed",
        }
    }
}

/// A normalised credential. Its `Debug` shows the kind and fingerprint, never the value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credential {
    kind: Kind,
    value: Vec<u8>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential").field("kind", &self.kind).field("fingerprint", &self.fingerprint()).finish()
    }
}

const SCHEMES: [(&str, &str, Kind); 2] =
    [("klaviyo-api-key", "Klaviyo-API-Key", Kind::Private), ("bearer", "Bearer", Kind::OAuth)];

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Parses and normalises an `Authorization` value (see the module docs for the forms).
pub fn parse(raw: &[u8]) -> Credential {
    let trimmed = trim(raw);
    let split = trimmed.iter().position(|&b| is_space(b)).unwrap_or(trimmed.len());
    let (scheme, rest) = trimmed.split_at(split);
    let token = trim(rest);
    let well_formed = !token.is_empty() && split < trimmed.len() && token.iter().all(|&b| b.is_ascii_graphic());
    if well_formed {
        if let Some((_, canonical, kind)) =
            SCHEMES.iter().find(|(lower, _, _)| scheme.eq_ignore_ascii_case(lower.as_bytes()))
        {
            let mut value = Vec::with_capacity(canonical.len() + 1 + token.len());
            value.extend_from_slice(canonical.as_bytes());
            value.push(b' ');
            value.extend_from_slice(token);
            return Credential { kind: *kind, value };
        }
    }
    let mut value = Vec::with_capacity(trimmed.len());
    let mut words = trimmed.split(|&b| is_space(b)).filter(|w| !w.is_empty());
    if let Some(first) = words.next() {
        value.extend(first.iter().map(u8::to_ascii_lowercase));
    }
    for w in words {
        value.push(b' ');
        value.extend_from_slice(w);
    }
    Credential { kind: Kind::Malformed, value }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| !is_space(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|&c| !is_space(c)).map_or(start, |e| e + 1);
    &b[start..end]
}

/// A stable, one-way name for a credential: `fp1_` and 32 hex digits of a SHA-256 of the
/// normalised value. Safe in config files, Redis and the persisted cache (keys are
/// random enough that the hash cannot be inverted); `klaviyo-proxy fingerprint` prints it.
///
/// Held inline (36 bytes): it is computed for every request and is a map key in
/// the account cache, so it costs no allocation to make, clone or compare.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

const FINGERPRINT_PREFIX: &[u8; 4] = b"fp1_";
const FINGERPRINT_LEN: usize = 4 + 32;

impl From<Fingerprint> for String {
    fn from(f: Fingerprint) -> String {
        f.as_str().to_owned()
    }
}

impl Fingerprint {
    /// The fingerprint of 16 digest bytes.
    fn of_digest(digest: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; FINGERPRINT_LEN];
        text[..4].copy_from_slice(FINGERPRINT_PREFIX);
        for (i, b) in digest[..16].iter().enumerate() {
            text[4 + 2 * i] = HEX[usize::from(b >> 4)];
            text[5 + 2 * i] = HEX[usize::from(b & 0xf)];
        }
        Fingerprint(text)
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII (`of_digest`, or text checked in `try_from`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// A short prefix for logs.
    pub fn short(&self) -> &str {
        &self.as_str()[..12]
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Fingerprint").field(&self.as_str()).finish()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let hex = s.strip_prefix("fp1_").unwrap_or("");
        match <[u8; FINGERPRINT_LEN]>::try_from(s.as_bytes()) {
            Ok(text)
                if s.starts_with("fp1_") && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Ok(Fingerprint(text))
            }
            _ => Err("must be `fp1_` and 32 lowercase hex digits, as `klaviyo-proxy fingerprint` prints".into()),
        }
    }
}

impl Credential {
    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The normalised value (for a well-formed credential, what goes upstream).
    pub fn as_bytes(&self) -> &[u8] {
        &self.value
    }

    /// The credential's [`Fingerprint`].
    pub fn fingerprint(&self) -> Fingerprint {
        thread_local! {
            static LAST: Last<Fingerprint> = const { Last::new() };
        }
        LAST.with(|last| {
            last.get_or(&[&self.value], || {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                ctx.update(b"klaviyo-proxy credential v1\0");
                ctx.update(&self.value);
                Fingerprint::of_digest(ctx.finish().as_ref())
            })
        })
    }
}

/// One thread's last answer of a pure function of a credential (its fingerprint, its
/// account hash): a client sends the same key on every request, and each answer is a
/// SHA-256 or an HMAC over it. The key is made of parts, compared one by one, so a hit
/// allocates nothing. Kept in a `thread_local!` of the function's own.
///
/// The remembered key is another client's credential: its `Debug` never shows it, and
/// it is compared in constant time, so how long a lookup takes does not tell a client
/// how much of its key matches the key before it.
pub(crate) struct Last<V>(std::cell::RefCell<Option<(Vec<Vec<u8>>, V)>>);

impl<V> std::fmt::Debug for Last<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Last([redacted])")
    }
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<V: Clone> Last<V> {
    /// Nothing remembered yet.
    pub(crate) const fn new() -> Self {
        Last(std::cell::RefCell::new(None))
    }

    /// The value for `key`: the remembered one when the key is the same, else
    /// `make()`'s, remembered in its place.
    pub(crate) fn get_or(&self, key: &[&[u8]], make: impl FnOnce() -> V) -> V {
        let mut last = self.0.borrow_mut();
        if let Some((k, v)) = last.as_ref() {
            // Every part is compared, even after one differs.
            let same = k.iter().zip(key).fold(k.len() == key.len(), |eq, (a, b)| same_bytes(a, b) & eq);
            if same {
                return v.clone();
            }
        }
        let v = make();
        *last = Some((key.iter().map(|part| part.to_vec()).collect(), v.clone()));
        v
    }
}

/// What `klaviyo-proxy fingerprint` reads: a whole `Authorization` value, or a bare
/// token (a `pk_` key is private, anything else an OAuth access token).
pub fn parse_key_input(input: &str) -> Credential {
    let trimmed = input.trim();
    let parsed = parse(trimmed.as_bytes());
    if parsed.kind != Kind::Malformed || trimmed.contains(char::is_whitespace) {
        return parsed;
    }
    let scheme = if trimmed.starts_with("pk_") { "Klaviyo-API-Key" } else { "Bearer" };
    parse(format!("{scheme} {trimmed}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_the_accepted_forms() {
        let canonical = b"Klaviyo-API-Key pk_abc".as_slice();
        for (raw, kind, value) in [
            ("Klaviyo-API-Key pk_abc", Kind::Private, canonical),
            ("klaviyo-api-key  pk_abc", Kind::Private, canonical),
            ("  KLAVIYO-API-KEY\tpk_abc \t", Kind::Private, canonical),
            ("Bearer tok.en-1", Kind::OAuth, b"Bearer tok.en-1".as_slice()),
            ("bearer   tok.en-1  ", Kind::OAuth, b"Bearer tok.en-1".as_slice()),
            // Keys are case sensitive: only the scheme folds.
            ("Klaviyo-API-Key PK_ABC", Kind::Private, b"Klaviyo-API-Key PK_ABC".as_slice()),
            // Malformed values are normalised too, never forwarded differently.
            ("pk_abc", Kind::Malformed, b"pk_abc".as_slice()),
            ("Klaviyo-API-Key", Kind::Malformed, b"klaviyo-api-key".as_slice()),
            ("Klaviyo-API-Key   ", Kind::Malformed, b"klaviyo-api-key".as_slice()),
            ("Basic   dXNlcjpwdw==", Kind::Malformed, b"basic dXNlcjpwdw==".as_slice()),
            ("  BASIC dXNlcjpwdw== ", Kind::Malformed, b"basic dXNlcjpwdw==".as_slice()),
            ("Bearer two words", Kind::Malformed, b"bearer two words".as_slice()),
            ("Klaviyo-API-Key pk_\u{e9}", Kind::Malformed, "klaviyo-api-key pk_\u{e9}".as_bytes()),
            ("", Kind::Malformed, b"".as_slice()),
            (" \t ", Kind::Malformed, b"".as_slice()),
        ] {
            let c = parse(raw.as_bytes());
            assert_eq!((c.kind(), c.as_bytes()), (kind, value), "{raw:?}");
        }
    }

    #[test]
    fn spellings_share_a_fingerprint_and_debug_hides_the_value() {
        let a = parse(b"Klaviyo-API-Key pk_secret_1");
        let b = parse(b" klaviyo-api-key \t pk_secret_1");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), parse(b"Bearer pk_secret_1").fingerprint());
        assert_ne!(a.fingerprint(), parse(b"Klaviyo-API-Key pk_secret_2").fingerprint());
        let fp = a.fingerprint();
        assert!(Fingerprint::try_from(fp.as_str().to_string()).is_ok());
        assert!(!format!("{a:?}").contains("secret"), "{a:?}");
        assert!(format!("{a:?}").contains(fp.as_str()));
    }

    #[test]
    fn the_last_answer_serves_only_the_same_key() {
        let last = Last::new();
        let mut made = 0;
        let mut get = |key: &[&[u8]], v: u32| {
            last.get_or(key, || {
                made += 1;
                v
            })
        };
        assert_eq!(get(&[b"a", b"bc"], 1), 1);
        assert_eq!(get(&[b"a", b"bc"], 2), 1, "the same key: remembered");
        // The parts are compared one by one: other splits of the same bytes are others.
        assert_eq!(get(&[b"ab", b"c"], 3), 3);
        assert_eq!(get(&[b"ab"], 4), 4);
        assert_eq!(get(&[b"a", b"bc"], 5), 5, "one answer is remembered, the last");
        assert_eq!(made, 4);
        assert_eq!(format!("{last:?}"), "Last([redacted])", "the remembered key never shows");
        // Through the memo, a fingerprint is still the credential's own.
        let (a, b) = (parse(b"Klaviyo-API-Key pk_memo_1"), parse(b"Klaviyo-API-Key pk_memo_2"));
        let fa = a.fingerprint();
        assert_ne!(b.fingerprint(), fa);
        assert_eq!(a.fingerprint(), fa);
    }

    #[test]
    fn fingerprint_text_is_checked() {
        for bad in [
            "",
            "fp1_",
            "fp1_ABCDEF0123456789abcdef0123456789",
            "fp2_0123456789abcdef0123456789abcdef",
            "pk_x",
            "fp1_0123456789abcdef0123456789abcde",
            "fp1_0123456789abcdef0123456789abcdef0",
        ] {
            assert!(Fingerprint::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn fingerprint_is_the_hex_of_the_digest_and_reads_back() {
        let key = parse(b"Klaviyo-API-Key pk_abc_1");
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"klaviyo-proxy credential v1\0");
        ctx.update(key.as_bytes());
        let hex: String = ctx.finish().as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
        let fp = key.fingerprint();
        assert_eq!(fp.as_str(), format!("fp1_{hex}"));
        assert_eq!(fp.short(), &fp.as_str()[..12]);
        assert_eq!(Fingerprint::try_from(fp.to_string()), Ok(fp.clone()));
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
    }

    #[test]
    fn fingerprint_input_takes_bare_tokens() {
        let key = parse(b"Klaviyo-API-Key pk_abc_1");
        assert_eq!(parse_key_input("pk_abc_1\n"), key);
        assert_eq!(parse_key_input("Klaviyo-API-Key pk_abc_1"), key);
        assert_eq!(parse_key_input("tok_1").kind(), Kind::OAuth);
        assert_eq!(parse_key_input("bearer tok_1"), parse(b"Bearer tok_1"));
    }
}
