//! Group commit on SQLite. SQLite has one writer, and with `synchronous = FULL` every commit
//! waits for the disk: one transaction per hold kept the writer busy ~0.6 ms, so holds
//! topped out near 1,650/s however many clients asked (BENCHMARKS.md). Here one task owns the
//! writer connection and runs the writes that queued meanwhile one after another inside one
//! transaction, each in its own savepoint, and commits once for all of them:
//!
//! - a write's result is handed back only after the commit that made it durable;
//! - a write that fails is rolled back to its savepoint alone; the others still commit;
//! - if the transaction around them fails (its commit included), every write of the batch
//!   fails with it and none took effect, as if each had had its own failed transaction.
//!
//! Writes run in queue order and see the earlier ones of their batch, exactly as if each had
//! committed alone in that order, so the conditional moves that make changes exactly-once
//! decide as before. A write whose caller went away still runs: it is all or nothing either
//! way. PostgreSQL does not come here: its writers work concurrently, each in its own
//! transaction.

use std::panic::AssertUnwindSafe;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use sqlx::{Acquire, AnyConnection, AnyPool};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// A write: statements on the connection it is given, inside the batch's transaction.
pub type Job<T> =
    Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<T, StoreError>> + Send>;

/// At most this many writes share one commit, so one batch cannot keep the next waiting long.
const MAX_BATCH: usize = 64;

/// A queued write with its result type erased. Given a connection it runs; given the error
/// that stopped its batch first, it reports that error without running.
type Queued = Box<
    dyn for<'c> FnOnce(Result<&'c mut AnyConnection, StoreError>) -> BoxFuture<'c, Settle> + Send,
>;

/// A write that ran: whether it failed on its own, and how to answer its caller once the
/// batch's commit has succeeded (`None`) or failed.
struct Settle {
    failed: bool,
    answer: Box<dyn FnOnce(Option<StoreError>) + Send>,
}

/// The queue to the task that owns the writer connection.
#[derive(Clone, Debug)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Batcher {
    /// Starts the writing task on the current runtime; it ends when every `Batcher` clone
    /// (every clone of the store) is gone.
    pub fn start(writer: AnyPool) -> Batcher {
        let (queue, queued) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(writer, queued));
        Batcher { queue }
    }

    /// Runs `job` in the next batch and returns its result once that batch is committed.
    pub async fn write<T: Send + 'static>(&self, job: Job<T>) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let queued: Queued = Box::new(move |connection| {
            Box::pin(async move {
                let result = match connection {
                    // A panicking write fails alone, like any failing write: unwinding through
                    // here would end the task every SQLite write depends on.
                    Ok(connection) => AssertUnwindSafe(job(connection))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| Err(panicked())),
                    Err(error) => Err(error),
                };
                Settle {
                    failed: result.is_err(),
                    answer: Box::new(move |batch_failed| {
                        let result = match (result, batch_failed) {
                            (Ok(_), Some(error)) => Err(error),
                            (result, _) => result,
                        };
                        let _ = reply.send(result);
                    }),
                }
            })
        });
        self.queue.send(queued).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A write's failure when its own code panicked: our fault, a 500.
fn panicked() -> StoreError {
    StoreError::Other(std::sync::Arc::new(sqlx::Error::Protocol(
        "a database write panicked".into(),
    )))
}

/// What callers get when the writing task is gone (its runtime shut down).
fn stopped() -> StoreError {
    StoreError::from(sqlx::Error::WorkerCrashed)
}

async fn write_batches(writer: AnyPool, mut queued: mpsc::UnboundedReceiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queued.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write_batch(&writer, &mut batch).await;
    }
}

/// Runs and commits one batch, then answers every write in it.
async fn write_batch(writer: &AnyPool, batch: &mut Vec<Queued>) {
    let mut connection = match writer.acquire().await {
        Ok(connection) => connection,
        Err(error) => return refuse_all(batch, StoreError::from(error)).await,
    };
    // sqlx's transaction: dropped without commit (a failure below), it rolls back.
    let mut transaction = match connection.begin().await {
        Ok(transaction) => transaction,
        Err(error) => return refuse_all(batch, StoreError::from(error)).await,
    };
    // One write alone needs no savepoint: its failure rolls back the transaction.
    let alone = batch.len() == 1;
    let mut settled = Vec::with_capacity(batch.len());
    let mut broken: Option<StoreError> = None;
    for queued in batch.drain(..) {
        if let Some(error) = &broken {
            settled.push(queued(Err(error.clone())).await);
            continue;
        }
        if !alone {
            if let Err(error) = execute(&mut transaction, "SAVEPOINT stepgate_write").await {
                broken = Some(error.clone());
                settled.push(queued(Err(error)).await);
                continue;
            }
        }
        let ran = queued(Ok(&mut *transaction)).await;
        if !alone {
            let undo = if ran.failed {
                execute(&mut transaction, "ROLLBACK TO stepgate_write").await
            } else {
                Ok(())
            };
            let released = match undo {
                Ok(()) => execute(&mut transaction, "RELEASE stepgate_write").await,
                Err(error) => Err(error),
            };
            if let Err(error) = released {
                broken = Some(error);
            }
        }
        settled.push(ran);
    }
    let failed = match broken {
        Some(error) => Some(error),
        None if alone && settled.iter().any(|ran| ran.failed) => {
            // Its own error is the answer; nothing of it may be committed.
            let _ = transaction.rollback().await;
            None
        }
        None => transaction.commit().await.err().map(StoreError::from),
    };
    for ran in settled {
        (ran.answer)(failed.clone());
    }
}

async fn execute(connection: &mut AnyConnection, statement: &str) -> Result<(), StoreError> {
    sqlx::query(statement).execute(connection).await?;
    Ok(())
}

/// Answers every queued write with `error` without running any.
async fn refuse_all(batch: &mut Vec<Queued>, error: StoreError) {
    for queued in batch.drain(..) {
        let ran = queued(Err(error.clone())).await;
        (ran.answer)(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    /// A batcher on a fresh SQLite file, with the gate's connection settings.
    async fn batcher() -> (Batcher, AnyPool, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}/batch.db?mode=rwc", dir.path().display());
        sqlx::any::install_default_drivers();
        let pool = super::super::sqlite_options(sqlx::any::AnyPoolOptions::new())
            .connect(&url)
            .await
            .expect("open the database");
        for statement in [
            "CREATE TABLE rows (n INTEGER PRIMARY KEY)",
            "CREATE TABLE parents (id INTEGER PRIMARY KEY)",
            // Checked at COMMIT only: the way to make a batch's commit fail.
            "CREATE TABLE children (parent INTEGER REFERENCES parents (id) \
             DEFERRABLE INITIALLY DEFERRED)",
        ] {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .expect("create a table");
        }
        (Batcher::start(pool.clone()), pool, dir)
    }

    fn insert(n: i64) -> Job<()> {
        Box::new(move |conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO rows (n) VALUES ($1)")
                    .bind(n)
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
    }

    /// Inserts `n`, then fails: only a rollback can take the row away again.
    fn insert_then_fail(n: i64) -> Job<()> {
        Box::new(move |conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO rows (n) VALUES ($1)")
                    .bind(n)
                    .execute(conn)
                    .await?;
                Err(StoreError::Corrupt("this write fails after writing".into()))
            })
        })
    }

    fn orphan_child() -> Job<()> {
        Box::new(|conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO children (parent) VALUES (42)")
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
    }

    async fn rows(pool: &AnyPool) -> Vec<i64> {
        sqlx::query("SELECT n FROM rows ORDER BY n")
            .fetch_all(pool)
            .await
            .expect("read the rows")
            .iter()
            .map(|row| row.try_get::<i64, _>("n").expect("an integer"))
            .collect()
    }

    // On the test's single thread, writes started together are all queued before the
    // batching task runs, so they share one batch.

    #[tokio::test]
    async fn a_failing_write_is_undone_alone_and_the_rest_of_its_batch_commits() {
        let (batcher, pool, _dir) = batcher().await;
        let (first, failing, last) = tokio::join!(
            batcher.write(insert(1)),
            batcher.write(insert_then_fail(2)),
            batcher.write(insert(3)),
        );
        assert!(first.is_ok() && last.is_ok(), "{first:?} {last:?}");
        assert!(
            matches!(failing, Err(StoreError::Corrupt(_))),
            "{failing:?}"
        );
        assert_eq!(rows(&pool).await, vec![1, 3]);
    }

    #[tokio::test]
    async fn a_write_that_panics_fails_alone_and_writing_goes_on() {
        let (batcher, pool, _dir) = batcher().await;
        let panicking: Job<()> = Box::new(|conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO rows (n) VALUES (2)")
                    .execute(&mut *conn)
                    .await?;
                panic!("a bug in a write");
            })
        });
        let (first, panicked, last) = tokio::join!(
            batcher.write(insert(1)),
            batcher.write(panicking),
            batcher.write(insert(3)),
        );
        assert!(first.is_ok() && last.is_ok(), "{first:?} {last:?}");
        assert!(
            matches!(panicked, Err(StoreError::Other(_))),
            "{panicked:?}"
        );
        assert_eq!(rows(&pool).await, vec![1, 3]);
        batcher
            .write(insert(4))
            .await
            .expect("later writes still run");
        assert_eq!(rows(&pool).await, vec![1, 3, 4]);
    }

    #[tokio::test]
    async fn a_write_alone_that_fails_leaves_nothing() {
        let (batcher, pool, _dir) = batcher().await;
        let failing = batcher.write(insert_then_fail(7)).await;
        assert!(
            matches!(failing, Err(StoreError::Corrupt(_))),
            "{failing:?}"
        );
        assert_eq!(rows(&pool).await, Vec::<i64>::new());
        batcher
            .write(insert(8))
            .await
            .expect("the next write works");
        assert_eq!(rows(&pool).await, vec![8]);
    }

    #[tokio::test]
    async fn when_the_commit_fails_every_write_of_the_batch_fails_and_none_took_effect() {
        let (batcher, pool, _dir) = batcher().await;
        let (first, orphan, last) = tokio::join!(
            batcher.write(insert(1)),
            batcher.write(orphan_child()),
            batcher.write(insert(3)),
        );
        for result in [&first, &orphan, &last] {
            assert!(
                result.is_err(),
                "a write of a batch whose commit failed: {result:?}"
            );
        }
        assert_eq!(rows(&pool).await, Vec::<i64>::new());
        // The connection is usable again afterwards.
        batcher
            .write(insert(4))
            .await
            .expect("the next batch commits");
        assert_eq!(rows(&pool).await, vec![4]);
    }

    #[tokio::test]
    async fn writes_answer_only_once_committed_and_visible_to_other_connections() {
        let (batcher, pool, _dir) = batcher().await;
        let writes: Vec<_> = (1..=100).map(|n| batcher.write(insert(n))).collect();
        for result in futures_util::future::join_all(writes).await {
            result.expect("each write commits");
        }
        // Read on the pool's other connections: only committed rows are visible there.
        assert_eq!(rows(&pool).await, (1..=100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn later_writes_of_a_batch_see_the_earlier_ones() {
        let (batcher, _pool, _dir) = batcher().await;
        let count_then_insert: Job<i64> = Box::new(|conn| {
            Box::pin(async move {
                let row = sqlx::query("SELECT COUNT(*) AS n FROM rows")
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(row.try_get::<i64, _>("n")?)
            })
        });
        let (first, second, seen) = tokio::join!(
            batcher.write(insert(1)),
            batcher.write(insert(2)),
            batcher.write(count_then_insert),
        );
        first.expect("first write");
        second.expect("second write");
        assert_eq!(seen.expect("the count"), 2);
    }
}
