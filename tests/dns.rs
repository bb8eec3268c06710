//! DNS discovery against a real DNS server, run inside each test on 127.0.0.1 (UDP).
//!
//! The server is a small responder built on hickory-proto: it parses each query and answers it
//! from a zone the test changes while the discovery runs, or, when told, with SERVFAIL, an
//! empty answer or garbage bytes.
//!
//! Nothing here depends on how fast the machine is: polls are counted in the queries the server
//! gets, the waits are for the pool's changes, and the time limits only catch hangs.
#![cfg(feature = "dns")]

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::xfer::Protocol;
use lbkit::discover::dns::{
    DnsDiscovery, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts,
};
use lbkit::strategy::RoundRobin;
use lbkit::{Endpoint, Pool, Tier};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// From the zone: the records, NOERROR with none for a known name, NXDOMAIN otherwise.
    Zone,
    /// SERVFAIL to everything.
    ServFail,
    /// NOERROR with no records to everything.
    Empty,
    /// Bytes that carry the query's id but do not parse as a DNS message.
    Garbage,
}

/// The records the server holds, by lower-case name without the final dot.
struct Zone {
    mode: Mode,
    ttl: u32,
    ips: HashMap<String, Vec<IpAddr>>,
    srv: HashMap<String, Vec<SRV>>,
}

impl Zone {
    fn set_ips(&mut self, name: &str, ips: &[&str]) {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        self.ips.insert(key(name), ips);
    }

    /// `(priority, weight, port, target)` records.
    fn set_srv(&mut self, name: &str, records: &[(u16, u16, u16, &str)]) {
        let records = records
            .iter()
            .map(|&(priority, weight, port, target)| {
                SRV::new(priority, weight, port, Name::from_ascii(target).unwrap())
            })
            .collect();
        self.srv.insert(key(name), records);
    }

    /// The reply to one query.
    fn reply(&self, request: &Message) -> Vec<u8> {
        let mut reply = Message::new();
        reply
            .set_id(request.id())
            .set_message_type(MessageType::Response)
            .set_op_code(request.op_code())
            .set_recursion_desired(request.recursion_desired())
            .set_recursion_available(true)
            .set_authoritative(true);
        for q in request.queries() {
            reply.add_query(q.clone());
        }
        match self.mode {
            Mode::Garbage => {
                let mut bytes = request.id().to_be_bytes().to_vec();
                // A header claiming one question and five answers, then junk.
                bytes.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 5, 0, 0, 0, 0]);
                bytes.extend_from_slice(&[0xff, 0x13, 0x37, 0xc0, 0xff, 0xee, 0x00, 0x07]);
                return bytes;
            }
            Mode::ServFail => {
                reply.set_response_code(ResponseCode::ServFail);
            }
            Mode::Empty => {}
            Mode::Zone => {
                let q = request.query().expect("a question");
                let name = key(&q.name().to_ascii());
                let known = self.ips.contains_key(&name) || self.srv.contains_key(&name);
                if !known {
                    reply.set_response_code(ResponseCode::NXDomain);
                }
                let mut rdata = Vec::new();
                match q.query_type() {
                    RecordType::A | RecordType::AAAA => {
                        for ip in self.ips.get(&name).into_iter().flatten() {
                            match (ip, q.query_type()) {
                                (IpAddr::V4(ip), RecordType::A) => rdata.push(RData::A(A(*ip))),
                                (IpAddr::V6(ip), RecordType::AAAA) => {
                                    rdata.push(RData::AAAA(AAAA(*ip)))
                                }
                                _ => {}
                            }
                        }
                    }
                    RecordType::SRV => {
                        for srv in self.srv.get(&name).into_iter().flatten() {
                            rdata.push(RData::SRV(srv.clone()));
                        }
                    }
                    _ => {}
                }
                for data in rdata {
                    reply.add_answer(Record::from_rdata(q.name().clone(), self.ttl, data));
                }
            }
        }
        reply.to_vec().expect("an encodable reply")
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A DNS server on 127.0.0.1 that answers from a [`Zone`] the test can change at any time.
struct DnsServer {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl DnsServer {
    async fn start() -> Self {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone {
            mode: Mode::Zone,
            ttl: 1,
            ips: HashMap::new(),
            srv: HashMap::new(),
        }));
        let queries = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let zone = zone.clone();
            let queries = queries.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(request) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    let reply = zone.lock().unwrap().reply(&request);
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        DnsServer {
            addr,
            zone,
            queries,
            task,
        }
    }

    fn zone(&self, f: impl FnOnce(&mut Zone)) {
        f(&mut self.zone.lock().unwrap());
    }

    fn mode(&self, mode: Mode) {
        self.zone(|z| z.mode = mode);
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    /// A resolver configuration that asks this server only, over UDP.
    fn config(&self) -> ResolverConfig {
        let mut config = ResolverConfig::new();
        config.add_name_server(NameServerConfig::new(self.addr, Protocol::Udp));
        config
    }

    /// A discovery aimed at this server, with short intervals for tests and a query timeout
    /// no answer of this server comes close to, however busy the machine.
    fn discovery(&self, base: DnsDiscovery) -> DnsDiscovery {
        self.discovery_with_timeout(base, Duration::from_secs(10))
    }

    /// [`discovery`](Self::discovery) with a query timeout of `timeout`: a short one where
    /// the server answers garbage (a lookup then fails only when it times out).
    fn discovery_with_timeout(&self, base: DnsDiscovery, timeout: Duration) -> DnsDiscovery {
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        base.resolver_config(self.config())
            .resolver_opts(opts)
            .min_ttl(Duration::from_millis(100))
            .max_ttl(Duration::from_secs(2))
            .retry_interval(Duration::from_millis(100))
            // The test server answers with loopback addresses.
            .allow_local(true)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type TestPool = Pool<(), RoundRobin>;

fn new_pool() -> TestPool {
    Pool::new(RoundRobin::new(), |_: &Endpoint| ())
}

/// The pool's endpoint ids, sorted.
fn ids(pool: &TestPool) -> Vec<String> {
    let mut ids: Vec<String> = pool
        .endpoints()
        .into_iter()
        .map(|(e, _)| e.id().to_string())
        .collect();
    ids.sort();
    ids
}

/// How long a test waits for something that must happen; reached only when it hangs.
const HANG: Duration = Duration::from_secs(30);

/// Waits until the pool holds exactly `want` (woken by each new snapshot of the pool, so it
/// looks as soon as the pool changes); returns how long it took. Panics after [`HANG`].
async fn wait_for(pool: &TestPool, want: &[&str]) -> Duration {
    let start = Instant::now();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut versions = pool.watch();
    loop {
        versions.borrow_and_update();
        if ids(pool) == want {
            return start.elapsed();
        }
        let changed = tokio::time::timeout_at((start + HANG).into(), versions.changed()).await;
        assert!(
            changed.is_ok(),
            "pool is {:?}, expected {want:?} within {HANG:?}",
            ids(pool)
        );
        changed.unwrap().expect("the pool is alive");
    }
}

/// Waits until `server` has answered `n` more queries; panics after [`HANG`].
async fn wait_queries(server: &DnsServer, n: usize) {
    let target = server.queries() + n;
    let deadline = Instant::now() + HANG;
    while server.queries() < target {
        assert!(Instant::now() < deadline, "discovery stopped polling");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a test body with a hard time limit; `RUST_LOG=lbkit=debug` shows the discovery's logs.
async fn bounded(body: impl Future<Output = ()>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(Duration::from_secs(120), body)
        .await
        .expect("test took too long");
}

#[tokio::test]
async fn pool_follows_a_and_aaaa_records() {
    bounded(async {
        let server = DnsServer::start().await;
        server.zone(|z| z.set_ips("backend.test", &["127.0.0.10", "127.0.0.11"]));
        let pool = new_pool();
        // No final dot: the search path (empty here) is applied as for any name.
        let task = server
            .discovery(DnsDiscovery::host("backend.test", 8080))
            .spawn(&pool)
            .unwrap();

        let first = wait_for(&pool, &["127.0.0.10:8080", "127.0.0.11:8080"]).await;
        let kept = pool.state(&"127.0.0.11:8080".into()).unwrap();
        for (e, _) in pool.endpoints() {
            assert_eq!((e.weight(), e.tier()), (1, Tier::PRIMARY));
        }

        // One address leaves, one joins, and an AAAA record appears.
        let queries_before = server.queries();
        server.zone(|z| z.set_ips("backend.test", &["127.0.0.11", "127.0.0.12", "::1"]));
        let followed = wait_for(&pool, &["127.0.0.11:8080", "127.0.0.12:8080", "[::1]:8080"]).await;
        let queries = server.queries() - queries_before;
        eprintln!(
            "first set after {first:?}; record change followed after {followed:?} and \
             {queries} queries (TTL 1 s)"
        );
        // The next poll (at the TTL, not later) follows the change: its two queries, A and
        // AAAA, and maybe the second one of a poll under way at the change.
        assert!(
            queries <= 3,
            "the change was followed after {queries} queries: more than one poll"
        );
        let still = pool.state(&"127.0.0.11:8080".into()).unwrap();
        assert!(
            Arc::ptr_eq(&kept, &still),
            "an address that stays keeps its live state"
        );

        // A one-shot lookup sees the same answer.
        let once = server
            .discovery(DnsDiscovery::host("backend.test.", 9000))
            .resolve_once()
            .await
            .unwrap();
        // Each endpoint carries the name it was found under (without the final dot), for
        // TLS to it.
        assert!(once.iter().all(|e| e.host() == Some("backend.test")));
        let once: Vec<String> = once.iter().map(|e| e.id().to_string()).collect();
        assert_eq!(once, ["127.0.0.11:9000", "127.0.0.12:9000", "[::1]:9000"]);
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn answers_cannot_point_at_loopback_link_local_or_mapped_addresses_by_default() {
    bounded(async {
        let server = DnsServer::start().await;
        server.zone(|z| {
            z.set_ips(
                "mixed.test",
                &[
                    "127.0.0.1",
                    "169.254.169.254",
                    "10.0.0.5",
                    "::ffff:127.0.0.1",
                    "fe80::1",
                    "::ffff:10.0.0.6",
                ],
            )
        });
        let strict = server
            .discovery(DnsDiscovery::host("mixed.test.", 80))
            .allow_local(false)
            .resolve_once()
            .await
            .unwrap();
        let strict: Vec<String> = strict.iter().map(|e| e.id().to_string()).collect();
        // Private addresses stay; a mapped one is taken as IPv4.
        assert_eq!(strict, ["10.0.0.5:80", "10.0.0.6:80"]);

        let capped = server
            .discovery(DnsDiscovery::host("mixed.test.", 80))
            .max_endpoints(2)
            .resolve_once()
            .await
            .unwrap();
        assert_eq!(capped.len(), 2);

        server.zone(|z| z.set_ips("meta.test", &["169.254.169.254"]));
        let err = server
            .discovery(DnsDiscovery::host("meta.test.", 80))
            .allow_local(false)
            .resolve_once()
            .await
            .unwrap_err();
        assert!(err.is_bad_record(), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn srv_records_give_ports_weights_and_tiers() {
    bounded(async {
        let server = DnsServer::start().await;
        server.zone(|z| {
            z.set_srv(
                "_http._tcp.svc.test",
                &[
                    (10, 5, 8001, "a.svc.test."),
                    (10, 1, 8002, "b.svc.test."),
                    (20, 3, 8003, "c.svc.test."),
                    // Lower priority value, but the target does not exist: skipped, and it
                    // takes no tier.
                    (5, 9, 8004, "gone.svc.test."),
                    // "No service here": skipped.
                    (10, 7, 8005, "."),
                ],
            );
            z.set_ips("a.svc.test", &["127.0.0.21"]);
            z.set_ips("b.svc.test", &["127.0.0.22"]);
            z.set_ips("c.svc.test", &["127.0.0.23"]);
        });
        let dns = server.discovery(DnsDiscovery::srv("_http._tcp.svc.test."));

        let want = [
            ("127.0.0.21:8001", 5, Tier::PRIMARY),
            ("127.0.0.22:8002", 1, Tier::PRIMARY),
            ("127.0.0.23:8003", 3, Tier::BACKUP),
        ];
        let described = |eps: &[Endpoint]| -> Vec<(String, u32, Tier)> {
            eps.iter()
                .map(|e| (e.id().to_string(), e.weight(), e.tier()))
                .collect()
        };
        let want: Vec<(String, u32, Tier)> = want
            .iter()
            .map(|(id, w, t)| (id.to_string(), *w, *t))
            .collect();

        let once = dns.resolve_once().await.unwrap();
        assert_eq!(described(&once), want);
        // An SRV endpoint's host name is its record's target.
        let hosts: Vec<_> = once.iter().map(|e| e.host()).collect();
        assert_eq!(
            hosts,
            [Some("a.svc.test"), Some("b.svc.test"), Some("c.svc.test")]
        );

        let pool = new_pool();
        let task = dns.clone().spawn(&pool).unwrap();
        wait_for(
            &pool,
            &["127.0.0.21:8001", "127.0.0.22:8002", "127.0.0.23:8003"],
        )
        .await;
        let eps: Vec<Endpoint> = pool.endpoints().into_iter().map(|(e, _)| e).collect();
        assert_eq!(described(&eps), want);

        // The primary target moves to another port and weight: the pool follows.
        server.zone(|z| {
            z.set_srv(
                "_http._tcp.svc.test",
                &[(10, 2, 9001, "a.svc.test."), (20, 3, 8003, "c.svc.test.")],
            )
        });
        wait_for(&pool, &["127.0.0.21:9001", "127.0.0.23:8003"]).await;
        let eps: Vec<Endpoint> = pool.endpoints().into_iter().map(|(e, _)| e).collect();
        assert_eq!(
            described(&eps),
            [
                ("127.0.0.21:9001".to_string(), 2, Tier::PRIMARY),
                ("127.0.0.23:8003".to_string(), 3, Tier::BACKUP)
            ]
        );

        // Records that are all unusable are a bad answer, not an empty pool.
        server.zone(|z| z.set_srv("_bad._tcp.svc.test", &[(1, 1, 0, "a.svc.test.")]));
        let err = server
            .discovery(DnsDiscovery::srv("_bad._tcp.svc.test."))
            .resolve_once()
            .await
            .unwrap_err();
        assert!(err.is_bad_record(), "{err:?}");
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn failed_garbage_and_empty_answers_keep_the_pool() {
    bounded(async {
        let server = DnsServer::start().await;
        server.zone(|z| z.set_ips("keep.test", &["127.0.0.31", "127.0.0.32"]));
        let pool = new_pool();
        let name = || DnsDiscovery::host("keep.test.", 80);
        // Garbage answers fail a lookup only when it times out: the running discovery has a
        // short timeout, so that it polls on. (Should a good answer be that late on a busy
        // machine, its lookup fails too, and the pool is kept all the same.)
        let task = server
            .discovery_with_timeout(name(), Duration::from_millis(300))
            .spawn(&pool)
            .unwrap();
        let good = ["127.0.0.31:80", "127.0.0.32:80"];
        wait_for(&pool, &good).await;
        let version = *pool.watch().borrow();

        let bad = [
            Mode::ServFail,
            Mode::Garbage,
            Mode::Empty,
            // Back to the zone, but the name is gone: NXDOMAIN.
            Mode::Zone,
        ];
        for mode in bad {
            server.mode(mode);
            if mode == Mode::Zone {
                server.zone(|z| {
                    z.ips.remove("keep.test");
                });
            }
            // A one-shot lookup says what is wrong (with a timeout no answer comes close to,
            // except for garbage, which only a timeout ends)...
            let dns = match mode {
                Mode::Garbage => server.discovery_with_timeout(name(), Duration::from_millis(300)),
                _ => server.discovery(name()),
            };
            let err = dns.resolve_once().await.unwrap_err();
            let expected_kind = match mode {
                Mode::ServFail | Mode::Garbage => err.is_lookup(),
                Mode::Empty | Mode::Zone => err.is_empty_answer(),
            };
            assert!(expected_kind, "{mode:?} gave {err:?}");
            if mode == Mode::ServFail {
                assert!(err.to_string().contains("Server Failure"), "{err}");
            }
            eprintln!("{mode:?}: {err}");
            // ... and the running discovery keeps the pool across several polls (two queries,
            // A and AAAA, per poll).
            wait_queries(&server, 6).await;
            assert_eq!(ids(&pool), good, "{mode:?} changed the pool");
            assert_eq!(*pool.watch().borrow(), version, "{mode:?} republished");
        }

        // A good answer again: the pool follows.
        server.zone(|z| {
            z.mode = Mode::Zone;
            z.set_ips("keep.test", &["127.0.0.33"]);
        });
        wait_for(&pool, &["127.0.0.33:80"]).await;
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn task_stops_when_the_pool_is_dropped() {
    bounded(async {
        let server = DnsServer::start().await;
        server.zone(|z| {
            z.ttl = 3600;
            z.set_ips("stop.test", &["127.0.0.41"]);
        });

        // Dropped during a long sleep (TTL 1 h, bounded to 10 min).
        let pool = new_pool();
        let task: lbkit::pool::PoolTask = server
            .discovery(DnsDiscovery::host("stop.test.", 80))
            .max_ttl(Duration::from_secs(600))
            .spawn(&pool)
            .unwrap();
        wait_for(&pool, &["127.0.0.41:80"]).await;
        drop(pool);
        tokio::time::timeout(HANG, task)
            .await
            .expect("the task ends soon after the pool is dropped");

        // Dropped while lookups fail (time out) and are retried.
        server.mode(Mode::Garbage);
        let pool = new_pool();
        let task = server
            .discovery_with_timeout(
                DnsDiscovery::host("stop.test.", 80),
                Duration::from_millis(300),
            )
            .spawn(&pool)
            .unwrap();
        wait_queries(&server, 2).await;
        drop(pool);
        tokio::time::timeout(HANG, task)
            .await
            .expect("the task ends soon after the pool is dropped");

        // Aborted: the pool keeps what it has.
        server.mode(Mode::Zone);
        let pool = new_pool();
        let task = server
            .discovery(DnsDiscovery::host("stop.test.", 80))
            .spawn(&pool)
            .unwrap();
        wait_for(&pool, &["127.0.0.41:80"]).await;
        task.abort();
        tokio::time::timeout(HANG, task)
            .await
            .expect("an aborted task ends");
        assert_eq!(ids(&pool), ["127.0.0.41:80"]);
    })
    .await;
}

#[tokio::test]
async fn bad_settings_are_refused_at_spawn() {
    let pool = new_pool();
    let config = ResolverConfig::new();
    let err = DnsDiscovery::host("backend.test.", 0)
        .resolver_config(config.clone())
        .spawn(&pool)
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
    let err = DnsDiscovery::host("bad name..test", 80)
        .resolver_config(config)
        .spawn(&pool)
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
}
