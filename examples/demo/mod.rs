//! Demo backends for the examples: small servers on 127.0.0.1, on ports the OS picks, so that
//! every example runs with no other setup. The HTTP ones are served by lbkit's own [`Server`].
//! Not an example itself: the examples include it with `mod demo;`, each using a part of it.
//!
//! - [`backend`] and [`slow_backend`]: an HTTP backend that says who it is;
//! - [`hello`]: that backend's service, for an example that serves it itself (to stop and
//!   restart it on the same port);
//! - [`serve`]: serves an example's own service, as the demo backends are served;
//! - [`echo_backend`]: a TCP line-echo server, for the TCP proxy;
//! - [`listen`] and [`ctrl_c`]: the listener and the shutdown signal of an example's own server.

// Each example uses a part of this module.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, Response};
use http_body_util::Full;
use lbkit::server::{RequestBody, Server};
use lbkit::BoxError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tower::Service;

/// The response header in which a demo backend gives its name, on every answer.
pub const NAME_HEADER: HeaderName = HeaderName::from_static("x-backend");

/// Starts an HTTP backend named `name` and returns its address; it serves until the program
/// ends. What it answers: see [`hello`].
pub async fn backend(name: impl ToString) -> std::io::Result<SocketAddr> {
    serve(hello(&name.to_string(), Duration::ZERO)).await
}

/// As [`backend`], but every answer waits `delay` first: a slower (or busier) server.
pub async fn slow_backend(name: impl ToString, delay: Duration) -> std::io::Result<SocketAddr> {
    serve(hello(&name.to_string(), delay)).await
}

/// The service of a demo backend named `name`: after `delay` it answers `/health` with `ok`,
/// `/headers` with the request headers it received (what a proxy in front of it added), and
/// anything else with `hello from NAME: METHOD URI`; every answer carries [`NAME_HEADER`].
pub fn hello(
    name: &str,
    delay: Duration,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    let name = name.to_string();
    tower::service_fn(move |req: Request<RequestBody>| {
        let body = match req.uri().path() {
            "/health" => "ok\n".to_owned(),
            "/headers" => {
                let mut text = format!("{name} received:\n");
                for (header, value) in req.headers() {
                    let value = value.to_str().unwrap_or("?");
                    text.push_str(&format!("  {header}: {value}\n"));
                }
                text
            }
            _ => format!("hello from {name}: {} {}\n", req.method(), req.uri()),
        };
        let res = Response::builder()
            .header(NAME_HEADER, name.as_str())
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response");
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(res)
        }
    })
}

/// Serves `service` with lbkit's [`Server`] on a port the OS picks, until the program ends, and
/// returns the address.
pub async fn serve<S, B>(service: S) -> std::io::Result<SocketAddr>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(Server::new(service).serve(listener));
    Ok(addr)
}

/// Starts a TCP echo server named `name` and returns its address: it greets each connection
/// with a line `NAME`, sends every line back upper-cased, and closes once the client has closed
/// its side. (lbkit's [`Server`] speaks HTTP; a raw TCP backend needs its own accept loop.)
pub async fn echo_backend(name: impl ToString) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let name = name.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: wait a little rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let greeting = format!("{name}\n");
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                w.write_all(greeting.as_bytes()).await?;
                let mut lines = BufReader::new(r).lines();
                while let Some(line) = lines.next_line().await? {
                    w.write_all(format!("{}\n", line.to_uppercase()).as_bytes())
                        .await?;
                }
                w.shutdown().await
            });
        }
    });
    Ok(addr)
}

/// Binds `addr` for an example's own server (a proxy), or exits with a message saying why (the
/// port is taken, say).
pub async fn listen(addr: &str) -> TcpListener {
    match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    }
}

/// Resolves when the user presses Ctrl-C, saying so: the shutdown signal for
/// [`Server::serve_with_shutdown`].
pub async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
    println!("shutting down: finishing requests in flight");
}
