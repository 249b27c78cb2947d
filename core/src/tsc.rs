//! A cheap cycle clock for poll loops: the TSC on x86_64 (one `rdtsc`, no syscall), nanoseconds
//! since a process-wide epoch from [`Instant`] elsewhere. [`Tsc::calibrate`] measures the tick
//! rate once at start-up against [`Instant`]; loops then only call [`now`].
//!
//! The one `unsafe` block here is the `rdtsc` intrinsic (no preconditions: the instruction is in
//! every x86_64 CPU and reads a counter).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Ticks of the cycle clock (TSC cycles on x86_64, nanoseconds elsewhere).
#[inline(always)]
pub fn now() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `rdtsc` has no preconditions; it only reads the time-stamp counter, which
        // every x86_64 CPU has.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        epoch().elapsed().as_nanos() as u64
    }
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The measured rate of [`now`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tsc {
    hz: f64,
}

impl Tsc {
    /// Measures the tick rate against [`Instant`] over about `over` (sleeps; call once at
    /// start-up). Without a TSC the rate is 1 GHz by construction.
    pub fn calibrate(over: Duration) -> Tsc {
        if cfg!(not(target_arch = "x86_64")) {
            let _ = epoch();
            return Tsc { hz: 1e9 };
        }
        let (i0, t0) = (Instant::now(), now());
        std::thread::sleep(over);
        let (i1, t1) = (Instant::now(), now());
        let secs = i1.duration_since(i0).as_secs_f64();
        let hz = t1.wrapping_sub(t0) as f64 / secs;
        Tsc {
            hz: if hz.is_finite() && hz > 1e6 { hz } else { 1e9 },
        }
    }

    /// A clock of a known rate (tests).
    pub fn with_hz(hz: f64) -> Tsc {
        Tsc { hz }
    }

    /// Ticks per second.
    pub fn hz(&self) -> f64 {
        self.hz
    }

    /// Nanoseconds per tick.
    pub fn ns_per_tick(&self) -> f64 {
        1e9 / self.hz
    }

    /// Ticks in `secs` seconds.
    pub fn ticks(&self, secs: f64) -> u64 {
        (secs * self.hz) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrated_clock_measures_a_sleep() {
        let t = Tsc::calibrate(Duration::from_millis(20));
        assert!(t.hz() > 1e6, "{t:?}");
        let a = now();
        let i = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let (ticks, real) = (now() - a, i.elapsed().as_secs_f64());
        let measured = ticks as f64 / t.hz();
        // Generous bounds: a shared machine can stretch either interval a little.
        assert!(
            (measured / real - 1.0).abs() < 0.2,
            "{measured} s by ticks, {real} s by Instant"
        );
    }
}
