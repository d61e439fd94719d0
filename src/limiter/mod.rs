//! Rate limiting: the window math ([`window`]) and the stores that hold the buckets:
//! [`local`] in this process, or [`redis`] shared by every replica through
//! [`shared`] (with a local fallback). A decision takes one token from every window of
//! every bucket a request needs, all at once or none.

pub mod local;
pub mod ramp;
pub mod redis;
pub mod shared;
pub mod state;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::time::Duration;

use tokio::time::Instant;

pub use local::{AccountHasher, BucketView, Grant, LocalStore, Place, Turn, DEFAULT_MAX_BUCKETS, MAX_DEMANDS};
pub use shared::{SharedStore, StoreState};
pub use window::{Tick, WindowSpec};

/// The bucket store a proxy decides with, chosen by `limiter.store`.
#[derive(Debug)]
pub enum Limiter {
    /// This process only.
    Local(LocalStore),
    /// Redis, shared by every replica, with a local fallback.
    Shared(Box<SharedStore>),
}

impl Limiter {
    /// Which store decides right now (for `/health` and the metrics).
    pub fn state(&self) -> StoreState {
        match self {
            Limiter::Local(_) => StoreState::Local,
            Limiter::Shared(s) => s.state(),
        }
    }

    /// Whether the shared store has fallen back to counting locally.
    pub fn is_degraded(&self) -> bool {
        self.state() == StoreState::Degraded
    }

    /// The store that decides locally: the only one, or the Redis fallback.
    pub fn local(&self) -> &LocalStore {
        match self {
            Limiter::Local(l) => l,
            Limiter::Shared(s) => s.fallback(),
        }
    }

    /// Pauses buckets until `until` (an upstream `Retry-After`). With Redis, every
    /// replica pauses; if Redis cannot be told, the error says so and this replica is
    /// degraded (its caller pauses the local store as for `local`).
    pub async fn pause(&self, keys: &[BucketKey], until: Instant) -> Result<(), redis::RedisStoreError> {
        match self {
            // The local pause belongs to the local store (`Bucket::paused_until`).
            Limiter::Local(_) => Ok(()),
            Limiter::Shared(s) => {
                let delay = until.saturating_duration_since(Instant::now());
                s.redis().pause(keys, delay).await.inspect_err(|e| s.mark_down(e))
            }
        }
    }

    /// Applies `RateLimit-Remaining` / `RateLimit-Reset` from a response to the steady
    /// window of the request's first bucket, so that no replica believes it has more
    /// left than Klaviyo says. Returns the phantom takes added.
    pub async fn correct(
        &self,
        demand: &Demand,
        remaining: u32,
        reset: Duration,
    ) -> Result<u64, redis::RedisStoreError> {
        match self {
            // The local correction belongs to the local store.
            Limiter::Local(_) => Ok(0),
            Limiter::Shared(s) => s.redis().correct(demand, 1, remaining, reset).await.inspect_err(|e| s.mark_down(e)),
        }
    }

    /// Drops idle buckets.
    pub fn sweep(&self, now: Instant) {
        match self {
            Limiter::Local(l) => l.sweep(now),
            Limiter::Shared(s) => s.sweep(now),
        }
    }

    /// Background work of the store, to run for the proxy's lifetime: the shared
    /// store's heartbeat (replica count, and the way back from degraded). Returns at
    /// once for the local store.
    pub async fn run_background(&self) {
        let s = match self {
            Limiter::Local(store) => return store_snapshots(store).await,
            Limiter::Shared(s) => s,
        };
        let mut every = tokio::time::interval(shared::HEARTBEAT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            s.beat().await;
        }
    }
}

/// With `limiter.state_path`, the local store's snapshot every second (and a last, clean
/// one at shutdown: [`Limiter::save_at_shutdown`]).
async fn store_snapshots(store: &LocalStore) {
    if !store.persists() {
        return;
    }
    let mut every = tokio::time::interval(state::SNAPSHOT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(error) = store.save(false) {
            tracing::warn!(%error, "cannot snapshot the limiter state");
        }
    }
}

impl Limiter {
    /// The local store's clean snapshot, once nothing else will leave (with
    /// `limiter.state_path`; the Redis store keeps its state in Redis).
    pub fn save_at_shutdown(&self) {
        if let Limiter::Local(store) = self {
            if let Err(error) = store.save(true) {
                tracing::warn!(%error, "cannot save the limiter state at shutdown");
            }
        }
    }
}

/// The account a bucket belongs to: a keyed hash of the credential (or of the
/// `company_id` for `/client/` operations), never the credential itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Account(pub u128);

/// A map keyed by account (or by account first), hashed with a multiply: the account
/// is already a keyed hash, so SipHash's protection buys nothing on the request path.
pub type AccountMap<K, V> = HashMap<K, V, BuildHasherDefault<AccountHasher>>;

/// A set of accounts, hashed as [`AccountMap`].
pub type AccountSet = HashSet<Account, BuildHasherDefault<AccountHasher>>;

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
    /// The request needs a bucket the store does not hold, and it holds as many as it
    /// may (`limiter.max_buckets`), none of them idle.
    TooManyBuckets {
        /// When a held bucket may become idle.
        wait: Duration,
    },
}

impl Denied {
    /// How long until a request like this one could be taken.
    pub fn wait(self) -> Duration {
        match self {
            Denied::QueueFull { wait } | Denied::Deadline { wait } | Denied::TooManyBuckets { wait } => wait,
        }
    }
}

/// Converts a duration to window ticks (µs).
pub fn ticks(d: Duration) -> Tick {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
