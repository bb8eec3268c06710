//! One case of the `compare` benchmarks in a plain loop, for a profiler: callgrind counts the
//! instructions of `measured` (steady on a noisy machine), perf samples it.
//!
//! ```text
//! cargo bench --bench profile --no-run          # prints the binary's path
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measured*' \
//!     target/release/deps/profile-<hash> p2c_lbkit_call 1000 200000
//! callgrind_annotate --inclusive=yes callgrind.out.<pid>
//! perf record -e cpu-clock -g target/release/deps/profile-<hash> p2c_lbkit_call 1000 20000000
//! ```
//!
//! Cases: `p2c_lbkit_pick`, `p2c_lbkit_call`, `p2c_tower_call`, `ewma_lbkit_pick`,
//! `ewma_lbkit_call`, `ewma_tower_call`, `rr_lbkit_pick`, `rr_pingora`, `maglev_lbkit`,
//! `ring_lbkit`, `ketama_pingora`; `maglev_small_table_lbkit` (Maglev with a 65 537-slot table
//! at any size); `update_lbkit_p2c`, `update_lbkit_maglev`, `update_lbkit_ring` (one endpoint
//! inserted and removed per iteration); `sizes` (the bytes of the futures each call moves).
//! Arguments: case, endpoints (default 1 000), iterations (default 1 000 000). Prints the wall
//! time per iteration of the loop alone (meaningless under valgrind).
//! `bash callgrind.sh` runs the matched cases under callgrind and prints their table.

mod common;

use std::hint::black_box;
use std::time::Instant;

use common::*;
use lbkit::strategy::{Maglev, PeakEwma, PowerOfTwoChoices, Ring, RoundRobin};
use lbkit::{Balancer, PickHints};
use pingora_load_balancing::selection::consistent::KetamaHashing;
use pingora_load_balancing::selection::RoundRobin as PingoraRoundRobin;

/// The loop the profilers look at: `iters` calls of `f`. Prints the wall time per call
/// (meaningless under valgrind).
#[inline(never)]
fn measured(iters: u64, mut f: impl FnMut()) {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let per = start.elapsed().as_secs_f64() * 1e9 / iters as f64;
    println!("{iters} iterations, {per:.1} ns each");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; ignore flags.
    let args: Vec<&str> = args[1..]
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let case = args.first().copied().unwrap_or("p2c_lbkit_call");
    let n: usize = args.get(1).map_or(1000, |a| a.parse().expect("endpoints"));
    let iters: u64 = args
        .get(2)
        .map_or(1_000_000, |a| a.parse().expect("iterations"));
    print!("{case} n={n}: ");
    match case {
        "p2c_lbkit_pick" => {
            let pool = lbkit_pool(PowerOfTwoChoices::new(), n);
            measured(iters, || drop(black_box(pool.pick(black_box(None)))));
        }
        "p2c_lbkit_call" => {
            let mut b = Balancer::from_pool(lbkit_pool(PowerOfTwoChoices::new(), n)).with_completion(lbkit::balance::CompleteOnResponse);
            measured(iters, || drop(black_box(send(&mut b))));
        }
        "p2c_tower_call" => {
            let mut b = tower_p2c(n);
            measured(iters, || drop(black_box(send(&mut b))));
        }
        "ewma_lbkit_pick" => {
            let pool = lbkit_pool(PeakEwma::new(), n);
            measured(iters, || drop(black_box(pool.pick(black_box(None)))));
        }
        "ewma_lbkit_call" => {
            let mut b = Balancer::from_pool(lbkit_pool(PeakEwma::new(), n)).with_completion(lbkit::balance::CompleteOnResponse);
            measured(iters, || drop(black_box(send(&mut b))));
        }
        "ewma_tower_call" => {
            let mut b = tower_peak_ewma(n);
            measured(iters, || drop(black_box(send(&mut b))));
        }
        "rr_lbkit_pick" => {
            let pool = lbkit_pool(RoundRobin::new(), n);
            measured(iters, || drop(black_box(pool.pick(black_box(None)))));
        }
        "rr_pingora" => {
            let lb = pingora_lb::<PingoraRoundRobin>(n);
            measured(iters, || drop(black_box(lb.select(black_box(b""), 256))));
        }
        "maglev_small_table_lbkit" => {
            // Maglev with the smallest default table (65 537 slots, 256 KiB) whatever the size:
            // how much of the cost at 10 000 endpoints is the table's cache misses.
            let mut keys = Keys(0);
            let mut hints = PickHints::default();
            let pool = lbkit_pool(Maglev::new().table_size(Maglev::MIN_TABLE), n);
            measured(iters, || {
                hints.set_hash_key(&keys.next());
                drop(black_box(pool.pick(Some(black_box(&hints)))));
            });
        }
        "maglev_lbkit" | "ring_lbkit" => {
            let mut keys = Keys(0);
            let mut hints = PickHints::default();
            if case == "maglev_lbkit" {
                let pool = lbkit_pool(Maglev::new(), n);
                measured(iters, || {
                    hints.set_hash_key(&keys.next());
                    drop(black_box(pool.pick(Some(black_box(&hints)))));
                });
            } else {
                let pool = lbkit_pool(Ring::new(), n);
                measured(iters, || {
                    hints.set_hash_key(&keys.next());
                    drop(black_box(pool.pick(Some(black_box(&hints)))));
                });
            }
        }
        "ketama_pingora" => {
            let lb = pingora_lb::<KetamaHashing>(n);
            let mut keys = Keys(0);
            measured(iters, || drop(black_box(lb.select(&keys.next(), 256))));
        }
        "update_lbkit_p2c" | "update_lbkit_maglev" | "update_lbkit_ring" => {
            // One endpoint inserted into a pool of `n` and removed again, per iteration.
            fn run<St: lbkit::strategy::Strategy>(st: St, n: usize, iters: u64) {
                let pool = lbkit_pool(st, n);
                let id = lbkit::endpoint::EndpointId::new(addr(n));
                measured(iters, || {
                    pool.insert(lbkit::Endpoint::new(id.clone()));
                    pool.remove(&id);
                });
            }
            match case {
                "update_lbkit_p2c" => run(PowerOfTwoChoices::new(), n, iters),
                "update_lbkit_maglev" => run(Maglev::new(), n, iters),
                _ => run(Ring::new(), n, iters),
            }
        }
        "sizes" => {
            // The sizes of what each call moves around.
            use tower::Service;
            let mut lb = Balancer::from_pool(lbkit_pool(PowerOfTwoChoices::new(), n)).with_completion(lbkit::balance::CompleteOnResponse);
            let mut tw = tower_p2c(n);
            now(std::future::poll_fn(|cx| tw.poll_ready(cx))).expect("ready");
            let req = Request::new(());
            println!("http::Request<()>: {} bytes", std::mem::size_of_val(&req));
            let f = lb.call(Request::new(()));
            println!(
                "lbkit Balancer::call future: {} bytes",
                std::mem::size_of_val(&f)
            );
            let g = tw.call(Request::new(()));
            println!(
                "tower Balance::call future: {} bytes",
                std::mem::size_of_val(&g)
            );
            println!(
                "lbkit Pool::pick output: {} bytes",
                std::mem::size_of::<Option<(lbkit::endpoint::Candidate, ReadyOk)>>()
            );
        }
        other => panic!("unknown case {other}"),
    }
}
