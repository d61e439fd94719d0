//! The circuit breaker in front of the upstream.
//!
//! ```text
//! Closed ──(failure ratio over the window ≥ threshold with ≥ min volume,
//!           or N failures of any kind in a row)──► Open (probe interval = the first)
//! Open ──(probe interval passed)──► HalfOpen (a few real requests probe)
//! HalfOpen ──(the first `probes` probes succeeded)──► Closed
//! HalfOpen ──(a probe failed)──► Open (the interval doubles, up to its cap)
//! ```
//! Only 5xx, timeouts and connection errors (reset, refused) count as failures; a 429
//! or another 4xx means Klaviyo is up and answering. Every transition is logged at
//! `info`.
//!
//! **One account's trouble holds that account alone.** A 5xx or a timeout names the
//! account it came from. When every failure that opened the breaker came from one
//! account (with other accounts' requests succeeding meanwhile, or none being sent),
//! the open breaker holds only that account: other accounts' requests (and their spool
//! replay) go on as *bystanders*, which neither probe nor count. The first bystander
//! that fails shows the trouble is wider: from then on the breaker holds everyone, as
//! during a real outage. Connection failures are never one account's. With a single
//! account (inject mode) nothing changes.
//!
//! The probe interval starts short (a blip costs half a second of fail-fast) and grows
//! while Klaviyo stays down, so a long outage costs it a probe every cap interval, and
//! the first successful probe closes the breaker: recovery takes at most one interval.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::limiter::Account;

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Rolling window over which the failure ratio is computed.
    pub window: Duration,
    /// Requests the window must hold before the ratio may open the breaker.
    pub min_requests: u32,
    /// Failure ratio, in (0, 1], that opens the breaker.
    pub failure_ratio: f64,
    /// Failures of any kind in a row (no success between them) that open it at once.
    pub consecutive_failures: u32,
    /// The first wait before probing; it doubles after each failed probe.
    pub probe_interval: Duration,
    /// The longest wait between probes.
    pub probe_interval_max: Duration,
    /// Probes let through at once while half-open; this many successes close it.
    pub probes: u32,
}

/// A failure streak opens the breaker only once it has lasted this long: concurrent
/// requests meeting one short blip (or a few random 5xx among many successes, which
/// land between them in milliseconds) are not an outage, and the ratio judges them.
pub const STREAK_MIN_SPAN: Duration = Duration::from_millis(100);

/// How long a failure streak must be to open the breaker, given the failures and
/// requests in the window before it: at least `base`, and, once the window holds
/// `min_volume` requests to tell an error rate by, long enough that so many failures in
/// a row would come by chance less than once in 100 000 at that rate. Under a steady
/// 20% of 5xx, three or five in a row happen every few thousand requests; eight in a
/// row almost never do. Before an outage the rate is near 0 and `base` decides.
pub fn streak_needed(base: u32, failed_before: u32, total_before: u32, min_volume: u32) -> u32 {
    if failed_before == 0 || total_before == 0 || total_before < min_volume {
        return base;
    }
    let rate = f64::from(failed_before) / f64::from(total_before);
    let chance = (1e-5f64.ln() / rate.ln()).ceil();
    if chance.is_finite() {
        base.max(chance.min(f64::from(MAX_STREAK)) as u32)
    } else {
        base.max(MAX_STREAK)
    }
}

/// Longest streak ever needed; above that error rate the ratio opens the breaker.
const MAX_STREAK: u32 = 100;

/// The probe interval after `failed_probes` failed probes: the first interval doubled
/// each time, never past the cap (nor below the first).
pub fn probe_interval(settings: &BreakerSettings, failed_probes: u32) -> Duration {
    let factor = 1u32.checked_shl(failed_probes.min(31)).unwrap_or(u32::MAX);
    settings.probe_interval.saturating_mul(factor).min(settings.probe_interval_max).max(settings.probe_interval)
}

/// How an upstream exchange ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that says Klaviyo is healthy (2xx, 3xx, 4xx including 429).
    Success,
    /// A 5xx or a timeout.
    Failure,
    /// The connection could not be made or broke.
    ConnectFailure,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Closed {
        slots: Vec<(u64, u32, u32)>,
        /// Failures since the last success, and when the first of them was recorded.
        streak: u32,
        streak_since: Option<Instant>,
        /// Whose failures the window holds.
        culprit: Culprit,
    },
    Open {
        until: Instant,
        failed_probes: u32,
        /// The one account held, or `None`: everyone.
        only: Option<Account>,
    },
    HalfOpen {
        in_flight: u32,
        succeeded: u32,
        failed_probes: u32,
        only: Option<Account>,
    },
}

impl State {
    /// The one account an open or half-open breaker holds (`None`: everyone, or closed).
    fn only(&self) -> Option<Account> {
        match self {
            State::Open { only, .. } | State::HalfOpen { only, .. } => *only,
            State::Closed { .. } => None,
        }
    }
}

/// Whose failures are in the breaker's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Culprit {
    Nobody,
    One(Account),
    /// Several accounts, or a failure no account owns (a connection failure).
    Many,
}

impl Culprit {
    fn add(self, account: Option<Account>) -> Culprit {
        match (self, account) {
            (Culprit::Nobody, Some(a)) => Culprit::One(a),
            (Culprit::One(a), Some(b)) if a == b => self,
            _ => Culprit::Many,
        }
    }
}

/// The breaker's state, as shown to operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Requests flow.
    Closed,
    /// Requests fail fast.
    Open,
    /// A few probes are let through.
    HalfOpen,
}

/// Told of every transition (from, to), e.g. to keep a metric.
type Observer = Box<dyn Fn(Phase, Phase) + Send + Sync>;

/// The upstream circuit breaker.
pub struct Breaker {
    settings: BreakerSettings,
    epoch: Instant,
    state: Mutex<State>,
    observer: Option<Observer>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock: formatting must never wait on (or deadlock with) the breaker's lock.
        let state = self.state.try_lock().map(|s| format!("{:?}", *s)).unwrap_or_else(|_| "(locked)".into());
        f.debug_struct("Breaker").field("settings", &self.settings).field("state", &state).finish()
    }
}

/// Leave to send one request upstream; report how it went with [`Breaker::record`].
/// Dropped unreported (the client hung up), a probe gives its place back.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    /// Admitted while the breaker holds another account only.
    bystander: bool,
    done: bool,
}

impl Permit<'_> {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            if let State::HalfOpen { in_flight, .. } = &mut *self.breaker.lock() {
                *in_flight = in_flight.saturating_sub(1);
            }
        }
    }
}

/// Slots of the rolling window.
const SLOTS: u32 = 10;

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        Breaker { settings, epoch: Instant::now(), state: Mutex::new(closed()), observer: None }
    }

    /// Calls `observer(from, to)` at every transition, under the breaker's lock.
    pub fn observed(mut self, observer: impl Fn(Phase, Phase) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    fn transition(&self, from: Phase, to: Phase) {
        if let Some(observer) = &self.observer {
            observer(from, to);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot_len(&self) -> Duration {
        (self.settings.window / SLOTS).max(Duration::from_millis(1))
    }

    /// The current phase (open becomes half-open only when a request asks).
    pub fn phase(&self) -> Phase {
        match &*self.lock() {
            State::Closed { .. } => Phase::Closed,
            State::Open { .. } => Phase::Open,
            State::HalfOpen { .. } => Phase::HalfOpen,
        }
    }

    /// When the breaker turns requests away: the time until the next probe may go (at
    /// least 1 ms, so callers can tell open from closed). Does not change state.
    pub fn open_for(&self, now: Instant) -> Option<Duration> {
        Self::turned_away(&self.lock(), &self.settings, now)
    }

    /// [`Breaker::open_for`] a request of `account`: `None` while the breaker holds
    /// another account only. A request of no known account is held like any.
    pub fn open_for_account(&self, now: Instant, account: Option<Account>) -> Option<Duration> {
        let state = self.lock();
        match (state.only(), account) {
            (Some(only), Some(a)) if only != a => None,
            _ => Self::turned_away(&state, &self.settings, now),
        }
    }

    /// [`Breaker::open_for`] unless the breaker holds one account only.
    pub fn open_for_everyone(&self, now: Instant) -> Option<Duration> {
        let state = self.lock();
        match state.only() {
            Some(_) => None,
            None => Self::turned_away(&state, &self.settings, now),
        }
    }

    fn turned_away(state: &State, settings: &BreakerSettings, now: Instant) -> Option<Duration> {
        match state {
            State::Open { until, .. } if *until > now => Some(*until - now),
            State::HalfOpen { in_flight, .. } if *in_flight >= settings.probes => Some(PROBE_BUSY),
            _ => None,
        }
    }

    /// Asks to send a request. `Err(wait)` means fail fast: the breaker is open for
    /// `wait` more (or half-open with every probe taken).
    pub fn admit(&self, now: Instant) -> Result<Permit<'_>, Duration> {
        self.admit_for(now, None)
    }

    /// [`Breaker::admit`] for a request of `account`: while the breaker holds another
    /// account only, it goes as a bystander (neither a probe nor counted, unless it
    /// fails: then the breaker holds everyone).
    pub fn admit_for(&self, now: Instant, account: Option<Account>) -> Result<Permit<'_>, Duration> {
        let permit = |probe, bystander| Permit { breaker: self, probe, bystander, done: false };
        let mut state = self.lock();
        if let (Some(only), Some(a)) = (state.only(), account) {
            if only != a {
                return Ok(permit(false, true));
            }
        }
        let (in_flight, failed_probes, only) = match &mut *state {
            State::Closed { .. } => return Ok(permit(false, false)),
            State::Open { until, .. } if *until > now => return Err(*until - now),
            State::Open { failed_probes, only, .. } => {
                tracing::info!(
                    from = "open",
                    to = "half_open",
                    probes = self.settings.probes,
                    one_account = only.is_some(),
                    "circuit breaker"
                );
                self.transition(Phase::Open, Phase::HalfOpen);
                (0, *failed_probes, *only)
            }
            State::HalfOpen { in_flight, .. } if *in_flight >= self.settings.probes => return Err(PROBE_BUSY),
            State::HalfOpen { in_flight, .. } => {
                *in_flight += 1;
                return Ok(permit(true, false));
            }
        };
        *state = State::HalfOpen { in_flight: in_flight + 1, succeeded: 0, failed_probes, only };
        Ok(permit(true, false))
    }

    /// Reports how a permitted request went.
    pub fn record(&self, permit: Permit<'_>, outcome: Outcome, now: Instant) {
        self.record_for(permit, outcome, now, None);
    }

    /// [`Breaker::record`] of a request of `account` (a 5xx or timeout is counted
    /// against it; a connection failure is everyone's).
    pub fn record_for(&self, mut permit: Permit<'_>, outcome: Outcome, now: Instant, account: Option<Account>) {
        permit.done = true;
        let s = self.settings;
        let slot = (now.saturating_duration_since(self.epoch).as_micros() / self.slot_len().as_micros().max(1)) as u64;
        let failed = outcome != Outcome::Success;
        let owner = if outcome == Outcome::Failure { account } else { None };
        let mut state = self.lock();
        if permit.bystander && failed {
            if let State::Open { only, .. } | State::HalfOpen { only, .. } = &mut *state {
                if only.take().is_some() {
                    tracing::info!(
                        one_account = false,
                        "circuit breaker: another account fails too; every account is held"
                    );
                }
            }
        }
        let next = match &mut *state {
            State::Closed { slots, streak, streak_since, culprit } => {
                slots.retain(|(n, _, _)| n + u64::from(SLOTS) > slot);
                if slots.iter().all(|(_, _, e)| *e == 0) {
                    *culprit = Culprit::Nobody;
                }
                if failed {
                    *culprit = culprit.add(owner);
                }
                if slots.last().is_none_or(|(n, _, _)| *n != slot) {
                    slots.push((slot, 0, 0));
                }
                let current = slots.last_mut().expect("pushed above");
                current.1 += 1;
                current.2 += u32::from(failed);
                if failed {
                    *streak += 1;
                    streak_since.get_or_insert(now);
                } else {
                    (*streak, *streak_since) = (0, None);
                }
                let (total, failures) = slots.iter().fold((0u32, 0u32), |(t, f), (_, n, e)| (t + n, f + e));
                let ratio_trips = total >= s.min_requests && f64::from(failures) >= s.failure_ratio * f64::from(total);
                let lasted = streak_since.is_some_and(|since| now.saturating_duration_since(since) >= STREAK_MIN_SPAN);
                let needed = streak_needed(s.consecutive_failures, failures - *streak, total - *streak, s.min_requests);
                let streak_trips = *streak >= needed && lasted;
                (ratio_trips || streak_trips).then(|| {
                    let wait = probe_interval(&s, 0);
                    let only = match *culprit {
                        Culprit::One(a) => Some(a),
                        _ => None,
                    };
                    tracing::info!(
                        from = "closed",
                        to = "open",
                        requests = total,
                        failures,
                        consecutive_failures = *streak,
                        probe_in_ms = wait.as_millis() as u64,
                        one_account = only.is_some(),
                        "circuit breaker"
                    );
                    self.transition(Phase::Closed, Phase::Open);
                    State::Open { until: now + wait, failed_probes: 0, only }
                })
            }
            State::HalfOpen { failed_probes, only, .. } if permit.probe && failed => {
                let failed_probes = failed_probes.saturating_add(1);
                let wait = probe_interval(&s, failed_probes);
                tracing::info!(
                    from = "half_open",
                    to = "open",
                    failed_probes,
                    probe_in_ms = wait.as_millis() as u64,
                    "circuit breaker"
                );
                self.transition(Phase::HalfOpen, Phase::Open);
                Some(State::Open { until: now + wait, failed_probes, only: *only })
            }
            State::HalfOpen { in_flight, succeeded, .. } if permit.probe => {
                *in_flight = in_flight.saturating_sub(1);
                *succeeded += 1;
                (*succeeded >= s.probes).then(|| {
                    tracing::info!(from = "half_open", to = "closed", probes = *succeeded, "circuit breaker");
                    self.transition(Phase::HalfOpen, Phase::Closed);
                    closed()
                })
            }
            // A request admitted before the breaker opened, finishing late: the
            // decision was already made without it.
            _ => None,
        };
        if let Some(next) = next {
            *state = next;
        }
    }
}

fn closed() -> State {
    State::Closed { slots: Vec::new(), streak: 0, streak_since: None, culprit: Culprit::Nobody }
}

/// The wait told to a request turned away because every probe is taken: the probes
/// answer within a round trip, so asking again soon is right.
const PROBE_BUSY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            window: Duration::from_secs(10),
            min_requests: 20,
            failure_ratio: 0.5,
            consecutive_failures: 5,
            probe_interval: Duration::from_millis(500),
            probe_interval_max: Duration::from_secs(4),
            probes: 1,
        }
    }

    fn run(b: &Breaker, outcome: Outcome) -> Result<(), Duration> {
        let p = b.admit(Instant::now())?;
        b.record(p, outcome, Instant::now());
        Ok(())
    }

    /// Failures spaced as a lone client's retries are: 50 ms apart.
    async fn spaced(b: &Breaker, outcome: Outcome, n: u32) {
        for _ in 0..n {
            tokio::time::advance(Duration::from_millis(50)).await;
            run(b, outcome).unwrap();
        }
    }

    #[test]
    fn probe_interval_doubles_up_to_its_cap() {
        let s = settings();
        let ms: Vec<u64> = (0..8).map(|n| probe_interval(&s, n).as_millis() as u64).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 4000, 4000, 4000, 4000]);
        assert_eq!(probe_interval(&s, u32::MAX), Duration::from_secs(4));
        // A cap below the first interval: the first interval wins.
        let odd = BreakerSettings { probe_interval_max: Duration::from_millis(100), ..s };
        assert_eq!(probe_interval(&odd, 3), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_ratio_only_with_volume() {
        let b = Breaker::new(BreakerSettings { consecutive_failures: 1000, ..settings() });
        for _ in 0..19 {
            run(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed, "19 requests are under the minimum volume");
        run(&b, Outcome::Failure).unwrap();
        assert_eq!(b.phase(), Phase::Open);
        assert_eq!(b.admit(Instant::now()).unwrap_err(), Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(b.open_for(Instant::now()), Some(Duration::from_millis(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_below_threshold_and_old_failures_do_not_open() {
        let b = Breaker::new(settings());
        for i in 0..100 {
            run(&b, if i % 3 == 0 { Outcome::Failure } else { Outcome::Success }).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed);
        for _ in 0..4 {
            run(&b, Outcome::Failure).unwrap();
            run(&b, Outcome::Success).unwrap();
        }
        // The window has moved on: the old failures no longer count.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..4 {
            run(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streak_of_any_failure_kind_opens_it() {
        for kinds in [[Outcome::Failure; 5], [Outcome::ConnectFailure; 5], {
            use Outcome::*;
            [Failure, ConnectFailure, Failure, ConnectFailure, Failure]
        }] {
            let b = Breaker::new(settings());
            for (i, kind) in kinds.iter().enumerate() {
                assert_eq!(b.phase(), Phase::Closed, "{i} failures of {kinds:?}");
                tokio::time::advance(Duration::from_millis(50)).await;
                run(&b, *kind).unwrap();
            }
            assert_eq!(b.phase(), Phase::Open, "{kinds:?}");
        }
        // A success (a 429 or a 4xx is one) breaks the streak.
        let b = Breaker::new(settings());
        spaced(&b, Outcome::Failure, 4).await;
        run(&b, Outcome::Success).unwrap();
        spaced(&b, Outcome::ConnectFailure, 4).await;
        assert_eq!(b.phase(), Phase::Closed);
        spaced(&b, Outcome::Failure, 1).await;
        assert_eq!(b.phase(), Phase::Open);
    }

    #[test]
    fn streaks_must_be_unlikely_at_the_error_rate_before_them() {
        let cases: &[(u32, u32, u32, u32)] = &[
            (3, 0, 0, 3),
            (3, 0, 500, 3),
            (3, 1, 500, 3),
            (3, 100, 500, 8),
            (3, 200, 500, 13),
            (5, 10, 500, 5),
            (3, 499, 500, MAX_STREAK),
            (3, 500, 500, MAX_STREAK),
            // Too few requests to tell a rate by: the base.
            (5, 4, 5, 5),
            (3, 10, 19, 3),
            (3, 4, 20, 8),
        ];
        for &(base, failed, total, want) in cases {
            assert_eq!(streak_needed(base, failed, total, 20), want, "{failed}/{total}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_streak_at_the_usual_error_rate_does_not_open_it() {
        // One request in five fails, spread out: 500 requests over 5 s.
        let b = Breaker::new(BreakerSettings { consecutive_failures: 3, ..settings() });
        for i in 0..500 {
            tokio::time::advance(Duration::from_millis(10)).await;
            run(&b, if i % 5 == 0 { Outcome::Failure } else { Outcome::Success }).unwrap();
        }
        // Then seven in a row over 350 ms (a stalled machine makes chance streaks
        // slow): still chance at that rate.
        spaced(&b, Outcome::Failure, 7).await;
        assert_eq!(b.phase(), Phase::Closed);
        spaced(&b, Outcome::Failure, 1).await;
        assert_eq!(b.phase(), Phase::Open, "eight in a row are not");
    }

    #[tokio::test(start_paused = true)]
    async fn a_streak_inside_a_few_milliseconds_is_left_to_the_ratio() {
        // Many concurrent requests meet a blip: ten failures within 10 ms.
        let b = Breaker::new(settings());
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(1)).await;
            run(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed);
        // Still failing 100 ms after the streak began: an outage.
        tokio::time::advance(Duration::from_millis(91)).await;
        run(&b, Outcome::Failure).unwrap();
        assert_eq!(b.phase(), Phase::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_follow_a_growing_schedule_and_the_first_success_closes() {
        let b = Breaker::new(settings());
        spaced(&b, Outcome::ConnectFailure, 5).await;
        assert_eq!(b.phase(), Phase::Open);
        // Probe at +0.5 s, +1 s, +2 s, +4 s, +4 s after each failure: requests in
        // between fail fast with the time left.
        let mut at = Vec::new();
        let t0 = Instant::now();
        for _ in 0..5 {
            loop {
                match b.admit(Instant::now()) {
                    Ok(p) => {
                        at.push(Instant::now().duration_since(t0).as_millis() as u64);
                        assert!(p.is_probe());
                        assert_eq!(b.phase(), Phase::HalfOpen);
                        // One probe at a time.
                        assert_eq!(b.admit(Instant::now()).unwrap_err(), PROBE_BUSY);
                        b.record(p, Outcome::Failure, Instant::now());
                        break;
                    }
                    Err(wait) => {
                        assert!(wait <= Duration::from_secs(4));
                        tokio::time::advance(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        assert_eq!(at, [500, 1500, 3500, 7500, 11500]);
        // The next one succeeds: closed at once, and a later streak starts again at 0.5 s.
        tokio::time::advance(Duration::from_secs(4)).await;
        run(&b, Outcome::Success).unwrap();
        assert_eq!(b.phase(), Phase::Closed);
        spaced(&b, Outcome::Failure, 5).await;
        assert_eq!(b.open_for(Instant::now()), Some(Duration::from_millis(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn several_probes_and_probes_given_back() {
        let b = Breaker::new(BreakerSettings { probes: 2, ..settings() });
        spaced(&b, Outcome::Failure, 5).await;
        tokio::time::advance(Duration::from_millis(500)).await;
        let p1 = b.admit(Instant::now()).unwrap();
        let p2 = b.admit(Instant::now()).unwrap();
        assert!(p1.is_probe() && p2.is_probe());
        assert!(b.admit(Instant::now()).is_err(), "only two probes at a time");
        b.record(p1, Outcome::Success, Instant::now());
        assert_eq!(b.phase(), Phase::HalfOpen, "one success of two");
        // A probe whose client hung up gives its place back.
        drop(p2);
        let p3 = b.admit(Instant::now()).unwrap();
        b.record(p3, Outcome::Success, Instant::now());
        assert_eq!(b.phase(), Phase::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn late_answers_of_requests_admitted_while_closed_change_nothing() {
        let b = Breaker::new(settings());
        let early = b.admit(Instant::now()).unwrap();
        spaced(&b, Outcome::Failure, 5).await;
        assert_eq!(b.phase(), Phase::Open);
        b.record(early, Outcome::Success, Instant::now());
        assert_eq!(b.phase(), Phase::Open);
    }

    fn run_for(b: &Breaker, account: u128, outcome: Outcome) -> Result<(), Duration> {
        let a = Some(Account(account));
        let p = b.admit_for(Instant::now(), a)?;
        b.record_for(p, outcome, Instant::now(), a);
        Ok(())
    }

    async fn spaced_for(b: &Breaker, account: u128, outcome: Outcome, n: u32) {
        for _ in 0..n {
            tokio::time::advance(Duration::from_millis(50)).await;
            run_for(b, account, outcome).unwrap();
        }
    }

    /// One account's 5xx streak holds that account only; another account's requests
    /// go by (their successes neither probe nor close it); the held account's probe
    /// closes it.
    #[tokio::test(start_paused = true)]
    async fn one_accounts_streak_holds_that_account_only() {
        let b = Breaker::new(settings());
        spaced_for(&b, 1, Outcome::Failure, 5).await;
        assert_eq!(b.phase(), Phase::Open);
        let now = Instant::now();
        assert!(b.open_for(now).is_some() && b.open_for_account(now, Some(Account(1))).is_some());
        assert_eq!(b.open_for_account(now, Some(Account(2))), None);
        assert_eq!(b.open_for_everyone(now), None);
        // A request of no known account is held.
        assert!(b.open_for_account(now, None).is_some());
        assert!(run_for(&b, 1, Outcome::Success).is_err());
        for _ in 0..50 {
            run_for(&b, 2, Outcome::Success).unwrap();
        }
        assert_eq!(b.phase(), Phase::Open);
        tokio::time::advance(Duration::from_millis(500)).await;
        // Half-open: the held account probes; the other still goes by meanwhile.
        let probe = b.admit_for(Instant::now(), Some(Account(1))).unwrap();
        assert!(probe.is_probe());
        run_for(&b, 2, Outcome::Success).unwrap();
        b.record_for(probe, Outcome::Success, Instant::now(), Some(Account(1)));
        assert_eq!(b.phase(), Phase::Closed);
    }

    /// The first bystander that fails too shows the trouble is wider: everyone is held.
    #[tokio::test(start_paused = true)]
    async fn a_failing_bystander_makes_it_hold_everyone() {
        let b = Breaker::new(settings());
        spaced_for(&b, 1, Outcome::Failure, 5).await;
        run_for(&b, 2, Outcome::Failure).unwrap();
        let now = Instant::now();
        assert!(b.open_for_account(now, Some(Account(2))).is_some());
        assert!(b.open_for_everyone(now).is_some());
        assert!(run_for(&b, 3, Outcome::Success).is_err());
    }

    /// Failures of several accounts, and connection failures, hold everyone at once.
    #[tokio::test(start_paused = true)]
    async fn several_accounts_or_connection_failures_hold_everyone() {
        let b = Breaker::new(settings());
        for n in 0..5 {
            spaced_for(&b, 1 + n % 2, Outcome::Failure, 1).await;
        }
        assert!(b.open_for_everyone(Instant::now()).is_some());
        let b = Breaker::new(settings());
        spaced_for(&b, 1, Outcome::ConnectFailure, 5).await;
        assert!(b.open_for_account(Instant::now(), Some(Account(2))).is_some());
    }
}
