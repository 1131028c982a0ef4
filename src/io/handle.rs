//! The product's end of an event loop running on its own thread: commands in over a channel
//! that wakes the loop, request-reply over a one-shot channel, a clean stop that joins the
//! thread (also on drop).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::gcks::EngineError;

/// How long a request waits for the loop's reply before the loop counts as gone.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running loop that takes commands of type `C`.
pub(crate) struct LoopHandle<C> {
    commands: Sender<C>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<Result<(), EngineError>>>,
    shutdown: fn() -> C,
}

impl<C> std::fmt::Debug for LoopHandle<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopHandle")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl<C> LoopHandle<C> {
    /// The handle of the loop on `thread`, which `shutdown()` stops.
    pub(crate) fn new(
        commands: Sender<C>,
        waker: Arc<mio::Waker>,
        thread: JoinHandle<Result<(), EngineError>>,
        shutdown: fn() -> C,
    ) -> Self {
        Self {
            commands,
            waker,
            thread: Some(thread),
            shutdown,
        }
    }

    /// Sends a command and wakes the loop.
    pub(crate) fn send(&self, command: C) -> Result<(), EngineError> {
        self.commands.send(command).map_err(|_| EngineError::Gone)?;
        self.waker.wake().map_err(EngineError::Io)
    }

    /// Sends the command `make` builds around a reply channel and waits for the reply.
    pub(crate) fn request<R>(&self, make: impl FnOnce(Sender<R>) -> C) -> Result<R, EngineError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(make(reply))?;
        answer
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| EngineError::Gone)
    }

    /// Stops the loop and waits for its thread; the loop's own error, if it had one.
    pub(crate) fn stop(&mut self) -> Result<(), EngineError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.commands.send((self.shutdown)());
        let _ = self.waker.wake();
        thread.join().map_err(|_| EngineError::Panicked)?
    }
}

impl<C> Drop for LoopHandle<C> {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
