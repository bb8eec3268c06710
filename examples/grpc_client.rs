//! A tonic gRPC client balanced over three local tonic servers by lbkit.
//!
//! ```text
//! cargo run --example grpc_client
//! ```
//!
//! It starts three gRPC servers on 127.0.0.1, makes a client whose channel is an lbkit
//! `Balancer` over one `tonic::transport::Channel` per server, makes six calls one after the
//! other and twelve at once, prints which server answered each, and exits (within a second).
//! With round robin the sequential calls visit the servers in turn; try
//! `PowerOfTwoChoices::new()` or `LeastConnections::new()` instead.
//!
//! gRPC needs its calls balanced per request, not per connection: one HTTP/2 connection
//! carries every call, so an L4 balancer would send them all to one server. Here each call is
//! a request through the `Balancer`, which picks a server for it; the balancer counts a call in
//! flight until its response body (with the gRPC trailers) ends (the default for HTTP services).
//!
//! lbkit's errors become gRPC statuses with `map_err(tonic::Status::from)` (feature `tonic`):
//! with no server up, a call fails with `UNAVAILABLE`, which gRPC clients retry, not
//! `UNKNOWN`. The last call here shows it, after the servers are stopped.
//!
//! No protoc needed: the messages are written by hand with `#[derive(prost::Message)]`, and the
//! calls go through tonic's generic `client::Grpc` / `server::Grpc` with the prost codec, which
//! is what generated code does underneath.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use lbkit::strategy::RoundRobin;
use lbkit::{Balancer, BoxError, Endpoint};
use tokio::net::TcpListener;
use tonic::server::{NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::{Service, ServiceExt};

/// `message HelloRequest { string name = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `message HelloReply { string message = 1; string server = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub server: String,
}

/// `rpc SayHello (HelloRequest) returns (HelloReply)` in `service demo.Greeter`.
pub const SAY_HELLO: &str = "/demo.Greeter/SayHello";

#[tokio::main]
pub async fn main() -> Result<(), BoxError> {
    let mut endpoints = Vec::new();
    let mut servers = Vec::new();
    for n in 1..=3 {
        let (addr, stop, served) = spawn_server(format!("server-{n}")).await?;
        println!("server-{n}: gRPC on {addr}");
        endpoints.push(Endpoint::from(addr));
        servers.push((stop, served));
    }

    // One lazily connected tonic channel per server, balanced by lbkit.
    let balancer = Balancer::new(endpoints, RoundRobin::new(), |ep: &Endpoint| {
        let addr = ep.socket_addr().expect("endpoints are socket addresses");
        Channel::from_shared(format!("http://{addr}"))
            .expect("valid URI")
            .connect_lazy()
    });
    // lbkit's errors as gRPC statuses: no endpoint up is UNAVAILABLE.
    let client = tonic::client::Grpc::new(balancer.map_err(Status::from));

    println!("\nsix calls, one after the other:");
    for i in 1..=6 {
        let reply = say_hello(client.clone(), format!("call {i}")).await?;
        println!("  call {i:2} -> {} ({})", reply.server, reply.message);
    }

    println!("\ntwelve calls at once:");
    let mut calls = tokio::task::JoinSet::new();
    for i in 1..=12 {
        let client = client.clone();
        calls.spawn(async move { say_hello(client, format!("call {i}")).await });
    }
    let mut spread = std::collections::BTreeMap::<String, usize>::new();
    while let Some(reply) = calls.join_next().await {
        *spread.entry(reply??.server).or_default() += 1;
    }
    for (server, n) in spread {
        println!("  {server}: {n} calls");
    }

    // Stop every server: the next call finds no one to connect to.
    for (stop, served) in servers {
        let _ = stop.send(());
        let _ = served.await;
    }
    match say_hello(client, "anyone there?".into()).await {
        Err(status) => println!("\nwith every server stopped: {:?}", status.code()),
        Ok(reply) => return Err(format!("a stopped server answered: {reply:?}").into()),
    }
    Ok(())
}

/// One unary call: what generated client code does.
pub async fn say_hello<T>(
    mut client: tonic::client::Grpc<T>,
    name: String,
) -> Result<HelloReply, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError>,
{
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {}", e.into())))?;
    let res = client
        .unary(
            Request::new(HelloRequest { name }),
            PathAndQuery::from_static(SAY_HELLO),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await?;
    Ok(res.into_inner())
}

/// Starts a tonic server named `name` on a port the OS picks; it serves until told to stop
/// through the returned sender (then it closes its listener and, after a GOAWAY, its
/// connections, and the returned task ends).
async fn spawn_server(
    name: String,
) -> Result<
    (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    BoxError,
> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let greeter = Greeter { name: name.into() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = Server::builder()
            .add_service(greeter)
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            eprintln!("server stopped: {e}");
        }
    });
    Ok((addr, stop, task))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The `demo.Greeter` service: what generated server code does, for one method.
#[derive(Clone)]
struct Greeter {
    name: std::sync::Arc<str>,
}

impl NamedService for Greeter {
    const NAME: &'static str = "demo.Greeter";
}

impl Service<http::Request<tonic::body::Body>> for Greeter {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let name = self.name.clone();
        Box::pin(async move {
            if req.uri().path() != SAY_HELLO {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
            Ok(grpc.unary(SayHello { name }, req).await)
        })
    }
}

/// The handler of `SayHello`.
struct SayHello {
    name: std::sync::Arc<str>,
}

impl UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFuture<Result<Response<HelloReply>, Status>>;

    fn call(&mut self, request: Request<HelloRequest>) -> Self::Future {
        let server = self.name.to_string();
        Box::pin(async move {
            let name = request.into_inner().name;
            Ok(Response::new(HelloReply {
                message: format!("hello, {name}"),
                server,
            }))
        })
    }
}
