//! Credentials in an HTTPS `GIT_REPO_URL` reach git through a credential helper, never the
//! checkout's `.git/config`, where any task could read them. The remote is the fixture
//! repository served by `git http-backend` behind basic authentication.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use iac_shared::events::FinishedState;
use iac_tests::fake_github::FakeGithub;
use iac_tests::fixture::git;
use iac_tests::pipeline::Pipeline;
use tokio::io::AsyncWriteExt;
use warp::Filter;
use warp::http::{HeaderMap, Method, Response, StatusCode};

const USER: &str = "deploy";
const TOKEN: &str = "s3cret-token-42";
/// `Basic` credentials for `deploy:s3cret-token-42`.
const AUTHORIZATION: &str = "Basic ZGVwbG95OnMzY3JldC10b2tlbi00Mg==";

/// A smart-HTTP git server for the repositories under `root`, refusing requests without the
/// right basic credentials; counts the requests it served.
struct GitHttp {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
}

impl GitHttp {
    async fn start(root: PathBuf) -> Self {
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |method: Method,
                      path: warp::path::FullPath,
                      query: String,
                      headers: HeaderMap,
                      body: Bytes| {
                    let (root, count) = (root.clone(), count.clone());
                    async move {
                        let authorized = headers
                            .get("authorization")
                            .is_some_and(|v| v.as_bytes() == AUTHORIZATION.as_bytes());
                        if !authorized {
                            return Response::builder()
                                .status(StatusCode::UNAUTHORIZED)
                                .header("WWW-Authenticate", "Basic realm=\"git\"")
                                .body(Bytes::new())
                                .unwrap();
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        http_backend(&root, &method, path.as_str(), &query, &headers, body).await
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        GitHttp { addr, served }
    }
}

/// Runs `git http-backend` as a CGI program for one request.
async fn http_backend(
    root: &Path,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response<Bytes> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_USER", USER)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("git http-backend starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&body).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let out = output.stdout;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("CGI headers end with an empty line");
    let mut response = Response::builder();
    for line in String::from_utf8_lossy(&out[..split]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.trim()[..3].parse().unwrap();
            response = response.status(code);
        } else {
            response = response.header(name.trim(), value.trim());
        }
    }
    response
        .body(Bytes::copy_from_slice(&out[split + 4..]))
        .unwrap()
}

/// A pipeline whose worker clones the fixture over HTTP with credentials in the URL.
async fn pipeline_over_http(github: &FakeGithub) -> (Pipeline, GitHttp, PathBuf) {
    let mut pipeline = Pipeline::new(&github.url());
    let remote = PathBuf::from(pipeline.fixture.url());
    let server = GitHttp::start(remote.parent().unwrap().to_path_buf()).await;
    let name = remote.file_name().unwrap().to_str().unwrap();
    let url = format!("http://{USER}:{TOKEN}@{}/{name}", server.addr);
    pipeline.set_env("worker", "GIT_REPO_URL", &url);
    let checkout = pipeline
        .fixture
        .scratch("workspace")
        .join(name.trim_end_matches(".git"));
    (pipeline, server, checkout)
}

#[tokio::test]
async fn https_credentials_reach_git_through_a_helper_and_never_the_checkouts_config() {
    let github = FakeGithub::start().await;
    let (pipeline, server, checkout) = pipeline_over_http(&github).await;
    let _gateway = pipeline.start_gateway().await;
    let worker = pipeline.start_worker().forbid_in_output(&[TOKEN]);

    for _ in 0..2 {
        let (commit, status, _) = pipeline
            .push_change("platform/01.postgres/compose.yaml")
            .await;
        assert_eq!(status, 200);
        let finished = pipeline.finished_at(&commit).await;
        assert_eq!(finished.state, FinishedState::Success, "{finished:?}");
    }
    assert!(
        server.served.load(Ordering::SeqCst) > 0,
        "git authenticated to the server"
    );
    let config = std::fs::read_to_string(checkout.join(".git/config")).unwrap();
    assert!(!config.contains(TOKEN), "{config}");
    assert!(
        config.contains(&format!("url = http://{}/", server.addr)),
        "{config}"
    );
    let runs = pipeline.fixture.runs();
    assert!(
        runs.iter()
            .all(|r| !r.env.values().any(|v| v.contains(TOKEN)))
    );
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_an_earlier_version_left_in_the_checkout_are_removed() {
    let github = FakeGithub::start().await;
    let (pipeline, server, checkout) = pipeline_over_http(&github).await;
    // As an earlier worker did: the URL with its credentials, stored by the clone.
    let url = format!("http://{USER}:{TOKEN}@{}/infra.git", server.addr);
    let workspace = checkout.parent().unwrap();
    // Off the runtime's threads: the server answering the clone runs on them.
    let (dir, target) = (workspace.to_path_buf(), checkout.clone());
    tokio::task::spawn_blocking(move || {
        let target = target.to_str().unwrap();
        git(&dir, &["clone", "--quiet", "--no-checkout", &url, target])
    })
    .await
    .unwrap();
    let before = std::fs::read_to_string(checkout.join(".git/config")).unwrap();
    assert!(
        before.contains(TOKEN),
        "the stand-in clone stores the token"
    );

    let _gateway = pipeline.start_gateway().await;
    let _worker = pipeline.start_worker().forbid_in_output(&[TOKEN]);
    let (commit, _, _) = pipeline
        .push_change("platform/01.postgres/compose.yaml")
        .await;
    assert_eq!(
        pipeline.finished_at(&commit).await.state,
        FinishedState::Success
    );
    let after = std::fs::read_to_string(checkout.join(".git/config")).unwrap();
    assert!(!after.contains(TOKEN), "{after}");
}
