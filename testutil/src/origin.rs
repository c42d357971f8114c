//! An HTTP/1.1 origin on 127.0.0.1 for Remote Asset tests, with knobs for what real origins do
//! wrong: 404, 403, slow, truncated bodies, wrong content, redirect loops, no Content-Length.
//!
//! Deliberately small (one request per connection, `Connection: close`): it exists to be
//! misconfigured per path, not to be a web server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the origin does for one path.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// 200 with these bytes and their Content-Length.
    Serve(Vec<u8>),
    /// 200 with these bytes, no Content-Length (the end of the body is the end of the
    /// connection).
    NoContentLength(Vec<u8>),
    /// 200 announcing `announced` bytes but sending only `body` before closing.
    Truncated {
        /// What is sent.
        body: Vec<u8>,
        /// What the Content-Length says.
        announced: u64,
    },
    /// Waits this long before answering (then serves the bytes).
    Slow(Duration, Vec<u8>),
    /// 302 to another path (pointing two paths at each other makes a loop).
    Redirect(String),
    /// This HTTP status with an empty body.
    Status(u16),
    /// 200 with the contents of this file, streamed (for large bodies: nothing held in memory).
    File(std::path::PathBuf),
}

#[derive(Debug, Default)]
struct State {
    paths: HashMap<String, Behavior>,
    hits: HashMap<String, u64>,
    headers: HashMap<String, Vec<(String, String)>>,
}

/// A running origin; stops when dropped.
#[derive(Debug)]
pub struct Origin {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// Starts an origin on a free port of 127.0.0.1 (every path answers 404 until set).
    pub async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve_one(sock, state).await;
                });
            }
        });
        Origin { addr, state, task }
    }

    /// Sets what `path` (starting with `/`) does.
    pub fn set(&self, path: &str, behavior: Behavior) {
        self.state
            .lock()
            .unwrap()
            .paths
            .insert(path.to_owned(), behavior);
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests `path` received.
    pub fn hits(&self, path: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// The headers of the last request for `path` (names lowercased).
    pub fn last_headers(&self, path: &str) -> Vec<(String, String)> {
        self.state
            .lock()
            .unwrap()
            .headers
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

async fn serve_one(
    mut sock: tokio::net::TcpStream,
    state: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    // The request head, bounded.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/");
    // Paths are matched without their query string.
    let path = path.split('?').next().unwrap_or(path).to_owned();
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let behavior = {
        let mut st = state.lock().unwrap();
        *st.hits.entry(path.clone()).or_default() += 1;
        st.headers.insert(path.clone(), headers);
        st.paths.get(&path).cloned()
    };
    let ok = |len: Option<u64>| {
        let mut h = String::from("HTTP/1.1 200 OK\r\nConnection: close\r\n");
        if let Some(n) = len {
            h.push_str(&format!("Content-Length: {n}\r\n"));
        }
        h.push_str("\r\n");
        h
    };
    match behavior {
        None => {
            sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await?
        }
        Some(Behavior::Serve(body)) => {
            sock.write_all(ok(Some(body.len() as u64)).as_bytes()).await?;
            sock.write_all(&body).await?;
        }
        Some(Behavior::NoContentLength(body)) => {
            sock.write_all(ok(None).as_bytes()).await?;
            sock.write_all(&body).await?;
        }
        Some(Behavior::Truncated { body, announced }) => {
            sock.write_all(ok(Some(announced)).as_bytes()).await?;
            sock.write_all(&body).await?;
        }
        Some(Behavior::Slow(delay, body)) => {
            tokio::time::sleep(delay).await;
            sock.write_all(ok(Some(body.len() as u64)).as_bytes()).await?;
            sock.write_all(&body).await?;
        }
        Some(Behavior::Redirect(to)) => {
            sock.write_all(
                format!(
                    "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?
        }
        Some(Behavior::File(path)) => {
            let mut f = tokio::fs::File::open(&path).await?;
            let len = f.metadata().await?.len();
            sock.write_all(ok(Some(len)).as_bytes()).await?;
            tokio::io::copy(&mut f, &mut sock).await?;
        }
        Some(Behavior::Status(code)) => {
            sock.write_all(
                format!(
                    "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?
        }
    }
    sock.shutdown().await
}
