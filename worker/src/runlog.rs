//! Run logs: every task's masked output, published to `IAC_RUNLOGS` in chunks for the run
//! pages, without ever slowing or failing a sync.
//!
//! Each task run gets a [`TaskOutput`]: its lines go through a bounded queue to one publishing
//! task, which sends a chunk when it holds [`CHUNK_BYTES`], and at least every [`FLUSH_EVERY`]
//! while the task prints, so a page shows output as it comes. When NATS is slow and the queue
//! is full, lines are dropped and the drop is marked in the log. A run keeps at most
//! `RUN_LOG_MAX_BYTES` over all its services; past that one line marks the cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use iac_shared::names::{ATTEMPT_HEADER, EVENT_ID_HEADER, RUNLOGS_STREAM, SERVICE_HEADER};
use iac_shared::nats::{ProvisionError, StreamSettings, run_log_subject, runlogs_stream_config};
use iac_shared::runtime::retry_until_shutdown;
use iac_shared::shutdown::Shutdown;
use tokio::sync::mpsc;

/// A chunk is sent once it holds this much output.
pub const CHUNK_BYTES: usize = 32 * 1024;
/// Output waits at most this long before it is sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Lines waiting to be published, per task; more are dropped (and the drop marked).
const QUEUE_LINES: usize = 8 * 1024;
/// How long one chunk may wait for JetStream's acknowledgement before it counts as lost.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of a task waits for its last chunks to be stored.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// `RUN_LOG_MAX_BYTES`: the output kept per run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunLogArgs {
    /// Most output kept per run for the run pages, all its services together (`10MiB`,
    /// `512KiB`, or bytes); 0 keeps none.
    #[arg(
        long = "run-log-max-bytes",
        env = "RUN_LOG_MAX_BYTES",
        value_name = "RUN_LOG_MAX_BYTES",
        default_value = "10MiB",
        value_parser = parse_bytes
    )]
    pub max_bytes: u64,
}

/// A size in bytes: a number, optionally followed by `B`, `KiB`, `MiB` or `GiB` (also `K`,
/// `M`, `G`, taken as the binary units).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| "expected a size such as 10MiB, 512KiB or 1048576".to_string())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}: use B, KiB, MiB or GiB")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| "too large".to_string())
}

/// Checks in the background that `IAC_RUNLOGS` is there (creating it where this NATS user may),
/// retrying while JetStream is not ready: the run pages are no reason to hold syncs back.
pub fn ensure_stream(js: &jetstream::Context, settings: &StreamSettings, shutdown: &Shutdown) {
    let (js, config, shutdown) = (
        js.clone(),
        runlogs_stream_config(settings),
        shutdown.clone(),
    );
    tokio::spawn(async move {
        let mut warned = false;
        let ensured = retry_until_shutdown(
            &shutdown,
            Duration::from_millis(200),
            || iac_shared::nats::ensure_stream(&js, config.clone()),
            |e, _| {
                if !warned {
                    tracing::warn!(error = %e, "{RUNLOGS_STREAM} is not ready: task output is not kept for the run pages until it is");
                    warned = true;
                }
                !matches!(e, ProvisionError::Drift { .. })
            },
        )
        .await;
        if ensured.is_ok() && warned {
            tracing::info!("{RUNLOGS_STREAM} is ready: task output is kept for the run pages");
        }
    });
}

/// Where the worker publishes run logs; [`RunLog::default`] publishes nothing.
#[derive(Clone)]
pub struct RunLog {
    js: Option<jetstream::Context>,
    max_bytes: u64,
    shutdown: Shutdown,
}

impl std::fmt::Debug for RunLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunLog")
            .field("enabled", &self.js.is_some())
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Default for RunLog {
    fn default() -> Self {
        RunLog {
            js: None,
            max_bytes: 0,
            shutdown: Shutdown::never(),
        }
    }
}

impl RunLog {
    pub fn new(js: jetstream::Context, max_bytes: u64, shutdown: Shutdown) -> Self {
        RunLog {
            js: (max_bytes > 0).then_some(js),
            max_bytes,
            shutdown,
        }
    }

    /// The log of one delivery of an event; its services share the byte budget.
    pub fn for_run(&self, event_id: &str, attempt: i64) -> RunOutput {
        RunOutput {
            run: self.js.clone().map(|js| {
                Arc::new(Run {
                    js,
                    event_id: event_id.to_string(),
                    subject: run_log_subject(event_id),
                    attempt: attempt.to_string(),
                    max_bytes: self.max_bytes,
                    used: AtomicU64::new(0),
                    cut: AtomicBool::new(false),
                    shutdown: self.shutdown.clone(),
                })
            }),
        }
    }
}

/// One run's log, handed to its tasks (through their `TaskEnv`).
#[derive(Debug, Clone, Default)]
pub struct RunOutput {
    run: Option<Arc<Run>>,
}

struct Run {
    js: jetstream::Context,
    event_id: String,
    subject: String,
    attempt: String,
    max_bytes: u64,
    used: AtomicU64,
    /// Whether the cut has been marked (once per run).
    cut: AtomicBool,
    /// The end of a task stops waiting for its output when the worker shuts down.
    shutdown: Shutdown,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("subject", &self.subject)
            .field("used", &self.used)
            .finish()
    }
}

impl RunOutput {
    /// Starts publishing the output of `service`'s task.
    pub fn task(&self, service: &str) -> TaskOutput {
        let Some(run) = &self.run else {
            return TaskOutput::default();
        };
        let (lines, queue) = mpsc::channel(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let publisher = Publisher {
            run: run.clone(),
            service: service.to_string(),
            dropped: dropped.clone(),
        };
        TaskOutput {
            lines: Some(lines),
            dropped,
            shutdown: Some(run.shutdown.clone()),
            done: Some(Arc::new(tokio::sync::Mutex::new(Some(tokio::spawn(
                publisher.run(queue),
            ))))),
        }
    }
}

type Done = Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>;

/// The output of one task on its way to `IAC_RUNLOGS`. Cheap to clone (stdout and stderr
/// each hold one).
#[derive(Debug, Clone, Default)]
pub struct TaskOutput {
    lines: Option<mpsc::Sender<String>>,
    dropped: Arc<AtomicU64>,
    shutdown: Option<Shutdown>,
    done: Option<Done>,
}

impl TaskOutput {
    /// Queues a line (already masked); never waits: a full queue drops it, and the drop is
    /// marked in the log.
    pub fn line(&self, line: &str) {
        if let Some(lines) = &self.lines
            && lines.try_send(line.to_string()).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes this handle; the last one to finish waits (a bounded time, and not past a
    /// shutdown: output never holds the worker up) until what was queued is stored, so the
    /// output is complete when the result says the task ended.
    pub async fn finish(mut self) {
        self.lines = None;
        let Some(done) = self.done.take() else {
            return;
        };
        let Some(handle) = done.lock().await.take() else {
            return;
        };
        let stored = tokio::time::timeout(FINISH_TIMEOUT, handle);
        let shutdown = self.shutdown.take();
        let shutting_down = async {
            match &shutdown {
                Some(shutdown) => shutdown.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            stored = stored => if stored.is_err() {
                tracing::warn!("the end of the task's output could not be stored in time");
            },
            _ = shutting_down => {
                tracing::info!("shutting down: not waiting for the end of the task's output to be stored");
            }
        }
    }
}

struct Publisher {
    run: Arc<Run>,
    service: String,
    dropped: Arc<AtomicU64>,
}

impl Publisher {
    async fn run(self, mut queue: mpsc::Receiver<String>) {
        let mut chunk = String::new();
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                line = queue.recv() => match line {
                    Some(line) => {
                        self.mark_dropped(&mut chunk);
                        chunk.push_str(&line);
                        chunk.push('\n');
                        if chunk.len() >= CHUNK_BYTES {
                            self.send(&mut chunk).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => if !chunk.is_empty() {
                    self.send(&mut chunk).await;
                }
            }
        }
        self.mark_dropped(&mut chunk);
        self.send(&mut chunk).await;
    }

    fn mark_dropped(&self, chunk: &mut String) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            chunk.push_str(&format!(
                "[{dropped} lines not kept: the run log could not keep up with the task]\n"
            ));
        }
    }

    /// Sends what fits in the run's budget, and the cut marker once when it no longer fits.
    async fn send(&self, chunk: &mut String) {
        if chunk.is_empty() {
            return;
        }
        let text = std::mem::take(chunk);
        let used = self
            .run
            .used
            .fetch_add(text.len() as u64, Ordering::Relaxed);
        let room = self.run.max_bytes.saturating_sub(used);
        let body = match fit(&text, room) {
            Fit::Whole => text,
            fit => {
                let kept = match fit {
                    Fit::Part(kept) => &text[..kept],
                    _ => "",
                };
                if self.run.cut.swap(true, Ordering::Relaxed) {
                    if kept.is_empty() {
                        return;
                    }
                    kept.to_string()
                } else {
                    format!(
                        "{kept}[run log cut: this run printed more than RUN_LOG_MAX_BYTES ({} \
                         bytes); the rest of its output is not kept]\n",
                        self.run.max_bytes
                    )
                }
            }
        };
        self.publish(body).await;
    }

    async fn publish(&self, body: String) {
        let mut headers = HeaderMap::new();
        headers.insert(EVENT_ID_HEADER, self.run.event_id.as_str());
        headers.insert(SERVICE_HEADER, self.service.as_str());
        headers.insert(ATTEMPT_HEADER, self.run.attempt.as_str());
        let sent = async {
            self.run
                .js
                .publish_with_headers(self.run.subject.clone(), headers, body.into())
                .await?
                .await?;
            Ok::<_, async_nats::Error>(())
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(service = %self.service, error = %e, "cannot store task output for the run page")
            }
            Err(_) => tracing::warn!(
                service = %self.service,
                "storing task output for the run page timed out"
            ),
        }
    }
}

/// How much of a chunk fits in what is left of a run's budget.
#[derive(Debug, PartialEq, Eq)]
enum Fit {
    Whole,
    /// The first bytes that fit, ending at a line (or, for one long line, a character).
    Part(usize),
    Nothing,
}

fn fit(text: &str, room: u64) -> Fit {
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if text.len() <= room {
        return Fit::Whole;
    }
    if room == 0 {
        return Fit::Nothing;
    }
    let end = (0..=room)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let head = &text[..end];
    match head.rfind('\n') {
        Some(end) => Fit::Part(end + 1),
        None if head.is_empty() => Fit::Nothing,
        None => Fit::Part(head.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units_or_bytes() {
        assert_eq!(parse_bytes("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_bytes("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(parse_bytes("10MB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn a_chunk_over_the_budget_is_cut_at_a_line() {
        assert_eq!(fit("one\ntwo\n", 100), Fit::Whole);
        assert_eq!(fit("one\ntwo\n", 6), Fit::Part(4));
        assert_eq!(fit("one long line", 4), Fit::Part(4));
        assert_eq!(fit("é", 1), Fit::Nothing);
        assert_eq!(fit("one\n", 0), Fit::Nothing);
    }

    #[test]
    fn without_nats_a_task_output_takes_lines_and_finishes_at_once() {
        let output = RunOutput::default().task("platform/x");
        output.line("nothing happens");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(output.finish());
    }
}
