//! The two clocks the daemon needs: CLOCK_BOOTTIME (the kernel stamps events with
//! `bpf_ktime_get_boot_ns`, which counts suspend too) and wall time for the findings.

use std::time::{Duration, SystemTime};

/// Nanoseconds of CLOCK_BOOTTIME, the same clock as the kernel's event timestamps.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux ≥ 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Wall-clock time of a CLOCK_BOOTTIME instant, as RFC 3339 UTC with milliseconds.
pub fn rfc3339_of_boot_ns(at_boot_ns: u64) -> String {
    let now_boot = boot_ns();
    let now_wall = SystemTime::now();
    let wall = if at_boot_ns <= now_boot {
        now_wall - Duration::from_nanos(now_boot - at_boot_ns)
    } else {
        now_wall + Duration::from_nanos(at_boot_ns - now_boot)
    };
    humantime::format_rfc3339_millis(wall).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_moves_forward() {
        let a = boot_ns();
        let b = boot_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn rfc3339_of_now_is_close_to_system_time() {
        let text = rfc3339_of_boot_ns(boot_ns());
        let parsed = humantime::parse_rfc3339(&text).expect("valid RFC 3339");
        let skew = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(skew < Duration::from_secs(5), "{text}");
        assert!(text.ends_with('Z'));
    }
}
