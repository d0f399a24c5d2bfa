//! The four Lua scripts of the claim protocol, shared by [`super::RedisStore`] and (with
//! the `redis-cluster` feature) `RedisClusterStore`. Each script touches exactly one key
//! (`KEYS[1]`), so it is atomic on one node and routes by that key's slot on a cluster.
//!
//! On one node, claims and done marks are also *batched*: the deliveries of a prefetch
//! window arrive together, and their claims (and later their done marks) queue up while
//! the previous batch is on the wire; the next batch takes all of them to Redis in one
//! script call over several keys, which runs the one-key script's steps for each key in
//! turn. Each key gets exactly the answer the one-key script would have given in that
//! order (the script is atomic, so no other client comes between), so the protocol and
//! its guarantees are the same; what changes is one round trip, one script run and one
//! reply to parse per batch instead of per message. No delay is added to wait for a
//! batch: a lone claim goes at once. A cluster routes a script by its one slot, and the
//! keys of a batch hash to many: there every operation stays a call of its own.
//!
//! A batch's claims need no script on Redis 7 or later: `SET key token NX PX lease GET`
//! does what [`CLAIM`] does in one native command (set only if absent, and answer what
//! was there: nothing, `done`, or another token), in about half the script's time on
//! the server. The store asks the server's version (`INFO server`) once per connection and
//! falls back to the script on an older server, or one that refuses `INFO`. The done
//! mark keeps its script: it sets `done` only over its own token or nothing, and Redis
//! has no native compare-and-set before 8.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use deadpool_redis::redis::aio::ConnectionLike;
use deadpool_redis::redis::{
    Cmd, ErrorKind, FromRedisValue, RedisError, Script, ScriptInvocation, ServerErrorKind, Value,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;

use super::{Claim, DedupError, DedupFuture, DedupStore, Op, StoreCall, claim_outcome, millis};

/// `0` acquired, `1` done, `2` held by another token.
const CLAIM: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
if v == 'done' then return 1 end
return 2
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Ours, or gone (our lease ran out and nobody claimed since): the work is done, say so.
/// Held by another token, or already done: leave it.
const COMPLETE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or not v then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// [`CLAIM`] for each of `KEYS`, with `ARGV[2i-1]` the token and `ARGV[2i]` the lease
/// of `KEYS[i]`; the answers in order.
const CLAIM_MANY: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then
    redis.call('SET', key, ARGV[2 * i - 1], 'PX', ARGV[2 * i])
    out[i] = 0
  elseif v == 'done' then
    out[i] = 1
  else
    out[i] = 2
  end
end
return out
"#;

/// [`COMPLETE`] for each of `KEYS`, with `ARGV[2i-1]` the token and `ARGV[2i]` the TTL of
/// `KEYS[i]`; the answers in order.
const COMPLETE_MANY: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v == ARGV[2 * i - 1] or not v then
    redis.call('SET', key, 'done', 'PX', ARGV[2 * i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// How a batch sends its claims: unknown until the connection's server was asked, then
/// native `SET ... NX GET` commands or the [`CLAIM_MANY`] script.
const CLAIM_FORM_UNKNOWN: u8 = 0;
const CLAIM_FORM_NATIVE: u8 = 1;
const CLAIM_FORM_SCRIPT: u8 = 2;

/// Whether a server whose `INFO server` reads `info` takes `SET` with both `NX` and
/// `GET` (Redis 7.0 and later; Valkey reports a compatible `redis_version`).
fn takes_set_nx_get(info: &str) -> bool {
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .and_then(|version| version.trim().split('.').next()?.parse::<u32>().ok())
        .is_some_and(|major| major >= 7)
}

/// The claim of `r` as one native command: set the token for the lease unless the key
/// exists, and answer the value that was there.
fn native_claim(r: &Request) -> Cmd {
    let mut cmd = Cmd::with_capacity(8, r.call.key().len() + r.call.token().len() + 32);
    cmd.arg("SET")
        .arg(r.call.key())
        .arg(r.call.token())
        .arg("NX")
        .arg("PX")
        .arg(millis(r.duration))
        .arg("GET");
    cmd
}

/// The code [`CLAIM`] answers, from what a native claim found under its key.
fn native_claim_code(found: &Value) -> Result<i64, DedupError> {
    match found {
        Value::Nil => Ok(0),
        Value::BulkString(v) if v.as_slice() == b"done" => Ok(1),
        Value::BulkString(_) => Ok(2),
        other => Err(DedupError(format!(
            "unexpected answer to a claim: {other:?}"
        ))),
    }
}

/// The prepared scripts; each method builds the invocation of one operation, which the
/// store runs on its connection (it answers an integer, decoded by the `*_outcome`
/// functions).
pub(super) struct Scripts {
    claim: Script,
    renew: Script,
    complete: Script,
    release: Script,
    claim_many: Script,
    complete_many: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            claim_many: Script::new(CLAIM_MANY),
            complete_many: Script::new(COMPLETE_MANY),
        }
    }

    /// The script of a batched operation: claiming (`Op::Claim`) or marking done
    /// (`Op::Complete`).
    fn many_script(&self, op: Op) -> &Script {
        match op {
            Op::Claim => &self.claim_many,
            Op::Complete => &self.complete_many,
        }
    }

    /// One call of `op`'s batched script for every `(key, token, duration)` of `batch`.
    ///
    /// Written straight into the command (`EVALSHA`, as a `ScriptInvocation` sends it):
    /// an invocation first copies every key and argument into a buffer of its own, three
    /// allocations per request, and then copies them into the command.
    fn many(&self, op: Op, batch: &[Request]) -> Cmd {
        let bytes: usize = batch
            .iter()
            .map(|r| r.call.key().len() + r.call.token().len() + 20)
            .sum();
        let mut cmd = Cmd::with_capacity(3 + 3 * batch.len(), bytes + 64);
        cmd.arg("EVALSHA")
            .arg(self.many_script(op).get_hash())
            .arg(batch.len());
        for r in batch {
            cmd.arg(r.call.key());
        }
        for r in batch {
            cmd.arg(r.call.token()).arg(millis(r.duration));
        }
        cmd
    }

    pub(super) fn claim(&self, key: &str, token: &str, lease: Duration) -> ScriptInvocation<'_> {
        let mut inv = self.claim.key(key);
        inv.arg(token).arg(millis(lease));
        inv
    }

    pub(super) fn renew(&self, key: &str, token: &str, lease: Duration) -> ScriptInvocation<'_> {
        let mut inv = self.renew.key(key);
        inv.arg(token).arg(millis(lease));
        inv
    }

    pub(super) fn complete(&self, key: &str, token: &str, ttl: Duration) -> ScriptInvocation<'_> {
        let mut inv = self.complete.key(key);
        inv.arg(token).arg(millis(ttl));
        inv
    }

    pub(super) fn release(&self, key: &str, token: &str) -> ScriptInvocation<'_> {
        let mut inv = self.release.key(key);
        inv.arg(token);
        inv
    }
}

/// The pool settings both Redis stores use: up to `pool_size` connections (one serves all
/// operations; more are only opened while a broken one is replaced under load).
pub(super) fn pool_config(pool_size: usize) -> deadpool_redis::PoolConfig {
    deadpool_redis::PoolConfig {
        max_size: pool_size.max(1),
        timeouts: deadpool_redis::Timeouts {
            wait: Some(Duration::from_secs(5)),
            create: Some(Duration::from_secs(2)),
            recycle: Some(Duration::from_secs(2)),
        },
        ..Default::default()
    }
}

/// Where a script store gets its connection: a pool handing out multiplexed connections
/// (one Redis node, or a cluster) of which cheap clones run commands.
pub(super) trait ConnectionSource: Send + Sync + 'static {
    /// Whether one script may touch keys of any slot (one node: yes; a cluster: no), so
    /// claims and done marks can be batched.
    const BATCHES: bool;
    /// What the pool hands out; kept in the shared slot, back to the pool when replaced.
    type Pooled: Send;
    /// A clone of it that runs commands (requests of all clones are pipelined).
    type Conn: ConnectionLike + Send;
    /// Take a connection from the pool.
    fn take(&self) -> impl Future<Output = Result<Self::Pooled, DedupError>> + Send;
    /// A command handle on a pooled connection.
    fn handle(pooled: &Self::Pooled) -> Self::Conn;
}

/// The claim protocol over any [`ConnectionSource`]. Every operation runs on a clone of one
/// shared multiplexed connection (no per-operation pool checkout, whose recycle check costs
/// a round trip of its own); any error drops it, and the next operation takes a fresh one.
pub(super) struct ScriptStore<S: ConnectionSource> {
    shared: Arc<Shared<S>>,
    /// The batcher of claims and done marks, started on first use (`S::BATCHES` only).
    batcher: OnceLock<Option<Batcher>>,
}

/// What the store's operations and its batchers share.
struct Shared<S: ConnectionSource> {
    source: S,
    /// The connection every operation clones; `None` until first use and after an error.
    slot: Mutex<Option<S::Pooled>>,
    scripts: Scripts,
    /// How the connection in `slot` sends claims (`CLAIM_FORM_*`); asked again of each
    /// new connection, which may reach another server (after a failover).
    claim_form: AtomicU8,
}

impl<S: ConnectionSource> ScriptStore<S> {
    pub(super) fn new(source: S) -> Self {
        Self {
            shared: Arc::new(Shared {
                source,
                slot: Mutex::new(None),
                scripts: Scripts::new(),
                claim_form: AtomicU8::new(CLAIM_FORM_UNKNOWN),
            }),
            batcher: OnceLock::new(),
        }
    }

    /// The batcher, started on first use from within a Tokio runtime; `None` on a cluster
    /// or outside a runtime (every operation is then a call of its own).
    fn batcher(&self) -> Option<&Batcher> {
        self.batcher
            .get_or_init(|| {
                if !S::BATCHES {
                    return None;
                }
                let runtime = tokio::runtime::Handle::try_current().ok()?;
                Some(Batcher::start(&runtime, Arc::clone(&self.shared)))
            })
            .as_ref()
    }
}

impl<S: ConnectionSource> Shared<S> {
    /// A handle on the shared connection, taking one from the pool if there is none.
    async fn connection(&self) -> Result<S::Conn, DedupError> {
        if let Some(pooled) = self.lock_slot()?.as_ref() {
            return Ok(S::handle(pooled));
        }
        let fresh = self.source.take().await?;
        let handle = S::handle(&fresh);
        // Several operations may race to fill the slot: the last one wins; a connection it
        // replaces goes back to the pool.
        *self.lock_slot()? = Some(fresh);
        Ok(handle)
    }

    fn lock_slot(&self) -> Result<std::sync::MutexGuard<'_, Option<S::Pooled>>, DedupError> {
        self.slot
            .lock()
            .map_err(|_| DedupError("dedup store connection slot poisoned".into()))
    }

    /// After an error the connection may be broken: let the next operation take another
    /// (the pool's recycle check discards a dead one).
    fn forget_connection(&self) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = None;
        }
        self.claim_form.store(CLAIM_FORM_UNKNOWN, Ordering::Relaxed);
    }

    /// How claims go to the server behind `conn`: natively if it is Redis 7 or later.
    /// Asked once per connection; a server that refuses `INFO` gets the script.
    async fn claim_form(&self, conn: &mut S::Conn) -> Result<u8, RedisError> {
        let known = self.claim_form.load(Ordering::Relaxed);
        if known != CLAIM_FORM_UNKNOWN {
            return Ok(known);
        }
        let form = match deadpool_redis::redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(conn)
            .await
        {
            Ok(info) if takes_set_nx_get(&info) => CLAIM_FORM_NATIVE,
            Ok(_) => CLAIM_FORM_SCRIPT,
            // `INFO` renamed or forbidden by an ACL: the script works everywhere.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Server(ServerErrorKind::ResponseError | ServerErrorKind::NoPerm)
                ) =>
            {
                CLAIM_FORM_SCRIPT
            }
            Err(e) => return Err(e),
        };
        self.claim_form.store(form, Ordering::Relaxed);
        Ok(form)
    }

    async fn run<T: FromRedisValue>(
        &self,
        invocation: ScriptInvocation<'_>,
    ) -> Result<T, DedupError> {
        let mut conn = self.connection().await?;
        invocation.invoke_async(&mut conn).await.map_err(|e| {
            self.forget_connection();
            DedupError(e.to_string())
        })
    }

    /// Run one batch, its claims and its done marks in one round trip (a pipeline of a
    /// native command per claim or one claim script, then one done-mark script): a code
    /// per request, in order, or the error for all of them.
    async fn run_batch(&self, batch: &Batch) -> Result<(Vec<i64>, Vec<i64>), DedupError> {
        let answer = tokio::time::timeout(BATCH_CALL_TIMEOUT, self.run_pipeline(batch))
            .await
            .unwrap_or_else(|_| {
                self.forget_connection();
                Err(DedupError(format!(
                    "no answer within {BATCH_CALL_TIMEOUT:?}"
                )))
            })?;
        let (form, replies) = answer;
        let mut replies = replies.into_iter();
        let claims = if form == CLAIM_FORM_NATIVE {
            let found: Vec<Value> = replies.by_ref().take(batch.claims.len()).collect();
            if found.len() != batch.claims.len() {
                return Err(DedupError(format!(
                    "{} answers for {} claims",
                    found.len(),
                    batch.claims.len()
                )));
            }
            found
                .iter()
                .map(native_claim_code)
                .collect::<Result<_, _>>()?
        } else {
            script_codes(&mut replies, &batch.claims)?
        };
        Ok((claims, script_codes(&mut replies, &batch.completes)?))
    }

    /// The pipeline of `batch` and how its claims went, loading the scripts first if the
    /// server does not know them (after a restart, or a `SCRIPT FLUSH`).
    async fn run_pipeline(&self, batch: &Batch) -> Result<(u8, Vec<Value>), DedupError> {
        let failed = |e: RedisError| {
            self.forget_connection();
            DedupError(e.to_string())
        };
        let mut conn = self.connection().await?;
        let form = if batch.claims.is_empty() {
            CLAIM_FORM_SCRIPT
        } else {
            self.claim_form(&mut conn).await.map_err(failed)?
        };
        let mut pipe = deadpool_redis::redis::Pipeline::with_capacity(batch.claims.len() + 1);
        if form == CLAIM_FORM_NATIVE {
            for r in &batch.claims {
                pipe.add_command(native_claim(r));
            }
        } else if !batch.claims.is_empty() {
            pipe.add_command(self.scripts.many(Op::Claim, &batch.claims));
        }
        if !batch.completes.is_empty() {
            pipe.add_command(self.scripts.many(Op::Complete, &batch.completes));
        }
        let answer = match pipe.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let loaded = async {
                    self.scripts.claim_many.load_async(&mut conn).await?;
                    self.scripts.complete_many.load_async(&mut conn).await
                };
                match loaded.await {
                    Ok(_) => pipe.query_async(&mut conn).await,
                    Err(e) => Err(e),
                }
            }
            answer => answer,
        };
        answer.map(|replies| (form, replies)).map_err(failed)
    }
}

/// The codes of a batched script's reply, the next of `replies`, one per request (none
/// was sent for no requests).
fn script_codes(
    replies: &mut impl Iterator<Item = Value>,
    requests: &[Request],
) -> Result<Vec<i64>, DedupError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let codes = match replies.next() {
        Some(reply) => {
            Vec::<i64>::from_redis_value(reply).map_err(|e| DedupError(e.to_string()))?
        }
        None => Vec::new(),
    };
    if codes.len() == requests.len() {
        Ok(codes)
    } else {
        Err(DedupError(format!(
            "the batched script answered {} codes for {} keys",
            codes.len(),
            requests.len()
        )))
    }
}

/// A batch call's own deadline. A caller gives up on its answer sooner (its own
/// deadline); this only ends a batch that hangs on a stopped Redis, so the next one can go.
const BATCH_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The most keys in one batch: a long script blocks the Redis server for other clients.
const MAX_BATCH: usize = 128;

/// Batches on the wire at once. While one is out, new requests queue up and form the
/// next: that waiting is what makes batches, with no timer. One at a time makes the
/// fewest round trips (each costs both sides system calls and a wake-up); the claims of
/// a window are sent well before their slots come, so their latency is hidden anyway.
const BATCHES_IN_FLIGHT: usize = 1;

/// One claim or done mark waiting for its batch; the answer goes into `call`.
struct Request {
    call: Arc<StoreCall>,
    op: Op,
    /// The lease (claim) or the TTL (done mark).
    duration: Duration,
}

/// The claims and the done marks of one round trip.
#[derive(Default)]
struct Batch {
    claims: Vec<Request>,
    completes: Vec<Request>,
}

/// Where claims and done marks queue; the task that sends them in batches ends when the
/// store is dropped.
struct Batcher(mpsc::UnboundedSender<Request>);

/// Run `batch` and send each caller its answer.
async fn answer_batch<S: ConnectionSource>(shared: Arc<Shared<S>>, batch: Batch) {
    let answer = shared.run_batch(&batch).await;
    for (op, requests, codes) in [
        (Op::Claim, batch.claims, answer.as_ref().map(|a| &a.0)),
        (Op::Complete, batch.completes, answer.as_ref().map(|a| &a.1)),
    ] {
        match codes {
            Ok(codes) => {
                for (r, code) in requests.into_iter().zip(codes) {
                    r.call.answer(op, Ok(*code));
                }
            }
            Err(e) => {
                for r in requests {
                    r.call.answer(op, Err(e.clone()));
                }
            }
        }
    }
}

impl Batcher {
    fn start<S: ConnectionSource>(
        runtime: &tokio::runtime::Handle,
        shared: Arc<Shared<S>>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        runtime.spawn(async move {
            // The batches on the wire run inside this task (no task spawned per batch).
            let mut on_the_wire = FuturesUnordered::new();
            let mut open = true;
            let mut batch = Vec::with_capacity(MAX_BATCH);
            loop {
                if !open && on_the_wire.is_empty() {
                    return;
                }
                tokio::select! {
                    // Answers first, so a batch's callers hear back before the next goes.
                    biased;
                    Some(()) = on_the_wire.next(), if !on_the_wire.is_empty() => {
                        // The callers just answered run first: a handler that finishes
                        // now sends its done mark, a delivery that arrives its claim,
                        // into the next batch rather than a round trip of its own.
                        tokio::task::yield_now().await;
                    }
                    n = rx.recv_many(&mut batch, MAX_BATCH),
                        if open && on_the_wire.len() < BATCHES_IN_FLIGHT =>
                    {
                        if n == 0 {
                            open = false;
                            continue;
                        }
                        // A caller that gave up (its deadline passed) is not claimed for:
                        // it is already releasing its claim, and a claim written after
                        // that release would hold the message off until its lease ran out.
                        batch.retain(|r: &Request| !r.call.given_up());
                        if batch.is_empty() {
                            continue;
                        }
                        // The receive buffer (room for the largest batch) stays, and is
                        // not allocated again per batch.
                        let mut taken = Batch::default();
                        for r in batch.drain(..) {
                            match r.op {
                                Op::Claim => taken.claims.push(r),
                                Op::Complete => taken.completes.push(r),
                            }
                        }
                        on_the_wire.push(answer_batch(Arc::clone(&shared), taken));
                    }
                }
            }
        });
        Self(tx)
    }

    /// Queue `op` for `call`; `false` if the batcher stopped.
    fn send(&self, call: &Arc<StoreCall>, op: Op, duration: Duration) -> bool {
        let request = Request {
            call: Arc::clone(call),
            op,
            duration,
        };
        self.0.send(request).is_ok()
    }

    /// Queue a request and wait for its batch's answer.
    async fn call(
        &self,
        key: &str,
        token: &str,
        op: Op,
        duration: Duration,
    ) -> Result<i64, DedupError> {
        let call = Arc::new(StoreCall::for_key(key, token));
        if !self.send(&call, op, duration) {
            return Err(DedupError("the dedup batcher stopped".into()));
        }
        // A caller that stops waiting (its deadline passed) is left out of a batch not yet
        // sent.
        let _give_up_when_dropped = GiveUpWhenDropped(&call);
        call.answered().await
    }
}

/// Marks its call given up when dropped (answered or not: once answered, it changes
/// nothing).
struct GiveUpWhenDropped<'a>(&'a StoreCall);

impl Drop for GiveUpWhenDropped<'_> {
    fn drop(&mut self) {
        self.0.give_up();
    }
}

impl<S: ConnectionSource> DedupStore for ScriptStore<S> {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        lease: Duration,
    ) -> DedupFuture<'a, Claim> {
        Box::pin(async move {
            let code = match self.batcher() {
                Some(b) => b.call(key, token, Op::Claim, lease).await?,
                // Boxed, as below: only a cluster takes this path, and inline the script
                // call would size every claim's future.
                None => {
                    Box::pin(
                        self.shared
                            .run(self.shared.scripts.claim(key, token, lease)),
                    )
                    .await?
                }
            };
            Ok(claim_outcome(code))
        })
    }

    fn renew<'a>(&'a self, key: &'a str, token: &'a str, lease: Duration) -> DedupFuture<'a, bool> {
        Box::pin(async move {
            let code: i64 = self
                .shared
                .run(self.shared.scripts.renew(key, token, lease))
                .await?;
            Ok(code == 1)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> DedupFuture<'a, bool> {
        Box::pin(async move {
            let code = match self.batcher() {
                Some(b) => b.call(key, token, Op::Complete, ttl).await?,
                None => {
                    Box::pin(
                        self.shared
                            .run(self.shared.scripts.complete(key, token, ttl)),
                    )
                    .await?
                }
            };
            Ok(code == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a str) -> DedupFuture<'a, bool> {
        Box::pin(async move {
            let code: i64 = self
                .shared
                .run(self.shared.scripts.release(key, token))
                .await?;
            Ok(code == 1)
        })
    }

    fn send(&self, call: &Arc<StoreCall>, op: Op, duration: Duration) -> bool {
        self.batcher()
            .is_some_and(|batcher| batcher.send(call, op, duration))
    }

    /// On a cluster the client sends `PING` to every node: all must answer.
    fn ping(&self) -> DedupFuture<'_, ()> {
        Box::pin(async move {
            let mut conn = self.shared.connection().await?;
            deadpool_redis::redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| {
                    self.shared.forget_connection();
                    DedupError(e.to_string())
                })
        })
    }
}

/// Implement [`DedupStore`] for a newtype over a [`ScriptStore`] by delegation.
macro_rules! delegate_dedup_store {
    ($store:ty) => {
        impl $crate::dedup::DedupStore for $store {
            fn claim<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
                lease: std::time::Duration,
            ) -> $crate::dedup::DedupFuture<'a, $crate::dedup::Claim> {
                self.0.claim(key, token, lease)
            }

            fn renew<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
                lease: std::time::Duration,
            ) -> $crate::dedup::DedupFuture<'a, bool> {
                self.0.renew(key, token, lease)
            }

            fn complete<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
                ttl: std::time::Duration,
            ) -> $crate::dedup::DedupFuture<'a, bool> {
                self.0.complete(key, token, ttl)
            }

            fn release<'a>(
                &'a self,
                key: &'a str,
                token: &'a str,
            ) -> $crate::dedup::DedupFuture<'a, bool> {
                self.0.release(key, token)
            }

            fn ping(&self) -> $crate::dedup::DedupFuture<'_, ()> {
                self.0.ping()
            }

            fn send(
                &self,
                call: &std::sync::Arc<$crate::dedup::StoreCall>,
                op: $crate::dedup::Op,
                duration: std::time::Duration,
            ) -> bool {
                self.0.send(call, op, duration)
            }
        }
    };
}
pub(super) use delegate_dedup_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_with_nx_and_get_is_taken_from_redis_7_on() {
        let info = |version: &str| {
            format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n")
        };
        assert!(takes_set_nx_get(&info("7.0.15")));
        assert!(takes_set_nx_get(&info("7.2.4")));
        assert!(takes_set_nx_get(&info("8.0.0")));
        assert!(!takes_set_nx_get(&info("6.2.14")));
        assert!(!takes_set_nx_get(&info("5.0.7")));
        assert!(!takes_set_nx_get("# Server\r\nredis_mode:standalone\r\n"));
        assert!(!takes_set_nx_get(&info("unknown")));
    }

    #[test]
    fn a_native_claim_answers_as_the_claim_script() {
        assert_eq!(native_claim_code(&Value::Nil).ok(), Some(0));
        assert_eq!(
            native_claim_code(&Value::BulkString(b"done".to_vec())).ok(),
            Some(1)
        );
        assert_eq!(
            native_claim_code(&Value::BulkString(b"4f1c-token".to_vec())).ok(),
            Some(2)
        );
        assert!(native_claim_code(&Value::Int(1)).is_err());
    }
}
