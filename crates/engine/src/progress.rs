//! Progress of the run in flight, for a person watching: the runner marks the steps (the source
//! read, the target observation, the apply), connectors count what each page brought, the apply
//! counts operations as they finish. What shows it (bars on a terminal, a periodic line in a log)
//! is a [`Listener`] the command line installs; without one every call is a no-op.
//!
//! One step runs at a time (agreements run one after the other); counts reported for a phase other
//! than the current step's are ignored (a target's look-up during an apply is not the apply's
//! progress).

use std::sync::OnceLock;

/// What a step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the source (entries: principals and group members).
    Read,
    /// Observing a target (principals).
    Observe,
    /// Applying a plan (operations).
    Apply,
}

impl Phase {
    /// What its counts count.
    pub fn unit(self) -> &'static str {
        match self {
            // A source's pages: principals, and group members (a user in five groups counts five
            // times), so "entries".
            Phase::Read => "entries",
            Phase::Observe => "principals",
            Phase::Apply => "operations",
        }
    }
}

/// Shows progress.
pub trait Listener: Send + Sync {
    /// A step starts; `total` when it is known.
    fn begin(&self, phase: Phase, label: &str, total: Option<u64>);
    /// `n` more done in `phase`.
    fn add(&self, phase: Phase, n: u64);
    /// The current step ended.
    fn end(&self);
    /// Runs `print` with the progress display out of the way (output to the same terminal).
    fn suspend(&self, print: &mut dyn FnMut());
}

static LISTENER: OnceLock<Box<dyn Listener>> = OnceLock::new();

/// Installs the process's listener; false if one was installed already.
pub fn listen(l: Box<dyn Listener>) -> bool {
    LISTENER.set(l).is_ok()
}

/// A step in progress; it ends when dropped (also on an error or a cancellation).
#[derive(Debug)]
#[must_use = "the step ends when this is dropped"]
pub struct Step(());

/// Starts a step.
pub fn begin(phase: Phase, label: &str, total: Option<u64>) -> Step {
    if let Some(l) = LISTENER.get() {
        l.begin(phase, label, total);
    }
    Step(())
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(l) = LISTENER.get() {
            l.end();
        }
    }
}

/// Counts `n` more principals read or observed, or operations applied, in `phase`.
pub fn add(phase: Phase, n: usize) {
    if let Some(l) = LISTENER.get() {
        l.add(phase, n as u64);
    }
}

/// Runs `print` with the progress display out of the way.
pub fn suspend(mut print: impl FnMut()) {
    match LISTENER.get() {
        Some(l) => l.suspend(&mut print),
        None => print(),
    }
}
