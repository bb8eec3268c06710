//! A UDP balancer: DNS over three local resolvers, with Maglev keeping each client's flow on
//! one resolver until that resolver goes down.
//!
//! ```text
//! cargo run --example udp_proxy
//! ```
//!
//! Resolver N answers every A query with `127.0.0.N` (TTL 0), so the answer tells which one
//! was reached; a datagram that is not DNS comes back prefixed with the resolver's name. At
//! start the example sends queries from six clients through the proxy, marks one resolver
//! down (its clients move, the others stay), brings it back (nobody moves back), adds a
//! fourth resolver (nobody moves), and prints the proxy's counters. Then it serves on
//! 127.0.0.1:5300 until Ctrl-C. Try, from another terminal:
//!
//! ```text
//! dig @127.0.0.1 -p 5300 example.com +short   # 127.0.0.N: each dig is a new flow (new port)
//! nc -u 127.0.0.1 5300                        # type lines: one flow, always the same resolver
//! ```

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use lbkit::proxy::UdpProxy;
use lbkit::strategy::Maglev;
use lbkit::{BoxError, Endpoint, EndpointId};
use tokio::net::UdpSocket;
use tokio::time::timeout;

const LISTEN: &str = "127.0.0.1:5300";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut resolvers = Vec::new();
    for n in 1..=3 {
        let addr = resolver(n).await?;
        println!("resolver-{n} on {addr}");
        resolvers.push(addr);
    }
    let proxy = UdpProxy::new(resolvers.clone(), Maglev::new())
        .idle_timeout(Duration::from_secs(60))
        .max_flows(10_000);
    let socket = match UdpSocket::bind(LISTEN).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot bind {LISTEN}: {e}");
            std::process::exit(1);
        }
    };
    let addr = socket.local_addr()?;
    let serving = tokio::spawn(proxy.clone().serve_with_shutdown(socket, async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down: flows dropped");
    }));

    let mut clients = Vec::new();
    for _ in 0..6 {
        let c = UdpSocket::bind("127.0.0.1:0").await?;
        c.connect(addr).await?;
        clients.push(c);
    }
    let mut id = 0u16;
    let mut ask_all = |label: &'static str| {
        let queries: Vec<u16> = (0..clients.len())
            .map(|_| {
                id += 1;
                id
            })
            .collect();
        let clients = &clients;
        async move {
            println!("\n{label}:");
            let mut reached = Vec::new();
            for (i, (c, id)) in clients.iter().zip(queries).enumerate() {
                let ip = resolve(c, id).await?;
                println!("  client {} ({}): {ip}", i + 1, c.local_addr()?);
                reached.push(ip);
            }
            Ok::<_, BoxError>(reached)
        }
    };
    let before = ask_all("each client's flow").await?;

    let down = before[0];
    let down_id = EndpointId::from(resolvers[usize::from(down.octets()[3]) - 1]);
    proxy.pool().set_down(&down_id, true);
    let after = ask_all("resolver of client 1 marked down: its clients move").await?;
    proxy.pool().set_down(&down_id, false);
    let back = ask_all("it is up again: flows stay where they are").await?;
    let fourth = resolver(4).await?;
    proxy.pool().insert(Endpoint::from(fourth));
    let added = ask_all("a fourth resolver joins: flows stay").await?;

    let kept = |a: &[Ipv4Addr], b: &[Ipv4Addr]| a.iter().zip(b).filter(|(x, y)| x == y).count();
    let stats = proxy.stats();
    println!(
        "\nflows kept: {}/6 when a resolver went down ({} of them on it), {}/6 when it came back, \
         {}/6 when one was added",
        kept(&before, &after),
        before.iter().filter(|ip| **ip == down).count(),
        kept(&after, &back),
        kept(&back, &added),
    );
    println!(
        "resolvers in use: {}; {stats:?}",
        added.iter().collect::<HashSet<_>>().len()
    );
    println!("\nserving DNS on {addr} until Ctrl-C");
    serving.await??;
    Ok(())
}

/// Starts resolver `n` on a port the OS picks: it answers A queries with `127.0.0.n` and
/// echoes anything that is not DNS, prefixed with its name.
async fn resolver(n: u8) -> std::io::Result<SocketAddr> {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let reply = match Message::from_vec(&buf[..len]) {
                Ok(query) if query.message_type() == MessageType::Query => answer(&query, n),
                _ => {
                    let mut r = format!("resolver-{n}: ").into_bytes();
                    r.extend_from_slice(&buf[..len]);
                    r
                }
            };
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    Ok(addr)
}

/// Resolver `n`'s answer to `query`: its questions, and `127.0.0.n` for each A question.
fn answer(query: &Message, n: u8) -> Vec<u8> {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true);
    for q in query.queries() {
        reply.add_query(q.clone());
        if q.query_type() == RecordType::A {
            let ip = Ipv4Addr::new(127, 0, 0, n);
            reply.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(ip))));
        }
    }
    reply.to_vec().unwrap_or_default()
}

/// Asks for `example.com.` A with `id` through the proxy, resending after a second without an
/// answer; returns the address answered.
async fn resolve(client: &UdpSocket, id: u16) -> Result<Ipv4Addr, BoxError> {
    let mut query = Message::new();
    query
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii("example.com.")?,
            RecordType::A,
        ));
    let query = query.to_vec()?;
    let mut buf = vec![0u8; 4096];
    for _ in 0..5 {
        client.send(&query).await?;
        let wait = async {
            loop {
                let n = client.recv(&mut buf).await?;
                let Ok(answer) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if answer.id() != id {
                    continue;
                }
                if let Some(RData::A(A(ip))) = answer.answers().first().map(|r| r.data()) {
                    return Ok::<_, BoxError>(*ip);
                }
                return Err("an answer without an A record".into());
            }
        };
        if let Ok(ip) = timeout(Duration::from_secs(1), wait).await {
            return ip;
        }
    }
    Err(format!("no answer to query {id}").into())
}
