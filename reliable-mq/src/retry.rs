//! The delayed retry ladder: which wait queue a failed message goes to, and when.
//!
//! Each distinct delay is a durable *tier* queue `{queue}.retry.{delay}` with that delay as
//! its message TTL and the work queue as its dead-letter target (default exchange, routing
//! key = work queue). A failed message is copied there (confirmed) and the original acked;
//! the broker moves it back when the TTL expires. No consumer slot is held while waiting,
//! and since all messages of a tier share one TTL they expire in queue order.

pub use reliable_mq_model::RetryLadder;

/// A test-only seam: make a consumer behave as if its process died right after a settle
/// copy (retry or dead letter) was confirmed and before the original was acked.
///
/// That window cannot be hit from outside on purpose: the confirm and the ack are a few
/// microseconds apart. An armed queue's next settle copy is published and confirmed as
/// usual, then the original is neither acked nor nacked: it stays unacked on the channel,
/// exactly as after a kill, until the connection goes away (the test stops the app) and
/// the broker redelivers it. Nothing else changes. Not a public API.
#[doc(hidden)]
#[cfg(any(test, feature = "testing"))]
pub mod crash_seam {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};

    static ARMED: Mutex<Vec<(String, Arc<AtomicBool>)>> = Mutex::new(Vec::new());

    /// Arm the seam for the next settle copy of `queue`; disarmed when dropped.
    pub fn arm(queue: &str) -> Armed {
        let fired = Arc::new(AtomicBool::new(false));
        ARMED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((queue.to_owned(), Arc::clone(&fired)));
        Armed {
            queue: queue.to_owned(),
            fired,
        }
    }

    /// An armed seam.
    #[derive(Debug)]
    pub struct Armed {
        queue: String,
        fired: Arc<AtomicBool>,
    }

    impl Armed {
        /// Whether a settle copy of the queue was confirmed and its original left unacked.
        pub fn fired(&self) -> bool {
            self.fired.load(Ordering::SeqCst)
        }
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            ARMED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(q, f)| !(q == &self.queue && Arc::ptr_eq(f, &self.fired)));
        }
    }

    /// Called between a settle copy's confirm and the ack: `true` means "die here" (once).
    pub(crate) fn fire(queue: &str) -> bool {
        let mut armed = ARMED.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = armed.iter().position(|(q, _)| q == queue) else {
            return false;
        };
        let (_, fired) = armed.swap_remove(i);
        fired.store(true, Ordering::SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_seam_fires_once_for_its_queue() {
        let armed = crash_seam::arm("seam-q");
        assert!(!crash_seam::fire("other-q"));
        assert!(!armed.fired());
        assert!(crash_seam::fire("seam-q"));
        assert!(armed.fired());
        assert!(!crash_seam::fire("seam-q"), "one shot");
        let dropped = crash_seam::arm("seam-q2");
        drop(dropped);
        assert!(!crash_seam::fire("seam-q2"), "disarmed on drop");
    }
}
