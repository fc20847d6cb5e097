//! The Redis job queue: Redis Streams with a consumer group, shared by any
//! number of host processes.
//!
//! Key layout (`{p}` is `REDIS_KEY_PREFIX`, default `crm`, so deployments can
//! share a Redis):
//! - `{p}:jobs`          stream; each entry is `id=<job id>`; consumer group `workers`
//! - `{p}:job:<job id>`  string: the job as JSON (attempts included); exists
//!   while the job is live (ready, reserved or delayed)
//! - `{p}:done:<job id>` marker (expires after 10 minutes) that the job was
//!   delivered: enqueueing it again adds nothing, but for a forced replay
//! - `{p}:delayed`       sorted set: job id → due time (unix ms) of retries
//! - `{p}:dead`          hash: job id → dead letter as JSON
//! - `{p}:dead:index`    sorted set: job id → time it died (unix ms)
//! - `{p}:order:<key>`   sorted set (all scores 0, so by member): the live job ids
//!   of one deal for one destination; ids start with their receipt's id (UUID
//!   v7), so the first is the earliest accepted
//! - `{p}:parked:<key>`  set: job ids waiting for an earlier job of their deal;
//!   moved back into the stream when a job of the group is acknowledged or
//!   dead-lettered
//! - `{p}:parked:count`  integer: parked jobs in all, for the queue depth
//! - `{p}:paused`        hash: destination → its `Pause` as JSON
//! - `{p}:waiting:<destination>` list: ids of a paused destination's jobs that
//!   came due, oldest first; back into the stream when it is resumed
//! - `{p}:paused:count`  integer: jobs in those lists, for the queue depth
//! - `{p}:ready`         string written by `/ready` (expires after a minute): a
//!   Redis that answers but refuses writes (out of memory, MISCONF, a
//!   read-only replica) is not ready
//!
//! Every multi-key change is one Lua script, so it is atomic; claiming a
//! read entry and settling a job (ack, retry, dead-letter) first check that
//! this consumer still holds its entry. Requests per delivery: the blocking
//! read, one claim (job, attempt count and the order-per-deal check) and a
//! share of one settle request: the settles of concurrent workers go
//! together in one pipelined request, as do the jobs of concurrent webhooks.
//! The claim script derives a deal's keys from the job, so the queue needs
//! one Redis node (not a cluster). A reserved entry stays pending in the
//! group until acknowledged; an entry idle longer than the visibility
//! timeout (its worker died) is taken over with XAUTOCLAIM. Entries a
//! process hands back are marked idle for the whole timeout (HAND_BACK), so
//! the next XAUTOCLAIM anywhere takes them at once, counting the attempt cut
//! off: a process stopping with deliveries cut off at the shutdown timeout
//! does it, and so does a process restarted under the `WORKER_ID` it had
//! when it was killed (the name is leased in `{p}:worker:<id>`, so no two
//! running processes share it). Due retries are moved from `delayed` into
//! the stream by whichever worker looks first.
//!
//! Attempts: the stored job counts the attempts settled so far; the group's
//! delivery count of an entry counts the attempts started on it (Redis
//! raises it before handing the entry out). A reserved job's `attempts` is
//! their sum, so an entry taken over after its worker died carries the
//! attempt that was cut short (also counted in `interrupted`). Blocking
//! reads run on their own connections, whose response timeout covers the
//! longest block; everything else uses a ConnectionManager, which
//! reconnects after an outage.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, Script, ScriptInvocation};

use super::{DeadLetter, Job, JobQueue, Pause, PausedBy, PausedDestination, QueueDepth, QueueError, Reserved};
use crate::batch::Batcher;
use crate::store::now_ms;

const GROUP: &str = "workers";
/// Longest single blocking read; reserve() loops until its own wait is up.
const BLOCK: Duration = Duration::from_millis(200);
/// How often a worker looks for entries abandoned by dead workers.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
/// How often due retries are moved into the stream (by whichever worker
/// looks first): a retry may run this much after its time.
const PROMOTE_EVERY: Duration = Duration::from_millis(100);
/// Retries one promotion request moves; a backlog takes several.
const PROMOTE_BATCH: i64 = 500;
/// How long a delivered job is remembered, so enqueueing it again adds
/// nothing: a duplicate webhook racing the first one's "jobs queued" mark,
/// or the start-up sweep after a crash between the two, would otherwise
/// queue a job already delivered.
const DONE_FOR: Duration = Duration::from_secs(600);
/// Waiting jobs of a resumed destination moved back per request.
const RESUME_PER_REQUEST: u64 = 2_000;
/// Most entries one process can hold: one per worker, with room to spare.
const MAX_HELD: usize = 100_000;
/// A WORKER_ID's lease: a process killed holding it blocks a restart under
/// the same name this long at most; renewed every third of it, so two
/// renewals may fail (each gives up after 2 s) before it lapses.
const LEASE_FOR: Duration = Duration::from_secs(15);

const ENQUEUE: &str = r"
if ARGV[4] == '1' then redis.call('DEL', KEYS[5]) end
if redis.call('EXISTS', KEYS[1], KEYS[5]) > 0 or redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] == '1' then redis.call('ZADD', KEYS[4], 0, ARGV[2]) end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[2])
return 1";

/// Take a read entry in one request: its job with the times the group has
/// handed the entry out and whether it is its destination's probe ({2,
/// job, deliveries, probe}), unless the entry is no longer this consumer's
/// ({3}), its job is gone, finished elsewhere (the entry is dropped: {0}),
/// its destination is paused (the entry goes, no attempt spent, and the
/// job id waits in the destination's list: {4}), or an earlier receipt's
/// job of its deal is live (the entry goes, no attempt spent, and the job
/// id waits in the deal's parked set: {1}). The deal's keys come from the
/// job's `order_key`.
const CLAIM: &str = r"
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #held == 0 or held[1][2] ~= ARGV[3] then return {3} end
local job = false
if ARGV[4] ~= '' then job = redis.call('GET', KEYS[2]) end
if not job then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  return {0}
end
local fields = cjson.decode(job)
local probe = 0
local pause = redis.call('HGET', KEYS[4], fields['destination'])
if pause then
  if cjson.decode(pause)['probe_job'] ~= ARGV[4] then
    redis.call('RPUSH', ARGV[5] .. ':waiting:' .. fields['destination'], ARGV[4])
    redis.call('INCR', KEYS[5])
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
    redis.call('XDEL', KEYS[1], ARGV[2])
    return {4}
  end
  probe = 1
end
local order = fields['order_key']
if type(order) == 'string' and order ~= '' then
  local first = redis.call('ZRANGE', ARGV[5] .. ':order:' .. order, 0, 0)[1]
  if first and string.match(first, '^[^/]*') < string.match(ARGV[4], '^[^/]*') then
    if redis.call('SADD', ARGV[5] .. ':parked:' .. order, ARGV[4]) == 1 then redis.call('INCR', KEYS[3]) end
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
    redis.call('XDEL', KEYS[1], ARGV[2])
    return {1}
  end
end
return {2, job, held[1][4], probe}";

/// Remove up to ARGV[2] dead letters that failed before ARGV[1] (unix ms).
const EXPIRE_DEAD: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return 0 end
redis.call('HDEL', KEYS[1], unpack(ids))
redis.call('ZREM', KEYS[2], unpack(ids))
return #ids";

/// Pause destination ARGV[1] (pause ARGV[2], by ARGV[3]) as
/// `Pause::may_replace` says (0 if not); the breaker replacing its own
/// pause keeps its `since_ms`.
const PAUSE: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
local pause = ARGV[2]
if old and ARGV[3] == 'breaker' then
  local current = cjson.decode(old)
  if current['by'] ~= 'breaker' or type(current['probe_job']) ~= 'string' then return 0 end
  local new = cjson.decode(pause)
  new['since_ms'] = current['since_ms']
  pause = cjson.encode(new)
end
redis.call('HSET', KEYS[1], ARGV[1], pause)
return 1";

/// With ARGV[4] = '1', resume destination ARGV[1] if it is paused (by
/// ARGV[2], or by anyone if empty; {-1, 0} if paused by another); with '0',
/// change no pause, and go on only if it is not paused. Then move up to
/// ARGV[3] of its waiting jobs back into the stream: {1 if this resumed
/// it, how many moved}. A resume cut short leaves the rest waiting in the
/// list of a destination no longer paused: the '0' form moves them too.
const RESUME: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
local resumed = 0
if ARGV[4] == '1' then
  if old and ARGV[2] ~= '' and cjson.decode(old)['by'] ~= ARGV[2] then return {-1, 0} end
  if old then
    redis.call('HDEL', KEYS[1], ARGV[1])
    resumed = 1
  end
elseif old then
  return {0, 0}
end
local ids = redis.call('LPOP', KEYS[2], tonumber(ARGV[3]))
if not ids then return {resumed, 0} end
for _, id in ipairs(ids) do
  redis.call('XADD', KEYS[3], '*', 'id', id)
end
redis.call('DECRBY', KEYS[4], #ids)
return {resumed, #ids}";

/// If the breaker paused destination ARGV[1] and the probe time has come
/// (ARGV[2] is now), let its oldest waiting job through as the probe, the
/// next one due at ARGV[3]: the job id, or false.
const PROBE: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return false end
local pause = cjson.decode(old)
local at = pause['probe_at_ms']
if pause['by'] ~= 'breaker' or (type(at) == 'number' and at > tonumber(ARGV[2])) then return false end
local id = redis.call('LPOP', KEYS[2])
if not id then return false end
redis.call('DECR', KEYS[4])
pause['probe_job'] = id
pause['probe_at_ms'] = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(pause))
redis.call('XADD', KEYS[3], '*', 'id', id)
return id";

/// Suffix of the settling scripts that end a job: it leaves its deal's
/// order, and the jobs parked behind it go back into the stream (each is
/// checked again when read).
const RELEASE: &str = r"
redis.call('ZREM', order, job)
local waiting = redis.call('SMEMBERS', parked)
for _, id in ipairs(waiting) do
  redis.call('XADD', stream, '*', 'id', id)
end
if #waiting > 0 then
  redis.call('DEL', parked)
  redis.call('DECRBY', count, #waiting)
end
return 1";

const PROMOTE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'id', id)
end
return #due";

/// Prefix of the settling scripts (CLAIM makes the same check): act only if
/// this consumer still holds the entry (another worker may have taken it
/// over after the visibility timeout; then that worker settles it).
const OWNED: &str = r"
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #held == 0 or held[1][2] ~= ARGV[3] then return 0 end";

const ACK: &str = r"
local stream, order, parked, count, job = KEYS[1], KEYS[3], KEYS[4], KEYS[5], ARGV[4]
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[6], 1, 'PX', ARGV[5])";

const RETRY: &str = r"
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1";

const DEAD: &str = r"
local stream, order, parked, count, job = KEYS[1], KEYS[5], KEYS[6], KEYS[7], ARGV[5]
redis.call('HSET', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])";

/// Mark this consumer's entries idle for the visibility timeout (ARGV[3]
/// ms), so that XAUTOCLAIM takes them at once; JUSTID leaves their delivery
/// counts as they are.
const HAND_BACK: &str = r"
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
for _, entry in ipairs(held) do
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry[1], 'IDLE', tonumber(ARGV[3]), 'JUSTID')
end
return #held";

/// Take or renew a WORKER_ID's lease for ARGV[2] ms (0: give it up): 1 if
/// this token held it, 2 if nobody did (taken), 0 if another token does.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
if holder then return 1 end
return 2";

/// Remove this consumer from the group if it holds no entry (removing one
/// that does would drop its entries from the pending list).
const FORGET: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])";

const REPLAY: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2])
if ARGV[3] == '1' then redis.call('ZADD', KEYS[5], 0, ARGV[1]) end
redis.call('XADD', KEYS[4], '*', 'id', ARGV[1])
return 1";

/// Jobs in Redis Streams.
pub struct RedisQueue {
    client: redis::Client,
    core: Arc<Core>,
    /// Connections for blocking reads (no response timeout), reused.
    blocking: Mutex<Vec<MultiplexedConnection>>,
    last_reclaim: Mutex<Instant>,
    /// Where the next XAUTOCLAIM starts in the pending list.
    reclaim_from: Mutex<String>,
    last_promote: Mutex<Instant>,
    /// Concurrent webhooks' jobs, enqueued in one request.
    enqueues: Batcher<Vec<(Job, String)>, Result<usize, QueueError>>,
    /// Concurrent workers' acks, retries and dead letters, in one request.
    settles: Batcher<Settlement, Result<(), QueueError>>,
}

/// What every request needs, shared with the batching tasks.
struct Core {
    conn: ConnectionManager,
    prefix: String,
    consumer: String,
    /// With a `WORKER_ID`: this process's token in the name's lease.
    lease: Option<String>,
    /// Another process holds the lease: deliver nothing, not ready.
    lease_lost: AtomicBool,
    /// Given up at shutdown: not to be renewed.
    lease_released: AtomicBool,
    visibility: Duration,
    scripts: Scripts,
    /// Requests sent so far (a pipeline counts once).
    trips: AtomicU64,
}

/// How a reserved job is settled: one script run in a batched request.
enum Settlement {
    Ack { lease: String, job_id: String, order_key: String },
    Retry { lease: String, job_id: String, job: String, due_ms: u64 },
    Dead { lease: String, job_id: String, order_key: String, letter: String, failed_at_ms: u64 },
}

/// The Lua scripts, hashed once (EVALSHA, falling back to EVAL).
struct Scripts {
    enqueue: Script,
    promote: Script,
    claim: Script,
    ack: Script,
    retry: Script,
    dead: Script,
    replay: Script,
    hand_back: Script,
    lease: Script,
    forget: Script,
    pause: Script,
    resume: Script,
    probe: Script,
    expire_dead: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let owned = |body: &str| Script::new(&format!("{OWNED}\n{body}"));
        Scripts {
            enqueue: Script::new(ENQUEUE),
            promote: Script::new(PROMOTE),
            claim: Script::new(CLAIM),
            ack: owned(&format!("{ACK}\n{RELEASE}")),
            retry: owned(RETRY),
            dead: owned(&format!("{DEAD}\n{RELEASE}")),
            replay: Script::new(REPLAY),
            hand_back: Script::new(HAND_BACK),
            lease: Script::new(LEASE),
            forget: Script::new(FORGET),
            pause: Script::new(PAUSE),
            resume: Script::new(RESUME),
            probe: Script::new(PROBE),
            expire_dead: Script::new(EXPIRE_DEAD),
        }
    }
}

fn unavailable(e: redis::RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn batch_failed() -> QueueError {
    QueueError::Unavailable("the Redis request failed unexpectedly".into())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, QueueError> {
    serde_json::to_string(v).map_err(|e| QueueError::Corrupt(e.to_string()))
}

impl Core {
    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// The list of a paused destination's waiting jobs.
    fn waiting_key(&self, destination: &str) -> String {
        format!("{}:waiting:{destination}", self.prefix)
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn done_key(&self, id: &str) -> String {
        format!("{}:done:{id}", self.prefix)
    }

    /// The order and parked keys of a deal (unused names for a job that is
    /// not ordered).
    fn order_keys(&self, order_key: &str) -> (String, String) {
        (format!("{}:order:{order_key}", self.prefix), format!("{}:parked:{order_key}", self.prefix))
    }

    /// One more request to Redis (for the round-trip count).
    fn trip(&self) -> ConnectionManager {
        self.trips.fetch_add(1, Ordering::Relaxed);
        self.conn.clone()
    }

    fn lease_key(&self) -> String {
        format!("{}:worker:{}", self.prefix, self.consumer)
    }

    /// Take this WORKER_ID's lease, waiting out one left by a process that
    /// was killed; refused while another running process renews it.
    async fn take_lease(&self, token: &str) -> Result<(), QueueError> {
        let give_up = Instant::now() + LEASE_FOR + LEASE_FOR / 2;
        loop {
            let mut c = self.trip();
            let ms = LEASE_FOR.as_millis() as u64;
            let taken: i64 = self
                .scripts
                .lease
                .key(self.lease_key())
                .arg(token)
                .arg(ms)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            if taken != 0 {
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err(QueueError::Unavailable(format!(
                    "WORKER_ID {} is in use by another running process; give each process its own",
                    self.consumer
                )));
            }
            tokio::time::sleep(LEASE_FOR / 10).await;
        }
    }

    /// Renew the lease until it is given up or lost. Lost (another
    /// process took the name while this one could not renew): this process
    /// stops delivering and is not ready until restarted.
    async fn keep_lease(core: std::sync::Weak<Core>, token: String) {
        loop {
            tokio::time::sleep(LEASE_FOR / 3).await;
            let Some(core) = core.upgrade() else { return };
            if core.lease_released.load(Ordering::Relaxed) {
                return;
            }
            let mut c = core.trip();
            let ms = LEASE_FOR.as_millis() as u64;
            let renewed: Result<i64, _> =
                core.scripts.lease.key(core.lease_key()).arg(&token).arg(ms).invoke_async(&mut c).await;
            match renewed {
                Ok(1) => {}
                Ok(2) => {
                    tracing::warn!(worker_id = %core.consumer, "the WORKER_ID lease had lapsed (Redis slow or restarted); taken again")
                }
                Ok(_) => {
                    core.lease_lost.store(true, Ordering::Relaxed);
                    tracing::error!(worker_id = %core.consumer, "another running process holds this WORKER_ID: this one stops delivering; restart it with its own");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the WORKER_ID lease"),
            }
        }
    }

    /// Refused once another process holds this WORKER_ID.
    fn check_lease(&self) -> Result<(), QueueError> {
        if self.lease_lost.load(Ordering::Relaxed) {
            return Err(QueueError::Unavailable(format!(
                "another running process holds WORKER_ID {}; this one delivers nothing until restarted with its own",
                self.consumer
            )));
        }
        Ok(())
    }

    /// Make the entries this consumer holds look idle for the whole
    /// visibility timeout (their delivery counts unchanged), in one script:
    /// the next takeover by any process counts the attempt cut off.
    async fn hand_back(&self) -> Result<usize, QueueError> {
        let mut c = self.trip();
        let handed: i64 = self
            .scripts
            .hand_back
            .key(self.key("jobs"))
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.visibility.as_millis() as u64)
            .arg(MAX_HELD)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(handed as usize)
    }

    /// Run script invocations in one pipelined request, each answered on its
    /// own. When Redis has lost the scripts (a restart), they are loaded and
    /// the invocations it refused run once more: a refused script did not run.
    async fn invoke_all(&self, calls: &[ScriptInvocation<'_>]) -> Vec<Result<i64, QueueError>> {
        let mut answers: Vec<Result<i64, QueueError>> =
            calls.iter().map(|_| Err(QueueError::Unavailable("not sent".into()))).collect();
        let mut pending: Vec<usize> = (0..calls.len()).collect();
        for first in [true, false] {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &pending {
                pipe.invoke_script(&calls[i]);
            }
            let mut c = self.trip();
            let replies: Vec<redis::RedisResult<i64>> = match pipe.query_async(&mut c).await {
                Ok(replies) => replies,
                Err(e) => {
                    let e = e.to_string();
                    for &i in &pending {
                        answers[i] = Err(QueueError::Unavailable(e.clone()));
                    }
                    break;
                }
            };
            let mut lost = Vec::new();
            for (&i, reply) in pending.iter().zip(replies) {
                match reply {
                    Err(e) if first && e.code() == Some("NOSCRIPT") => lost.push(i),
                    reply => answers[i] = reply.map_err(unavailable),
                }
            }
            if lost.is_empty() {
                break;
            }
            if let Err(e) = self.load_scripts(&mut c).await {
                for &i in &lost {
                    answers[i] = Err(e.clone());
                }
                break;
            }
            pending = lost;
        }
        answers
    }

    async fn load_scripts(&self, c: &mut ConnectionManager) -> Result<(), QueueError> {
        let s = &self.scripts;
        let mut pipe = redis::pipe();
        for script in
            [&s.enqueue, &s.promote, &s.claim, &s.ack, &s.retry, &s.dead, &s.replay, &s.hand_back, &s.lease, &s.forget]
        {
            pipe.load_script(script).ignore();
        }
        self.trips.fetch_add(1, Ordering::Relaxed);
        pipe.query_async::<()>(c).await.map_err(unavailable)
    }

    /// Every webhook's jobs of a batch (each with its JSON) in one request;
    /// each webhook learns how many of its jobs were new.
    async fn enqueue_batch(&self, batch: Vec<Vec<(Job, String)>>) -> Vec<Result<usize, QueueError>> {
        let (stream, dead) = (self.key("jobs"), self.key("dead"));
        let calls: Vec<ScriptInvocation<'_>> = batch
            .iter()
            .flatten()
            .map(|(job, json)| {
                let mut call = self.scripts.enqueue.key(self.job_key(&job.id));
                call.key(&stream).key(&dead).key(self.order_keys(&job.order_key).0).key(self.done_key(&job.id));
                call.arg(json).arg(&job.id).arg(if job.order_key.is_empty() { "0" } else { "1" });
                // A forced replay of a delivered job (its budget restarts
                // past its earlier attempts) is meant to run again.
                call.arg(if job.budget_start > 0 { "1" } else { "0" });
                call
            })
            .collect();
        let mut replies = self.invoke_all(&calls).await.into_iter();
        batch
            .iter()
            .map(|jobs| {
                // Each webhook's own replies, all of them, before the next's.
                let own: Vec<_> = replies.by_ref().take(jobs.len()).collect();
                own.into_iter().try_fold(0, |added, reply| Ok(added + reply? as usize))
            })
            .collect()
    }

    async fn settle_batch(&self, batch: Vec<Settlement>) -> Vec<Result<(), QueueError>> {
        let (stream, count) = (self.key("jobs"), self.key("parked:count"));
        let calls: Vec<ScriptInvocation<'_>> = batch
            .iter()
            .map(|settle| match settle {
                Settlement::Ack { lease, job_id, order_key } => {
                    let (order, parked) = self.order_keys(order_key);
                    let mut call = self.scripts.ack.key(&stream);
                    call.key(self.job_key(job_id)).key(order).key(parked).key(&count).key(self.done_key(job_id));
                    call.arg(GROUP).arg(lease).arg(&self.consumer).arg(job_id).arg(DONE_FOR.as_millis() as u64);
                    call
                }
                Settlement::Retry { lease, job_id, job, due_ms } => {
                    let mut call = self.scripts.retry.key(&stream);
                    call.key(self.job_key(job_id)).key(self.key("delayed"));
                    call.arg(GROUP).arg(lease).arg(&self.consumer).arg(job).arg(due_ms).arg(job_id);
                    call
                }
                Settlement::Dead { lease, job_id, order_key, letter, failed_at_ms } => {
                    let (order, parked) = self.order_keys(order_key);
                    let mut call = self.scripts.dead.key(&stream);
                    call.key(self.job_key(job_id)).key(self.key("dead")).key(self.key("dead:index"));
                    call.key(order).key(parked).key(&count);
                    call.arg(GROUP).arg(lease).arg(&self.consumer).arg(letter).arg(job_id).arg(failed_at_ms);
                    call
                }
            })
            .collect();
        self.invoke_all(&calls).await.into_iter().map(|reply| reply.map(|_| ())).collect()
    }
}

impl RedisQueue {
    /// Connect, create the consumer group if needed. Fails when Redis cannot
    /// be reached, so a misconfigured REDIS_URI stops start-up.
    /// `worker_id` (`WORKER_ID`) names this process in the consumer group,
    /// the same across restarts: it is leased, so no two running processes
    /// use it, and a process restarted under it hands the entries it held
    /// back at once. Without one, each start gets a fresh name, and the
    /// entries a killed process held wait out the visibility timeout.
    pub async fn connect(
        uri: &str,
        prefix: &str,
        worker_id: Option<&str>,
        visibility: Duration,
    ) -> Result<RedisQueue, QueueError> {
        let fresh = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7());
        let consumer = worker_id.unwrap_or(&fresh);
        let client = redis::Client::open(uri).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config).await.map_err(unavailable)?;
        let core = Arc::new(Core {
            conn,
            prefix: prefix.to_string(),
            consumer: consumer.to_string(),
            lease: worker_id.map(|_| uuid::Uuid::now_v7().to_string()),
            lease_lost: AtomicBool::new(false),
            lease_released: AtomicBool::new(false),
            visibility,
            scripts: Scripts::new(),
            trips: AtomicU64::new(0),
        });
        let (a, b) = (core.clone(), core.clone());
        let queue = RedisQueue {
            client,
            core,
            blocking: Mutex::new(Vec::new()),
            last_reclaim: Mutex::new(Instant::now() - RECLAIM_EVERY),
            reclaim_from: Mutex::new("0-0".into()),
            last_promote: Mutex::new(Instant::now() - PROMOTE_EVERY),
            enqueues: Batcher::spawn(move |batch| {
                let core = a.clone();
                async move { core.enqueue_batch(batch).await }
            }),
            settles: Batcher::spawn(move |batch| {
                let core = b.clone();
                async move { core.settle_batch(batch).await }
            }),
        };
        queue.ensure_group().await?;
        if let Some(token) = &queue.core.lease {
            queue.core.take_lease(token).await?;
            tokio::spawn(Core::keep_lease(Arc::downgrade(&queue.core), token.clone()));
            let held = queue.core.hand_back().await?;
            if held > 0 {
                tracing::warn!(
                    worker_id = consumer,
                    jobs = held,
                    "this WORKER_ID held jobs when it last stopped; they run again at once"
                );
            }
        }
        Ok(queue)
    }

    async fn ensure_group(&self) -> Result<(), QueueError> {
        let mut c = self.core.trip();
        let created: Result<(), redis::RedisError> = c.xgroup_create_mkstream(self.core.key("jobs"), GROUP, "0").await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn blocking_conn(&self) -> Result<MultiplexedConnection, QueueError> {
        if let Some(c) = self.blocking.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            // The longest block, and room for an answer: a Redis that stops
            // answering does not hold a worker (or a shutdown) forever.
            .set_response_timeout(Some(BLOCK + Duration::from_secs(2)));
        self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(unavailable)
    }

    /// Claim a read entry in one request (see CLAIM): its job, with the
    /// attempts started on the entry counted (more than one means earlier
    /// holders stopped mid-attempt), or None.
    async fn claim(&self, entry_id: &str, job_id: Option<String>) -> Result<Option<Reserved>, QueueError> {
        let job_id = job_id.unwrap_or_default();
        let mut c = self.core.trip();
        let reply: Vec<redis::Value> = self
            .core
            .scripts
            .claim
            .key(self.core.key("jobs"))
            .key(self.core.job_key(&job_id))
            .key(self.core.key("parked:count"))
            .key(self.core.key("paused"))
            .key(self.core.key("paused:count"))
            .arg(GROUP)
            .arg(entry_id)
            .arg(&self.core.consumer)
            .arg(&job_id)
            .arg(&self.core.prefix)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        let [code, json, deliveries, probe] = <[redis::Value; 4]>::try_from(reply).unwrap_or_default();
        if redis::from_redis_value::<i64>(code).ok() != Some(2) {
            return Ok(None);
        }
        let json: String = redis::from_redis_value(json).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let deliveries: u32 = redis::from_redis_value(deliveries).unwrap_or(1);
        let mut job: Job = serde_json::from_str(&json).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let deliveries = deliveries.max(1);
        job.attempts += deliveries;
        job.interrupted += deliveries - 1;
        let probe = redis::from_redis_value::<i64>(probe).ok() == Some(1);
        Ok(Some(Reserved { job, lease: entry_id.to_string(), probe }))
    }

    fn entry_job_id(map: &std::collections::HashMap<String, redis::Value>) -> Option<String> {
        map.get("id").and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
    }

    /// Move due retries into the stream, at most every PROMOTE_EVERY.
    async fn promote_due(&self) -> Result<(), QueueError> {
        {
            let mut last = self.last_promote.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < PROMOTE_EVERY {
                return Ok(());
            }
            *last = Instant::now();
        }
        loop {
            let mut c = self.core.trip();
            let moved: i64 = self
                .core
                .scripts
                .promote
                .key(self.core.key("delayed"))
                .key(self.core.key("jobs"))
                .arg(now_ms())
                .arg(PROMOTE_BATCH)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            if moved < PROMOTE_BATCH {
                return Ok(());
            }
        }
    }

    /// One RESUME request: (1 if it resumed the destination, -1 if another
    /// paused it, else 0; jobs moved).
    async fn resume_request(
        &self,
        destination: &str,
        by: Option<PausedBy>,
        resume: bool,
    ) -> Result<(i64, u64), QueueError> {
        let mut c = self.core.trip();
        let (resumed, moved): (i64, u64) = self
            .core
            .scripts
            .resume
            .key(self.core.key("paused"))
            .key(self.core.waiting_key(destination))
            .key(self.core.key("jobs"))
            .key(self.core.key("paused:count"))
            .arg(destination)
            .arg(by.map_or("", PausedBy::as_str))
            .arg(RESUME_PER_REQUEST)
            .arg(if resume { "1" } else { "0" })
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok((resumed, moved))
    }

    /// Take over one entry idle past the visibility timeout, if any: every
    /// RECLAIM_EVERY, and at once again while there are some.
    async fn reclaim(&self) -> Result<Option<Reserved>, QueueError> {
        {
            let mut last = self.last_reclaim.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < RECLAIM_EVERY {
                return Ok(None);
            }
            *last = Instant::now();
        }
        let from = self.reclaim_from.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut c = self.core.trip();
        let reply: StreamAutoClaimReply = c
            .xautoclaim_options(
                self.core.key("jobs"),
                GROUP,
                &self.core.consumer,
                self.core.visibility.as_millis() as u64,
                &from,
                StreamAutoClaimOptions::default().count(1),
            )
            .await
            .map_err(unavailable)?;
        // Redis scans part of the pending list per call: go on from where it
        // stopped, at once while it finds entries (a stopped process's jobs)
        // or has more to scan.
        let more = !reply.claimed.is_empty() || reply.next_stream_id != "0-0";
        *self.reclaim_from.lock().unwrap_or_else(|e| e.into_inner()) = reply.next_stream_id.clone();
        if more {
            *self.last_reclaim.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now() - RECLAIM_EVERY;
        }
        for entry in reply.claimed {
            if let Some(reserved) = self.claim(&entry.id, Self::entry_job_id(&entry.map)).await? {
                let interrupted = reserved.job.interrupted;
                tracing::warn!(job_id = %reserved.job.id, interrupted, "took over a job whose worker stopped answering");
                return Ok(Some(reserved));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl JobQueue for RedisQueue {
    /// With the jobs of concurrent webhooks, in one pipelined request.
    async fn enqueue(&self, jobs: Vec<Job>) -> Result<usize, QueueError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let jobs = jobs.into_iter().map(|job| to_json(&job).map(|json| (job, json))).collect::<Result<_, _>>()?;
        self.enqueues.call(jobs).await.ok_or_else(batch_failed)?
    }

    async fn reserve(&self, wait: Duration) -> Result<Option<Reserved>, QueueError> {
        self.core.check_lease()?;
        let give_up = Instant::now() + wait;
        loop {
            self.promote_due().await?;
            if let Some(job) = self.reclaim().await? {
                return Ok(Some(job));
            }
            let block = BLOCK.min(give_up.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
            let mut conn = self.blocking_conn().await?;
            self.core.trips.fetch_add(1, Ordering::Relaxed);
            let options = StreamReadOptions::default()
                .group(GROUP, &self.core.consumer)
                .count(1)
                .block(block.as_millis() as usize);
            let read: Result<StreamReadReply, redis::RedisError> =
                conn.xread_options(&[self.core.key("jobs")], &[">"], &options).await;
            let reply = match read {
                Ok(r) => {
                    self.blocking.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
                    r
                }
                Err(e) if e.code() == Some("NOGROUP") => {
                    // Redis lost its data (restart without persistence): recreate.
                    self.ensure_group().await?;
                    continue;
                }
                Err(e) => return Err(unavailable(e)),
            };
            for key in reply.keys {
                for entry in key.ids {
                    if let Some(reserved) = self.claim(&entry.id, Self::entry_job_id(&entry.map)).await? {
                        return Ok(Some(reserved));
                    }
                }
            }
            if Instant::now() >= give_up {
                return Ok(None);
            }
        }
    }

    /// Settles go with those of concurrent workers, in one pipelined request.
    async fn ack(&self, reserved: &Reserved) -> Result<(), QueueError> {
        let job = &reserved.job;
        let settle =
            Settlement::Ack { lease: reserved.lease.clone(), job_id: job.id.clone(), order_key: job.order_key.clone() };
        self.settles.call(settle).await.ok_or_else(batch_failed)?
    }

    async fn retry(&self, reserved: Reserved, delay: Duration) -> Result<(), QueueError> {
        let job = to_json(&reserved.job)?;
        let due_ms = now_ms() + delay.as_millis() as u64;
        let settle = Settlement::Retry { lease: reserved.lease, job_id: reserved.job.id, job, due_ms };
        self.settles.call(settle).await.ok_or_else(batch_failed)?
    }

    async fn dead_letter(&self, reserved: Reserved, reason: String) -> Result<(), QueueError> {
        let (job_id, order_key) = (reserved.job.id.clone(), reserved.job.order_key.clone());
        let letter = DeadLetter { job: reserved.job, reason, failed_at_ms: now_ms() };
        let settle = Settlement::Dead {
            lease: reserved.lease,
            job_id,
            order_key,
            letter: to_json(&letter)?,
            failed_at_ms: letter.failed_at_ms,
        };
        self.settles.call(settle).await.ok_or_else(batch_failed)?
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut c = self.core.trip();
        let stop = if limit == usize::MAX { -1 } else { limit as isize - 1 };
        let ids: Vec<String> = c.zrange(self.core.key("dead:index"), 0, stop).await.map_err(unavailable)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.core.trips.fetch_add(1, Ordering::Relaxed);
        let letters: Vec<Option<String>> =
            redis::cmd("HMGET").arg(self.core.key("dead")).arg(&ids).query_async(&mut c).await.map_err(unavailable)?;
        letters
            .into_iter()
            .flatten()
            .map(|json| serde_json::from_str(&json).map_err(|e| QueueError::Corrupt(e.to_string())))
            .collect()
    }

    async fn replay(&self, job_id: &str) -> Result<Option<Job>, QueueError> {
        let mut c = self.core.trip();
        let json: Option<String> = c.hget(self.core.key("dead"), job_id).await.map_err(unavailable)?;
        let Some(json) = json else { return Ok(None) };
        let letter: DeadLetter = serde_json::from_str(&json).map_err(|e| QueueError::Corrupt(e.to_string()))?;
        let mut job = letter.job;
        job.replayed(now_ms());
        let (order, _) = self.core.order_keys(&job.order_key);
        self.core.trips.fetch_add(1, Ordering::Relaxed);
        let moved: i64 = self
            .core
            .scripts
            .replay
            .key(self.core.key("dead"))
            .key(self.core.key("dead:index"))
            .key(self.core.job_key(job_id))
            .key(self.core.key("jobs"))
            .key(order)
            .arg(job_id)
            .arg(to_json(&job)?)
            .arg(if job.order_key.is_empty() { "0" } else { "1" })
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok((moved == 1).then_some(job))
    }

    /// One pipelined request.
    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let mut c = self.core.trip();
        type Reply = (redis::streams::StreamInfoGroupsReply, u64, Option<i64>, u64, Option<i64>);
        let (groups, delayed, parked, dead, paused): Reply = redis::pipe()
            .xinfo_groups(self.core.key("jobs"))
            .zcard(self.core.key("delayed"))
            .get(self.core.key("parked:count"))
            .hlen(self.core.key("dead"))
            .get(self.core.key("paused:count"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let group = groups.groups.into_iter().find(|g| g.name == GROUP);
        Ok(QueueDepth {
            ready: group.as_ref().and_then(|g| g.lag).unwrap_or(0) as u64,
            // Parked jobs wait for an earlier one of their deal: delayed too.
            delayed: delayed + parked.unwrap_or(0).max(0) as u64,
            in_flight: group.map(|g| g.pending).unwrap_or(0) as u64,
            dead,
            paused: paused.unwrap_or(0).max(0) as u64,
        })
    }

    async fn remove_dead_before(&self, before_ms: u64, limit: usize) -> Result<usize, QueueError> {
        let mut c = self.core.trip();
        let removed: i64 = self
            .core
            .scripts
            .expire_dead
            .key(self.core.key("dead"))
            .key(self.core.key("dead:index"))
            .arg(before_ms)
            .arg(limit)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(removed.max(0) as usize)
    }

    async fn pause(&self, destination: &str, pause: Pause) -> Result<bool, QueueError> {
        let by = pause.by.as_str();
        let mut c = self.core.trip();
        let set: i64 = self
            .core
            .scripts
            .pause
            .key(self.core.key("paused"))
            .arg(destination)
            .arg(to_json(&pause)?)
            .arg(by)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(set == 1)
    }

    /// A few thousand waiting jobs per request, so that resuming a long
    /// pause does not stall Redis.
    async fn resume(&self, destination: &str, by: Option<PausedBy>) -> Result<Option<u64>, QueueError> {
        let (resumed, moved) = self.resume_request(destination, by, true).await?;
        if resumed < 0 {
            return Ok(None);
        }
        let mut released = moved;
        if moved == RESUME_PER_REQUEST {
            released += self.drain_unpaused(destination).await?;
        }
        Ok((resumed == 1 || released > 0).then_some(released))
    }

    /// Also moves what a resume cut short left in the destination's list.
    async fn drain_unpaused(&self, destination: &str) -> Result<u64, QueueError> {
        let mut released = 0;
        loop {
            let (_, moved) = self.resume_request(destination, None, false).await?;
            released += moved;
            if moved < RESUME_PER_REQUEST {
                return Ok(released);
            }
        }
    }

    async fn paused(&self) -> Result<Vec<PausedDestination>, QueueError> {
        let mut c = self.core.trip();
        let pauses: std::collections::BTreeMap<String, String> =
            c.hgetall(self.core.key("paused")).await.map_err(unavailable)?;
        if pauses.is_empty() {
            return Ok(Vec::new());
        }
        let mut lengths = redis::pipe();
        for destination in pauses.keys() {
            lengths.llen(self.core.waiting_key(destination));
        }
        self.core.trips.fetch_add(1, Ordering::Relaxed);
        let lengths: Vec<u64> = lengths.query_async(&mut c).await.map_err(unavailable)?;
        Ok(pauses
            .into_iter()
            .zip(lengths)
            .filter_map(|((destination, json), waiting)| match serde_json::from_str(&json) {
                Ok(pause) => Some(PausedDestination { destination, pause, waiting }),
                Err(e) => {
                    tracing::error!(%destination, error = %e, "a stored pause is unreadable; left out");
                    None
                }
            })
            .collect())
    }

    async fn probe(&self, destination: &str, now_ms: u64, next_ms: u64) -> Result<Option<String>, QueueError> {
        let mut c = self.core.trip();
        self.core
            .scripts
            .probe
            .key(self.core.key("paused"))
            .key(self.core.waiting_key(destination))
            .key(self.core.key("jobs"))
            .key(self.core.key("paused:count"))
            .arg(destination)
            .arg(now_ms)
            .arg(next_ms)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)
    }

    fn round_trips(&self) -> u64 {
        self.core.trips.load(Ordering::Relaxed)
    }

    /// The first process to set `{p}:alerted` for the cooldown; if Redis
    /// cannot say, yes: a second e-mail beats a missed alert.
    async fn may_alert(&self, cooldown: Duration) -> bool {
        let mut c = self.core.trip();
        let set: Result<Option<String>, _> = redis::cmd("SET")
            .arg(self.core.key("alerted"))
            .arg(&self.core.consumer)
            .arg("NX")
            .arg("PX")
            .arg(cooldown.as_millis().max(1) as u64)
            .query_async(&mut c)
            .await;
        set.map_or(true, |reply| reply.is_some())
    }

    /// Also gives up the WORKER_ID lease, so a restart need not wait for
    /// it, and removes a fresh name that holds nothing from the group.
    async fn release_held(&self) -> Result<usize, QueueError> {
        // Lost: the entries under this name are the other process's.
        self.core.check_lease()?;
        let held = self.core.hand_back().await?;
        let mut c = self.core.trip();
        let scripts = &self.core.scripts;
        let done = match &self.core.lease {
            None => {
                let mut forget = scripts.forget.key(self.core.key("jobs"));
                forget.arg(GROUP).arg(&self.core.consumer);
                forget
            }
            Some(token) => {
                self.core.lease_released.store(true, Ordering::Relaxed);
                let mut give_up = scripts.lease.key(self.core.lease_key());
                give_up.arg(token).arg(0);
                give_up
            }
        };
        let _: i64 = done.invoke_async(&mut c).await.map_err(unavailable)?;
        Ok(held)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        self.core.check_lease()?;
        let mut c = self.core.trip();
        let _: () = c.set_ex(self.core.key("ready"), now_ms(), 60).await.map_err(unavailable)?;
        Ok(())
    }
}
