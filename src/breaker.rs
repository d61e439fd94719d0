//! The circuit breaker in front of the upstream.
//!
//! ```text
//! Closed ──(failure ratio over the window ≥ threshold with ≥ min volume,
//!           or N consecutive connection failures)──► Open
//! Open ──(cool-down passed)──► HalfOpen (a few real requests probe)
//! HalfOpen ──(every probe succeeded)──► Closed
//! HalfOpen ──(a probe failed)──► Open (a new cool-down)
//! ```
//! Only 5xx, timeouts and connection errors count as failures; a 429 or another 4xx
//! means Klaviyo is up and answering. Every transition is logged at `info`.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Rolling window over which the failure ratio is computed.
    pub window: Duration,
    /// Requests the window must hold before the ratio may open the breaker.
    pub min_requests: u32,
    /// Failure ratio, in (0, 1], that opens the breaker.
    pub failure_ratio: f64,
    /// Consecutive connection failures (nothing reached Klaviyo) that open it at once.
    pub consecutive_connect_failures: u32,
    /// How long it stays open before probing.
    pub cool_down: Duration,
    /// Probes let through while half-open; all must succeed to close.
    pub probes: u32,
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
    Closed { slots: Vec<(u64, u32, u32)>, consecutive: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
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
        Breaker {
            settings,
            epoch: Instant::now(),
            state: Mutex::new(State::Closed { slots: Vec::new(), consecutive: 0 }),
            observer: None,
        }
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

    /// When the breaker is open: the time left in its cool-down (at least 1 ms while
    /// open, so callers can tell open from closed). Does not change state.
    pub fn open_for(&self, now: Instant) -> Option<Duration> {
        match &*self.lock() {
            State::Open { until } if *until > now => Some(*until - now),
            State::HalfOpen { in_flight, .. } if *in_flight >= self.settings.probes => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Asks to send a request. `Err(wait)` means fail fast: the breaker is open for
    /// `wait` more (or half-open with every probe taken).
    pub fn admit(&self, now: Instant) -> Result<Permit<'_>, Duration> {
        let mut state = self.lock();
        let next = match &mut *state {
            State::Closed { .. } => return Ok(Permit { breaker: self, probe: false, done: false }),
            State::Open { until } if *until > now => return Err(*until - now),
            State::Open { .. } => State::HalfOpen { in_flight: 0, succeeded: 0 },
            State::HalfOpen { .. } => state.clone(),
        };
        if !matches!(*state, State::HalfOpen { .. }) {
            tracing::info!(from = "open", to = "half_open", probes = self.settings.probes, "circuit breaker");
            self.transition(Phase::Open, Phase::HalfOpen);
        }
        *state = next;
        let State::HalfOpen { in_flight, .. } = &mut *state else { unreachable!("half-open set above") };
        if *in_flight >= self.settings.probes {
            return Err(Duration::from_secs(1));
        }
        *in_flight += 1;
        Ok(Permit { breaker: self, probe: true, done: false })
    }

    /// Reports how a permitted request went.
    pub fn record(&self, mut permit: Permit<'_>, outcome: Outcome, now: Instant) {
        permit.done = true;
        let s = self.settings;
        let slot = (now.saturating_duration_since(self.epoch).as_micros() / self.slot_len().as_micros().max(1)) as u64;
        let mut state = self.lock();
        let next = match (&mut *state, outcome) {
            (State::Closed { slots, consecutive }, outcome) => {
                slots.retain(|(n, _, _)| n + u64::from(SLOTS) > slot);
                if slots.last().is_none_or(|(n, _, _)| *n != slot) {
                    slots.push((slot, 0, 0));
                }
                let current = slots.last_mut().expect("pushed above");
                current.1 += 1;
                current.2 += u32::from(outcome != Outcome::Success);
                *consecutive = if outcome == Outcome::ConnectFailure { *consecutive + 1 } else { 0 };
                let (total, failed) = slots.iter().fold((0u32, 0u32), |(t, f), (_, n, e)| (t + n, f + e));
                let ratio_trips = total >= s.min_requests && f64::from(failed) >= s.failure_ratio * f64::from(total);
                let streak_trips = *consecutive >= s.consecutive_connect_failures;
                if ratio_trips || streak_trips {
                    tracing::info!(
                        from = "closed",
                        to = "open",
                        requests = total,
                        failures = failed,
                        consecutive_connect_failures = *consecutive,
                        cool_down_ms = s.cool_down.as_millis() as u64,
                        "circuit breaker"
                    );
                    self.transition(Phase::Closed, Phase::Open);
                    Some(State::Open { until: now + s.cool_down })
                } else {
                    None
                }
            }
            (State::HalfOpen { .. }, Outcome::Failure | Outcome::ConnectFailure) if permit.probe => {
                tracing::info!(
                    from = "half_open",
                    to = "open",
                    cool_down_ms = s.cool_down.as_millis() as u64,
                    "circuit breaker"
                );
                self.transition(Phase::HalfOpen, Phase::Open);
                Some(State::Open { until: now + s.cool_down })
            }
            (State::HalfOpen { in_flight, succeeded }, Outcome::Success) if permit.probe => {
                *in_flight = in_flight.saturating_sub(1);
                *succeeded += 1;
                if *succeeded >= s.probes {
                    tracing::info!(from = "half_open", to = "closed", probes = *succeeded, "circuit breaker");
                    self.transition(Phase::HalfOpen, Phase::Closed);
                    Some(State::Closed { slots: Vec::new(), consecutive: 0 })
                } else {
                    None
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            window: Duration::from_secs(10),
            min_requests: 20,
            failure_ratio: 0.5,
            consecutive_connect_failures: 5,
            cool_down: Duration::from_secs(5),
            probes: 2,
        }
    }

    fn run(b: &Breaker, outcome: Outcome) -> Result<(), Duration> {
        let p = b.admit(Instant::now())?;
        b.record(p, outcome, Instant::now());
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_ratio_only_with_volume() {
        let b = Breaker::new(settings());
        for _ in 0..19 {
            run(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed, "19 requests are under the minimum volume");
        run(&b, Outcome::Failure).unwrap();
        assert_eq!(b.phase(), Phase::Open);
        assert_eq!(b.admit(Instant::now()).unwrap_err(), Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(b.open_for(Instant::now()), Some(Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_below_threshold_and_old_failures_do_not_open() {
        let b = Breaker::new(settings());
        for i in 0..100 {
            run(&b, if i % 3 == 0 { Outcome::Failure } else { Outcome::Success }).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed);
        for _ in 0..15 {
            run(&b, Outcome::Failure).unwrap();
        }
        // The window has moved on: the old failures no longer count.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..5 {
            run(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed);
        // A 429 or a 4xx is a Success for the breaker; it breaks a connect streak.
        for _ in 0..4 {
            run(&b, Outcome::ConnectFailure).unwrap();
        }
        run(&b, Outcome::Success).unwrap();
        for _ in 0..4 {
            run(&b, Outcome::ConnectFailure).unwrap();
        }
        assert_eq!(b.phase(), Phase::Closed);
        run(&b, Outcome::ConnectFailure).unwrap();
        assert_eq!(b.phase(), Phase::Open, "five connection failures in a row");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probes_then_closes_or_reopens() {
        let b = Breaker::new(settings());
        for _ in 0..5 {
            run(&b, Outcome::ConnectFailure).unwrap();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let p1 = b.admit(Instant::now()).unwrap();
        let p2 = b.admit(Instant::now()).unwrap();
        assert!(p1.is_probe() && p2.is_probe());
        assert_eq!(b.phase(), Phase::HalfOpen);
        // Only two probes at a time.
        assert!(b.admit(Instant::now()).is_err());
        b.record(p1, Outcome::Success, Instant::now());
        // A probe whose client hung up gives its place back.
        drop(p2);
        let p3 = b.admit(Instant::now()).unwrap();
        b.record(p3, Outcome::Success, Instant::now());
        assert_eq!(b.phase(), Phase::Closed);
        // Reopen: a failed probe starts a new cool-down.
        for _ in 0..5 {
            run(&b, Outcome::ConnectFailure).unwrap();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        run(&b, Outcome::Failure).unwrap();
        assert_eq!(b.phase(), Phase::Open);
        assert_eq!(b.open_for(Instant::now()), Some(Duration::from_secs(5)));
    }
}
