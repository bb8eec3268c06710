//! gRPC in the proxy: failures answered as gRPC answers, not as HTTP error pages.
//!
//! A gRPC client reads a call's outcome from `grpc-status`, not from the HTTP status: to it,
//! an HTTP 503 with a text body is a broken server (`UNKNOWN` or `UNAVAILABLE` with "Received
//! http2 header with status: 503", depending on the library), and the text is lost. So for a
//! gRPC request (`crate::grpc::is_grpc`) the proxy answers its own failures as a
//! gRPC server would: HTTP 200, `content-type: application/grpc`, and a *trailers-only*
//! response (headers with the end of the stream) carrying `grpc-status` and `grpc-message`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::ProxyBody;
use crate::grpc::{Code, GRPC_MESSAGE, GRPC_STATUS};

/// The gRPC status code for a failure the proxy would answer with HTTP `status` (see
/// [`status_for`](super::status_for)): a timeout (504) is `DEADLINE_EXCEEDED` (4); no backend
/// available (503), a backend that failed (502) and overload (429) are `UNAVAILABLE` (14),
/// which gRPC clients may retry; other statuses follow gRPC's table for HTTP statuses (401
/// `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, 404 `UNIMPLEMENTED`, anything else
/// `UNKNOWN`).
pub(crate) fn grpc_code_for(status: StatusCode) -> Code {
    match status.as_u16() {
        504 => Code::DEADLINE_EXCEEDED,
        429 | 502 | 503 => Code::UNAVAILABLE,
        400 => Code::INTERNAL,
        401 => Code::UNAUTHENTICATED,
        403 => Code::PERMISSION_DENIED,
        404 => Code::UNIMPLEMENTED,
        _ => Code::UNKNOWN,
    }
}

/// The answer to a gRPC request that failed in the proxy with what would be HTTP `status`:
/// HTTP 200, `content-type: application/grpc`, `grpc-status` ([`grpc_code_for`]) and a short
/// `grpc-message` naming the failure (never a backend address), and no body: a trailers-only
/// response.
pub(crate) fn grpc_error_response<B>(status: StatusCode) -> Response<ProxyBody<B>> {
    let message = match status {
        StatusCode::SERVICE_UNAVAILABLE => "no backend available",
        StatusCode::GATEWAY_TIMEOUT => "backend timed out",
        StatusCode::BAD_GATEWAY => "backend failed",
        StatusCode::TOO_MANY_REQUESTS => "proxy overloaded",
        _ => "proxy error",
    };
    trailers_only(grpc_code_for(status), message)
}

/// The answer to a gRPC call whose client's deadline (`grpc-timeout`) passed in the proxy:
/// `DEADLINE_EXCEEDED`.
pub(super) fn deadline_exceeded<B>() -> Response<ProxyBody<B>> {
    trailers_only(Code::DEADLINE_EXCEEDED, "deadline (grpc-timeout) exceeded")
}

/// HTTP 200 with `code` and `message` in the headers and no body.
fn trailers_only<B>(code: Code, message: &'static str) -> Response<ProxyBody<B>> {
    let mut res = Response::new(Either::Right(Full::new(Bytes::new())));
    let headers = res.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS, HeaderValue::from(code.as_u32()));
    headers.insert(GRPC_MESSAGE, HeaderValue::from_static(message));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body;

    #[test]
    fn trailers_only_answers() {
        let res = grpc_error_response::<Full<Bytes>>(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(res.headers()["grpc-message"], "no backend available");
        assert!(res.body().is_end_stream());
        let res = grpc_error_response::<Full<Bytes>>(StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(res.headers()["grpc-status"], "4");
        assert_eq!(grpc_code_for(StatusCode::BAD_GATEWAY), Code::UNAVAILABLE);
        assert_eq!(grpc_code_for(StatusCode::IM_A_TEAPOT), Code::UNKNOWN);
    }
}
