//! How a command ends: the exit codes `senet` returns, the error that marks a runtime failure,
//! and the stop flag Ctrl-C (SIGINT) and SIGTERM set. A leaf: it uses no other module.
//!
//! | code | when |
//! | --- | --- |
//! | 0 | done |
//! | 1 | a runtime failure ([`RuntimeFailure`]): the GPU lost, out of memory, a GPU error, the data loader failed |
//! | 2 | usage or bad input: flags, files, datasets, checkpoints, no adapter, a diverged run (every other error) |
//! | 130 | interrupted ([`Interrupted`]): the first signal saves and stops ([`stop_requested`]), a second aborts at once |

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

pub const SUCCESS: u8 = 0;
pub const RUNTIME: u8 = 1;
pub const BAD_INPUT: u8 = 2;
pub const INTERRUPTED: u8 = 130;

/// A failure that is not the user's input: the device, the driver, or a bug (a panicking thread).
/// Anywhere in an error's chain, it makes the exit code [`RUNTIME`].
#[derive(Debug)]
pub struct RuntimeFailure(pub String);

impl std::fmt::Display for RuntimeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RuntimeFailure {}

/// `msg` as a runtime failure.
pub fn runtime(msg: impl Into<String>) -> anyhow::Error {
    RuntimeFailure(msg.into()).into()
}

/// The text of a thread's panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_string())
}

/// Training was stopped by a signal after saving: the command exits [`INTERRUPTED`].
#[derive(Debug)]
pub struct Interrupted {
    /// The run folder, for the `--resume` command.
    pub out: PathBuf,
    /// The resume checkpoint written.
    pub saved: PathBuf,
    pub epoch: usize,
    pub step: usize,
    /// A data-parallel rank other than 0: it ends with the same code, rank 0 alone says so.
    pub quiet: bool,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted in epoch {} after step {}; saved {}. Continue with: senet train --resume {}",
            self.epoch,
            self.step,
            self.saved.display(),
            self.out.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// An error every data-parallel rank reaches at the same point with the same message (bad input
/// checked on identical data, a configuration mismatch agreed by a collective): the ranks end
/// together, with no abort, and only rank 0 prints it — the others carry an empty message.
#[derive(Debug)]
pub struct Collective(pub String);

impl std::fmt::Display for Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Collective {}

/// The exit code for an error: [`INTERRUPTED`] for an [`Interrupted`] run, [`RUNTIME`] when a
/// [`RuntimeFailure`] is in its chain, else [`BAD_INPUT`].
pub fn code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Interrupted>().is_some() {
        INTERRUPTED
    } else if e.chain().any(|c| c.is::<RuntimeFailure>()) {
        RUNTIME
    } else {
        BAD_INPUT
    }
}

/// What a command that failed with `e` prints on stderr (nothing for a quiet rank's share of an
/// error rank 0 reports), and its exit code.
pub fn report(e: &anyhow::Error) -> (Option<String>, u8) {
    let code = code(e);
    let text = if let Some(i) = e.downcast_ref::<Interrupted>() {
        (!i.quiet).then(|| format!("{e:#}"))
    } else if e.downcast_ref::<Collective>().is_some_and(|c| c.0.is_empty()) {
        None
    } else {
        Some(format!("error: {e:#}"))
    };
    (text, code)
}

/// Set by the first Ctrl-C (SIGINT) or SIGTERM: the run finishes its step, saves and exits 130.
static STOP: AtomicBool = AtomicBool::new(false);

/// Install the handler (once per process; later calls share it). The first signal sets the stop
/// flag; a second one, while the run is still finishing its step or saving, exits 130 at once.
pub fn install_stop_handler() {
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted again: aborting now, without saving");
            std::process::exit(i32::from(INTERRUPTED));
        }
        eprintln!("stopping after this step (Ctrl-C again to abort at once)");
    });
}

/// Ask for a stop as a signal would (a data-parallel rank whose peer was signalled).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
