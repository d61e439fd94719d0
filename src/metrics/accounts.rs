//! Bounded per-account series: the accounts with the most upstream traffic get series
//! of their own, under their Klaviyo id or configured name; every other account is
//! `other`. The ranking is recomputed at each scrape from traffic that decays by half
//! per scrape, so today's busy accounts are the ones shown.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

use crate::limiter::{Account, AccountMap, AccountSet};

/// Most accounts with series of their own in any per-account metric.
pub const MAX_ACCOUNT_SERIES: usize = 32;

/// The label of every account beyond the top [`MAX_ACCOUNT_SERIES`].
pub const OTHER: &str = "other";

/// Most accounts whose traffic is tracked between scrapes (the rest is not ranked
/// until the decay makes room).
const MAX_TRACKED: usize = 4096;

/// Most `RateLimit-Remaining` reports held between scrapes (one per account and
/// endpoint): beyond it the oldest is forgotten, so a flood of bogus keys costs bounded
/// memory even if nobody scrapes.
pub(crate) const MAX_REPORTED: usize = 4096;

/// Most names learned by resolution kept (beyond it, the oldest are forgotten and
/// those accounts show as their hash alias).
const MAX_NAMES: usize = 16_384;

/// Which accounts are shown, and under what names.
#[derive(Debug, Default)]
pub struct AccountSeries {
    /// Configured names (replaced whole at a reload).
    configured: HashMap<Account, String>,
    /// Names learned by resolution: Klaviyo ids (`id:app` for OAuth).
    learned: AccountMap<Account, String>,
    traffic: AccountMap<Account, u64>,
    shown: AccountSet,
}

impl AccountSeries {
    /// Replaces the configured names.
    pub fn set_configured(&mut self, names: HashMap<Account, String>) {
        self.configured = names;
    }

    /// Names an account learned by resolution.
    pub fn learn(&mut self, account: Account, name: String) {
        if self.learned.len() >= MAX_NAMES && !self.learned.contains_key(&account) {
            self.learned.clear();
        }
        self.learned.insert(account, name);
    }

    /// Whether the account is named as `name` already (a cheap check before `learn`).
    pub fn knows(&self, account: Account, name: &str) -> bool {
        self.learned.get(&account).is_some_and(|n| n == name)
    }

    /// Counts one upstream request of an account; a free slot shows it at once.
    pub fn note(&mut self, account: Account) {
        if self.traffic.len() < MAX_TRACKED || self.traffic.contains_key(&account) {
            *self.traffic.entry(account).or_default() += 1;
        }
        if self.shown.len() < MAX_ACCOUNT_SERIES {
            self.shown.insert(account);
        }
    }

    /// The account's label: its name (configured, learned, else its hash alias) when
    /// shown, else [`OTHER`].
    pub fn label(&self, account: Account) -> String {
        if !self.shown.contains(&account) {
            return OTHER.to_string();
        }
        self.name(account)
    }

    /// The account's name, shown or not.
    pub fn name(&self, account: Account) -> String {
        self.configured.get(&account).or_else(|| self.learned.get(&account)).cloned().unwrap_or_else(|| account.alias())
    }

    /// Shows the top accounts by recent traffic, halves the traffic, and returns the
    /// labels of the accounts no longer shown (their series are to be removed).
    pub fn rerank(&mut self) -> Vec<String> {
        let mut ranked: Vec<(u64, Account)> = self.traffic.iter().map(|(a, n)| (*n, *a)).collect();
        // Ties keep the accounts already shown.
        ranked.sort_unstable_by_key(|(n, a)| (std::cmp::Reverse(*n), !self.shown.contains(a), *a));
        let top: AccountSet = ranked.into_iter().take(MAX_ACCOUNT_SERIES).map(|(_, a)| a).collect();
        let dropped: Vec<String> = self.shown.difference(&top).map(|a| self.name(*a)).collect();
        self.shown = top;
        self.traffic.retain(|_, n| {
            *n /= 2;
            *n > 0
        });
        dropped
    }
}

/// Klaviyo's last `RateLimit-Remaining` per (account, endpoint) and when it came: at
/// most [`MAX_REPORTED`], the oldest report forgotten first, in O(1) amortised work per
/// report.
#[derive(Debug, Default)]
pub(crate) struct Reported {
    /// The latest report of each key, with its sequence number.
    latest: AccountMap<(Account, usize), (i64, Instant, u64)>,
    /// Keys in report order; an entry whose sequence number is not its key's latest is
    /// stale (the key reported again since, or was forgotten).
    order: VecDeque<((Account, usize), u64)>,
    seq: u64,
}

impl Reported {
    /// Records a report, forgetting the oldest beyond [`MAX_REPORTED`].
    pub(crate) fn insert(&mut self, key: (Account, usize), remaining: i64, at: Instant) {
        self.seq += 1;
        self.latest.insert(key, (remaining, at, self.seq));
        self.order.push_back((key, self.seq));
        while self.latest.len() > MAX_REPORTED {
            let Some((old, seq)) = self.order.pop_front() else { break };
            if self.latest.get(&old).is_some_and(|v| v.2 == seq) {
                self.latest.remove(&old);
            }
        }
        // Keys reporting again leave stale entries behind: dropped once they are half,
        // so each report pays for at most one.
        if self.order.len() > 2 * self.latest.len().max(64) {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let latest = &self.latest;
        self.order.retain(|(key, seq)| latest.get(key).is_some_and(|v| v.2 == *seq));
    }

    /// Keeps the reports `current` says are recent (at scrape time).
    pub(crate) fn keep(&mut self, current: impl Fn(Instant) -> bool) {
        self.latest.retain(|_, (_, at, _)| current(*at));
        self.compact();
    }

    /// (remaining, key) of every report held.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (i64, (Account, usize))> + '_ {
        self.latest.iter().map(|(key, (remaining, _, _))| (*remaining, *key))
    }

    /// Reports held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.latest.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn reports_stay_bounded_and_the_newest_are_kept() {
        let mut r = Reported::default();
        let now = Instant::now();
        for n in 0..3 * MAX_REPORTED as u128 {
            r.insert((Account(n), 1), 5, now);
            // One busy key reporting all along stays, and leaves no garbage behind.
            r.insert((Account(u128::MAX), 1), 7, now);
            assert!(r.len() <= MAX_REPORTED && r.order.len() <= 2 * MAX_REPORTED + 2, "{} {}", r.len(), r.order.len());
        }
        let held: HashSet<Account> = r.iter().map(|(_, (a, _))| a).collect();
        assert!(held.contains(&Account(u128::MAX)));
        assert!(held.contains(&Account(3 * MAX_REPORTED as u128 - 1)));
        assert!(!held.contains(&Account(0)), "the oldest are forgotten");
        r.keep(|_| false);
        assert_eq!((r.len(), r.order.len()), (0, 0));
    }

    #[test]
    fn top_accounts_by_traffic_plus_other() {
        let mut s = AccountSeries::default();
        s.learn(Account(7), "Acme01".into());
        s.note(Account(7));
        assert_eq!(s.label(Account(7)), "Acme01");
        // Free slots fill at once; beyond them, accounts are `other` until ranked.
        for n in 100..100 + MAX_ACCOUNT_SERIES as u128 {
            s.note(Account(n));
        }
        let late = Account(99);
        for _ in 0..50 {
            s.note(late);
        }
        assert_eq!(s.label(late), OTHER);
        let dropped = s.rerank();
        assert_eq!(s.label(late), late.alias(), "the busiest account is shown after a ranking");
        assert_eq!(s.label(Account(7)), "Acme01", "ties keep the accounts already shown");
        assert_eq!(dropped.len(), 1);
        let shown = (0..200u128).filter(|n| s.label(Account(*n)) != OTHER).count();
        assert_eq!(shown, MAX_ACCOUNT_SERIES);
        // Traffic decays: a burst long ago no longer holds a slot.
        for _ in 0..10 {
            for n in 100..100 + MAX_ACCOUNT_SERIES as u128 {
                s.note(Account(n));
            }
            s.rerank();
        }
        assert_eq!(s.label(late), OTHER);
        s.set_configured([(Account(100), "main".to_string())].into());
        assert_eq!(s.label(Account(100)), "main");
    }
}
