//! `events_lost` records: written into the findings stream when the kernel dropped events since
//! the last one, at most one per EVENTS_LOST_EVERY, so that a storm cannot flood the findings.

use std::{collections::BTreeMap, time::Duration, time::Instant};

use monitor_common::lost_category;

use crate::{clock, enrich, report::finding::Finding};

/// At most one `events_lost` record per this long.
const EVENTS_LOST_EVERY: Duration = Duration::from_secs(10);

type Counts = [u64; lost_category::COUNT as usize];

/// Lost-event counts as of the last `events_lost` record, and when it was written.
#[derive(Default)]
pub struct LostReports {
    reported: Counts,
    reported_at: Option<Instant>,
}

impl LostReports {
    /// The record to write for the kernel's lost-event counts `lost`, if one is due.
    pub fn due(&mut self, lost: Counts) -> Option<Finding> {
        if lost == self.reported
            || self
                .reported_at
                .is_some_and(|at| at.elapsed() < EVENTS_LOST_EVERY)
        {
            return None;
        }
        let since: BTreeMap<&'static str, u64> = lost_category::NAMES
            .iter()
            .zip(lost.iter().zip(self.reported))
            .filter(|(_, (now, before))| *now > before)
            .map(|(name, (now, before))| (*name, now - before))
            .collect();
        self.reported = lost;
        self.reported_at = Some(Instant::now());
        Some(enrich::events_lost(
            since,
            lost.iter().sum(),
            clock::boot_ns(),
        ))
    }
}
