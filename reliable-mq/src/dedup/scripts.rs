//! The four Lua scripts of the claim protocol, shared by [`super::RedisStore`] and (with
//! the `redis-cluster` feature) `RedisClusterStore`. Each script touches exactly one key
//! (`KEYS[1]`), so it is atomic on one node and routes by that key's slot on a cluster.

use std::time::Duration;

use deadpool_redis::redis::{Script, ScriptInvocation};

use super::{Claim, millis};

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

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The prepared scripts; each method builds the invocation of one operation, which the
/// store runs on its connection (it answers an integer, decoded by the `*_outcome`
/// functions).
pub(super) struct Scripts {
    claim: Script,
    renew: Script,
    complete: Script,
    release: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
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

/// What the claim script's answer means.
pub(super) fn claim_outcome(code: i64) -> Claim {
    match code {
        0 => Claim::Acquired,
        1 => Claim::Done,
        _ => Claim::Held,
    }
}
