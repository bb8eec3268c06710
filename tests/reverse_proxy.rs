//! The README's proxy, `examples/reverse_proxy.rs`, run as users run it (its own `proxy`
//! function, compiled into this test), in front of real backends on 127.0.0.1: a backend
//! killed under load costs no client a request, and traffic goes back to it once it returns.
//!
//! No assertion depends on how fast the machine is: the load is counted in requests, and the
//! time limits only catch hangs.

#[path = "../examples/reverse_proxy.rs"]
#[allow(dead_code)]
mod reverse_proxy;

mod common;

use std::time::Duration;

use common::fault::{start_server_at, Load};
use lbkit::endpoint::Health;
use tokio::net::TcpListener;

const HANG: Duration = Duration::from_secs(60);

/// Starts the example's proxy over `endpoints` with short health-check and ejection timers.
async fn start_proxy(
    endpoints: Vec<lbkit::Endpoint>,
) -> (
    std::net::SocketAddr,
    lbkit::Pool<lbkit::balance::Target, lbkit::strategy::AnyStrategy>,
    tokio::task::JoinHandle<()>,
) {
    let args = reverse_proxy::Args {
        check_interval: Duration::from_millis(100),
        ejection_time: Duration::from_millis(500),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (pool, serving) = reverse_proxy::proxy(endpoints, &args, listener, std::future::pending());
    (addr, pool, tokio::spawn(serving))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_no_request_and_gets_traffic_back() {
    let mut servers = common::start_servers(3).await;
    let (addr, pool, task) = start_proxy(common::endpoints(&servers)).await;

    let load = Load::start(addr, 8, 20_000, Duration::ZERO);
    load.wait_for(300, HANG).await;
    // Kill one backend: its listener and every open connection close at once, with requests
    // in flight on some of them.
    let victim = servers.remove(1);
    let (name, victim_addr) = (victim.name().to_owned(), victim.addr());
    drop(victim);
    let id = lbkit::EndpointId::from(name.as_str());
    common::wait_until(HANG, "the killed backend to be taken out", || {
        pool.health(&id) != Some(Health::Healthy)
    })
    .await;
    load.wait_for(1_000, HANG).await;

    // Bring it back on its port; once the health check and outlier detection let it in,
    // requests reach it again.
    let _back = start_server_at(&name, victim_addr).await;
    common::wait_until(HANG, "the restarted backend to be healthy again", || {
        pool.health(&id) == Some(Health::Healthy)
    })
    .await;
    load.wait_for(300, HANG).await;
    let report = load.stop().await;
    // Round robin over three healthy backends: a third of these go to the one that returned.
    let after = Load::start(addr, 1, 30, Duration::ZERO).finish().await;
    task.abort();

    assert_eq!(
        report.failures,
        0,
        "{} of {} requests failed: {:?} (e.g. {:?})",
        report.failures,
        report.sent,
        report.failure_kinds,
        report.sample_failures()
    );
    assert_eq!(after.failures, 0, "{:?}", after.sample_failures());
    assert!(
        after.by_backend.get(&name).copied().unwrap_or(0) > 0,
        "no request reached the restarted backend: {:?}",
        after.by_backend
    );
}
