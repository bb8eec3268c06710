//! Who the client is: the connection's peer address ([`ClientAddr`]), the proxies trusted to
//! report another one ([`ClientIp`], [`Cidr`]), and the forwarding headers a proxy writes
//! ([`append_forwarded`], [`ForwardedHeaders`]).
//!
//! A forwarding header is only as honest as whoever wrote it: any client can send
//! `X-Forwarded-For: 1.2.3.4`. So [`ClientIp`] reads one only when the connection's peer is a
//! proxy you trust, and then walks the list from the right (the entry the nearest proxy added)
//! past every address that is itself a trusted proxy; the first address that is not is the
//! client. The proxy ([`Forward`](crate::proxy::Forward)) uses the same trust setting when it
//! writes the headers: from an untrusted peer, the client's own values are dropped.
//!
//! [`ClientAddr`] is put in each request's extensions by lbkit's
//! [`Server`](crate::server::Server). Behind another server, [`ClientAddrLayer`] copies it from
//! that server's own extension (axum's `ConnectInfo`, for one) in one line.

mod chain;
mod layer;
mod write;

pub use chain::{Cidr, ClientIp, InvalidCidr};
pub use layer::{ClientAddrLayer, WithClientAddr};
pub use write::{append_forwarded, ForwardedHeaders};
pub(crate) use write::{may_be_among, name_lengths};

/// The parsers behind [`ClientIp`], public for the fuzz targets: plain functions over bytes
/// that never panic and never allocate; anything malformed reads as "not an address".
#[doc(hidden)]
pub mod parse {
    pub use super::chain::{
        client_from_chain, forwarded_for_nodes, parse_node, x_forwarded_for_nodes, ForwardedNodes,
    };
}

/// The address of the peer a request came from, put in the request's extensions by the server
/// that accepted the connection ([`Server`](crate::server::Server) does;
/// [`ClientAddrLayer`] copies it from another server's extension). The proxy writes it into
/// `X-Forwarded-For`/`Forwarded`, and client-IP keys read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// Marks a request that came over a TLS connection the server terminated: lbkit's
/// [`Server`](crate::server::Server) inserts it into the extensions of every request on a
/// connection it terminated TLS for (`Server::tls`, feature `tls`). Layers that act on the
/// client's scheme read it: the sticky layer makes its cookie `Secure`. Insert it yourself when
/// your own server terminates TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientTls;

impl ClientAddr {
    /// The `ClientAddr` in `req`'s extensions, if a server put one there.
    pub fn of<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
        req.extensions().get::<ClientAddr>().map(|c| c.0)
    }
}
