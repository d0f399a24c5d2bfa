//! A claim or done mark sent to the store at once and answered later.
//!
//! An idempotent consumer claims a delivery the moment it arrives, long before a slot is
//! free for it, so that the claims of a prefetch window go to Redis together (one batch)
//! and their round trip overlaps the handlers. Sending needs no task: the request joins
//! the batcher's queue there and then, and the answer is written into the [`StoreCall`]
//! the delivery keeps. The same allocation carries the key and the token for the claim,
//! its lease renewals and its done mark, and tells the renewal sweep whether the claim
//! was acquired (a claim still unanswered is not renewed yet; one found done or held by
//! another delivery is never renewed).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use super::{Claim, DedupError};

/// Which batched operation a request is.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Claim the key for the lease (answers a claim code, see [`claim_code`]).
    Claim,
    /// Mark the key done for the TTL (answers 1 if marked).
    Complete,
}

/// Where a claim stands, for the renewal sweep.
const PENDING: u8 = 0;
const ACQUIRED: u8 = 1;
const NOT_OURS: u8 = 2;

/// One delivery's key and token, and the answer of the store call under way for it.
#[doc(hidden)]
pub struct StoreCall {
    /// The key, then the token, in one allocation.
    key_token: Box<str>,
    /// Where the key ends in `key_token`.
    key_len: usize,
    /// The claim's answer as the renewal sweep needs it: pending, acquired, not ours.
    claim: AtomicU8,
    /// The caller stopped waiting (its deadline passed): a batch not yet sent leaves the
    /// request out. A claim written after the caller released it would hold the message
    /// off until its lease ran out.
    gave_up: AtomicBool,
    answer: Mutex<Answer>,
}

#[derive(Default)]
struct Answer {
    code: Option<Result<i64, DedupError>>,
    waiting: Option<Waker>,
}

impl std::fmt::Debug for StoreCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCall")
            .field("key", &self.key())
            .finish_non_exhaustive()
    }
}

impl StoreCall {
    /// A call for `key_token`, the key (its first `key_len` bytes) then the token.
    pub(crate) fn new(key_token: String, key_len: usize) -> Self {
        debug_assert!(key_token.is_char_boundary(key_len));
        Self {
            key_token: key_token.into_boxed_str(),
            key_len,
            claim: AtomicU8::new(PENDING),
            gave_up: AtomicBool::new(false),
            answer: Mutex::new(Answer::default()),
        }
    }

    /// A call for `key` and `token`, copied into one allocation.
    pub(crate) fn for_key(key: &str, token: &str) -> Self {
        let mut key_token = String::with_capacity(key.len() + token.len());
        key_token.push_str(key);
        key_token.push_str(token);
        Self::new(key_token, key.len())
    }

    pub(crate) fn key(&self) -> &str {
        &self.key_token[..self.key_len]
    }

    pub(crate) fn token(&self) -> &str {
        &self.key_token[self.key_len..]
    }

    /// Whether the claim was acquired (`Some(true)`), found done or held elsewhere
    /// (`Some(false)`), or is not answered yet (`None`).
    pub(crate) fn acquired(&self) -> Option<bool> {
        match self.claim.load(Ordering::Acquire) {
            PENDING => None,
            state => Some(state == ACQUIRED),
        }
    }

    /// Give up waiting for the answer (see the field).
    pub(crate) fn give_up(&self) {
        self.gave_up.store(true, Ordering::Release);
    }

    pub(crate) fn given_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
    }

    /// Write the answer of `op` and wake the caller.
    pub(crate) fn answer(&self, op: Op, code: Result<i64, DedupError>) {
        if op == Op::Claim
            && let Ok(code) = &code
        {
            let state = if claim_outcome(*code) == Claim::Acquired {
                ACQUIRED
            } else {
                NOT_OURS
            };
            self.claim.store(state, Ordering::Release);
        }
        let waiting = {
            let mut answer = self.lock();
            answer.code = Some(code);
            answer.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
    }

    /// The answer, if it has come.
    pub(crate) fn take_answer(&self) -> Option<Result<i64, DedupError>> {
        self.lock().code.take()
    }

    /// Wait for the answer.
    pub(crate) async fn answered(&self) -> Result<i64, DedupError> {
        poll_fn(|cx| {
            let mut answer = self.lock();
            match answer.code.take() {
                Some(code) => Poll::Ready(code),
                None => {
                    answer.waiting = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    fn lock(&self) -> MutexGuard<'_, Answer> {
        self.answer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a claim code of the scripts means: `0` acquired, `1` done, anything else held.
pub(crate) fn claim_outcome(code: i64) -> Claim {
    match code {
        0 => Claim::Acquired,
        1 => Claim::Done,
        _ => Claim::Held,
    }
}

/// The code the scripts answer for `claim` (the inverse of [`claim_outcome`]), for stores
/// that answer a [`Claim`].
pub(crate) fn claim_code(claim: Claim) -> i64 {
    match claim {
        Claim::Acquired => 0,
        Claim::Done => 1,
        Claim::Held => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_wakes_the_waiting_caller_and_tells_the_sweep() {
        let call = std::sync::Arc::new(StoreCall::for_key("k", "t"));
        assert_eq!((call.key(), call.token()), ("k", "t"));
        assert_eq!(call.acquired(), None, "not answered yet");
        let answering = std::sync::Arc::clone(&call);
        let waiter = tokio::spawn(async move { answering.answered().await });
        tokio::task::yield_now().await;
        call.answer(Op::Claim, Ok(0));
        assert_eq!(waiter.await.expect("no panic").ok(), Some(0));
        assert_eq!(call.acquired(), Some(true));
        call.answer(Op::Complete, Ok(1));
        assert_eq!(
            call.acquired(),
            Some(true),
            "a done mark's answer is no claim"
        );
        assert_eq!(call.take_answer().and_then(Result::ok), Some(1));
        assert!(call.take_answer().is_none(), "taken once");
    }

    #[test]
    fn done_or_held_is_not_ours() {
        for claim in [Claim::Done, Claim::Held] {
            let call = StoreCall::for_key("k", "t");
            call.answer(Op::Claim, Ok(claim_code(claim)));
            assert_eq!(call.acquired(), Some(false));
            assert_eq!(claim_outcome(claim_code(claim)), claim);
        }
    }
}
