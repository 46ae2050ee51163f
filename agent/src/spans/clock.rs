//! Kernel timestamps (CLOCK_MONOTONIC, from bpf_ktime_get_ns) to wall-clock
//! time for export.

pub struct Clock {
    /// realtime - monotonic, in ns.
    offset_ns: i128,
}

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn new() -> Self {
        let mut c = Self { offset_ns: 0 };
        c.refresh();
        c
    }

    /// Re-reads the offset (wall clock may be stepped or slewed by NTP).
    pub fn refresh(&mut self) {
        self.offset_ns = now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC);
    }

    pub fn monotonic_now_ns() -> u64 {
        now(libc::CLOCK_MONOTONIC) as u64
    }

    pub fn to_unix_nanos(&self, monotonic_ns: u64) -> u64 {
        (monotonic_ns as i128 + self.offset_ns).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_maps_to_now() {
        let clock = Clock::new();
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128;
        let mapped = clock.to_unix_nanos(Clock::monotonic_now_ns()) as i128;
        assert!((wall - mapped).abs() < 50_000_000, "wall {wall} mapped {mapped}");
    }
}
