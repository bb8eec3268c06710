//! lbkit's `Server` when the process runs out of file descriptors (`EMFILE`): it keeps running,
//! retries `accept` after a pause, and serves again once descriptors free up.
//!
//! A test binary of its own, because it lowers this process's descriptor limit. Nothing depends
//! on the machine's speed: the test waits for the server's own "accept failed" events and for
//! the answer, under limits that only catch hangs.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use lbkit::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

const HANG: Duration = Duration::from_secs(30);

/// Counts the server's "accept failed" warnings.
struct AcceptFailures(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AcceptFailures {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}").contains("accept failed") {
                    self.0 = true;
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        if m.0 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count() as u64)
}

fn nofile() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim
}

fn set_nofile(lim: libc::rlimit) {
    // SAFETY: setrlimit reads the struct we pass.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "current_thread")]
async fn the_server_keeps_running_out_of_file_descriptors_and_serves_again() {
    let failures = Arc::new(AtomicU64::new(0));
    tracing_subscriber::registry()
        .with(AcceptFailures(failures.clone()))
        .init();

    let svc = tower::service_fn(|_req: Request<lbkit::server::RequestBody>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
            "ok",
        )))))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(Server::new(svc).serve(listener));

    // The client's socket exists before the table fills up; connecting needs no new one.
    let socket = TcpSocket::new_v4().unwrap();
    let saved = nofile();
    set_nofile(libc::rlimit {
        rlim_cur: (open_fds() + 16).min(saved.rlim_cur),
        rlim_max: saved.rlim_max,
    });
    let mut hog = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("unexpected error filling the descriptor table: {e}"),
        }
    }

    // The kernel completes the handshake, but the server cannot accept: EMFILE, again and
    // again, each logged and waited out.
    let mut client = tokio::time::timeout(HANG, socket.connect(addr))
        .await
        .expect("connect hung")
        .expect("connect");
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(HANG, async {
        while failures.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the server never reported a failed accept");
    assert!(!server.is_finished(), "the server stopped on EMFILE");

    // Descriptors free up: the waiting client is accepted and served.
    drop(hog);
    set_nofile(saved);
    let res = tokio::time::timeout(HANG, read_response(&mut client))
        .await
        .expect("the waiting client was never served");
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.ends_with("ok"), "{res}");
    server.abort();
}
