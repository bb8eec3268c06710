//! Demo backends for the examples: small HTTP servers on 127.0.0.1, served by lbkit's own
//! [`Server`], so that every example runs with no other setup. Not an example itself: the
//! examples include it with `mod demo;`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use lbkit::server::Server;
use tokio::net::TcpListener;

/// Starts a backend named `name` on a port the OS picks and returns its address. It answers
/// `hello from NAME: METHOD URI`, and at `/headers` lists the request headers it received
/// (what a proxy in front of it added).
pub async fn backend(name: impl ToString) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let name = name.to_string();
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let body = if req.uri().path() == "/headers" {
            let mut text = format!("{name} received:\n");
            for (header, value) in req.headers() {
                let value = value.to_str().unwrap_or("?");
                text.push_str(&format!("  {header}: {value}\n"));
            }
            text
        } else {
            format!("hello from {name}: {} {}\n", req.method(), req.uri())
        };
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
            body,
        )))))
    });
    tokio::spawn(Server::new(svc).serve(listener));
    Ok(addr)
}
