//! Scripted faults: what the simulator does wrong, set by `simulate` flags at start and
//! by `POST /__sim/faults` (the whole [`Faults`] as JSON) at run time.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::server::Gate;

/// How the upstream is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outage {
    /// Up.
    #[default]
    None,
    /// Every API request is answered 503.
    Unavailable,
    /// Connections are reset: open ones dropped, new ones get a TCP RST.
    Reset,
    /// The listening socket is closed: connecting is refused.
    Refused,
}

impl Outage {
    /// The server gate this outage needs.
    pub fn gate(self) -> Gate {
        match self {
            Outage::None | Outage::Unavailable => Gate::Open,
            Outage::Reset => Gate::Reset,
            Outage::Refused => Gate::Refuse,
        }
    }
}

/// The faults in force. Every field defaults to "no fault".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of API requests, in [0, 1], answered with a 5xx (not counted against
    /// the limits, nothing done).
    pub error_rate: f64,
    /// The statuses such an error is drawn from, uniformly.
    pub error_statuses: Vec<u16>,
    /// Added to every response, in milliseconds.
    pub latency_ms: u64,
    /// An outage.
    pub outage: Outage,
    /// The outage ends by itself after this many milliseconds (0: until changed).
    /// Needed for `reset` and `refused`, which also cut off the control endpoint.
    pub outage_ms: u64,
    /// "Another consumer": for this many milliseconds from when the faults are set,
    /// the account's quota is spent elsewhere and every API request gets a 429 whose
    /// `Retry-After` is the (integer, rounded up) time left.
    pub throttle_for_ms: u64,
    /// Share of API requests, in [0, 1], answered 429 at random (another consumer
    /// spending part of the quota).
    pub throttle_rate: f64,
    /// The raw `Retry-After` of fault 429s instead of the computed one (`"0"`,
    /// `"-1"`, `"soon"`, an HTTP-date, `""` for none), to test its parsing.
    pub retry_after: Option<String>,
    /// Share of API requests, in [0, 1], answered only after `slow_ms`.
    pub slow_rate: f64,
    /// The delay of a slow response, in milliseconds (set it past the proxy's timeout).
    pub slow_ms: u64,
    /// With `throttle_rate`: a random 429 holds the bucket for its `Retry-After`
    /// (another consumer spent the quota), so every request of the bucket inside the
    /// hold is answered 429 too, with the time left.
    pub throttle_holds: bool,
    /// Share of API requests, in [0, 1], answered by "Cloudflare" with a 403
    /// `cf-mitigated: challenge` HTML page, as cloud egress addresses sometimes are.
    pub challenge_rate: f64,
    /// Accounts (as [`super::account_alias`] names them: `acme` for
    /// `pk_acme_...`) whose every API request is answered 503 while the others are
    /// served: one account's trouble on a day Klaviyo is up.
    pub failing_accounts: Vec<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_rate: 0.0,
            error_statuses: vec![500, 502, 503, 504],
            latency_ms: 0,
            outage: Outage::None,
            outage_ms: 0,
            throttle_for_ms: 0,
            throttle_rate: 0.0,
            retry_after: None,
            slow_rate: 0.0,
            slow_ms: 0,
            throttle_holds: false,
            challenge_rate: 0.0,
            failing_accounts: Vec::new(),
        }
    }
}

/// What to do with one API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Handle it normally.
    Pass,
    /// Answer with this 5xx.
    Error(u16),
    /// Answer 429 with this `Retry-After` value (`None`: no header); the body's detail
    /// names the whole seconds (as Klaviyo's does, whatever the header says).
    Throttle(Option<String>, u64),
    /// Answer 403 with `cf-mitigated: challenge`.
    Challenge,
}

impl Faults {
    /// Checks the values a JSON body may get wrong.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("error_rate", self.error_rate),
            ("throttle_rate", self.throttle_rate),
            ("slow_rate", self.slow_rate),
            ("challenge_rate", self.challenge_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be between 0 and 1"));
            }
        }
        if self.error_rate > 0.0 && self.error_statuses.is_empty() {
            return Err("error_statuses must not be empty".into());
        }
        if let Some(bad) = self.error_statuses.iter().find(|s| !(500..=599).contains(*s)) {
            return Err(format!("error status {bad} is not a 5xx"));
        }
        Ok(())
    }

    /// Decides the fate of one API request of `account`, `since_set` after these
    /// faults were set.
    pub fn verdict(&self, account: &str, since_set: Duration, rng: &mut fastrand::Rng) -> Verdict {
        if self.outage == Outage::Unavailable || self.failing_accounts.iter().any(|a| a == account) {
            return Verdict::Error(503);
        }
        let window = Duration::from_millis(self.throttle_for_ms);
        if since_set < window {
            let left = window - since_set;
            let secs = left.as_micros().div_ceil(1_000_000) as u64;
            return Verdict::Throttle(Some(self.retry_after.clone().unwrap_or_else(|| secs.to_string())), secs);
        }
        if self.challenge_rate > 0.0 && rng.f64() < self.challenge_rate {
            return Verdict::Challenge;
        }
        if self.error_rate > 0.0 && rng.f64() < self.error_rate {
            return Verdict::Error(self.error_statuses[rng.usize(..self.error_statuses.len())]);
        }
        if self.throttle_rate > 0.0 && rng.f64() < self.throttle_rate {
            let header = self.retry_after.clone().unwrap_or_else(|| "1".into());
            let secs = header.trim().parse().unwrap_or(1);
            return Verdict::Throttle(Some(header), secs);
        }
        Verdict::Pass
    }

    /// The extra delay for one response.
    pub fn delay(&self, rng: &mut fastrand::Rng) -> Duration {
        let slow = self.slow_rate > 0.0 && rng.f64() < self.slow_rate;
        Duration::from_millis(self.latency_ms.saturating_add(if slow { self.slow_ms } else { 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let mut rng = fastrand::Rng::with_seed(1);
        let none = Faults::default();
        assert_eq!(none.verdict("acme", Duration::ZERO, &mut rng), Verdict::Pass);
        let down = Faults { outage: Outage::Unavailable, ..Faults::default() };
        assert_eq!(down.verdict("acme", Duration::ZERO, &mut rng), Verdict::Error(503));
        let one = Faults { failing_accounts: vec!["acme".into()], ..Faults::default() };
        assert_eq!(one.verdict("acme", Duration::ZERO, &mut rng), Verdict::Error(503));
        assert_eq!(one.verdict("other", Duration::ZERO, &mut rng), Verdict::Pass);
        let other = Faults { throttle_for_ms: 2500, ..Faults::default() };
        assert_eq!(other.verdict("acme", Duration::from_millis(400), &mut rng), Verdict::Throttle(Some("3".into()), 3));
        assert_eq!(
            other.verdict("acme", Duration::from_millis(1600), &mut rng),
            Verdict::Throttle(Some("1".into()), 1)
        );
        assert_eq!(other.verdict("acme", Duration::from_millis(2500), &mut rng), Verdict::Pass);
        let some = Faults { error_rate: 0.2, ..Faults::default() };
        let errors = (0..10_000).filter(|_| some.verdict("acme", Duration::ZERO, &mut rng) != Verdict::Pass).count();
        assert!((1800..2200).contains(&errors), "{errors}");
        let json: Faults = serde_json::from_str(r#"{"outage":"refused","retry_after":"soon"}"#).unwrap();
        assert_eq!(json.outage.gate(), Gate::Refuse);
        assert!(serde_json::from_str::<Faults>(r#"{"bogus":1}"#).is_err());
        assert!(Faults { error_rate: 2.0, ..Faults::default() }.check().is_err());
        assert!(Faults { error_statuses: vec![404], ..Faults::default() }.check().is_err());
    }

    #[test]
    fn extreme_values_never_panic() {
        let mut rng = fastrand::Rng::with_seed(1);
        let f = Faults {
            latency_ms: u64::MAX,
            slow_ms: u64::MAX,
            slow_rate: 1.0,
            throttle_for_ms: u64::MAX,
            outage_ms: u64::MAX,
            retry_after: Some(u64::MAX.to_string()),
            ..Faults::default()
        };
        assert!(f.delay(&mut rng) >= Duration::from_millis(u64::MAX));
        assert!(
            matches!(f.verdict("acme", Duration::ZERO, &mut rng), Verdict::Throttle(Some(ref v), _) if *v == u64::MAX.to_string())
        );
        let f = Faults { throttle_for_ms: u64::MAX, ..Faults::default() };
        assert!(matches!(f.verdict("acme", Duration::MAX, &mut rng), Verdict::Pass));
    }
}
