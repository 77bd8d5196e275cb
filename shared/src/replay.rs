//! Replaying a stream: selected messages are published again onto their own subject, so they
//! go through the normal path once more (`iac-worker replay` for events, `iac-reporter replay`
//! for results). Each copy carries `Iac-Replay-Of: <original sequence>` and a fresh
//! `Nats-Msg-Id`, so de-duplication does not swallow it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use clap::Args;
use futures::StreamExt;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::names::{FORCE_HEADER, MSG_ID_HEADER, REPLAY_OF_HEADER};

/// `replay`: which messages to publish again (NATS is reached through the global NATS flags).
#[derive(Debug, Clone, Args)]
pub struct ReplayCommand {
    #[command(flatten)]
    pub select: ReplayArgs,
}

impl ReplayCommand {
    /// Connects, replays, and prints one line per message to stdout (what would be replayed,
    /// on a dry run).
    pub async fn run(
        &self,
        nats: &crate::nats::NatsArgs,
        client_name: &str,
        stream: &str,
        subjects: &[&str],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let client = crate::nats::connect_once(nats, client_name).await?;
        let js = jetstream::new(client);
        let replayed = replay(&js, stream, subjects, &self.select).await?;
        println!("SEQ\tTIME\tSUBJECT\tCOMMIT\tSERVICES");
        for line in &replayed {
            println!("{line}");
        }
        let verb = if self.select.dry_run {
            "would replay"
        } else {
            "replayed"
        };
        eprintln!("{verb} {} message(s) of {stream}", replayed.len());
        Ok(())
    }
}

/// Which messages to replay.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Replay messages stored at or after this time: RFC 3339 (2026-11-25T10:00:00Z), or a
    /// duration ago (2h, 30m, 1d).
    #[arg(long, value_parser = parse_time, required_unless_present = "from_seq", conflicts_with = "from_seq")]
    pub since: Option<OffsetDateTime>,
    /// Replay from this stream sequence on.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Replay up to and including this stream sequence.
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Replay only this subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// Run the tasks even where they would otherwise skip (events only).
    #[arg(long)]
    pub force: bool,
    /// List what would be replayed, one line each, and publish nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `--since`: an RFC 3339 time, or a duration ago (`2h`).
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    parse_time_at(s, OffsetDateTime::now_utc())
}

/// `s` as an RFC 3339 time, or as a duration before `now`.
fn parse_time_at(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    if let Ok(time) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(time);
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        "not an RFC 3339 time nor a duration ago; examples: 2026-11-25T10:00:00Z, 2h".to_string()
    })?;
    time::Duration::try_from(ago)
        .ok()
        .and_then(|ago| now.checked_sub(ago))
        .ok_or_else(|| format!("{s} ago is before any time that can be stored"))
}

/// One message selected for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub original_seq: u64,
    pub time: OffsetDateTime,
    pub subject: String,
    /// Commit the message is about (`after`, `commit` or `ref`), if it names one.
    pub commit: Option<String>,
    /// Services it names (`services`, or `all`).
    pub services: Vec<String>,
    /// Sequence of the copy (absent on a dry run).
    pub new_seq: Option<u64>,
}

impl std::fmt::Display for Replayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}",
            self.original_seq,
            self.time.format(&Rfc3339).unwrap_or_default(),
            self.subject,
            self.commit.as_deref().unwrap_or("-"),
            if self.services.is_empty() {
                "-".to_string()
            } else {
                self.services.join(",")
            }
        )?;
        if let Some(seq) = self.new_seq {
            write!(f, "\t-> {seq}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("--subject {0:?} is not one of {1}")]
    BadSubject(String, String),
    #[error("--to-seq {to} is before the first selected sequence {from}")]
    BadRange { from: u64, to: u64 },
    #[error("reading {stream}: {reason}")]
    Read { stream: String, reason: String },
    #[error("publishing the copy of sequence {seq}: {reason}")]
    Publish { seq: u64, reason: String },
}

/// Whether `subject` is `pattern`, or one subject of a pattern ending in `.*` (one more token,
/// as in NATS: `iac.events.deploy.*` takes `iac.events.deploy.staging`).
fn subject_matches(pattern: &str, subject: &str) -> bool {
    match pattern.strip_suffix(".*") {
        Some(prefix) => subject
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|token| !token.is_empty() && !token.contains(['.', '*', '>', ' '])),
        None => pattern == subject,
    }
}

/// Replays the messages of `stream` selected by `args`; `subjects` are the subjects a replay
/// may name (a pattern ending in `.*` for one more token). Messages stored after the replay began (its own copies among them) are never
/// selected, so a replay always ends.
pub async fn replay(
    js: &jetstream::Context,
    stream_name: &str,
    subjects: &[&str],
    args: &ReplayArgs,
) -> Result<Vec<Replayed>, ReplayError> {
    if let Some(subject) = &args.subject
        && !subjects
            .iter()
            .any(|allowed| subject_matches(allowed, subject))
    {
        return Err(ReplayError::BadSubject(
            subject.clone(),
            subjects.join(", "),
        ));
    }
    if let (Some(from), Some(to)) = (args.from_seq, args.to_seq)
        && to < from
    {
        return Err(ReplayError::BadRange { from, to });
    }
    let read_err = |e: &dyn std::fmt::Display| ReplayError::Read {
        stream: stream_name.to_string(),
        reason: e.to_string(),
    };
    let mut stream = js.get_stream(stream_name).await.map_err(|e| read_err(&e))?;
    let last_seq = stream
        .info()
        .await
        .map_err(|e| read_err(&e))?
        .state
        .last_sequence;
    let upper = args.to_seq.unwrap_or(last_seq).min(last_seq);
    let mut reader = RangeReader::open(
        &stream,
        args.from_seq,
        args.since,
        args.subject.clone(),
        upper,
    )
    .await
    .map_err(|e| read_err(&e))?;

    let mut replayed = Vec::new();
    while let Some(RangeMessage { message, seq, time }) =
        reader.next().await.map_err(|e| read_err(&e))?
    {
        let mut selected = describe(seq, time, &message.subject, &message.payload);
        if !args.dry_run {
            let headers = replay_headers(message.headers.as_ref(), seq, args.force);
            let ack = js
                .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
                .await
                .map_err(|e| ReplayError::Publish {
                    seq,
                    reason: e.to_string(),
                })?
                .await
                .map_err(|e| ReplayError::Publish {
                    seq,
                    reason: e.to_string(),
                })?;
            selected.new_seq = Some(ack.sequence);
            tracing::info!(original_seq = seq, new_seq = ack.sequence, subject = %message.subject, "replayed");
        }
        replayed.push(selected);
    }
    Ok(replayed)
}

/// One message of a [`RangeReader`], with its stream sequence and the time it was stored.
pub struct RangeMessage {
    pub message: jetstream::Message,
    pub seq: u64,
    pub time: OffsetDateTime,
}

/// Reads a stream in order through an unnamed ordered reader (no durable consumer is made or
/// changed): from a sequence, else from a time, else from the first message, and never past
/// `upper`, the last sequence when the read began, so copies published while reading are not
/// read back and a read always ends.
pub struct RangeReader {
    messages: consumer::pull::Ordered,
    upper: u64,
    done: bool,
}

impl RangeReader {
    /// Starts reading `stream` (only `filter`'s subject when given).
    pub async fn open(
        stream: &jetstream::stream::Stream,
        from_seq: Option<u64>,
        since: Option<OffsetDateTime>,
        filter: Option<String>,
        upper: u64,
    ) -> Result<Self, async_nats::Error> {
        let deliver_policy = match (from_seq, since) {
            (Some(start_sequence), _) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            (None, Some(start_time)) => consumer::DeliverPolicy::ByStartTime { start_time },
            (None, None) => consumer::DeliverPolicy::All,
        };
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy,
                filter_subject: filter.unwrap_or_default(),
                ..Default::default()
            })
            .await?;
        Ok(RangeReader {
            messages: reader.messages().await?,
            upper,
            done: false,
        })
    }

    /// The next message, or `None` at `upper`, after the last message stored, or when none
    /// comes for 2 seconds.
    pub async fn next(&mut self) -> Result<Option<RangeMessage>, async_nats::Error> {
        if self.done {
            return Ok(None);
        }
        let message = match tokio::time::timeout(Duration::from_secs(2), self.messages.next()).await
        {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => return Ok(None),
        };
        let info = message.info()?;
        let (seq, time, pending) = (info.stream_sequence, info.published, info.pending);
        if seq > self.upper {
            self.done = true;
            return Ok(None);
        }
        self.done = pending == 0 || seq >= self.upper;
        Ok(Some(RangeMessage { message, seq, time }))
    }
}

/// The original headers, with a fresh message id and the replay markers.
pub fn replay_headers(original: Option<&HeaderMap>, seq: u64, force: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(original) = original {
        for (name, values) in original.iter() {
            let name: &str = name.as_ref();
            if [MSG_ID_HEADER, REPLAY_OF_HEADER, FORCE_HEADER].contains(&name) {
                continue;
            }
            for value in values {
                headers.append(name, value.as_str());
            }
        }
    }
    headers.insert(MSG_ID_HEADER, uuid_like(seq).as_str());
    headers.insert(REPLAY_OF_HEADER, seq.to_string().as_str());
    if force {
        headers.insert(FORCE_HEADER, "true");
    }
    headers
}

/// A message id unique to this replay of this sequence.
fn uuid_like(seq: u64) -> String {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("replay-{seq}-{nanos:x}-{:x}", std::process::id())
}

fn describe(seq: u64, time: OffsetDateTime, subject: &str, payload: &[u8]) -> Replayed {
    let json: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let commit = ["after", "commit", "ref"]
        .iter()
        .find_map(|k| json.get(*k).and_then(Value::as_str))
        .map(str::to_string);
    let mut services: Vec<String> = json
        .get("services")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if json.get("all").and_then(Value::as_bool) == Some(true) {
        services.push(crate::rules::ALL_SERVICES.to_string());
    }
    Replayed {
        original_seq: seq,
        time,
        subject: subject.to_string(),
        commit,
        services,
        new_seq: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_may_name_one_environments_deployments() {
        let deploys = "iac.events.deploy.*";
        assert!(subject_matches(deploys, "iac.events.deploy.staging"));
        assert!(subject_matches("iac.events.push", "iac.events.push"));
        for not_one in [
            "iac.events.deploy",
            "iac.events.deploy.",
            "iac.events.deploy.a.b",
            "iac.events.deploy.>",
            "iac.events.deploy.*",
            "iac.events.deployx",
        ] {
            assert!(!subject_matches(deploys, not_one), "{not_one}");
        }
    }

    #[test]
    fn replayed_copies_get_a_fresh_message_id_and_the_original_sequence() {
        let mut original = HeaderMap::new();
        original.insert(MSG_ID_HEADER, "delivery-1");
        original.insert(crate::names::EVENT_ID_HEADER, "delivery-1");
        let headers = replay_headers(Some(&original), 42, true);
        assert_ne!(headers.get(MSG_ID_HEADER).unwrap().as_str(), "delivery-1");
        assert_eq!(headers.get(REPLAY_OF_HEADER).unwrap().as_str(), "42");
        assert_eq!(headers.get(FORCE_HEADER).unwrap().as_str(), "true");
        assert_eq!(
            headers.get(crate::names::EVENT_ID_HEADER).unwrap().as_str(),
            "delivery-1"
        );
        let again = replay_headers(Some(&original), 42, false);
        assert!(again.get(FORCE_HEADER).is_none());
    }

    #[test]
    fn a_replayed_message_is_described_by_commit_and_services() {
        let time = OffsetDateTime::UNIX_EPOCH;
        let push = describe(
            3,
            time,
            "iac.events.push",
            br#"{"after": "abc", "paths": []}"#,
        );
        assert_eq!(push.commit.as_deref(), Some("abc"));
        let sync = describe(4, time, "iac.events.sync", br#"{"all": true}"#);
        assert_eq!(sync.services, ["__all__"]);
        assert_eq!(
            sync.to_string(),
            "4\t1970-01-01T00:00:00Z\tiac.events.sync\t-\t__all__"
        );
    }

    #[test]
    fn times_must_be_rfc3339() {
        assert!(parse_time("2026-11-25T10:00:00Z").is_ok());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn since_also_takes_a_duration_ago() {
        let now = OffsetDateTime::parse("2026-11-25T10:00:00Z", &Rfc3339).unwrap();
        let at = |s| parse_time_at(s, now).map(|t| t.format(&Rfc3339).unwrap());
        assert_eq!(at("2h").unwrap(), "2026-11-25T08:00:00Z");
        assert_eq!(at("30m").unwrap(), "2026-11-25T09:30:00Z");
        assert_eq!(at("1d").unwrap(), "2026-11-24T10:00:00Z");
        assert_eq!(at("2026-11-20T00:00:00Z").unwrap(), "2026-11-20T00:00:00Z");
        assert!(at("in two hours").unwrap_err().contains("2h"));
        assert!(at("100000000000y").is_err());
    }
}
