//! Kubernetes discovery against a local HTTP server that speaks the part of the API the
//! watch uses: the EndpointSlice list, and a watch whose events (JSON lines) the test sends
//! one by one. kube-rs's client talks to it over a real socket on 127.0.0.1; no cluster.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lbkit::discover::kube::KubeDiscovery;
use lbkit::strategy::RoundRobin;
use lbkit::{Endpoint, EndpointId, Pool};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use common::{wait_until, within, HANG};

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";

/// The fake API server: the slices a list returns, the watch events it streams, and what it
/// was asked.
struct ApiServer {
    url: String,
    list: Mutex<Vec<Value>>,
    events: broadcast::Sender<Value>,
    watches: AtomicUsize,
    selectors: Mutex<Vec<String>>,
}

impl ApiServer {
    async fn start(list: Vec<Value>) -> Arc<ApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = Arc::new(ApiServer {
            url: format!("http://{}", listener.local_addr().expect("address")),
            list: Mutex::new(list),
            events: broadcast::channel(64).0,
            watches: AtomicUsize::new(0),
            selectors: Mutex::new(Vec::new()),
        });
        let api = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| api.clone().serve(req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        server
    }

    async fn serve(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), percent_decode(v)))
            .collect();
        let json = |status: u16, body: Value| {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())).boxed())
                .expect("response")
        };
        if req.uri().path() != SLICES {
            return Ok(json(404, json!({"kind": "Status", "code": 404})));
        }
        if let Some(selector) = query.get("labelSelector") {
            self.selectors.lock().unwrap().push(selector.clone());
        }
        if query.get("watch").map(String::as_str) != Some("true") {
            let items = self.list.lock().unwrap().clone();
            return Ok(json(
                200,
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                }),
            ));
        }
        // A watch: every event sent from now on, one JSON object per line.
        let events = self.events.subscribe();
        self.watches.fetch_add(1, Ordering::SeqCst);
        let stream = futures::stream::unfold(events, |mut events| async move {
            let event = events.recv().await.ok()?;
            let line = Bytes::from(format!("{event}\n"));
            Some((Ok::<_, Infallible>(Frame::data(line)), events))
        });
        Ok(Response::builder()
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .expect("response"))
    }

    /// Sends a watch event to every open watch.
    fn send(&self, kind: &str, object: Value) {
        self.events
            .send(json!({"type": kind, "object": object}))
            .expect("a watch is open");
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8")
}

/// An endpoint of a slice: its address, zone and conditions.
fn endpoint(ip: &str, zone: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "zone": zone,
    })
}

/// An EndpointSlice of Service `web` (ports `metrics` 9090 and `http` 8080).
fn slice(name: &str, version: u32, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "resourceVersion": version.to_string(),
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
            {"name": "http", "port": 8080, "protocol": "TCP"},
        ],
        "endpoints": endpoints,
    })
}

/// The pool's endpoints as (id, weight, zone).
fn members(pool: &Pool<EndpointId, RoundRobin>) -> Vec<(String, u32, Option<String>)> {
    pool.endpoints()
        .into_iter()
        .map(|(e, _)| (e.id().to_string(), e.weight(), e.zone().map(str::to_owned)))
        .collect()
}

fn member(id: &str, weight: u32, zone: &str) -> (String, u32, Option<String>) {
    (id.to_owned(), weight, Some(zone.to_owned()))
}

/// List, then watch: ready endpoints in rotation, serving-and-terminating ones draining
/// (weight 0), the rest out; zones kept; modified, added and deleted slices followed; the
/// task stops with the pool.
#[tokio::test]
async fn follows_endpoint_slices() {
    within(Duration::from_secs(120), async {
        let api = ApiServer::start(vec![slice(
            "web-1",
            2,
            vec![
                endpoint("127.0.0.2", "a", true, true, false),
                endpoint("127.0.0.3", "b", true, true, false),
                endpoint("127.0.0.4", "b", false, true, true),
                endpoint("127.0.0.5", "c", false, false, false),
            ],
        )])
        .await;
        let config = kube::Config::new(api.url.parse().expect("url"));
        let client = kube::Client::try_from(config).expect("client");
        let pool = Pool::new(RoundRobin::new(), |e: &Endpoint| e.id().clone());
        let task = KubeDiscovery::new("shop", "web")
            .port_name("http")
            .client(client)
            .spawn(&pool)
            .await
            .expect("discovery starts");

        let listed = vec![
            member("127.0.0.2:8080", 1, "a"),
            member("127.0.0.3:8080", 1, "b"),
            member("127.0.0.4:8080", 0, "b"),
        ];
        wait_until(HANG, "the listed endpoints", || members(&pool) == listed).await;
        let eligible: Vec<String> = pool
            .snapshot()
            .eligible()
            .iter()
            .map(|c| c.id().to_string())
            .collect();
        assert_eq!(eligible.len(), 2, "the draining endpoint gets no request");
        assert!(api
            .selectors
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "kubernetes.io/service-name=web"));

        wait_until(HANG, "the watch", || api.watches.load(Ordering::SeqCst) > 0).await;
        // 127.0.0.2 starts terminating (drains), 127.0.0.5 becomes ready.
        api.send(
            "MODIFIED",
            slice(
                "web-1",
                3,
                vec![
                    endpoint("127.0.0.2", "a", false, true, true),
                    endpoint("127.0.0.3", "b", true, true, false),
                    endpoint("127.0.0.5", "c", true, true, false),
                ],
            ),
        );
        let modified = vec![
            member("127.0.0.2:8080", 0, "a"),
            member("127.0.0.3:8080", 1, "b"),
            member("127.0.0.5:8080", 1, "c"),
        ];
        wait_until(HANG, "the modified slice", || members(&pool) == modified).await;

        // A second slice joins; then the first one is deleted.
        api.send(
            "ADDED",
            slice("web-2", 4, vec![endpoint("127.0.0.6", "c", true, true, false)]),
        );
        wait_until(HANG, "the added slice", || members(&pool).len() == 4).await;
        api.send("DELETED", slice("web-1", 5, vec![]));
        wait_until(HANG, "the deleted slice", || {
            members(&pool) == vec![member("127.0.0.6:8080", 1, "c")]
        })
        .await;

        drop(pool);
        // The next event finds the pool gone (or the pool's watch closes first).
        let _ = api.events.send(json!({"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": "6"}}}));
        wait_until(HANG, "the task to stop", || task.is_finished()).await;
    })
    .await;
}

/// Names that are not Kubernetes names are refused before anything is sent.
#[tokio::test]
async fn bad_names_are_config_errors() {
    let api = ApiServer::start(Vec::new()).await;
    let client =
        kube::Client::try_from(kube::Config::new(api.url.parse().expect("url"))).expect("client");
    let pool = Pool::new(RoundRobin::new(), |e: &Endpoint| e.id().clone());
    for (namespace, service, port) in [
        ("shop", "web,tier=db", "http"),
        ("", "web", "http"),
        ("shop", "web", "HTTP"),
    ] {
        let err = KubeDiscovery::new(namespace, service)
            .port_name(port)
            .client(client.clone())
            .spawn(&pool)
            .await
            .expect_err("refused");
        assert!(err.is_config(), "{err}");
    }
    assert!(api.selectors.lock().unwrap().is_empty());
}
