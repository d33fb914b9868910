//! Fault injection, for demonstrations and tests of the driver lifecycle: a device's
//! driver told to crash or hang after so many requests.
//!
//! The device code only counts requests ([`FaultPlan::request`] from a
//! [`RequestJournal`](crate::virtio::block::RequestJournal)); what a crash is depends on
//! where the driver runs: a driver partition aborts (the process dies), a worker thread
//! in the hypervisor panics (and the hypervisor's fault policy decides what that means).
//! A hang is a driver that stops making progress for ever. Off unless asked for.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a fault plan says to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    /// Crash.
    Crash,
    /// Stop making progress.
    Hang,
}

/// A fault due after a number of requests (over every queue of a device).
#[derive(Debug, Default)]
pub struct FaultPlan {
    crash_after: Option<u64>,
    hang_after: Option<u64>,
    requests: AtomicU64,
}

impl FaultPlan {
    /// No fault.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses `crash-after=N` or `hang-after=N`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, count) = text.split_once('=').ok_or_else(|| format!("'{text}' is not KIND=N"))?;
        let count: u64 = count.parse().map_err(|_| format!("'{count}' is not a number of requests"))?;
        match kind {
            "crash-after" => Ok(Self { crash_after: Some(count), ..Self::default() }),
            "hang-after" => Ok(Self { hang_after: Some(count), ..Self::default() }),
            other => Err(format!("unknown fault '{other}' (use crash-after=N or hang-after=N)")),
        }
    }

    /// Counts one request; says whether the fault is due.
    pub fn request(&self) -> Option<Injected> {
        let done = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        if self.crash_after.is_some_and(|after| done > after) {
            return Some(Injected::Crash);
        }
        if self.hang_after.is_some_and(|after| done > after) {
            return Some(Injected::Hang);
        }
        None
    }

    /// Requests counted so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }
}

/// Injects a plan's fault into the thread that serves a device inside the hypervisor: a
/// crash is a panic of that thread (what a driver bug there would do at best), a hang a
/// thread that never returns.
pub struct InjectInThread(pub std::sync::Arc<FaultPlan>);

impl crate::virtio::block::RequestJournal for InjectInThread {
    fn fetched(&mut self, _head: u16) {
        match self.0.request() {
            Some(Injected::Crash) => {
                panic!("fault injection: crash after {} requests", self.0.requests() - 1)
            }
            Some(Injected::Hang) => {
                log::error!("fault injection: hanging after {} requests", self.0.requests() - 1);
                hang()
            }
            None => {}
        }
    }
}

/// Hangs the calling thread for ever: an injected hang.
pub fn hang() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_fire_after_their_count() {
        let plan = FaultPlan::parse("crash-after=2").unwrap();
        assert_eq!((plan.request(), plan.request(), plan.request()), (None, None, Some(Injected::Crash)));
        let plan = FaultPlan::parse("hang-after=0").unwrap();
        assert_eq!(plan.request(), Some(Injected::Hang));
        assert_eq!(FaultPlan::none().request(), None);
        for bad in ["", "crash", "crash-after=x", "explode-after=1"] {
            assert!(FaultPlan::parse(bad).is_err(), "{bad}");
        }
    }
}
