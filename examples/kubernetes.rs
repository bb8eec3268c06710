//! A pool that follows a Kubernetes Service's EndpointSlices (feature `kube`), printing its
//! endpoints each time they change: ready ones in rotation, terminating ones draining
//! (weight 0), each with its zone, and the zone routing table when `--zone` is given.
//!
//! Against a real cluster: the client comes from your kubeconfig (`~/.kube/config` or
//! `$KUBECONFIG`, its current context), or from the pod's service account when run inside a
//! cluster, which needs RBAC to `list` and `watch` `endpointslices` in the namespace.
//!
//! ```text
//! kubectl create deployment web --image=nginx --replicas=3
//! kubectl expose deployment web --port=80 --name=web
//! cargo run --example kubernetes -- --namespace default --service web --port-name "" --zone eu-west-1a
//! kubectl scale deployment web --replicas=5     # two endpoints join
//! kubectl rollout restart deployment web        # old pods drain (weight 0), then leave
//! ```
//!
//! `--port-name` is the Service port's name (empty: the slices' first port). Without a
//! cluster it stops with the reason the client could not be made. `tests/kube.rs` runs the
//! same discovery against a local server that speaks the watch API.

use lbkit::discover::kube::KubeDiscovery;
use lbkit::pool::ZoneAware;
use lbkit::strategy::PowerOfTwoChoices;
use lbkit::{Endpoint, Pool};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .init();
    let (mut namespace, mut service, mut port, mut zone) =
        ("default".to_owned(), "web".to_owned(), String::new(), None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            usage();
        };
        match flag.as_str() {
            "--namespace" => namespace = value,
            "--service" => service = value,
            "--port-name" => port = value,
            "--zone" => zone = Some(value),
            _ => usage(),
        }
    }

    let mut builder = Pool::builder(PowerOfTwoChoices::new());
    if let Some(zone) = &zone {
        builder = builder.zone_aware(ZoneAware::new(zone.as_str()));
    }
    // The services here are the addresses: this example only shows the membership.
    let pool = builder.build(|e: &Endpoint| e.socket_addr());
    let mut discovery = KubeDiscovery::new(namespace, service);
    if !port.is_empty() {
        discovery = discovery.port_name(port);
    }
    let _task = match discovery.spawn(&pool).await {
        Ok(task) => task,
        Err(e) => {
            eprintln!("{}", chain(&e));
            std::process::exit(1);
        }
    };
    let mut versions = pool.watch();
    while versions.changed().await.is_ok() {
        let snapshot = pool.snapshot();
        println!("version {}:", snapshot.version());
        for (e, state) in pool.endpoints() {
            let role = if e.weight() == 0 { "draining" } else { "ready" };
            println!(
                "  {:<22} {:<8} zone {:<12} in flight {}",
                e.id(),
                role,
                e.zone().unwrap_or("-"),
                state.in_flight()
            );
        }
        if let Some(shares) = snapshot.zone_shares() {
            let shares: Vec<String> = shares
                .iter()
                .map(|(z, s)| format!("{} {:.1}%", z.as_deref().unwrap_or("-"), s * 100.0))
                .collect();
            println!("  zone routing: {}", shares.join(", "));
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: kubernetes [--namespace NS] [--service NAME] [--port-name NAME] [--zone ZONE]"
    );
    std::process::exit(2);
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
