//! Bounded per-account series: the accounts with the most upstream traffic get series
//! of their own, under their Klaviyo id or configured name; every other account is
//! `other`. The ranking is recomputed at each scrape from traffic that decays by half
//! per scrape, so today's busy accounts are the ones shown.

use std::collections::{HashMap, HashSet};

use crate::limiter::Account;

/// Most accounts with series of their own in any per-account metric.
pub const MAX_ACCOUNT_SERIES: usize = 32;

/// The label of every account beyond the top [`MAX_ACCOUNT_SERIES`].
pub const OTHER: &str = "other";

/// Most accounts whose traffic is tracked between scrapes (the rest is not ranked
/// until the decay makes room).
const MAX_TRACKED: usize = 4096;

/// Most names learned by resolution kept (beyond it, the oldest are forgotten and
/// those accounts show as their hash alias).
const MAX_NAMES: usize = 16_384;

/// Which accounts are shown, and under what names.
#[derive(Debug, Default)]
pub struct AccountSeries {
    /// Configured names (replaced whole at a reload).
    configured: HashMap<Account, String>,
    /// Names learned by resolution: Klaviyo ids (`id:app` for OAuth).
    learned: HashMap<Account, String>,
    traffic: HashMap<Account, u64>,
    shown: HashSet<Account>,
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
        let top: HashSet<Account> = ranked.into_iter().take(MAX_ACCOUNT_SERIES).map(|(_, a)| a).collect();
        let dropped: Vec<String> = self.shown.difference(&top).map(|a| self.name(*a)).collect();
        self.shown = top;
        self.traffic.retain(|_, n| {
            *n /= 2;
            *n > 0
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
