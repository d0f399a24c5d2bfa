//! The outcome ledger of one publisher channel: every publish in flight, its lapin
//! futures, and the return (if any) that belongs to it.
//!
//! Why it exists (lapin 4.12): a `basic.return` carries no delivery tag. lapin queues it
//! and hands it to whichever confirm the next ack resolves first, in `HashMap` order when
//! the ack is `multiple`; so the return of one publish can arrive attached to another
//! publish's confirm. And a `PublisherConfirm` dropped before it resolves is parked inside
//! lapin (with any return it would have carried) until someone calls
//! `wait_for_confirms`, so cancelled publishes would leak there.
//!
//! What the ledger does instead:
//! - **Identity.** Each return is matched to its publish by what the message itself
//!   carries: its `message_id` when no other publish in flight on this channel uses that
//!   id (the usual case: nothing is added to the message), else a per-attempt token in the
//!   [`TOKEN_HEADER`] header, given to every publish that reuses an id still in flight.
//!   So every publish in flight is named by exactly one of the two.
//! - **Order.** Every lapin future is polled with a waker of the ledger's own, which
//!   queues the publish's key the moment lapin resolves it (lapin resolves on its I/O
//!   thread, in wire order). Before anyone's outcome is read, all resolutions queued so
//!   far are processed in that order, recording every attached return under its owner.
//!   The broker sends a publish's return before the ack that covers it, and lapin hands
//!   it out no later than that ack, so by the time a publish's own ack is processed its
//!   return, wherever lapin put it, has been recorded.
//! - **Ownership.** The ledger, not the caller, owns lapin's futures and polls them to
//!   the end. A caller that stops waiting (cancelled, or told its confirm timed out) only
//!   detaches; the entry leaves the ledger when lapin resolves it (ack, nack or channel
//!   error). A background task per channel does the polling when no caller is waiting,
//!   and fires the confirm deadlines (one timer per channel, not one per publish).
//! - **Bound.** At most [`MAX_IN_FLIGHT`] entries per channel (a semaphore); a publish
//!   beyond that waits for room, within its confirm timeout, before anything is sent.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::error;

use super::Link;

/// The header carrying the per-attempt token of a publish that reuses a `message_id`
/// already in flight on the same channel. Reserved: a caller's header of this name is
/// removed before publishing.
pub const TOKEN_HEADER: &str = "x-publish-token";

/// Publishes in flight per channel, at most (cancelled and timed-out ones included, until
/// the broker answers for them).
pub const MAX_IN_FLIGHT: usize = 16_384;

/// What became of one publish attempt.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Acked and not returned: the broker has it.
    Confirmed,
    /// Returned as unroutable (then acked): reply code and text.
    Returned(u16, String),
    /// Nacked by the broker.
    Nacked,
    /// The channel or connection failed before the confirm: the broker's reply code when
    /// it closed the channel or connection, and the error text.
    Failed(Option<u16>, String),
    /// No answer within the confirm timeout (the ledger keeps waiting for it).
    TimedOut,
}

type SendFuture = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

enum Step {
    Sending(SendFuture),
    Confirming(PublisherConfirm),
    Done,
}

struct Entry {
    step: Step,
    waker: Waker,
    wake: Arc<EntryWake>,
    /// The id this entry is named by in `by_id`, when it carries no token.
    holds_id: Option<Arc<str>>,
    returned: Option<(u16, String)>,
    outcome: Option<Outcome>,
    /// No caller will read the final outcome (cancelled, or already told it timed out).
    detached: bool,
    /// Judged: its ack or nack has been processed (a return can no longer be its own).
    settled: bool,
    _permit: OwnedSemaphorePermit,
}

/// Wakes for one entry: queue its key, then wake its caller (or the background task when
/// no caller waits).
struct EntryWake {
    key: u64,
    shared: Arc<Shared>,
    caller: Mutex<Option<Waker>>,
}

impl Wake for EntryWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.shared.ready).push(self.key);
        match &*lock(&self.caller) {
            Some(w) => w.wake_by_ref(),
            None => self.shared.background.notify_one(),
        }
    }
}

struct Shared {
    /// Keys whose lapin future may have progressed, in the order lapin woke them.
    ready: Mutex<Vec<u64>>,
    background: Notify,
}

#[derive(Default)]
struct State {
    next_key: u64,
    entries: HashMap<u64, Entry>,
    by_id: HashMap<Arc<str>, u64>,
    deadlines: VecDeque<(Instant, u64)>,
    /// Entries lapin has resolved, judged once the ready queue is empty.
    resolved: Vec<(u64, Outcome)>,
}

/// The ledger of one channel.
pub(crate) struct Ledger {
    state: Mutex<State>,
    shared: Arc<Shared>,
    room: Arc<Semaphore>,
    /// Returns that matched no publish in flight (should stay 0; logged when not).
    stray_returns: AtomicU64,
}

impl Ledger {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            shared: Arc::new(Shared {
                ready: Mutex::new(Vec::new()),
                background: Notify::new(),
            }),
            room: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            stray_returns: AtomicU64::new(0),
        })
    }

    /// Start the background task that polls detached entries and fires deadlines; it ends
    /// once the channel is gone and every entry is settled.
    pub(crate) fn spawn_background(self: &Arc<Self>, link: Weak<Link>) {
        let ledger = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let next = {
                    let mut state = lock(&ledger.state);
                    ledger.drain(&mut state);
                    ledger.expire(&mut state);
                    if state.entries.is_empty() && link.strong_count() == 0 {
                        return;
                    }
                    state.deadlines.front().map(|(at, _)| *at)
                };
                let idle = Instant::now() + Duration::from_secs(1);
                let until = next.map_or(idle, |at| at.min(idle));
                tokio::select! {
                    () = ledger.shared.background.notified() => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }
        });
    }

    /// Entries in the ledger (in flight, including detached ones).
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.state).entries.len()
    }

    /// Returns that matched no publish in flight.
    pub(crate) fn stray_returns(&self) -> u64 {
        self.stray_returns.load(Ordering::Relaxed)
    }

    /// Send one publish on `link` and return the ticket to its outcome. Waits for room
    /// first, at most until `room_by` (`None`: no room, nothing was sent). The ticket
    /// resolves as timed out at `deadline`, if given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        self: &Arc<Self>,
        link: &Arc<Link>,
        exchange: ShortString,
        routing_key: ShortString,
        body: Arc<Vec<u8>>,
        mut properties: BasicProperties,
        message_id: &str,
        room_by: Instant,
        deadline: Option<Instant>,
    ) -> Option<Ticket> {
        let permit = match Arc::clone(&self.room).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let wait = Arc::clone(&self.room).acquire_owned();
                tokio::time::timeout_at(room_by, wait).await.ok()?.ok()?
            }
        };
        let mut state = lock(&self.state);
        state.next_key += 1;
        let key = state.next_key;
        let holds_id = if state.by_id.contains_key(message_id) {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(
                ShortString::from(TOKEN_HEADER),
                AMQPValue::LongLongInt(key as i64),
            );
            properties = properties.with_headers(headers);
            None
        } else {
            let id: Arc<str> = message_id.into();
            state.by_id.insert(Arc::clone(&id), key);
            Some(id)
        };
        let wake = Arc::new(EntryWake {
            key,
            shared: Arc::clone(&self.shared),
            caller: Mutex::new(None),
        });
        let waker = Waker::from(Arc::clone(&wake));
        let sending = Arc::clone(link);
        let future: SendFuture = Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            sending
                .channel
                .basic_publish(exchange, routing_key, options, &body, properties)
                .await
        });
        state.entries.insert(
            key,
            Entry {
                step: Step::Sending(future),
                waker,
                wake,
                holds_id,
                returned: None,
                outcome: None,
                detached: false,
                settled: false,
                _permit: permit,
            },
        );
        if let Some(at) = deadline {
            if state.deadlines.is_empty() {
                self.shared.background.notify_one();
            }
            state.deadlines.push_back((at, key));
            // Deadlines of settled publishes wait for their time to be dropped; keep
            // them from outnumbering the live ones at high rates or long timeouts.
            if state.deadlines.len() > 2 * state.entries.len() + 1024 {
                let State {
                    deadlines, entries, ..
                } = &mut *state;
                deadlines.retain(|(_, k)| entries.contains_key(k));
            }
        }
        // The first poll numbers the publish and queues its frames, both synchronously:
        // under the state lock, so the numbering order is the wire order.
        self.advance(&mut state, key);
        self.drain(&mut state);
        drop(state);
        Some(Ticket {
            ledger: Arc::clone(self),
            key,
            done: false,
        })
    }

    /// Process every resolution lapin has signalled, then judge the resolved entries.
    ///
    /// Judging waits until the ready queue is empty: lapin makes a confirm's result
    /// visible a moment before it wakes the next one, so an entry can be found resolved
    /// (polled for an older wake) while the wake of a confirm resolved before it, maybe
    /// carrying its return, is still queued. Every confirm resolved before the ones found
    /// here has queued its wake by now, so emptying the queue records its return first.
    fn drain(&self, state: &mut State) {
        loop {
            let keys = std::mem::take(&mut *lock(&self.shared.ready));
            if keys.is_empty() {
                break;
            }
            for key in keys {
                self.advance(state, key);
            }
        }
        for (key, outcome) in std::mem::take(&mut state.resolved) {
            self.finish(state, key, outcome);
        }
    }

    /// Poll one entry's lapin futures as far as they go.
    fn advance(&self, state: &mut State, key: u64) {
        let (result, returned) = {
            let Some(entry) = state.entries.get_mut(&key) else {
                return;
            };
            let mut cx = Context::from_waker(&entry.waker);
            loop {
                match &mut entry.step {
                    Step::Done => return,
                    Step::Sending(send) => match send.as_mut().poll(&mut cx) {
                        Poll::Pending => return,
                        Poll::Ready(Ok(confirm)) => entry.step = Step::Confirming(confirm),
                        Poll::Ready(Err(e)) => {
                            entry.step = Step::Done;
                            break (failed(&e), None);
                        }
                    },
                    Step::Confirming(confirm) => match Pin::new(confirm).poll(&mut cx) {
                        Poll::Pending => return,
                        Poll::Ready(r) => {
                            entry.step = Step::Done;
                            break match r {
                                Ok(Confirmation::Ack(ret)) => (Outcome::Confirmed, ret),
                                Ok(Confirmation::Nack(ret)) => (Outcome::Nacked, ret),
                                Ok(Confirmation::NotRequested) => (
                                    Outcome::Failed(None, "channel not in confirm mode".into()),
                                    None,
                                ),
                                Err(e) => (failed(&e), None),
                            };
                        }
                    },
                }
            }
        };
        // The return lapin attached here may be anyone's: record it under its owner.
        if let Some(returned) = returned {
            self.attribute(state, &returned);
        }
        state.resolved.push((key, result));
    }

    fn attribute(&self, state: &mut State, returned: &BasicReturnMessage) {
        let properties = &returned.delivery.properties;
        let token = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(TOKEN_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
                _ => None,
            });
        let owner = match token {
            Some(key) => Some(key),
            None => properties
                .message_id()
                .as_ref()
                .and_then(|id| state.by_id.get(id.as_str()).copied()),
        };
        let reply = (returned.reply_code, returned.reply_text.to_string());
        match owner.and_then(|key| state.entries.get_mut(&key)) {
            Some(entry) if !entry.settled => entry.returned = Some(reply),
            _ => {
                self.stray_returns.fetch_add(1, Ordering::Relaxed);
                error!(
                    message_id = ?properties.message_id(),
                    reply = %returned.reply_text,
                    "a returned message matched no publish in flight; its publish may have been reported as confirmed"
                );
            }
        }
    }

    fn finish(&self, state: &mut State, key: u64, result: Outcome) {
        let Some(entry) = state.entries.get_mut(&key) else {
            return;
        };
        if let Some(id) = entry.holds_id.take()
            && state.by_id.get(&id) == Some(&key)
        {
            state.by_id.remove(&id);
        }
        let Some(entry) = state.entries.get_mut(&key) else {
            return;
        };
        entry.settled = true;
        if entry.detached {
            state.entries.remove(&key);
            return;
        }
        entry.outcome = Some(match (result, entry.returned.take()) {
            (Outcome::Confirmed, Some((code, text))) => Outcome::Returned(code, text),
            (other, _) => other,
        });
    }

    /// Tell callers whose deadline passed; their entries stay until lapin resolves them.
    fn expire(&self, state: &mut State) {
        let now = Instant::now();
        while let Some(&(at, key)) = state.deadlines.front() {
            if at > now {
                break;
            }
            state.deadlines.pop_front();
            if let Some(entry) = state.entries.get_mut(&key)
                && entry.outcome.is_none()
                && !entry.detached
                && !matches!(entry.step, Step::Done)
            {
                entry.outcome = Some(Outcome::TimedOut);
                if let Some(w) = &*lock(&entry.wake.caller) {
                    w.wake_by_ref();
                }
            }
        }
    }
}

/// The caller's handle on one publish: a future of its [`Outcome`]. Dropping it detaches
/// the caller; the ledger still sees the publish through.
pub(crate) struct Ticket {
    ledger: Arc<Ledger>,
    key: u64,
    done: bool,
}

impl Future for Ticket {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = &mut *self;
        let ledger = Arc::clone(&this.ledger);
        let mut state = lock(&ledger.state);
        let Some(entry) = state.entries.get(&this.key) else {
            this.done = true;
            return Poll::Ready(Outcome::TimedOut);
        };
        // Register before draining: a resolution after this point wakes us, one before it
        // is processed by the drain below.
        {
            let mut caller = lock(&entry.wake.caller);
            if !caller.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *caller = Some(cx.waker().clone());
            }
        }
        ledger.drain(&mut state);
        let Some(entry) = state.entries.get_mut(&this.key) else {
            this.done = true;
            return Poll::Ready(Outcome::TimedOut);
        };
        let Some(outcome) = entry.outcome.take() else {
            return Poll::Pending;
        };
        this.done = true;
        if matches!(entry.step, Step::Done) {
            state.entries.remove(&this.key);
        } else {
            entry.detached = true;
            *lock(&entry.wake.caller) = None;
        }
        Poll::Ready(outcome)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = lock(&self.ledger.state);
        if let Some(entry) = state.entries.get_mut(&self.key) {
            if matches!(entry.step, Step::Done) {
                state.entries.remove(&self.key);
            } else {
                entry.detached = true;
                *lock(&entry.wake.caller) = None;
            }
        }
        drop(state);
        // Whatever lapin resolved meanwhile is now the background task's to process.
        self.ledger.shared.background.notify_one();
    }
}

fn failed(e: &lapin::Error) -> Outcome {
    Outcome::Failed(reply_code(e), e.to_string())
}

/// The broker's reply code carried by a channel or connection close, if that is what
/// `e` is.
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Remove the reserved token header from caller headers (a stale one, e.g. copied from a
/// consumed message, would name the wrong publish).
pub(crate) fn strip_token(headers: &mut FieldTable) {
    if headers.inner().contains_key(TOKEN_HEADER) {
        let mut map = headers.inner().clone();
        map.remove(TOKEN_HEADER);
        *headers = map.into();
    }
}

// A panic while holding one of these locks leaves consistent data, so poisoning is
// ignored rather than spread.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
