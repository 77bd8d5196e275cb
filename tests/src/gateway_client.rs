//! Requests as GitHub and operators send them: sample payloads from `tests/data/github/`,
//! signed bodies, and a small HTTP/1.1 client that can also send what a well-behaved client
//! never does (a body cut short, a chunked body over the limit, a false `Content-Length`).

use std::net::SocketAddr;
use std::time::Duration;

use iac_shared::signature::{
    NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, sign_timestamped,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tools::workspace_root;

/// A sample payload checked into `tests/data/github/` (`push.json`, `ping.json`).
pub fn sample(name: &str) -> Vec<u8> {
    let path = workspace_root().join("tests/data/github").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// An answer: status code, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics, showing the body, when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "answer {} is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a request with `Content-Length` and reads the answer (within 10 seconds: see
/// [`request_within`] for a request the server holds longer).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    send_raw(addr, &bytes).await
}

/// [`timestamped`], waiting up to `within` for the answer (a held `wait: true` deployment).
pub async fn timestamped_within(
    addr: SocketAddr,
    path: &str,
    secret: &str,
    body: &[u8],
    within: Duration,
) -> Response {
    let timestamp = unix_now().to_string();
    let nonce = fresh_nonce();
    let signature = sign_timestamped(secret.as_bytes(), &timestamp, &nonce, body);
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\
         Content-Type: application/json\r\n{SIGNATURE_HEADER}: {signature}\r\n\
         {TIMESTAMP_HEADER}: {timestamp}\r\n{NONCE_HEADER}: {nonce}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    tokio::time::timeout(within, async {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        stream.write_all(&raw).await.expect("writing the request");
        read_response(&mut stream).await
    })
    .await
    .unwrap_or_else(|_| panic!("no answer within {within:?}"))
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"").await
}

/// A GitHub delivery to `/webhook`: JSON body, signed with `secret`.
pub async fn webhook(
    addr: SocketAddr,
    secret: &str,
    event: &str,
    delivery: &str,
    body: &[u8],
) -> Response {
    let signature = sign(secret.as_bytes(), body);
    request(
        addr,
        "POST",
        "/webhook",
        &[
            ("Content-Type", "application/json"),
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", delivery),
            (SIGNATURE_HEADER, &signature),
            ("User-Agent", "GitHub-Hookshot/test"),
        ],
        body,
    )
    .await
}

/// An operator's signed `POST /sync`.
pub async fn sync(addr: SocketAddr, secret: &str, body: &[u8]) -> Response {
    let signature = sign(secret.as_bytes(), body);
    request(
        addr,
        "POST",
        "/sync",
        &[
            ("Content-Type", "application/json"),
            (SIGNATURE_HEADER, &signature),
        ],
        body,
    )
    .await
}

/// The current time in unix seconds, as a client puts it in `X-IAC-Timestamp`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// A nonce no other request of this process used.
pub fn fresh_nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "test:{}:{}:{}",
        std::process::id(),
        unix_now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `POST` to `path` signed in the timestamped form (`/deploy`, `/deploy/status`, `/sync`),
/// with the given timestamp and nonce.
pub async fn timestamped(
    addr: SocketAddr,
    path: &str,
    secret: &str,
    body: &[u8],
    timestamp: u64,
    nonce: &str,
) -> Response {
    let timestamp = timestamp.to_string();
    let signature = sign_timestamped(secret.as_bytes(), &timestamp, nonce, body);
    request(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            (SIGNATURE_HEADER, &signature),
            (TIMESTAMP_HEADER, &timestamp),
            (NONCE_HEADER, nonce),
        ],
        body,
    )
    .await
}

/// A `POST` to `path` signed as the original runner's client signs: now, with a fresh nonce.
pub async fn signed_now(addr: SocketAddr, path: &str, secret: &str, body: &[u8]) -> Response {
    timestamped(addr, path, secret, body, unix_now(), &fresh_nonce()).await
}

/// Writes `raw` as is (it may stop anywhere), then reads one answer. Fails the test when no
/// complete answer arrives within 10 seconds.
pub async fn send_raw(addr: SocketAddr, raw: &[u8]) -> Response {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        stream.write_all(raw).await.expect("writing the request");
        read_response(&mut stream).await
    })
    .await
    .expect("no answer within 10s")
}

async fn read_response(stream: &mut TcpStream) -> Response {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await.expect("reading the answer");
        assert!(
            n > 0,
            "connection closed before an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    loop {
        if length.is_some_and(|len| body.len() >= len) {
            break;
        }
        // The server may reset a connection whose request it did not read to the end.
        let n: usize = stream.read(&mut chunk).await.unwrap_or_default();
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(data, b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}
