//! How a command ends: the exit codes `senet` returns, the error that marks a runtime failure,
//! and the stop flag Ctrl-C (SIGINT) and SIGTERM set. A leaf: it uses no other module.
//!
//! | code | when |
//! | --- | --- |
//! | 0 | done |
//! | 1 | a runtime failure ([`RuntimeFailure`]): the GPU lost, out of memory, a GPU error, the data loader failed |
//! | 2 | usage or bad input: flags, files, datasets, checkpoints, no adapter, a diverged run (every other error) |
//! | 130 | interrupted: the first signal saves and stops ([`stop_requested`]), a second aborts at once |

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

/// The exit code for an error: [`RUNTIME`] when a [`RuntimeFailure`] is in its chain,
/// `interrupted(e)` → [`INTERRUPTED`], else [`BAD_INPUT`].
pub fn code(e: &anyhow::Error, interrupted: impl Fn(&anyhow::Error) -> bool) -> u8 {
    if interrupted(e) {
        INTERRUPTED
    } else if e.chain().any(|c| c.is::<RuntimeFailure>()) {
        RUNTIME
    } else {
        BAD_INPUT
    }
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
