//! An L4 (TCP) balancer in front of three local echo servers (the shared demo ones,
//! `examples/demo`).
//!
//! ```text
//! cargo run --example tcp_proxy
//! ```
//!
//! At start it opens three connections through the proxy itself and holds them: least
//! connections gives each a different backend, since a TCP connection counts as in flight for
//! its whole life. Then each sends a line, half-closes, and reads the echo. After that it keeps
//! serving on 127.0.0.1:9000 until Ctrl-C. Try, from other terminals:
//!
//! ```text
//! nc 127.0.0.1 9000        # greeted by a backend; type lines, they come back upper-cased
//! ```
//!
//! Keep two or three `nc` sessions open at once: each gets a different backend. Half-close
//! works too: `printf 'hi\n' | nc -N 127.0.0.1 9000` sends, shuts its write side, and still reads the
//! answer before the backend closes.

mod demo;

use std::net::SocketAddr;
use std::time::Duration;

use lbkit::proxy::TcpProxy;
use lbkit::strategy::LeastConnections;
use lbkit::BoxError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

const LISTEN: &str = "127.0.0.1:9000";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut backends = Vec::new();
    for n in 1..=3 {
        let addr = demo::echo_backend(format!("echo-{n}")).await?;
        println!("echo-{n} on {addr}");
        backends.push(addr);
    }

    let proxy = TcpProxy::new(backends, LeastConnections::new())
        .connect_timeout(Duration::from_secs(2))
        .idle_timeout(Duration::from_secs(300));
    let listener = demo::listen(LISTEN).await;
    let addr = listener.local_addr()?;
    let serving = tokio::spawn(proxy.serve(listener));

    println!("\nthree connections held open at once:");
    let mut held = Vec::new();
    for i in 1..=3 {
        let (greeting, conn) = open(addr).await?;
        println!("  connection {i}: greeted by {greeting}");
        held.push(conn);
    }
    for (i, conn) in held.into_iter().enumerate() {
        let echoed = talk(conn, &format!("hello {}", i + 1)).await?;
        println!("  connection {}: echoed {echoed:?}", i + 1);
    }

    println!("\nTCP proxy on {addr}; try: nc 127.0.0.1 9000   (Ctrl-C to stop)");
    tokio::select! {
        res = serving => res??,
        _ = tokio::signal::ctrl_c() => println!("bye"),
    }
    Ok(())
}

type Conn = (Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf);

/// Connects through the proxy and reads the greeting line: the backend's name.
async fn open(proxy: SocketAddr) -> Result<(String, Conn), BoxError> {
    let (r, w) = TcpStream::connect(proxy).await?.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = lines.next_line().await?.unwrap_or_default();
    Ok((greeting, (lines, w)))
}

/// Sends `line`, half-closes, and reads the echo.
async fn talk((mut lines, mut w): Conn, line: &str) -> Result<String, BoxError> {
    w.write_all(format!("{line}\n").as_bytes()).await?;
    w.shutdown().await?;
    Ok(lines.next_line().await?.unwrap_or_default())
}
