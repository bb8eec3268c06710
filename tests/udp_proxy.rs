//! The UDP balancer over real UDP sockets on 127.0.0.1.
//!
//! Backends answer each datagram with their name and the datagram; clients resend a question
//! until its answer comes (UDP may drop, even on loopback), matching answers to questions by
//! content. No assertion depends on how fast the machine is: the time limits only catch hangs.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, within, HANG};
use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use lbkit::proxy::UdpProxy;
use lbkit::strategy::{Maglev, RoundRobin, Strategy};
use lbkit::{Endpoint, EndpointId};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// How long a client waits for an answer before it sends its question again.
const RESEND: Duration = Duration::from_millis(300);

/// A UDP backend that answers each datagram with `name|datagram` (or, in DNS mode, with a
/// DNS-style response carrying the query's id).
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    fn id(&self) -> EndpointId {
        EndpointId::from(self.addr)
    }
}

async fn backend(name: &'static str, dns: bool) -> Backend {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let reply = if dns {
                dns_answer(&buf[..n], name)
            } else {
                let mut r = format!("{name}|").into_bytes();
                r.extend_from_slice(&buf[..n]);
                r
            };
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    Backend {
        name,
        addr,
        received,
        task,
    }
}

async fn backends(dns: bool) -> [Backend; 3] {
    [
        backend("a", dns).await,
        backend("b", dns).await,
        backend("c", dns).await,
    ]
}

/// The address a DNS-style backend answers every A query with: 10.0.0.1 for `a`, and so on,
/// so the client sees which backend answered.
fn dns_ip(name: &str) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, name.as_bytes()[0] - b'a' + 1)
}

/// The DNS response of backend `name` to `query`: same id and question, one A record.
fn dns_answer(query: &[u8], name: &str) -> Vec<u8> {
    let Ok(request) = Message::from_vec(query) else {
        return Vec::new();
    };
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    for q in request.queries() {
        reply.add_query(q.clone());
        if q.query_type() == RecordType::A {
            reply.add_answer(Record::from_rdata(
                q.name().clone(),
                0,
                RData::A(A(dns_ip(name))),
            ));
        }
    }
    reply.to_vec().expect("an encodable reply")
}

/// A DNS query for `example.com.` A with `id`.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Message::new();
    q.set_id(id)
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
    q.to_vec().unwrap()
}

/// Starts `proxy` on a fresh socket; returns its address and the serving task.
async fn start<St: Strategy>(proxy: UdpProxy<St>) -> (SocketAddr, JoinHandle<std::io::Result<()>>)
where
    St::State: Send + Sync,
{
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    (addr, tokio::spawn(proxy.serve(socket)))
}

/// A client socket connected to the proxy.
async fn client(proxy: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(proxy).await.unwrap();
    s
}

/// Sends `question` until an answer to it comes; returns the name of the backend that
/// answered. Answers to earlier questions (duplicates of resent ones) are skipped.
async fn ask(client: &UdpSocket, question: &str) -> String {
    let deadline = Instant::now() + HANG;
    let mut buf = vec![0u8; 65_536];
    loop {
        assert!(Instant::now() < deadline, "no answer to {question:?}");
        // A send may report the ICMP error of an earlier one; the question is sent again.
        let _ = client.send(question.as_bytes()).await;
        let wait = async {
            loop {
                let Ok(n) = client.recv(&mut buf).await else {
                    continue;
                };
                let text = std::str::from_utf8(&buf[..n]).unwrap();
                if let Some((name, echoed)) = text.split_once('|') {
                    if echoed == question {
                        return name.to_string();
                    }
                }
            }
        };
        if let Ok(name) = timeout(RESEND, wait).await {
            return name;
        }
    }
}

/// Asks `n` questions tagged `tag`; returns the set of backends that answered.
async fn ask_many(client: &UdpSocket, tag: &str, n: usize) -> HashSet<String> {
    let mut names = HashSet::new();
    for i in 0..n {
        names.insert(ask(client, &format!("{tag}-{i}")).await);
    }
    names
}

/// The one backend that answered `client`'s `n` questions (fails if several did).
async fn backend_of(client: &UdpSocket, tag: &str, n: usize) -> String {
    let names = ask_many(client, tag, n).await;
    assert_eq!(
        names.len(),
        1,
        "one flow went to several backends: {names:?}"
    );
    names.into_iter().next().unwrap()
}

fn name_to_id(backends: &[Backend]) -> HashMap<String, EndpointId> {
    backends
        .iter()
        .map(|b| (b.name.to_string(), b.id()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reach_the_right_client_for_many_concurrent_clients() {
    within(HANG * 2, async {
        let backends = backends(false).await;
        // Round robin: the flow table alone keeps each client on its backend.
        let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), RoundRobin::new());
        let (addr, _serving) = start(proxy.clone()).await;
        let mut clients = Vec::new();
        for c in 0..48 {
            clients.push(tokio::spawn(async move {
                let s = client(addr).await;
                // Each question names its client, so an answer delivered to the wrong client
                // never matches and the asker would hang (caught by HANG).
                backend_of(&s, &format!("client{c}"), 20).await
            }));
        }
        let mut per_backend: HashMap<String, usize> = HashMap::new();
        for c in clients {
            *per_backend.entry(c.await.unwrap()).or_default() += 1;
        }
        // Round robin spreads 48 new flows evenly.
        assert_eq!(per_backend.len(), 3, "{per_backend:?}");
        assert!(per_backend.values().all(|&n| n == 16), "{per_backend:?}");
        let stats = proxy.stats();
        assert_eq!(stats.flows, 48);
        assert_eq!(stats.flows_opened, 48);
        assert!(stats.datagrams_to_backends >= 48 * 20);
        assert!(stats.datagrams_to_clients >= 48 * 20);
        let total: u64 = backends
            .iter()
            .map(|b| b.received.load(Ordering::SeqCst))
            .sum();
        assert!(total >= 48 * 20);
        // Every flow counts in flight at its backend.
        assert_eq!(proxy.pool().in_flight(), 48);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_a_new_client_arrives_whole_and_in_order() {
    within(HANG * 2, async {
        let backends = backends(false).await;
        let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), RoundRobin::new());
        let (addr, _serving) = start(proxy.clone()).await;
        for round in 0..5 {
            // Sent at once, before the flow's upstream socket has seen any readiness event:
            // none is resent, so a datagram lost by the proxy would hang the test.
            let c = client(addr).await;
            for i in 0..10 {
                c.send(format!("burst{round}-{i}").as_bytes())
                    .await
                    .unwrap();
            }
            let mut buf = vec![0u8; 1024];
            let mut got = Vec::new();
            for _ in 0..10 {
                let n = c.recv(&mut buf).await.unwrap();
                let text = std::str::from_utf8(&buf[..n]).unwrap();
                got.push(text.split_once('|').unwrap().1.to_string());
            }
            let sent: Vec<String> = (0..10).map(|i| format!("burst{round}-{i}")).collect();
            assert_eq!(got, sent);
        }
        let stats = proxy.stats();
        assert_eq!(stats.dropped_send, 0);
        assert_eq!(stats.flows_opened, 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_stay_on_their_backend_across_unrelated_pool_changes() {
    within(HANG * 2, async {
        let backends = backends(false).await;
        let extra = backend("d", false).await;
        let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), Maglev::new());
        let (addr, _serving) = start(proxy.clone()).await;
        let mut clients = Vec::new();
        for _ in 0..12 {
            clients.push(client(addr).await);
        }
        let mut before = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            before.push(backend_of(c, &format!("before{i}"), 5).await);
        }
        proxy.pool().insert(Endpoint::from(extra.addr));
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(backend_of(c, &format!("added{i}"), 5).await, before[i]);
        }
        proxy.pool().remove(&extra.id());
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(backend_of(c, &format!("removed{i}"), 5).await, before[i]);
        }
        assert_eq!(extra.received.load(Ordering::SeqCst), 0);
        let stats = proxy.stats();
        assert_eq!(stats.flows_opened, 12);
        assert_eq!(stats.flows_moved, 0);
    })
    .await;
}

/// Marks the backend of the first client down (or removes it): exactly its flows move, the
/// others stay, and every client keeps getting answers.
async fn flows_move_off(remove: bool) {
    let backends = backends(false).await;
    let ids = name_to_id(&backends);
    let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), Maglev::new());
    let (addr, _serving) = start(proxy.clone()).await;
    let mut clients = Vec::new();
    let mut before = Vec::new();
    for i in 0..12 {
        let c = client(addr).await;
        before.push(backend_of(&c, &format!("before{i}"), 3).await);
        clients.push(c);
    }
    let gone = before[0].clone();
    let on_gone = before.iter().filter(|b| **b == gone).count();
    if remove {
        assert!(proxy.pool().remove(&ids[&gone]));
    } else {
        assert!(proxy.pool().set_down(&ids[&gone], true));
    }
    let mut after = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let now = backend_of(c, &format!("after{i}"), 5).await;
        if before[i] == gone {
            assert_ne!(now, gone, "client {i} still on the backend that went away");
        } else {
            assert_eq!(now, before[i], "client {i} moved though its backend stayed");
        }
        after.push(now);
    }
    assert_eq!(proxy.stats().flows_moved, on_gone as u64);
    if !remove {
        // Coming back up moves nothing back: flows move only when their endpoint goes.
        assert!(proxy.pool().set_down(&ids[&gone], false));
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(backend_of(c, &format!("back{i}"), 3).await, after[i]);
        }
        assert_eq!(proxy.stats().flows_moved, on_gone as u64);
    }
    // A moved flow's old task ends a moment after the move.
    wait_until(HANG, "the moved flows' old tasks to end", || {
        proxy.flows() == 12
    })
    .await;
    assert_eq!(proxy.pool().in_flight(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_move_when_their_backend_is_marked_down() {
    within(HANG * 2, flows_move_off(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_move_when_their_backend_is_removed() {
    within(HANG * 2, flows_move_off(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_expire() {
    within(HANG * 2, async {
        let backends = backends(false).await;
        let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), Maglev::new())
            .idle_timeout(Duration::from_millis(200));
        let (addr, _serving) = start(proxy.clone()).await;
        let mut clients = Vec::new();
        let mut first = Vec::new();
        for i in 0..5 {
            let c = client(addr).await;
            first.push(ask(&c, &format!("hello{i}")).await);
            clients.push(c);
        }
        assert_eq!(proxy.stats().flows_opened, 5);
        wait_until(HANG, "idle flows to expire", || proxy.flows() == 0).await;
        assert_eq!(proxy.stats().flows_expired, 5);
        assert_eq!(proxy.pool().in_flight(), 0);
        // A client that comes back gets a new flow, on the same backend (Maglev).
        assert_eq!(backend_of(&clients[0], "again", 3).await, first[0]);
        assert!(proxy.stats().flows_opened >= 6);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_limit_drops_new_clients_only() {
    within(HANG * 2, async {
        let backends = backends(false).await;
        let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), RoundRobin::new()).max_flows(2);
        let (addr, _serving) = start(proxy.clone()).await;
        let (one, two) = (client(addr).await, client(addr).await);
        let b1 = backend_of(&one, "one", 3).await;
        let b2 = backend_of(&two, "two", 3).await;
        let third = client(addr).await;
        for i in 0..5 {
            third.send(format!("third-{i}").as_bytes()).await.unwrap();
        }
        wait_until(HANG, "the third client's datagrams to be dropped", || {
            proxy.stats().dropped_flow_limit == 5
        })
        .await;
        assert_eq!(backend_of(&one, "one-again", 5).await, b1);
        assert_eq!(backend_of(&two, "two-again", 5).await, b2);
        let stats = proxy.stats();
        assert_eq!((stats.flows, stats.flows_opened), (2, 2));
        assert_eq!(stats.dropped_flow_limit, 5);
    })
    .await;
}

/// Sends a DNS query with `id` until its response comes; returns the address in its A
/// record (which names the resolver that answered).
async fn resolve(client: &UdpSocket, id: u16) -> Ipv4Addr {
    let query = dns_query(id);
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + HANG;
    let answer = loop {
        assert!(Instant::now() < deadline, "no answer to query {id}");
        let _ = client.send(&query).await;
        let wait = async {
            loop {
                let Ok(n) = client.recv(&mut buf).await else {
                    continue;
                };
                // The id is the first two bytes of a DNS message.
                if n >= 12 && buf[..2] == id.to_be_bytes() {
                    return buf[..n].to_vec();
                }
            }
        };
        if let Ok(a) = timeout(RESEND, wait).await {
            break a;
        }
    };
    let answer = Message::from_vec(&answer).expect("a DNS message");
    assert_eq!(answer.message_type(), MessageType::Response);
    assert_eq!(answer.queries().len(), 1);
    match answer.answers().first().map(|r| r.data()) {
        Some(RData::A(A(ip))) => *ip,
        _ => panic!("no A record in {answer:?}"),
    }
}

/// Resolves `n` queries from each client, the clients concurrently with the other clients; returns the one
/// resolver each client's flow reached.
async fn resolve_all(clients: &[Arc<UdpSocket>], phase: u16, n: u16) -> Vec<Ipv4Addr> {
    let mut tasks = Vec::new();
    for (c, s) in clients.iter().enumerate() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut ips = HashSet::new();
            for q in 0..n {
                ips.insert(resolve(&s, phase * 10_000 + c as u16 * 100 + q).await);
            }
            assert_eq!(ips.len(), 1, "one resolver per client flow: {ips:?}");
            ips.into_iter().next().unwrap()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_style_backends_answer_by_query_id_and_survive_one_going_down() {
    within(HANG * 2, async {
        let backends = backends(true).await;
        let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), Maglev::new());
        let (addr, _serving) = start(proxy.clone()).await;
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(Arc::new(client(addr).await));
        }
        let before = resolve_all(&clients, 1, 10).await;
        assert_eq!(proxy.stats().flows_opened, 8);
        // The resolver of the first client goes down; its clients move, the others stay.
        let down = backends
            .iter()
            .find(|b| dns_ip(b.name) == before[0])
            .unwrap();
        assert!(proxy.pool().set_down(&down.id(), true));
        let after = resolve_all(&clients, 2, 10).await;
        for (b, a) in before.iter().zip(&after) {
            if *b == before[0] {
                assert_ne!(*a, *b);
            } else {
                assert_eq!(*a, *b);
            }
        }
        let moved = before.iter().filter(|b| **b == before[0]).count();
        assert_eq!(proxy.stats().flows_moved, moved as u64);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_counts_a_failure_and_the_flow_moves() {
    within(HANG * 2, async {
        // A port where nothing listens: datagrams to it come back as ICMP port unreachable.
        let dead = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let live = backend("live", false).await;
        let proxy = UdpProxy::new([dead], RoundRobin::new());
        let (addr, _serving) = start(proxy.clone()).await;
        let c = client(addr).await;
        c.send(b"to-the-dead").await.unwrap();
        wait_until(HANG, "the refusal to be seen", || {
            proxy.stats().backend_errors >= 1
        })
        .await;
        let dead_state = proxy.pool().state(&EndpointId::from(dead)).unwrap();
        wait_until(HANG, "the failure to count at the endpoint", || {
            dead_state.errors() >= 1
        })
        .await;
        // The failed flow moves to the other backend (the dead one is avoided even though
        // it is still eligible).
        proxy.pool().insert(Endpoint::from(live.addr));
        assert_eq!(backend_of(&c, "after", 5).await, "live");
        let stats = proxy.stats();
        assert!(stats.flows_moved >= 1, "{stats:?}");
        wait_until(HANG, "the failed flow's task to end", || proxy.flows() == 1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_receiving_and_drops_flows() {
    within(HANG * 2, async {
        let backends = backends(false).await;
        let proxy = UdpProxy::new(backends.iter().map(|b| b.addr), RoundRobin::new());
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(proxy.clone().serve_with_shutdown(socket, async {
            let _ = rx.await;
        }));
        let mut clients = Vec::new();
        for i in 0..4 {
            let c = client(addr).await;
            ask(&c, &format!("q{i}")).await;
            clients.push(c);
        }
        assert_eq!(proxy.flows(), 4);
        tx.send(()).unwrap();
        serving.await.unwrap().unwrap();
        assert_eq!(proxy.flows(), 0);
        assert_eq!(proxy.pool().in_flight(), 0);
        assert_eq!(proxy.stats().flows_expired, 0);
        // The socket is closed: nothing answers any more. Late answers to resent questions
        // are skipped; a refusal (ICMP port unreachable) or silence is what comes.
        let _ = clients[0].send(b"after-shutdown").await;
        let mut buf = [0u8; 64];
        let late = async {
            loop {
                match clients[0].recv(&mut buf).await {
                    Ok(n) if buf[..n].ends_with(b"|after-shutdown") => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        };
        assert!(!timeout(RESEND, late).await.unwrap_or(false));
    })
    .await;
}
