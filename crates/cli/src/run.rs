//! Wiring between the command line and [`idsync_runner`]: the printer reports runs, the saved plan
//! file's shape, and exit codes for errors.

use crate::output::Printer;
use idsync_engine::ApplyReport;
use idsync_model::{Halt, Plan, PlanFile};
pub use idsync_runner::{Agreement, Mode, ReadCache, RunOptions, exit, unix_now};
use idsync_runner::{Reporter, RunError};
use serde::{Deserialize, Serialize};

/// A saved set of plans (`idsync plan --out plan.json`), one per agreement.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlanBundle {
    /// Format version.
    pub format: u32,
    /// One per agreement.
    pub plans: Vec<PlanFile>,
}

impl Reporter for Printer {
    fn note(&mut self, note: &str) {
        Printer::note(self, note);
    }
    fn heading(&mut self, heading: &str) {
        Printer::heading(self, heading);
    }
    fn plan(&mut self, plan: &Plan, target: &str, mode: Mode) {
        Printer::plan(self, plan, target, mode);
    }
    fn halt(&mut self, halt: &Halt) {
        Printer::halt(self, halt);
    }
    fn report(&mut self, report: &ApplyReport) {
        Printer::report(self, report);
    }
}

/// The exit code an error asks for: a run's own (another run holds the lease: 4), else 1.
pub fn code_of(e: &anyhow::Error) -> u8 {
    if let Some(r) = e.downcast_ref::<RunError>() {
        return r.exit_code();
    }
    match e.downcast_ref::<idsync_state::StateError>() {
        Some(
            idsync_state::StateError::LeaseHeld { .. } | idsync_state::StateError::LeaseLost { .. },
        ) => exit::BUSY,
        _ => exit::ERROR,
    }
}

/// The worse of two exit codes, from best to worst: in sync (0), pending (2), halted (3), busy (4),
/// error (1). A run of several targets exits with the worst of theirs.
pub fn worse(a: u8, b: u8) -> u8 {
    let rank = |c: u8| match c {
        exit::OK => 0,
        exit::PENDING => 1,
        exit::HALTED => 2,
        exit::BUSY => 3,
        _ => 4,
    };
    if rank(b) > rank(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_worse_than_anything_else() {
        assert_eq!(worse(exit::OK, exit::PENDING), exit::PENDING);
        assert_eq!(worse(exit::ERROR, exit::PENDING), exit::ERROR);
        assert_eq!(worse(exit::HALTED, exit::ERROR), exit::ERROR);
        assert_eq!(worse(exit::BUSY, exit::HALTED), exit::BUSY);
        assert_eq!(worse(exit::PENDING, exit::OK), exit::PENDING);
    }
}
