//! Rate limiting: the window math ([`window`]) and the store that holds every bucket
//! ([`local`]). A decision takes one token from every window of every bucket a request
//! needs, all at once or none.

pub mod local;
pub mod window;

use std::time::Duration;

pub use local::{BucketView, Grant, LocalStore, MAX_DEMANDS};
pub use window::{Tick, WindowSpec};

/// The account a bucket belongs to: a keyed hash of the credential (or of the
/// `company_id` for `/client/` operations), never the credential itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Account(pub u128);

impl Account {
    /// Requests that carry no credential share this account; Klaviyo rejects them anyway.
    pub const ANONYMOUS: Account = Account(0);

    /// A short alias safe to show in logs and metrics (a prefix of the keyed hash).
    pub fn alias(self) -> String {
        format!("{:08x}", (self.0 >> 96) as u32)
    }
}

/// Which of an account's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BucketId {
    /// An endpoint's own bucket (stable and beta versions share it).
    Endpoint(u16),
    /// The extra bucket of an endpoint's `n`-th conditional limit.
    Condition(u16, u8),
    /// Paths the catalog does not know share one conservative bucket.
    Unknown,
}

/// A bucket: one account's counter for one endpoint (or condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    /// Whose quota.
    pub account: Account,
    /// Which counter.
    pub bucket: BucketId,
}

/// The windows of one bucket: burst, steady and, for some endpoints, a daily cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    specs: [WindowSpec; 3],
    len: u8,
}

impl Windows {
    /// Builds the windows from up to three specs.
    pub fn new(specs: &[WindowSpec]) -> Self {
        assert!((1..=3).contains(&specs.len()), "a bucket has one to three windows");
        let mut all = [specs[0]; 3];
        all[..specs.len()].copy_from_slice(specs);
        Windows { specs: all, len: specs.len() as u8 }
    }

    /// The specs, in order.
    pub fn as_slice(&self) -> &[WindowSpec] {
        &self.specs[..usize::from(self.len)]
    }
}

/// One bucket a request needs a token from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// The bucket.
    pub key: BucketKey,
    /// Its windows under the current config.
    pub windows: Windows,
}

/// Why the limiter would not queue a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The bucket's queue already holds `max_depth` requests.
    QueueFull {
        /// When a request arriving now could go.
        wait: Duration,
    },
    /// The request could only go after its deadline.
    Deadline {
        /// When the request could go.
        wait: Duration,
    },
}

/// Converts a duration to window ticks (µs).
pub fn ticks(d: Duration) -> Tick {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
