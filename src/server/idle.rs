//! HTTP/1.1 connections that hold no buffers while idle.
//!
//! hyper's HTTP/1.1 connection keeps, for as long as it lives, an 8 KiB read buffer, an 8 KiB
//! buffer for response heads and a boxed slot the size of the service's request future;
//! inside the connection's task they made an idle keep-alive connection cost about 40 KiB.
//! As nginx frees a keep-alive connection's buffers and waits for the next request with none,
//! the server takes an HTTP/1.1 connection apart (hyper's `into_parts`) once it has waited for
//! its client's next request ([`Activity::parkable`]) for between one and two times
//! [`PARK_AFTER`](super::conn::PARK_AFTER) (1 s; a busy connection is never taken apart, so
//! its requests cost nothing more), or at once when more than
//! [`PARK_AT_ONCE_ABOVE`](super::conn::PARK_AT_ONCE_ABOVE) (256) HTTP/1.1 connections are
//! open; keeps only the socket and the connection's service, waits until the socket is
//! readable, and builds hyper's connection again for the next request.
//! A parked connection costs about 3 KiB (its task, the socket's registration), against about
//! 40 KiB before.
//!
//! Only plain TCP connections that start with HTTP/1.1 are parked: a TLS session keeps
//! buffers of its own, and HTTP/2 keeps its state (streams, flow control, settings) for the
//! life of the connection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::accept::Drain;
use super::conn::{drive, started, Activity, Driven, IdleRules, IoSeen};
use crate::error::BoxError;

/// HTTP/2's connection preface: a client that starts with it speaks HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the client's first bytes say about its protocol.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sniffed {
    /// Not HTTP/2's preface: HTTP/1.1.
    Http1,
    /// HTTP/2's preface, or too little of the start to tell.
    Other,
    /// The client closed the connection before sending anything.
    Closed,
}

/// Waits for the client's first bytes and looks at them without consuming them (`peek`), so
/// that hyper reads the request from the socket itself (no rewound prefix, which made hyper
/// grow its read buffer to 16 KiB).
pub(super) async fn sniff(stream: &TcpStream) -> io::Result<Sniffed> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut buf).await?;
    Ok(if n == 0 {
        Sniffed::Closed
    } else if buf[..n] == H2_PREFACE[..n] {
        Sniffed::Other
    } else {
        Sniffed::Http1
    })
}

/// How a server serves its plain HTTP/1.1 connections.
pub(super) struct Http1 {
    /// hyper's settings for them.
    pub(super) builder: http1::Builder,
    /// How many are open.
    pub(super) open: AtomicUsize,
}

/// Serves an HTTP/1.1 connection with `http1.builder` until it ends, parking it while idle (see the
/// [module docs](self)); the rules of [`drive`] apply while hyper's connection exists, and a
/// parked connection closes after `rules.idle_h1` or when the server drains. The caller counts
/// the connection in `http1.open`.
pub(super) async fn serve_http1<S, B>(
    http1: &Http1,
    mut stream: TcpStream,
    mut service: S,
    activity: &Arc<Activity>,
    rules: IdleRules,
    accepted: Instant,
    drain: &mut Option<Drain>,
) -> Result<(), hyper::Error>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Unpin + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut prefix = Bytes::new();
    loop {
        let io = TokioIo::new(Watched {
            stream,
            prefix,
            seen: activity.io.clone(),
        });
        // Boxed: the connection's task stays small while it is parked.
        let mut conn = Box::new(http1.builder.serve_connection(io, service).with_upgrades());
        let driven = drive(
            Pin::new(&mut *conn),
            activity,
            rules,
            accepted,
            drain,
            Some(&http1.open),
            |c| c.graceful_shutdown(),
        )
        .await;
        match driven {
            Driven::Done(out) => return out,
            Driven::Close => return Ok(()),
            Driven::Idle => {}
        }
        // Idle between requests: keep the socket and the service, free the rest.
        let Some(parts) = conn.into_parts() else {
            return Ok(()); // upgraded (its future has ended before this)
        };
        let watched = parts.io.into_inner();
        service = parts.service;
        stream = watched.stream;
        prefix = join(parts.read_buf, watched.prefix);
        activity.io.read_waiting.store(false, Ordering::Relaxed);
        if !prefix.is_empty() {
            continue; // part of the next request was read: hyper parses it at once
        }
        let parked = Instant::now();
        tokio::select! {
            biased;
            () = started(drain) => return Ok(()),
            ready = stream.readable() => {
                if ready.is_err() {
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(parked + rules.idle_h1) => {
                tracing::debug!("idle: closing the connection");
                return Ok(());
            }
        }
    }
}

/// Bytes hyper had read but not parsed, then bytes it had not read yet. (An empty buffer is
/// dropped, not kept: hyper's empty read buffer still owns its 8 KiB.)
fn join(read: Bytes, unread: Bytes) -> Bytes {
    if read.is_empty() && unread.is_empty() {
        Bytes::new()
    } else if unread.is_empty() {
        read
    } else if read.is_empty() {
        unread
    } else {
        let mut both = BytesMut::with_capacity(read.len() + unread.len());
        both.extend_from_slice(&read);
        both.extend_from_slice(&unread);
        both.freeze()
    }
}

/// The socket as hyper's HTTP/1.1 connection uses it: bytes left from a parked connection are
/// read first, and what hyper does with it is noted for the connection's [`Activity`] (whether
/// its last read found no data, whether bytes came since the last request started, whether
/// all it wrote was flushed), which tells when the connection can be parked.
struct Watched {
    stream: TcpStream,
    prefix: Bytes,
    seen: Arc<IoSeen>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let seen = &this.seen;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            seen.read_waiting.store(false, Ordering::Relaxed);
            seen.read_since_call.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let out = Pin::new(&mut this.stream).poll_read(cx, buf);
        seen.read_waiting.store(out.is_pending(), Ordering::Relaxed);
        if buf.filled().len() > before {
            seen.read_since_call.store(true, Ordering::Relaxed);
        }
        out
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.seen.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.seen.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    // hyper flushes the socket only once its own buffer is empty: a completed flush means
    // everything written so far is with the kernel.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let out = Pin::new(&mut this.stream).poll_flush(cx);
        if let Poll::Ready(Ok(())) = out {
            this.seen.unflushed.store(false, Ordering::Relaxed);
        }
        out
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
