use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, TE, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use super::check::target;
use super::http::send;
use super::{CheckError, CheckFuture, HealthCheck};
use crate::endpoint::Endpoint;
use crate::grpc;

/// The path of `grpc.health.v1.Health/Check`.
const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// The most of a response body a [`GrpcCheck`] reads (the answer is a few bytes).
const MAX_BODY: usize = 16 * 1024;
/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// Healthy when the endpoint's gRPC health service
/// ([`grpc.health.v1.Health/Check`](https://github.com/grpc/grpc/blob/master/doc/health-checking.md))
/// answers `SERVING`.
///
/// Each check opens a new HTTP/2 connection (h2c, prior knowledge), as Kubernetes' gRPC probe
/// and Envoy's gRPC health check do, and makes one unary call. `NOT_SERVING` (or `UNKNOWN`,
/// `SERVICE_UNKNOWN`) fails with [`CheckErrorKind::NotServing`](super::CheckErrorKind::NotServing);
/// a call that fails (a server without the health service answers `UNIMPLEMENTED`) with
/// [`CheckErrorKind::GrpcStatus`](super::CheckErrorKind::GrpcStatus). Defaults: the server's
/// overall health (service name `""`), `:authority` the endpoint's address.
///
/// The two messages (`HealthCheckRequest { string service = 1; }` and
/// `HealthCheckResponse { ServingStatus status = 1; }`) are encoded by hand: no protobuf
/// library or generated code is needed.
///
/// ```
/// use lbkit::health::{GrpcCheck, HealthChecker};
///
/// let checker = HealthChecker::new(GrpcCheck::new().service("shop.Cart"));
/// # drop(checker);
/// ```
#[derive(Clone, Debug, Default)]
pub struct GrpcCheck {
    config: Arc<Config>,
}

#[derive(Clone, Debug, Default)]
struct Config {
    service: String,
    authority: Option<String>,
    port: Option<u16>,
}

impl GrpcCheck {
    /// A check of the server's overall health (service name `""`).
    pub fn new() -> Self {
        GrpcCheck::default()
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Asks for the health of `service` (a fully qualified name such as `shop.Cart`) instead
    /// of the whole server's.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.config().service = service.into();
        self
    }

    /// Sets `:authority` (default: the endpoint's address, such as `10.0.0.7:50051`).
    pub fn authority(mut self, authority: impl Into<String>) -> Self {
        self.config().authority = Some(authority.into());
        self
    }

    /// Sends the check to `port` on the endpoint's host instead of its own port.
    pub fn port(mut self, port: u16) -> Self {
        self.config().port = Some(port);
        self
    }
}

impl HealthCheck for GrpcCheck {
    fn check(&self, endpoint: &Endpoint) -> CheckFuture {
        let addr = target(endpoint, self.config.port);
        let config = self.config.clone();
        Box::pin(async move { run(&config, addr?).await })
    }
}

async fn run(config: &Config, addr: SocketAddr) -> Result<(), CheckError> {
    let authority = config.authority.clone().unwrap_or_else(|| addr.to_string());
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{authority}{CHECK_PATH}"))
        .header(CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
        .header(TE, HeaderValue::from_static("trailers"))
        .header(USER_AGENT, HeaderValue::from_static("lbkit-health-check"))
        .body(Full::new(encode_request(&config.service)))
        .map_err(CheckError::failed)?;
    let (res, _conn) = send(addr, req, true).await?;
    if res.status() != StatusCode::OK {
        return Err(CheckError::status(res.status().as_u16()));
    }
    // A trailers-only answer: the status is in the headers and there is no message.
    if let Some(code) = grpc::status(res.headers()) {
        if code != grpc::Code::OK {
            return Err(CheckError::grpc_status(code.as_u32()));
        }
    }
    let mut body = res.into_body();
    let mut message = Vec::new();
    let mut code = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(CheckError::protocol)?;
        match frame.into_data() {
            Ok(data) if message.len() + data.len() <= MAX_BODY => message.extend_from_slice(&data),
            Ok(_) => return Err(CheckError::protocol("health answer too long")),
            Err(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    code = grpc::status(trailers);
                }
            }
        }
    }
    match code {
        Some(grpc::Code::OK) => {}
        Some(code) => return Err(CheckError::grpc_status(code.as_u32())),
        None => return Err(CheckError::protocol("no grpc-status in the answer")),
    }
    match decode_status(&message) {
        Some(SERVING) => Ok(()),
        Some(status) => Err(CheckError::not_serving(status)),
        None => Err(CheckError::protocol("malformed HealthCheckResponse")),
    }
}

/// One length-prefixed gRPC message holding `HealthCheckRequest { service }`.
fn encode_request(service: &str) -> Bytes {
    let mut msg = BytesMut::with_capacity(service.len() + 16);
    if !service.is_empty() {
        msg.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.put_slice(service.as_bytes());
    }
    let mut framed = BytesMut::with_capacity(msg.len() + 5);
    framed.put_u8(0); // not compressed
    framed.put_u32(msg.len() as u32);
    framed.put_slice(&msg);
    framed.freeze()
}

fn put_varint(buf: &mut BytesMut, mut n: u64) {
    while n >= 0x80 {
        buf.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    buf.put_u8(n as u8);
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// The `status` of the one length-prefixed, uncompressed `HealthCheckResponse` in `body`:
/// 0 (`UNKNOWN`, proto3's default) when the field is absent; `None` if malformed.
fn decode_status(body: &[u8]) -> Option<u64> {
    let (&compressed, rest) = body.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = get_varint(&mut msg)?;
        match key & 7 {
            0 => {
                let v = get_varint(&mut msg)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => msg = msg.get(8..)?,
            2 => {
                let n = usize::try_from(get_varint(&mut msg)?).ok()?;
                msg = msg.get(n..)?;
            }
            5 => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding() {
        assert_eq!(&encode_request("")[..], [0, 0, 0, 0, 0]);
        assert_eq!(
            &encode_request("a.B")[..],
            [0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
        );
    }

    #[test]
    fn response_decoding() {
        assert_eq!(decode_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(SERVING));
        assert_eq!(decode_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        // The default (UNKNOWN) is not encoded; unknown fields are skipped.
        assert_eq!(decode_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(
            decode_status(&[0, 0, 0, 0, 6, 0x12, 2, b'x', b'y', 0x08, 1]),
            Some(SERVING)
        );
        // Truncated, compressed, or a bad wire type.
        assert_eq!(decode_status(&[0, 0, 0, 0, 2, 0x08]), None);
        assert_eq!(decode_status(&[1, 0, 0, 0, 2, 0x08, 1]), None);
        assert_eq!(decode_status(&[0, 0, 0, 0, 1, 0x0f]), None);
        assert_eq!(decode_status(&[]), None);
        let mut long = BytesMut::new();
        put_varint(&mut long, 300);
        assert_eq!(get_varint(&mut &long[..]), Some(300));
    }
}
