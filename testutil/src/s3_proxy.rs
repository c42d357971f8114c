//! A fault-injecting TCP proxy on 127.0.0.1 in front of a real S3-compatible server, for the
//! faults real servers cannot be made to show on demand: 503 SlowDown, 500, connections reset
//! or left hanging, and a slow link.
//!
//! Faults are per connection: each new connection takes the next fault due (resets first, then
//! stalls, 503s, 500s) and is closed after it; a connection with no fault due is forwarded byte
//! for byte (request signatures stay valid: nothing is rewritten). The S3 client reconnects after
//! a failed attempt, so "the next N connections fail" is "the next N attempts fail".

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The knobs; change them at any time.
#[derive(Debug, Default)]
pub struct Faults {
    /// Connections to reset (closed at once, nothing answered).
    pub resets: AtomicUsize,
    /// Connections to leave hanging (the request is read, nothing is ever answered).
    pub stalls: AtomicUsize,
    /// Connections answered `503 SlowDown`.
    pub slow_downs: AtomicUsize,
    /// Connections answered `500 InternalError`.
    pub internal_errors: AtomicUsize,
    /// Every connection answered `503 SlowDown` while set.
    pub always_slow_down: AtomicBool,
    /// Client-to-server bytes per second (0: unlimited), to keep uploads in flight longer.
    pub upload_rate: AtomicU64,
    /// Faults served so far.
    pub served: AtomicUsize,
}

/// A running proxy.
#[derive(Debug)]
pub struct S3Proxy {
    /// `http://127.0.0.1:PORT`: the endpoint to give the S3 client.
    pub endpoint: String,
    /// The knobs.
    pub faults: Arc<Faults>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes one from `n` if it is above zero.
fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

impl S3Proxy {
    /// Starts a proxy to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> S3Proxy {
        let target: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (f, cut_rx) = (f.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    let _ = handle(conn, target, f, cut_rx).await;
                });
            }
        });
        S3Proxy {
            endpoint: format!("http://{addr}"),
            faults,
            cut,
            task,
        }
    }

    /// Closes every forwarded connection open now, so the next requests open new ones (and
    /// meet the faults armed): the client's pooled connections would otherwise bypass them.
    pub fn cut_connections(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

async fn handle(
    mut conn: TcpStream,
    target: SocketAddr,
    f: Arc<Faults>,
    mut cut: tokio::sync::watch::Receiver<u64>,
) -> std::io::Result<()> {
    cut.mark_unchanged();
    if take(&f.resets) {
        f.served.fetch_add(1, Ordering::AcqRel);
        // Linger 0 makes the close a reset; it cannot block here (nothing unsent).
        #[allow(deprecated)]
        conn.set_linger(Some(Duration::ZERO))?;
        return Ok(()); // dropped with linger 0: a reset
    }
    let answer = if take(&f.stalls) {
        f.served.fetch_add(1, Ordering::AcqRel);
        let mut buf = vec![0u8; 64 * 1024];
        // Read whatever comes, answer nothing, until the client gives up.
        while conn.read(&mut buf).await? > 0 {}
        return Ok(());
    } else if f.always_slow_down.load(Ordering::Acquire) || take(&f.slow_downs) {
        Some((
            503,
            "Slow Down",
            "SlowDown",
            "Please reduce your request rate.",
        ))
    } else if take(&f.internal_errors) {
        Some((
            500,
            "Internal Server Error",
            "InternalError",
            "We encountered an internal error.",
        ))
    } else {
        None
    };
    if let Some((code, reason, s3_code, message)) = answer {
        f.served.fetch_add(1, Ordering::AcqRel);
        read_head(&mut conn).await?;
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{s3_code}</Code>\
             <Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
        );
        let head = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await?;
        conn.shutdown().await?;
        return Ok(());
    }
    let upstream = TcpStream::connect(target).await?;
    let _ = upstream.set_nodelay(true);
    let _ = conn.set_nodelay(true);
    let (mut cr, mut cw) = conn.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            uw.write_all(&buf[..n]).await?;
            let rate = f.upload_rate.load(Ordering::Acquire);
            if rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
            }
        }
        uw.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut ur, &mut cw).await?;
        cw.shutdown().await
    };
    tokio::select! {
        _ = async { tokio::try_join!(up, down) } => {}
        _ = cut.changed() => {}
    }
    Ok(())
}

/// Reads up to the end of a request head (the body, if any, is left unread: the answer closes
/// the connection).
async fn read_head(conn: &mut TcpStream) -> std::io::Result<()> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 64 * 1024 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
