//! The embedded default store: one SQLite file (`<data-dir>/cattery.db`) in WAL mode, driven
//! through `rusqlite` alone (migrations included). One file per aggregate implements its trait.
//!
//! Connections, not pools, each driven on the thread that needs it:
//! - **Point reads** (a key, a session, an agent by name: a few µs) run on the calling task's
//!   thread, on an idle read connection.
//! - **Scans** (lists, counts, log searches: up to milliseconds on large tables) run on a
//!   blocking thread (`spawn_blocking`), at most [`SCANS`] at a time, so they never hold an
//!   async worker.
//! - **Writes**: one connection (WAL allows one writer; a second would collide on SQLite's
//!   write lock, whose busy handler sleeps 1, 2, 5, 10 ms... between retries). The session
//!   and instance writes of the start/stop path and the log inserts are *group-committed*:
//!   they queue to one task that runs everything queued meanwhile in one transaction
//!   (`BEGIN IMMEDIATE`, each write in its savepoint, `COMMIT`) and answers each caller once
//!   the `COMMIT` returned, so a write is committed before its caller hears `Ok`, and eight
//!   concurrent starts cost one commit instead of eight. Other writes (agents, keys, secrets,
//!   orgs, pruning) take the same connection between groups, on a blocking thread, each in
//!   its own transaction.
//!
//! Durability: a write that has answered `Ok` survives a crash of the server. Past a machine
//! crash or a power loss, the management writes (agents, deployments, keys, orgs, secret
//! sets, webhook endpoints: [`SqliteStore::write_tx`]) survive too, since their commit waits
//! for the WAL's fsync, and so does every commit made before one of them. The group commits
//! (sessions, instances, logs, deliveries) do not wait for it (`synchronous = NORMAL`: an fsync
//! per commit doubled a warm start's latency on a loaded machine): the WAL is synced by each
//! checkpoint pass, every [`CHECKPOINT_EVERY`], so a power loss can take back the session
//! writes of the last fraction of a second (docs/operations.md, "Durability").
//!
//! Faults: after any failed write the connection is rolled back to no transaction
//! ([`conn::Conn::ensure_clean`]), so a full disk, a read-only remount or an I/O error fails
//! the writes made meanwhile (with [`StoreError::Full`] or [`StoreError::Unavailable`]) and
//! the store works again once the fault is gone. Reads go on through the fault.

mod agents;
pub mod backup;
mod builds;
mod cluster;
mod conn;
mod instances;
mod keys;
mod logs;
pub mod migrate;
mod nodes;
mod secrets;
mod sessions;
mod webhooks;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex, Semaphore};

use self::conn::{Conn, Mode};
use super::{StoreError, StoreResult};

/// SQLite-backed [`super::Store`]. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    /// The write connection, between group commits.
    writer: Arc<AsyncMutex<Conn>>,
    /// Group-committed writes, to [`group_writer`].
    jobs: mpsc::UnboundedSender<Job>,
}

struct Inner {
    path: PathBuf,
    /// Idle read connections for point reads.
    readers: parking_lot::Mutex<Vec<Conn>>,
    /// Idle read connections for scans (a larger page cache).
    scanners: parking_lot::Mutex<Vec<Conn>>,
    /// Scans running at once.
    scans: Semaphore,
}

/// Scans run at once on blocking threads.
const SCANS: usize = 4;
/// Most writes committed in one group transaction.
const MAX_GROUP: usize = 64;
/// Page cache of the write connection (negative: KiB), 16 MiB.
const WRITER_CACHE_SIZE: &str = "-16384";
/// Page cache of each point-read connection, 2 MiB: they read through the memory map and
/// look up single rows; with 16 MiB each, the extra connections held tens of MiB of the
/// control plane's RSS once the log table had grown.
const READER_CACHE_SIZE: &str = "-2048";
/// Page cache of each scan connection (at most [`SCANS`]), 16 MiB: counts and pages over
/// large tables (100,000 sessions) read whole indexes.
const SCANNER_CACHE_SIZE: &str = "-16384";
/// How often the WAL is checkpointed into the database file (a pass with nothing to copy
/// costs nothing: no fsync).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Called once the group transaction of a write ended, with the group's error if it failed
/// as a whole (its `COMMIT`, or a fault that rolled the transaction back).
type Done = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A group-committed write: runs its statements on the write connection (inside the group's
/// transaction, or alone) and returns how to answer its caller, with its own error if it
/// failed. It must leave nothing behind when it fails: one statement, or several in
/// [`Conn::atomic`].
/// Called with `None` when the group failed before its turn: then it only makes its answer.
type Job = Box<dyn FnOnce(Option<&mut Conn>) -> (Done, Option<StoreError>) + Send>;

/// The group-commit task: takes every queued write, runs them in one transaction on the
/// write connection, commits, answers. A write that fails does not affect the others of its
/// group, unless its failure rolled the transaction back (a full disk, an I/O error): then
/// every write of the group fails. Ends when the store is dropped.
async fn group_writer(writer: Arc<AsyncMutex<Conn>>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut jobs: Vec<Job> = Vec::new();
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        // One more turn of the scheduler before the group closes: the tasks already woken
        // (the other starts and stops of a burst) queue their writes into this group instead
        // of the next, so a burst costs fewer commits (each commit writes and checksums
        // every page it dirtied into the WAL).
        tokio::task::yield_now().await;
        let mut w = writer.lock().await;
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let done = run_group(&mut w, &mut jobs);
        drop(w);
        for (d, err) in done {
            d(err.as_ref());
        }
    }
}

/// Runs `jobs` as one transaction (or one by one when alone, or when the transaction cannot
/// start); returns each one's answer with the group's error, if any. Leaves the connection
/// outside any transaction.
fn run_group(db: &mut Conn, jobs: &mut Vec<Job>) -> Vec<(Done, Option<StoreError>)> {
    if jobs.len() == 1 || db.exec("BEGIN IMMEDIATE", &[]).is_err() {
        // Alone: its own statements commit it.
        db.ensure_clean();
        let out = jobs
            .drain(..)
            .map(|job| {
                let (d, _) = job(Some(db));
                db.ensure_clean();
                (d, None)
            })
            .collect();
        return out;
    }
    let mut done: Vec<Done> = Vec::with_capacity(jobs.len());
    let mut lost: Option<StoreError> = None;
    for job in jobs.drain(..) {
        if lost.is_some() {
            // The transaction is gone: do not run the rest in autocommit mode.
            done.push(job(None).0);
            continue;
        }
        let (d, err) = job(Some(db));
        done.push(d);
        if db.autocommit() {
            // SQLite rolled the whole transaction back (a full disk, an I/O error).
            lost = Some(err.unwrap_or_else(|| {
                StoreError::Unavailable("the group's transaction was rolled back".into())
            }));
        }
    }
    let failed = match lost {
        Some(e) => Some(e),
        None => db.exec("COMMIT", &[]).err(),
    };
    db.ensure_clean();
    done.into_iter().map(|d| (d, failed.clone())).collect()
}

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] on a connection of its own, on a blocking
/// thread, and has the writer start the WAL again from the top once it grew past
/// [`RESTART_FRAMES`]. Runs until the store is dropped.
///
/// - **The copy:** a `PASSIVE` checkpoint never waits for the writer or readers, and the writer
///   never waits for it, so the copying and its fsyncs stay off the write path.
/// - **The restart:** the writer writes from the top of the WAL again (instead of appending)
///   only when its transaction begins while the WAL is wholly copied. Under a steady stream of
///   commits that never happens by itself: every checkpoint ends with frames committed while it
///   ran. The WAL then grew by every page the writer dirtied for as long as the writes went on
///   (1 GB in 15 s of churn), each frame a page the kernel had to allocate anew. So when the
///   WAL is past [`RESTART_FRAMES`], a second pass runs while it holds the write connection:
///   no commit can run meanwhile, the pass copies only what the first one left (a few
///   milliseconds' worth) and catches up, and the next group commit restarts the WAL.
///
/// A checkpoint on one connection concurrent with a commit on another that restarts the WAL
/// is the pattern of SQLite's "WAL-reset bug" (<https://sqlite.org/wal.html#walresetbug>:
/// frames recorded as copied into the database file that were not, so a corrupt file), fixed
/// in SQLite 3.51.3; the bundled SQLite is 3.51.3 (a unit test keeps it so). The second pass
/// never races a commit. Running every checkpoint on the write connection instead would
/// avoid the pattern with any SQLite, but the copy and its fsyncs then stall every write
/// queued behind it: warm start p99 at concurrency 8 went from 3-4 ms to 15-18 ms
/// (docs/performance.md).
async fn checkpoints(inner: Weak<Inner>, writer: Weak<AsyncMutex<Conn>>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<Conn> = None;
    loop {
        tick.tick().await;
        let Some(path) = inner.upgrade().map(|i| i.path.clone()) else {
            return;
        };
        let res = checkpoint_pass(conn.take(), path.clone(), None).await;
        let frames = match res {
            Ok((c, frames)) => {
                conn = Some(c);
                frames
            }
            Err(e) => {
                tracing::debug!(error = %e, "WAL checkpoint failed; retrying later");
                continue;
            }
        };
        if frames < RESTART_FRAMES {
            continue;
        }
        let Some(writer) = writer.upgrade() else {
            return;
        };
        match checkpoint_pass(conn.take(), path, Some(writer)).await {
            Ok((c, _)) => conn = Some(c),
            Err(e) => tracing::debug!(error = %e, "WAL checkpoint failed; retrying later"),
        }
    }
}

/// The WAL's size, in frames, past which the checkpoint task has the writer start it again
/// from the top: 4,096 frames of 4 KiB pages, 16 MiB.
const RESTART_FRAMES: i64 = 4096;

/// One `PASSIVE` checkpoint on the checkpointing connection (opened when `conn` is `None`),
/// on a blocking thread; returns the connection and the frames the WAL held. With `hold`, the
/// pass holds the write connection while it runs (no commit meanwhile: it catches up). The
/// lock is taken on the blocking thread, so a wait for a free blocking thread never holds up
/// the writes.
async fn checkpoint_pass(
    conn: Option<Conn>,
    path: PathBuf,
    hold: Option<Arc<AsyncMutex<Conn>>>,
) -> StoreResult<(Conn, i64)> {
    tokio::task::spawn_blocking(move || {
        let _held = hold.as_ref().map(|w| w.blocking_lock());
        let mut c = match conn {
            Some(c) => c,
            None => Conn::open(&path, Mode::Checkpoint, READER_CACHE_SIZE)?,
        };
        let r = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", &[], |r| {
            r.int(1).unwrap_or(0)
        });
        c.ensure_clean();
        r.map(|frames| (c, frames.unwrap_or(0)))
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("WAL checkpoint task: {e}")))?
}

/// The database file's name in the data directory.
pub const DB_FILE: &str = "cattery.db";

impl SqliteStore {
    /// Opens (creating if needed) `<dir>/cattery.db` and applies migrations.
    ///
    /// Errors: the file cannot be opened or a migration fails.
    pub async fn open(dir: &Path) -> StoreResult<Self> {
        conn::install_error_log();
        let path = dir.join(DB_FILE);
        let p = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut w = Conn::open(&p, Mode::Write, WRITER_CACHE_SIZE)?;
            migrate::run(&mut w)?;
            Ok::<_, StoreError>(w)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("opening the store: {e}")))??;
        let inner = Arc::new(Inner {
            path,
            readers: parking_lot::Mutex::new(Vec::new()),
            scanners: parking_lot::Mutex::new(Vec::new()),
            scans: Semaphore::new(SCANS),
        });
        let writer = Arc::new(AsyncMutex::new(writer));
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(group_writer(writer.clone(), rx));
        tokio::spawn(checkpoints(Arc::downgrade(&inner), Arc::downgrade(&writer)));
        Ok(SqliteStore {
            inner,
            writer,
            jobs,
        })
    }

    /// Runs `f` on an idle read connection (opened when none is idle), on this thread: for
    /// point lookups only.
    fn read_now<T>(&self, f: impl FnOnce(&mut Conn) -> StoreResult<T>) -> StoreResult<T> {
        let inner = &self.inner;
        let begun = std::time::Instant::now();
        let r = read_on(&inner.path, &inner.readers, READER_CACHE_SIZE, f);
        crate::telemetry::store_op("read", begun.elapsed());
        r
    }

    /// Runs `f` on a read connection on a blocking thread: for scans.
    async fn scan<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> StoreResult<T> + Send + 'static,
    {
        let begun = std::time::Instant::now();
        let _permit = self
            .inner
            .scans
            .acquire()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let inner = self.inner.clone();
        let r = tokio::task::spawn_blocking(move || {
            read_on(&inner.path, &inner.scanners, SCANNER_CACHE_SIZE, f)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?;
        crate::telemetry::store_op("scan", begun.elapsed());
        r
    }

    /// Runs `f` on the write connection as part of the next group commit (see the module
    /// docs) and returns its result once committed. `f` must leave nothing behind when it
    /// fails: one statement, or several in [`Conn::atomic`].
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> StoreResult<T> + Send + 'static,
    {
        let begun = std::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |db| {
            let r = match db {
                Some(db) => f(db),
                None => Err(StoreError::Unavailable("not run".into())),
            };
            let err = r.as_ref().err().cloned();
            let done: Done = Box::new(move |group: Option<&StoreError>| {
                let _ = tx.send(match group {
                    Some(e) => Err(e.clone()),
                    None => r,
                });
            });
            (done, err)
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable("the store's writer has stopped".into()))?;
        let r = rx
            .await
            .map_err(|_| StoreError::Unavailable("the store's writer has stopped".into()))?;
        crate::telemetry::store_op("write", begun.elapsed());
        r
    }

    /// Runs `f` in a transaction of its own on the write connection (between group commits),
    /// on a blocking thread; rolled back if it fails. Durable when it returns `Ok`, past a
    /// machine crash or a power loss too: its `COMMIT` waits for the WAL's fsync
    /// (`synchronous = FULL`), which makes every commit before it durable as well. The
    /// management writes (agents, deployments, keys, orgs, secret sets, webhook endpoints)
    /// take this path; see the module docs for the group commits' window.
    async fn write_tx<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> StoreResult<T> + Send + 'static,
    {
        let begun = std::time::Instant::now();
        let mut w = self.writer.clone().lock_owned().await;
        let r = tokio::task::spawn_blocking(move || {
            w.ensure_clean();
            let r = w
                .exec("PRAGMA synchronous = FULL", &[])
                .and_then(|_| w.exec("BEGIN IMMEDIATE", &[]))
                .and_then(|_| {
                    let v = f(&mut w)?;
                    w.exec("COMMIT", &[])?;
                    Ok(v)
                });
            w.ensure_clean();
            // Back to the group commits' level (at worst they stay as durable as this one).
            let _ = w.exec("PRAGMA synchronous = NORMAL", &[]);
            r
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("write task failed: {e}")))?;
        crate::telemetry::store_op("write_tx", begun.elapsed());
        r
    }
}

/// A limited create's check, inside its write transaction (the one writer serializes it with
/// every other create): `count_sql` counts `org`'s records of the kind (its one parameter is
/// the org). Errors: `LimitReached` when there are `limit` or more.
fn within_limit(db: &mut Conn, count_sql: &str, org: &str, limit: u32) -> StoreResult<()> {
    if db.query_int(count_sql, &[conn::Val::Text(org)])? >= i64::from(limit) {
        return Err(StoreError::LimitReached);
    }
    Ok(())
}

/// Runs `f` on an idle read connection of `pool` (opened when none is idle).
fn read_on<T>(
    path: &Path,
    pool: &parking_lot::Mutex<Vec<Conn>>,
    cache_size: &str,
    f: impl FnOnce(&mut Conn) -> StoreResult<T>,
) -> StoreResult<T> {
    let idle = pool.lock().pop();
    let mut c = match idle {
        Some(c) => c,
        None => Conn::open(path, Mode::Read, cache_size)?,
    };
    let r = f(&mut c);
    c.ensure_clean();
    pool.lock().push(c);
    r
}

#[cfg(test)]
mod tests;
