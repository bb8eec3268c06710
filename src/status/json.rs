//! The status page's JSON: every pool's statistics, with durations in milliseconds.

use serde_json::{json, Value};

use super::{health_str, ms, State};
use crate::stats::{EndpointStats, PoolStats};

/// The JSON document of the pools, as in the [module docs](super).
pub(super) fn render(pools: &[(&str, PoolStats)]) -> Vec<u8> {
    let pools: Vec<Value> = pools.iter().map(|(name, p)| pool(name, p)).collect();
    let mut body = serde_json::to_vec_pretty(&json!({ "pools": pools }))
        .expect("a JSON value always serialises");
    body.push(b'\n');
    body
}

fn pool(name: &str, p: &PoolStats) -> Value {
    json!({
        "name": name,
        "strategy": p.strategy,
        "version": p.version,
        "panic": p.panic,
        "tier": p.tier.map(|t| t.0),
        "in_flight": p.in_flight,
        "requests": p.requests(),
        "errors": p.errors(),
        "eligible": p.eligible(),
        "endpoints": p.endpoints.iter().map(endpoint).collect::<Vec<_>>(),
    })
}

fn endpoint(e: &EndpointStats) -> Value {
    let state = State::of(e);
    let last_check = e.last_check.as_ref().map(|c| {
        json!({
            "ok": c.passed(),
            "error": c.error,
            "took_ms": ms(c.took),
            "ago_ms": ms(c.at.elapsed()),
        })
    });
    json!({
        "id": e.id.as_str(),
        "addr": e.addr.map(|a| a.to_string()),
        "state": state.as_str(),
        "health": health_str(e.health),
        "eligible": e.eligible,
        "drained": e.weight == 0,
        "warming_up": e.warming_up,
        "weight": e.weight,
        "effective_weight": e.effective_weight,
        "tier": e.tier.0,
        "in_flight": e.in_flight,
        "requests": e.requests,
        "errors": e.errors,
        "cancelled": e.cancelled,
        "consecutive_failures": e.consecutive_failures,
        "state_for_ms": e.health_changed.map(ms),
        "latency_ms": {
            "count": e.latency.count,
            "mean": ms(e.latency.mean),
            "p50": ms(e.latency.p50),
            "p90": ms(e.latency.p90),
            "p99": ms(e.latency.p99),
            "p999": ms(e.latency.p999),
        },
        "latency_ewma_ms": ms(e.latency_ewma),
        "last_check": last_check,
    })
}
