//! The HTML of the run pages, rendered on the server (pure): one function per page, every
//! text from a task or an event escaped, no external assets, readable on a phone. The run
//! page is whole without its small inline script, which only appends live output.

use bytes::Bytes;
use iac_shared::events::{FinishedState, SyncOutcome, Trigger};

use super::runs::{Run, RunOutput, Stored};

/// Escapes text for HTML content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0 auto;max-width:70rem;\
padding:.75rem;color:#1b1f23;background:#fff}h1{font-size:1.3rem;margin:.3rem 0}\
h2{font-size:1.05rem;margin:1.2rem 0 .3rem;word-break:break-all}\
table{border-collapse:collapse;width:100%;font-size:.9rem}\
th,td{text-align:left;padding:.35rem .4rem;border-bottom:1px solid #ddd;vertical-align:top}\
td{word-break:break-word}a{color:#0550ae}\
pre{background:#f6f8fa;border:1px solid #ddd;border-radius:4px;padding:.5rem;\
white-space:pre-wrap;word-break:break-all;font-size:.8rem;max-height:80vh;overflow:auto}\
.ok{color:#116329}.bad{color:#a40e26}.run{color:#9a6700}.muted{color:#57606a}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem .8rem;margin:.5rem 0}\
dt{color:#57606a}dd{margin:0;word-break:break-all}\
.scroll{overflow-x:auto}code{white-space:nowrap}\
@media (max-width:40rem){.wide{display:none}}";

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>",
        escape(title)
    )
}

pub fn trigger_word(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Push => "push",
        Trigger::Sync => "sync",
        Trigger::Deploy => "deploy",
    }
}

/// The outcome of a run in a word, with its CSS class.
pub fn state_word(state: Option<FinishedState>) -> (&'static str, &'static str) {
    match state {
        None => ("running", "run"),
        Some(FinishedState::Success) => ("success", "ok"),
        Some(FinishedState::Failure) => ("failure", "bad"),
        Some(FinishedState::Error) => ("error", "bad"),
    }
}

/// The outcome of a service in words, with its CSS class.
pub fn outcome_word(outcome: Option<SyncOutcome>) -> (&'static str, &'static str) {
    match outcome {
        None => ("running", "run"),
        Some(SyncOutcome::Synced) => ("synced", "ok"),
        Some(SyncOutcome::Failed) => ("failed", "bad"),
        Some(SyncOutcome::TimedOut) => ("timed out", "bad"),
        Some(SyncOutcome::Unknown) => ("unknown service", "bad"),
        Some(SyncOutcome::NotFinished) => ("not finished", "bad"),
        Some(SyncOutcome::Blocked) => ("blocked", "bad"),
    }
}

/// `850 ms`, `12.3 s`, `4 min 05 s`.
pub fn duration(ms: Option<u64>) -> String {
    match ms {
        None => "–".into(),
        Some(ms) if ms < 1_000 => format!("{ms} ms"),
        Some(ms) if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) => format!("{} min {:02} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn short_commit(commit: Option<&str>) -> String {
    commit.map_or_else(|| "–".into(), |c| c.chars().take(10).collect())
}

/// `2026-01-02 10:11:12 UTC` from RFC 3339 (the worker writes UTC).
fn when(timestamp: Option<&str>) -> String {
    timestamp.map_or_else(
        || "–".into(),
        |t| {
            format!(
                "{} UTC",
                t.chars().take(19).collect::<String>().replace('T', " ")
            )
        },
    )
}

/// `/runs`: recent runs, newest first, each linking to its page (`link` gives the path).
pub fn list_page(runs: &[Run], older: Option<u64>, link: impl Fn(&str) -> String) -> String {
    let mut html = head("Runs · iac-runner");
    html.push_str("<h1>Runs</h1>");
    if runs.is_empty() {
        html.push_str("<p class=\"muted\">No runs yet.</p>");
    } else {
        html.push_str(
            "<div class=\"scroll\"><table><thead><tr><th>Started</th><th class=\"wide\">Trigger</th>\
             <th>Commit</th>\
             <th class=\"wide\">Environment</th><th>Services</th><th>Outcome</th>\
             <th class=\"wide\">Duration</th></tr></thead><tbody>",
        );
        for run in runs {
            let (state, class) = state_word(run.state);
            let services = if run.services.is_empty() {
                "<span class=\"muted\">none</span>".to_string()
            } else {
                run.services
                    .iter()
                    .map(|s| {
                        let (word, class) = outcome_word(s.outcome);
                        format!(
                            "{} <span class=\"{class}\">{word}</span>",
                            escape(&s.service)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("<br>")
            };
            html.push_str(&format!(
                "<tr><td><a href=\"{}\">{}</a></td><td class=\"wide\">{}</td><td><code>{}</code></td>\
                 <td class=\"wide\">{}</td><td>{services}</td><td class=\"{class}\">{state}</td>\
                 <td class=\"wide\">{}</td></tr>",
                escape(&link(&run.id)),
                escape(&when(
                    run.started_at.as_deref().or(run.finished_at.as_deref())
                )),
                trigger_word(run.trigger),
                escape(&short_commit(run.commit.as_deref())),
                escape(run.env.as_deref().unwrap_or("–")),
                duration(run.duration_ms),
            ));
        }
        html.push_str("</tbody></table></div>");
    }
    if let Some(before) = older {
        html.push_str(&format!(
            "<p><a href=\"/runs?before={before}\">Older runs →</a></p>"
        ));
    }
    html.push_str("</body></html>");
    html
}

/// A piece of the run page: markup, or a chunk of task output still in JetStream (by stream
/// sequence), so a page of a large run is read and escaped piece by piece as it is sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Html(String),
    Output(u64),
}

/// A chunk of task output, escaped for a `<pre>`.
pub fn escape_output(text: &[u8]) -> Bytes {
    Bytes::from(escape(&String::from_utf8_lossy(text)))
}

/// `/runs/<id>`: the run, each service's outcome, selection reason and output; `live`, the
/// address of the live output while the run goes on.
pub fn run_page(
    run_id: &str,
    run: Option<&Run>,
    output: RunOutput,
    live: Option<&str>,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut html = head(&format!("Run {run_id} · iac-runner"));
    html.push_str(&format!("<h1>Run <code>{}</code></h1>", escape(run_id)));
    let (state, class) = state_word(run.and_then(|r| r.state));
    html.push_str("<dl>");
    let mut fact = |name: &str, value: &str, class: &str| {
        html.push_str(&format!(
            "<dt>{name}</dt><dd class=\"{class}\">{}</dd>",
            escape(value)
        ));
    };
    if let Some(run) = run {
        fact("Trigger", trigger_word(run.trigger), "");
        if let Some(repository) = &run.repository {
            fact("Repository", repository, "");
        }
        fact("Commit", run.commit.as_deref().unwrap_or("–"), "");
        fact("Environment", run.env.as_deref().unwrap_or("–"), "");
        fact("Started", &when(run.started_at.as_deref()), "");
        fact("Duration", &duration(run.duration_ms), "");
    }
    html.push_str(&format!(
        "<dt>Outcome</dt><dd class=\"{class}\" id=\"state\">{state}</dd>"
    ));
    if let Some(error) = run.and_then(|r| r.error.as_deref()) {
        html.push_str(&format!(
            "<dt>Error</dt><dd class=\"bad\">{}</dd>",
            escape(error)
        ));
    }
    html.push_str("</dl>");
    if let Some(live) = live {
        html.push_str(&format!(
            "<p id=\"live\" class=\"run\" data-src=\"{}\">Running: output appears here as it is printed.</p>",
            escape(live)
        ));
    }
    pieces.push(Piece::Html(html));

    let mut sections: Vec<(String, Option<&super::runs::ServiceRun>, u32, Vec<Stored>)> = run
        .map(|r| {
            r.services
                .iter()
                .map(|s| (s.service.clone(), Some(s), 0, Vec::new()))
                .collect()
        })
        .unwrap_or_default();
    for (service, attempt, chunks) in output.services {
        match sections.iter_mut().find(|(s, ..)| *s == service) {
            Some(section) => {
                section.2 = attempt;
                section.3 = chunks;
            }
            None => sections.push((service, None, attempt, chunks)),
        }
    }
    if sections.is_empty() {
        pieces.push(Piece::Html(
            "<p class=\"muted\" id=\"none\">No service output kept for this run.</p>".into(),
        ));
    }
    for (service, summary, attempt, chunks) in sections {
        let (word, class) = outcome_word(summary.and_then(|s| s.outcome));
        let mut section = format!(
            "<section><h2>{}</h2><p><span class=\"{class}\" data-outcome=\"{}\">{word}</span>",
            escape(&service),
            escape(&service)
        );
        if let Some(summary) = summary {
            if let Some(code) = summary.exit_code {
                section.push_str(&format!(" · exit code {code}"));
            }
            if summary.duration_ms.is_some() {
                section.push_str(&format!(" · {}", duration(summary.duration_ms)));
            }
            if let Some(reason) = &summary.reason {
                section.push_str(&format!(
                    "<br><span class=\"muted\">Selected: {}</span>",
                    escape(reason)
                ));
            }
        }
        section.push_str(&format!(
            "</p><pre data-service=\"{}\" data-attempt=\"{attempt}\">",
            escape(&service)
        ));
        pieces.push(Piece::Html(section));
        pieces.extend(chunks.into_iter().map(|c| Piece::Output(c.seq)));
        pieces.push(Piece::Html("</pre></section>".into()));
    }
    let mut tail = String::new();
    if live.is_some() {
        tail.push_str("<script>");
        tail.push_str(LIVE_SCRIPT);
        tail.push_str("</script>");
    }
    tail.push_str("</body></html>");
    pieces.push(Piece::Html(tail));
    pieces
}

/// Appends live output to each service's `<pre>` (server-sent events), and shows the outcomes
/// when the run ends. Only `textContent` is written, so output is never read as markup.
const LIVE_SCRIPT: &str = r#"(function(){
var live=document.getElementById('live');
if(!live||!window.EventSource)return;
function find(attr,service){
  var all=document.querySelectorAll('['+attr+']');
  for(var i=0;i<all.length;i++){if(all[i].getAttribute(attr)===service)return all[i];}
  return null;
}
function pre(service){
  var p=find('data-service',service);
  if(p)return p;
  var none=document.getElementById('none');if(none)none.remove();
  var s=document.createElement('section'),h=document.createElement('h2'),o=document.createElement('p'),b=document.createElement('span');
  h.textContent=service;b.textContent='running';b.className='run';b.setAttribute('data-outcome',service);
  p=document.createElement('pre');p.setAttribute('data-service',service);p.setAttribute('data-attempt','0');
  o.appendChild(b);s.appendChild(h);s.appendChild(o);s.appendChild(p);
  document.body.insertBefore(s,document.querySelector('script'));
  return p;
}
var src=new EventSource(live.getAttribute('data-src'));
src.addEventListener('output',function(e){
  var d=JSON.parse(e.data),p=pre(d.service);
  if(d.attempt>+p.getAttribute('data-attempt')){p.textContent='';p.setAttribute('data-attempt',d.attempt);}
  var end=p.scrollTop+p.clientHeight>=p.scrollHeight-4;
  p.textContent+=d.text;
  if(end)p.scrollTop=p.scrollHeight;
});
src.addEventListener('end',function(e){
  var d=JSON.parse(e.data),st=document.getElementById('state');
  st.textContent=d.state;st.className=d.ok?'ok':'bad';
  d.services.forEach(function(s){var o=find('data-outcome',s.service);if(o){o.textContent=s.outcome;o.className=s.ok?'ok':'bad';}});
  live.textContent='Finished.';live.className='muted';
  src.close();
});
})();"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::runs::ServiceRun;

    fn run() -> Run {
        Run {
            id: "e<1>".into(),
            seq: 7,
            trigger: Trigger::Push,
            repository: Some("acme/infra".into()),
            commit: Some("0123456789abcdef".into()),
            env: Some("production".into()),
            started_at: Some("2026-01-02T10:11:12.123Z".into()),
            finished_at: None,
            services: vec![ServiceRun {
                service: "platform/<x>".into(),
                reason: Some("changed \"platform/x\"".into()),
                outcome: Some(SyncOutcome::Failed),
                exit_code: Some(2),
                duration_ms: Some(61_500),
            }],
            state: Some(FinishedState::Failure),
            error: None,
            duration_ms: Some(62_000),
        }
    }

    /// The page as sent, with chunk 9 holding `OUTPUT`.
    fn render(pieces: Vec<Piece>) -> String {
        pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::Html(html) => html,
                Piece::Output(seq) => {
                    assert_eq!(seq, 9);
                    String::from_utf8(escape_output(OUTPUT).to_vec()).unwrap()
                }
            })
            .collect()
    }

    const OUTPUT: &[u8] = b"<script>alert('x')</script> & done\n";

    #[test]
    fn everything_from_tasks_and_events_is_escaped() {
        let mut output = RunOutput::default();
        output.services.push((
            "platform/<x>".into(),
            1,
            vec![Stored {
                seq: 9,
                len: OUTPUT.len(),
            }],
        ));
        let page = render(run_page("e<1>", Some(&run()), output, None));
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; done"));
        assert!(page.contains("Run <code>e&lt;1&gt;</code>"));
        assert!(page.contains("Selected: changed &quot;platform/x&quot;"));
        assert!(page.contains("exit code 2") && page.contains("1 min 01 s"));
        assert!(!page.contains("<script>"), "no script once the run is over");
        let list = list_page(&[run()], None, |id| format!("/runs/{id}?t=\"x"));
        assert!(
            list.contains("href=\"/runs/e&lt;1&gt;?t=&quot;x\""),
            "{list}"
        );
        assert!(list.contains("platform/&lt;x&gt; <span class=\"bad\">failed</span>"));
    }

    #[test]
    fn a_running_run_carries_the_live_script_and_its_source() {
        let mut running = run();
        running.state = None;
        let page = render(run_page(
            "e1",
            Some(&running),
            RunOutput::default(),
            Some("/runs/e1/live?t=ab&after=0"),
        ));
        assert!(page.contains("data-src=\"/runs/e1/live?t=ab&amp;after=0\""));
        assert!(page.contains("new EventSource"));
        assert!(page.contains("id=\"state\">running<"));
    }

    #[test]
    fn the_list_is_readable_on_a_phone_and_pages_on() {
        let list = list_page(&[run()], Some(7), |id| format!("/runs/{id}"));
        assert!(list.contains("name=\"viewport\""));
        assert!(list.contains("href=\"/runs?before=7\""));
        assert!(list.contains("<code>0123456789</code>"));
        assert!(list.contains("2026-01-02 10:11:12"));
        assert!(
            !list.contains("http://") && !list.contains("https://"),
            "no external assets"
        );
    }
}
