//! The run pages against the real binaries, NATS, git and `invoke`: every status links to its
//! run page, which keeps the task's whole output (masked, cut with a mark past
//! `RUN_LOG_MAX_BYTES`) behind a token an altered link does not have; the list of runs is
//! behind basic auth, and off without it; and in headless Chromium the pages read as expected
//! and a running task's output appears without a reload.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use iac_tests::fake_github::{FakeGithub, StatusRequest};
use iac_tests::free_port;
use iac_tests::pipeline::{Pipeline, Running};
use iac_tests::wait_for;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const POSTGRES: &str = "platform/01.postgres";
const CONTEXT: &str = "IaC Runner / Sync";
const VAULT_TOKEN: &str = "s.vault-token-run-pages-7c1d";
const WEB_USER: &str = "ops";
const WEB_PASSWORD: &str = "list-password-5e9a";
const LINK_SECRET: &str = "run-link-secret-31f0";

/// A pipeline whose reporter serves the run pages on a port of its own, linked from
/// `PUBLIC_URL`, and whose worker holds a secret its tasks print.
struct Pages {
    pipeline: Pipeline,
    base: String,
    _running: Running,
}

async fn start(github: &FakeGithub, configure: impl FnOnce(&mut Pipeline)) -> Pages {
    let mut pipeline = Pipeline::new(&github.url());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let env_file = pipeline.fixture.scratch("secrets").join("task.env");
    std::fs::write(&env_file, format!("VAULT_TOKEN={VAULT_TOKEN}\n")).unwrap();
    pipeline.set_env("worker", "TASK_ENV_FILE", env_file.to_str().unwrap());
    for (key, value) in [
        ("WEB_PORT", port.to_string()),
        ("PUBLIC_URL", format!("{base}/")),
        ("WEB_USER", WEB_USER.to_string()),
        ("WEB_PASSWORD", WEB_PASSWORD.to_string()),
    ] {
        pipeline.set_env("reporter", key, &value);
    }
    configure(&mut pipeline);
    let running = pipeline.start_all().await;
    let client = iac_tests::http();
    wait_for("the run pages to listen", WAIT, || {
        let url = format!("{base}/runs");
        let client = client.clone();
        async move { client.get(url).send().await.ok().map(drop) }
    })
    .await;
    Pages {
        pipeline,
        base,
        _running: running,
    }
}

async fn get(url: &str) -> (u16, String) {
    try_get(url)
        .await
        .unwrap_or_else(|| panic!("no answer from {url}"))
}

async fn try_get(url: &str) -> Option<(u16, String)> {
    let answer = iac_tests::http().get(url).send().await.ok()?;
    let status = answer.status().as_u16();
    Some((status, answer.text().await.ok()?))
}

/// The link of the status GitHub shows for the whole sync.
fn link_of(status: &StatusRequest) -> String {
    status.body["target_url"]
        .as_str()
        .unwrap_or_else(|| panic!("a status without a target_url: {}", status.body))
        .to_string()
}

/// `url` with the last hex digit of its token changed.
fn altered(url: &str) -> String {
    let mut url = url.to_string();
    let last = url.pop().unwrap();
    url.push(if last == '0' { '1' } else { '0' });
    url
}

#[tokio::test]
async fn a_status_links_to_a_run_page_with_the_whole_masked_output_and_an_altered_link_gets_404() {
    let github = FakeGithub::start().await;
    let pages = start(&github, |_| {}).await;
    pages.pipeline.fixture.set_behaviour_json(
        POSTGRES,
        json!({"exit": 3, "output_lines": 200, "line_bytes": 10, "echo_env": ["VAULT_TOKEN"]}),
    );
    let (commit, status, _) = pages
        .pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    assert_eq!(status, 200);
    let finished = pages.pipeline.finished_at(&commit).await;
    let failure = github
        .wait_for_shown(&commit, CONTEXT, "failure", WAIT)
        .await;

    let link = link_of(&failure);
    let run_path = format!("/runs/{}", finished.event_id);
    assert!(
        link.starts_with(&format!("{}{run_path}?t=", pages.base)),
        "{link}"
    );
    let (code, page) = get(&link).await;
    assert_eq!(code, 200, "{page}");
    // The result keeps a tail of 20 lines; the page keeps them all.
    let tail = finished.services[0].output_tail.join("\n");
    assert!(!tail.contains("000000xxxxxxxxxx"), "{tail}");
    for line in [
        "syncing 01.postgres",
        "000000xxxxxxxxxx",
        "000199xxxxxxxxxx",
    ] {
        assert!(page.contains(line), "{line} missing from the run page");
    }
    assert!(page.contains("deploy of 01.postgres failed: boom"));
    assert!(page.contains("VAULT_TOKEN=***"));
    assert!(!page.contains(VAULT_TOKEN), "the run page shows a secret");
    assert!(page.contains("failed") && page.contains("exit code 3"));
    assert!(
        page.contains("Selected: changed platform/01.postgres/"),
        "the selection reason is missing"
    );
    assert!(page.contains(&commit));

    // Every status of the run links to the same page.
    let links: Vec<String> = github
        .accepted()
        .iter()
        .filter(|r| r.commit == commit && r.body.get("target_url").is_some())
        .map(link_of)
        .collect();
    assert!(links.len() >= 2, "{links:?}");
    assert!(links.iter().all(|l| *l == link), "{links:?}");

    for wrong in [
        altered(&link),
        format!("{}{run_path}", pages.base),
        format!("{}{run_path}?t=", pages.base),
        format!(
            "{}/runs/another-run?{}",
            pages.base,
            link.split_once('?').unwrap().1
        ),
    ] {
        let (code, page) = get(&wrong).await;
        assert_eq!(code, 404, "{wrong}");
        assert!(!page.contains("000000"), "{wrong} shows output");
    }
}

#[tokio::test]
async fn output_past_run_log_max_bytes_is_cut_with_a_mark_and_the_task_still_syncs() {
    let github = FakeGithub::start().await;
    let pages = start(&github, |pipeline| {
        pipeline.set_env("worker", "RUN_LOG_MAX_BYTES", "64KiB");
        pipeline.set_env("reporter", "RUN_LINK_SECRET", LINK_SECRET);
    })
    .await;
    pages
        .pipeline
        .fixture
        .set_behaviour_json(POSTGRES, json!({"output_lines": 4000, "line_bytes": 100}));
    let (commit, _, _) = pages
        .pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    let success = github
        .wait_for_shown(&commit, CONTEXT, "success", WAIT)
        .await;
    let (code, page) = get(&link_of(&success)).await;
    assert_eq!(code, 200);
    assert!(page.contains("000000x"), "the start of the output is kept");
    assert!(
        page.contains("[run log cut: this run printed more than RUN_LOG_MAX_BYTES (65536 bytes)"),
        "no cut marker"
    );
    assert!(!page.contains("003999x"), "output past the limit is kept");
    assert_eq!(page.matches("[run log cut").count(), 1);
    let pre_bytes = page.split("<pre").nth(1).unwrap().len();
    assert!(pre_bytes < 80 * 1024, "{pre_bytes} bytes of output shown");
}

#[tokio::test]
async fn the_run_list_is_behind_basic_auth_and_off_without_it() {
    let github = FakeGithub::start().await;
    let mut pages = start(&github, |_| {}).await;
    let (commit, _, _) = pages
        .pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    let success = github
        .wait_for_shown(&commit, CONTEXT, "success", WAIT)
        .await;
    let list = format!("{}/runs", pages.base);
    let client = iac_tests::http();
    let (code, _) = get(&list).await;
    assert_eq!(code, 401, "the list without credentials");
    let wrong = client
        .get(&list)
        .basic_auth(WEB_USER, Some("not-the-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let shown = client
        .get(&list)
        .basic_auth(WEB_USER, Some(WEB_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(shown.status().as_u16(), 200);
    let html = shown.text().await.unwrap();
    assert!(html.contains(&commit[..10]) && html.contains("success") && html.contains("push"));
    assert!(html.contains("platform/postgres"), "{html}");
    let run_link = link_of(&success);
    let path = run_link.strip_prefix(&pages.base).unwrap();
    assert!(
        html.contains(&path.replace('&', "&amp;")),
        "the list links to the run page"
    );

    // A reporter without WEB_USER and WEB_PASSWORD has no list, yet serves run links.
    let port = free_port();
    let reporter_env = [("WEB_PORT", port.to_string())];
    for (key, value) in &reporter_env {
        pages.pipeline.set_env("reporter", key, value);
    }
    pages.pipeline.set_env("reporter", "WEB_USER", "");
    pages.pipeline.set_env("reporter", "WEB_PASSWORD", "");
    let _other = pages
        .pipeline
        .start_reporter()
        .forbid_in_output(&[WEB_PASSWORD]);
    let other = format!("http://127.0.0.1:{port}");
    let (code, _) = wait_for("the second reporter's pages", WAIT, || {
        let url = format!("{other}{path}");
        async move {
            let (code, page) = try_get(&url).await?;
            (code == 200 && page.contains("syncing")).then_some((code, page))
        }
    })
    .await;
    assert_eq!(code, 200, "both reporters sign links alike");
    let (code, _) = get(&format!("{other}/runs")).await;
    assert_eq!(
        code, 404,
        "the list is off without WEB_USER and WEB_PASSWORD"
    );
}

/// Headless Chromium, or `None` where it could not be installed (the reason printed).
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("CHROMIUM_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join("chromium"))
                .find(|path| path.is_file())
        });
    if found.is_none() {
        match std::env::var("IAC_BROWSER_UNAVAILABLE") {
            Ok(reason) => eprintln!("SKIPPED: the browser test needs chromium: {reason}"),
            Err(_) => panic!(
                "chromium is not installed: run ./tests/run.sh (it installs it) or \
                 `apt-get install chromium`"
            ),
        }
    }
    found
}

/// Runs headless Chromium on `url` with `args`; returns its standard output.
fn browse(chromium: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn in_a_browser_the_list_and_a_run_page_read_well_and_a_running_task_shows_up_live() {
    let Some(chromium) = chromium() else { return };
    let github = FakeGithub::start().await;
    let pages = start(&github, |_| {}).await;
    let fixture = &pages.pipeline.fixture;
    let shots = fixture.scratch("screenshots");
    let profile = fixture.scratch("chromium-profile");
    fixture.set_behaviour_json(
        POSTGRES,
        json!({"sleep": 8, "output_lines": 3, "line_bytes": 8, "echo_env": ["VAULT_TOKEN"]}),
    );
    let (commit, _, _) = pages
        .pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    // The run page while the task sleeps: what it printed so far, and the live view.
    let pending = github
        .wait_for_shown(&commit, CONTEXT, "pending", WAIT)
        .await;
    let link = link_of(&pending);
    let (_, first) = wait_for("the task's first lines on the run page", WAIT, || {
        let link = link.clone();
        async move {
            let (code, page) = get(&link).await;
            (code == 200 && page.contains("000002x") && page.contains("id=\"live\""))
                .then_some((code, page))
        }
    })
    .await;
    assert!(
        !first.contains("01.postgres synced"),
        "the task had not ended yet"
    );

    // Chromium loads the page now and runs its script until the run ends: the last line and
    // the outcome arrive through the live view, with no reload.
    let dom = browse(
        &chromium,
        &profile,
        &["--dump-dom", "--virtual-time-budget=30000"],
        &link,
    );
    assert!(dom.contains("01.postgres synced"), "no live output:\n{dom}");
    assert!(
        dom.contains("Finished."),
        "the live view did not end:\n{dom}"
    );
    assert!(dom.contains("VAULT_TOKEN=***") && !dom.contains(VAULT_TOKEN));
    let finished = github
        .wait_for_shown(&commit, CONTEXT, "success", WAIT)
        .await;
    assert_eq!(link_of(&finished), link);

    // The finished run page and the list, as a person sees them on a desk and on a phone.
    let run_shot = shots.join("run-page.png");
    browse(
        &chromium,
        &profile,
        &[
            &format!("--screenshot={}", run_shot.display()),
            "--window-size=1000,470",
        ],
        &link,
    );
    let phone_shot = shots.join("run-page-phone.png");
    browse(
        &chromium,
        &profile,
        &[
            &format!("--screenshot={}", phone_shot.display()),
            "--window-size=390,844",
        ],
        &link,
    );
    let list_url = pages
        .base
        .replace("http://", &format!("http://{WEB_USER}:{WEB_PASSWORD}@"))
        + "/runs";
    let list_dom = browse(&chromium, &profile, &["--dump-dom"], &list_url);
    assert!(
        list_dom.contains(&commit[..10]) && list_dom.contains("success"),
        "{list_dom}"
    );
    let list_shot = shots.join("runs.png");
    browse(
        &chromium,
        &profile,
        &[
            &format!("--screenshot={}", list_shot.display()),
            "--window-size=1000,400",
        ],
        &list_url,
    );
    let list_phone_shot = shots.join("runs-phone.png");
    browse(
        &chromium,
        &profile,
        &[
            &format!("--screenshot={}", list_phone_shot.display()),
            "--window-size=390,400",
        ],
        &list_url,
    );
    for shot in [&run_shot, &phone_shot, &list_shot, &list_phone_shot] {
        let size = std::fs::metadata(shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} is {size} bytes", shot.display());
    }
    // `RUN_PAGES_SCREENSHOTS=<dir>` keeps them (how docs/run-page.png was made).
    if let Some(dir) = std::env::var_os("RUN_PAGES_SCREENSHOTS") {
        for shot in [&run_shot, &phone_shot, &list_shot, &list_phone_shot] {
            std::fs::copy(shot, Path::new(&dir).join(shot.file_name().unwrap())).unwrap();
        }
    }
}

#[tokio::test]
async fn a_reporter_whose_web_port_is_taken_says_so_and_still_posts_statuses() {
    let github = FakeGithub::start().await;
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut pipeline = Pipeline::new(&github.url());
    pipeline.set_env("reporter", "WEB_PORT", &port.to_string());
    pipeline.set_env("reporter", "PUBLIC_URL", "https://ci.example.com");
    let running = pipeline.start_all().await;
    let (commit, _, _) = pipeline
        .push_change(&format!("{POSTGRES}/compose.yaml"))
        .await;
    let success = github
        .wait_for_shown(&commit, CONTEXT, "success", WAIT)
        .await;
    assert!(link_of(&success).starts_with("https://ci.example.com/runs/"));
    assert!(
        running
            .reporter
            .output()
            .contains("WEB_PORT: cannot listen"),
        "{}",
        running.reporter.output()
    );
}
