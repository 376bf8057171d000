//! Programs attached only while the daemon needs them (the write probe, the scheduler probes),
//! so that the host pays for them only then.

use aya::{Ebpf, programs::tp_btf::BtfTracePointLinkId};

use super::{ProbeError, program_error, tp_btf};

/// Programs attached and detached together while the daemon runs, with their links while
/// attached. Both or neither: a failed attach detaches what it had attached.
pub(super) struct OnDemand {
    /// In attach order; detached in reverse.
    programs: &'static [&'static str],
    links: Vec<(&'static str, BtfTracePointLinkId)>,
    /// The kernel refused the programs (their detector is unavailable): never attached.
    disabled: bool,
}

impl OnDemand {
    pub(super) fn new(programs: &'static [&'static str]) -> Self {
        Self {
            programs,
            links: Vec::new(),
            disabled: false,
        }
    }

    /// Never attach: this kernel refused the programs.
    pub(super) fn disable(&mut self) {
        self.disabled = true;
    }

    pub(super) fn attached(&self) -> bool {
        !self.links.is_empty()
    }

    pub(super) fn set(&mut self, ebpf: &mut Ebpf, attached: bool) -> Result<(), ProbeError> {
        if attached == self.attached() || (attached && self.disabled) {
            return Ok(());
        }
        if !attached {
            while let Some((program, link)) = self.links.pop() {
                tp_btf(ebpf, program)?
                    .detach(link)
                    .map_err(|e| program_error(program, "detach", e))?;
            }
            return Ok(());
        }
        for &program in self.programs {
            let link = tp_btf(ebpf, program).and_then(|prog| {
                prog.attach()
                    .map_err(|e| program_error(program, "attach", e))
            });
            match link {
                Ok(link) => self.links.push((program, link)),
                Err(err) => {
                    let _ = self.set(ebpf, false);
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}
