//! The L4 balancer over real TCP sockets on 127.0.0.1.
//!
//! Every port here is reserved for the test process (see `common::reserve_port`): a stopped
//! listener leaves an address where connecting is refused. No assertion depends on how fast
//! the machine is; the time limits only catch hangs, and the timers are checked from below
//! (they never fire early).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{dead_addr, listen_reserved, wait_until, HANG};
use lbkit::proxy::TcpProxy;
use lbkit::strategy::{LeastConnections, RoundRobin, Strategy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A backend that greets each connection with its name and a newline, then echoes everything
/// until the client half-closes, then closes.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(name: &'static str) -> Backend {
    let (listener, addr) = listen_reserved();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            conns.spawn(async move {
                s.write_all(format!("{name}\n").as_bytes()).await?;
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    Backend {
        addr,
        accepted,
        task,
    }
}

async fn start<St: Strategy>(proxy: TcpProxy<St>) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let (listener, addr) = listen_reserved();
    (addr, tokio::spawn(proxy.serve(listener)))
}

/// Connects through the proxy and reads the greeting line: the backend's name.
async fn greet(proxy: SocketAddr) -> (String, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = s.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "connection closed before the greeting ended");
        if byte[0] == b'\n' {
            break;
        }
        name.push(byte[0]);
    }
    (String::from_utf8(name).unwrap(), s)
}

/// Bound on a whole test; only catches a hang.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn spreads_connections_round_robin() {
    within(async {
        let backends = [backend("a").await, backend("b").await, backend("c").await];
        let (addr, server) = start(TcpProxy::new(
            backends.iter().map(|b| b.addr),
            RoundRobin::new(),
        ))
        .await;
        let mut seen = std::collections::HashMap::<String, u32>::new();
        for _ in 0..30 {
            let (name, _s) = greet(addr).await;
            *seen.entry(name).or_default() += 1;
        }
        assert_eq!(seen.len(), 3);
        assert!(seen.values().all(|&n| n == 10), "{seen:?}");
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn least_connections_counts_open_connections() {
    within(async {
        let backends = [backend("a").await, backend("b").await, backend("c").await];
        let proxy = TcpProxy::new(backends.iter().map(|b| b.addr), LeastConnections::new());
        let pool = proxy.pool().clone();
        let (addr, server) = start(proxy).await;
        let mut open = Vec::new();
        let mut seen = std::collections::HashMap::<String, u32>::new();
        for _ in 0..9 {
            let (name, s) = greet(addr).await;
            *seen.entry(name).or_default() += 1;
            open.push(s);
        }
        // Open connections are load: three on each backend.
        assert!(seen.values().all(|&n| n == 3), "{seen:?}");
        assert_eq!(pool.in_flight(), 9);
        drop(open);
        wait_until(HANG, "the connections to be released", || {
            pool.in_flight() == 0
        })
        .await;
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn a_dead_backend_is_skipped() {
    within(async {
        let alive = [backend("a").await, backend("b").await];
        // Reserved, never listening: connecting is refused.
        let dead = dead_addr().await;
        let addrs = [alive[0].addr, dead, alive[1].addr];
        let (addr, server) = start(TcpProxy::new(addrs, RoundRobin::new())).await;
        for _ in 0..30 {
            let (name, _s) = greet(addr).await;
            assert_ne!(name, "dead");
        }
        assert_eq!(
            alive[0].accepted.load(Ordering::SeqCst) + alive[1].accepted.load(Ordering::SeqCst),
            30
        );
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn half_close_passes_through() {
    within(async {
        let b = backend("a").await;
        let (addr, server) = start(TcpProxy::new([b.addr], RoundRobin::new())).await;
        let (_, mut s) = greet(addr).await;
        let payload = vec![7u8; 256 * 1024];
        s.write_all(&payload).await.unwrap();
        s.shutdown().await.unwrap(); // our write half ends; we keep reading
        let mut echoed = Vec::new();
        s.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload);
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    within(async {
        let b = backend("a").await;
        let idle = Duration::from_millis(200);
        let proxy = TcpProxy::new([b.addr], RoundRobin::new()).idle_timeout(idle);
        let (addr, server) = start(proxy).await;
        // Before the connection: its idle time cannot have started earlier.
        let started = tokio::time::Instant::now();
        let (_, mut s) = greet(addr).await;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the idle connection should be closed");
        let waited = started.elapsed();
        assert!(waited >= idle, "closed before its idle timeout: {waited:?}");
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn no_backend_closes_at_once() {
    within(async {
        // Closed for having no backend, not for being idle: that would take an hour.
        let proxy = TcpProxy::new([], RoundRobin::new()).idle_timeout(Duration::from_secs(3600));
        let (addr, server) = start(proxy).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = s.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_open_connections_finish() {
    within(async {
        let b = backend("a").await;
        // Its port stays reserved once the listener closes: connecting is then refused.
        let (listener, addr) = listen_reserved();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let proxy = TcpProxy::new([b.addr], RoundRobin::new());
        // A grace period the test never waits for: the server ends when its connections do.
        let server = tokio::spawn(proxy.serve_with_shutdown(
            listener,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(3600),
        ));
        let (_, mut open) = greet(addr).await;
        stop.send(()).unwrap();
        // The listener closes: new connections are refused.
        let deadline = tokio::time::Instant::now() + HANG;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still accepting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The open connection still works, to its end.
        open.write_all(b"still here").await.unwrap();
        open.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        open.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"still here");
        // With it gone, the server returns (long before the hour of grace).
        tokio::time::timeout(HANG, server)
            .await
            .expect("the server ends once its connections are done")
            .unwrap()
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn connections_left_after_the_grace_period_are_closed() {
    within(async {
        let b = backend("a").await;
        let (listener, addr) = listen_reserved();
        let proxy = TcpProxy::new([b.addr], RoundRobin::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let grace = Duration::from_millis(200);
        let server = tokio::spawn(proxy.serve_with_shutdown(
            listener,
            async {
                let _ = stopped.await;
            },
            grace,
        ));
        let (_, mut idle) = greet(addr).await;
        let started = tokio::time::Instant::now();
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        let waited = started.elapsed();
        assert!(waited >= grace, "ended before its grace period: {waited:?}");
        let mut buf = [0u8; 8];
        assert_eq!(
            idle.read(&mut buf).await.unwrap_or(0),
            0,
            "closed by the proxy"
        );
    })
    .await;
}
