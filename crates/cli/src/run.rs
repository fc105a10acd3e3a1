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
