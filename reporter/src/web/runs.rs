//! What the run pages show, read from JetStream: the runs, from `IAC_RESULTS` (an index in
//! memory, kept current by an ordered reader), and each run's output, from `IAC_RUNLOGS`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;
use iac_shared::events::{FinishedState, SyncFinished, SyncOutcome, SyncStarted, Trigger};
use iac_shared::names::*;
use iac_shared::nats::run_log_subject;
use iac_shared::shutdown::Shutdown;

/// Runs the index holds; older ones drop out of the list (their links keep working while the
/// results are kept, but show no summary).
pub const MAX_RUNS: usize = 5_000;

/// One service of a run, as the list and the run page show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRun {
    pub service: String,
    /// Why it was selected.
    pub reason: Option<String>,
    /// `None` while it runs.
    pub outcome: Option<SyncOutcome>,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<u64>,
}

/// One run (one event), from its `started` and `finished` results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub id: String,
    /// Where the run sits in the list: the stream sequence of its first result.
    pub seq: u64,
    pub trigger: Trigger,
    pub repository: Option<String>,
    pub commit: Option<String>,
    pub env: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub services: Vec<ServiceRun>,
    /// `None` while it runs.
    pub state: Option<FinishedState>,
    pub error: Option<String>,
    pub duration_ms: Option<u64>,
}

impl Run {
    fn started(seq: u64, started: SyncStarted) -> Self {
        let services = started
            .services
            .iter()
            .map(|service| ServiceRun {
                service: service.clone(),
                reason: started.reasons.get(service).cloned(),
                outcome: None,
                exit_code: None,
                duration_ms: None,
            })
            .collect();
        Run {
            id: started.event_id,
            seq,
            trigger: started.trigger,
            repository: started.repository,
            commit: Some(started.commit),
            env: started.env,
            started_at: Some(started.started_at),
            finished_at: None,
            services,
            state: None,
            error: None,
            duration_ms: None,
        }
    }

    /// Takes in the `finished` result (which comes after `started`, or alone when the sync
    /// could not start).
    fn finish(&mut self, finished: SyncFinished) {
        self.trigger = finished.trigger;
        self.repository = finished.repository.or(self.repository.take());
        self.commit = finished.commit.or(self.commit.take());
        self.env = finished.env.or(self.env.take());
        self.finished_at = Some(finished.finished_at);
        self.state = Some(finished.state);
        self.error = finished.error;
        self.duration_ms = Some(finished.duration_ms);
        let reasons: HashMap<String, Option<String>> = self
            .services
            .drain(..)
            .map(|s| (s.service, s.reason))
            .collect();
        self.services = finished
            .services
            .into_iter()
            .map(|s| ServiceRun {
                reason: s
                    .reason
                    .or_else(|| reasons.get(&s.service).cloned().flatten()),
                service: s.service,
                outcome: Some(s.outcome),
                exit_code: s.exit_code,
                duration_ms: Some(s.duration_ms),
            })
            .collect();
    }
}

/// The runs seen in `IAC_RESULTS`, newest last, at most [`MAX_RUNS`].
#[derive(Debug, Default)]
pub struct Index {
    runs: HashMap<String, Run>,
    order: BTreeMap<u64, String>,
}

impl Index {
    /// Takes in one result message.
    pub fn add(&mut self, seq: u64, subject: &str, payload: &[u8]) {
        match subject {
            STARTED_SUBJECT => {
                let Ok(started) = serde_json::from_slice::<SyncStarted>(payload) else {
                    return;
                };
                match self.runs.get_mut(&started.event_id) {
                    // A redelivered event starts again: the newest attempt counts.
                    Some(run) => {
                        let first = run.seq;
                        *run = Run::started(first, started);
                    }
                    None => self.insert(Run::started(seq, started)),
                }
            }
            FINISHED_SUBJECT => {
                let Ok(finished) = serde_json::from_slice::<SyncFinished>(payload) else {
                    return;
                };
                match self.runs.get_mut(&finished.event_id) {
                    Some(run) => run.finish(finished),
                    None => {
                        let mut run = Run {
                            id: finished.event_id.clone(),
                            seq,
                            trigger: finished.trigger,
                            repository: None,
                            commit: None,
                            env: None,
                            started_at: None,
                            finished_at: None,
                            services: Vec::new(),
                            state: None,
                            error: None,
                            duration_ms: None,
                        };
                        run.finish(finished);
                        self.insert(run);
                    }
                }
            }
            _ => {}
        }
    }

    fn insert(&mut self, run: Run) {
        self.order.insert(run.seq, run.id.clone());
        self.runs.insert(run.id.clone(), run);
        while self.order.len() > MAX_RUNS {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.runs.remove(&oldest);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&Run> {
        self.runs.get(id)
    }

    /// Up to `count` runs older than `before` (all when `None`), newest first, and whether
    /// older ones remain.
    pub fn page(&self, before: Option<u64>, count: usize) -> (Vec<Run>, bool) {
        let upper = before.unwrap_or(u64::MAX);
        let mut older = self.order.range(..upper).rev();
        let runs: Vec<Run> = older
            .by_ref()
            .take(count)
            .filter_map(|(_, id)| self.runs.get(id).cloned())
            .collect();
        (runs, older.next().is_some())
    }
}

pub type SharedIndex = Arc<RwLock<Index>>;

/// Keeps `index` current from `IAC_RESULTS` until shutdown: an ordered reader from the first
/// result kept, started again after the last one seen when it fails.
pub async fn follow_results(js: jetstream::Context, index: SharedIndex, shutdown: Shutdown) {
    let mut next_seq = 1;
    while !shutdown.is_triggered() {
        let read = read_results(&js, &index, &mut next_seq);
        tokio::select! {
            failed = read => {
                tracing::warn!(error = %failed, "cannot read {RESULTS_STREAM} for the run pages; retrying");
            }
            _ = shutdown.wait() => break,
        }
        if shutdown.sleep_or_shutdown(Duration::from_secs(1)).await {
            break;
        }
    }
}

async fn read_results(
    js: &jetstream::Context,
    index: &SharedIndex,
    next_seq: &mut u64,
) -> async_nats::Error {
    let stream = match js.get_stream(RESULTS_STREAM).await {
        Ok(stream) => stream,
        Err(e) => return e.into(),
    };
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: *next_seq,
            },
            ..Default::default()
        })
        .await;
    let mut messages = match reader {
        Ok(reader) => match reader.messages().await {
            Ok(messages) => messages,
            Err(e) => return e.into(),
        },
        Err(e) => return e.into(),
    };
    while let Some(message) = messages.next().await {
        let message = match message {
            Ok(message) => message,
            Err(e) => return e.into(),
        };
        let Ok(info) = message.info() else { continue };
        let seq = info.stream_sequence;
        if let Ok(mut index) = index.write() {
            index.add(seq, message.subject.as_str(), &message.payload);
        }
        *next_seq = seq + 1;
    }
    "the reader of the results ended".into()
}

/// One chunk of a run's output (its text empty when only its headers were read).
#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    pub service: String,
    pub attempt: u32,
    /// The size of the text as stored.
    pub len: usize,
    pub text: Bytes,
}

impl Chunk {
    fn from_message(seq: u64, message: &async_nats::Message) -> Option<Chunk> {
        let headers = message.headers.as_ref()?;
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        Some(Chunk {
            seq,
            service: header(SERVICE_HEADER)?,
            attempt: header(ATTEMPT_HEADER)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
            // Set by JetStream when only the headers are delivered.
            len: header("Nats-Msg-Size")
                .and_then(|n| n.parse().ok())
                .unwrap_or(message.payload.len()),
            text: message.payload.clone(),
        })
    }
}

/// Where a chunk of output is stored, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub len: usize,
}

/// What a run's output is made of, by service, in the order the services first printed; only
/// the newest attempt of each service counts. The text itself stays in JetStream until the
/// page is sent, so a page of a large run is never held in memory whole.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub services: Vec<(String, u32, Vec<Stored>)>,
    /// The stream sequence of the last chunk read (0 for none): live output follows on.
    pub last_seq: u64,
}

impl RunOutput {
    pub fn add(&mut self, chunk: &Chunk) {
        self.last_seq = self.last_seq.max(chunk.seq);
        let stored = Stored {
            seq: chunk.seq,
            len: chunk.len,
        };
        match self
            .services
            .iter_mut()
            .find(|(s, _, _)| *s == chunk.service)
        {
            Some((_, attempt, chunks)) if chunk.attempt > *attempt => {
                *attempt = chunk.attempt;
                *chunks = vec![stored];
            }
            Some((_, attempt, chunks)) if chunk.attempt == *attempt => chunks.push(stored),
            Some(_) => {}
            None => self
                .services
                .push((chunk.service.clone(), chunk.attempt, vec![stored])),
        }
    }

    pub fn bytes(&self) -> usize {
        self.services
            .iter()
            .flat_map(|(_, _, chunks)| chunks)
            .map(|c| c.len)
            .sum()
    }
}

/// What is stored of a run's output so far, read as headers only.
pub async fn read_output(
    js: &jetstream::Context,
    run_id: &str,
) -> Result<RunOutput, async_nats::Error> {
    let subject = run_log_subject(run_id);
    let mut output = RunOutput::default();
    let stream = js.get_stream(RUNLOGS_STREAM).await?;
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(last) => last.sequence,
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(output);
        }
        Err(e) => return Err(e.into()),
    };
    let mut chunks = follow_output(&stream, &subject, 1, true).await?;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        output.add(&chunk);
        if chunk.seq >= last {
            break;
        }
    }
    Ok(output)
}

/// The text of one stored chunk.
pub async fn chunk_text(
    stream: &jetstream::stream::Stream,
    seq: u64,
) -> Result<Bytes, async_nats::Error> {
    Ok(stream.direct_get(seq).await?.payload)
}

/// The chunks of a run's output from stream sequence `from` on, as they are stored (without
/// their text with `headers_only`).
pub async fn follow_output(
    stream: &jetstream::stream::Stream,
    subject: &str,
    from: u64,
    headers_only: bool,
) -> Result<
    impl futures::Stream<Item = Result<Chunk, async_nats::Error>> + Send + Unpin + use<>,
    async_nats::Error,
> {
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            filter_subject: subject.to_string(),
            headers_only,
            ..Default::default()
        })
        .await?;
    let messages = reader.messages().await?;
    Ok(messages.filter_map(|message| {
        std::future::ready(match message {
            Ok(message) => message
                .info()
                .ok()
                .and_then(|info| Chunk::from_message(info.stream_sequence, &message).map(Ok)),
            Err(e) => Some(Err(e.into())),
        })
    }))
}

/// The stream sequence of the last chunk of a run's output stored (0 for none).
pub async fn last_output_seq(
    stream: &jetstream::stream::Stream,
    run_id: &str,
) -> Result<u64, async_nats::Error> {
    match stream
        .get_last_raw_message_by_subject(&run_log_subject(run_id))
        .await
    {
        Ok(last) => Ok(last.sequence),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn started(id: &str, services: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&SyncStarted {
            event_id: id.into(),
            event_seq: 1,
            trigger: Trigger::Push,
            repository: Some("acme/infra".into()),
            commit: "abc".into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            reasons: BTreeMap::from([("a/x".to_string(), "changed a/x/main.py".to_string())]),
            replay_of: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            env: Some("production".into()),
            deployment_id: None,
        })
        .unwrap()
    }

    fn finished(id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "event_id": id, "event_seq": 1, "trigger": "push", "commit": "abc",
            "state": "failure", "duration_ms": 1500, "finished_at": "2026-01-01T00:00:02Z",
            "totals": {"total": 1, "synced": 0, "failed": 1, "timed_out": 0, "unknown": 0},
            "services": [{"service": "a/x", "outcome": "failed", "exit_code": 2,
                          "output_tail": [], "duration_ms": 1400}]
        }))
        .unwrap()
    }

    #[test]
    fn a_run_keeps_its_selection_reason_and_takes_its_outcome_when_it_finishes() {
        let mut index = Index::default();
        index.add(1, STARTED_SUBJECT, &started("e1", &["a/x"]));
        let running = index.get("e1").unwrap();
        assert_eq!(running.state, None);
        assert_eq!(running.services[0].outcome, None);
        index.add(2, FINISHED_SUBJECT, &finished("e1"));
        let run = index.get("e1").unwrap();
        assert_eq!(run.state, Some(FinishedState::Failure));
        assert_eq!(run.services[0].outcome, Some(SyncOutcome::Failed));
        assert_eq!(
            run.services[0].reason.as_deref(),
            Some("changed a/x/main.py")
        );
        assert_eq!(run.env.as_deref(), Some("production"));
        assert_eq!(run.seq, 1);
    }

    #[test]
    fn pages_go_from_the_newest_run_to_older_ones() {
        let mut index = Index::default();
        for i in 1..=5u64 {
            index.add(i * 10, STARTED_SUBJECT, &started(&format!("e{i}"), &[]));
        }
        index.add(99, FINISHED_SUBJECT, &finished("e2"));
        let (first, more) = index.page(None, 2);
        let ids: Vec<&str> = first.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["e5", "e4"]);
        assert!(more);
        let (last, more) = index.page(Some(first[1].seq), 10);
        let ids: Vec<&str> = last.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["e3", "e2", "e1"]);
        assert!(!more);
        assert_eq!(last[1].state, Some(FinishedState::Failure));
    }

    #[test]
    fn the_index_forgets_the_oldest_runs_past_its_limit() {
        let mut index = Index::default();
        for i in 0..(MAX_RUNS as u64 + 3) {
            index.add(i + 1, STARTED_SUBJECT, &started(&format!("e{i}"), &[]));
        }
        assert!(index.get("e0").is_none() && index.get("e2").is_none());
        assert!(index.get("e3").is_some());
        assert_eq!(index.runs.len(), MAX_RUNS);
    }

    #[test]
    fn a_newer_attempt_replaces_the_output_of_an_older_one() {
        let chunk = |seq, service: &str, attempt, len| Chunk {
            seq,
            service: service.into(),
            attempt,
            len,
            text: Bytes::new(),
        };
        let mut output = RunOutput::default();
        output.add(&chunk(1, "a/x", 1, 10));
        output.add(&chunk(2, "b/y", 1, 6));
        output.add(&chunk(3, "a/x", 2, 11));
        output.add(&chunk(4, "a/x", 1, 20));
        assert_eq!(output.services[0].2, [Stored { seq: 3, len: 11 }]);
        assert_eq!(output.services[1].0, "b/y");
        assert_eq!(output.last_seq, 4);
        assert_eq!(output.bytes(), 17);
    }
}
