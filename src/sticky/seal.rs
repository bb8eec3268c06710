//! Sealing an endpoint id into an opaque cookie value, and opening it again.
//!
//! Format (version 2): `base64url(version ‖ nonce ‖ ciphertext ‖ tag)`, no padding, where the
//! plaintext is `issued ‖ len ‖ id ‖ zeros` padded to a multiple of 16 bytes (so the length of
//! the value hints at nothing finer than the id's length in 16-byte steps), `issued` being the
//! issue time in whole seconds since the Unix epoch (8 bytes, big-endian), sealed with
//! ChaCha20-Poly1305 under the [`CookieSecret`], a random 96-bit nonce per cookie, and the cookie
//! name as associated data (a value minted for one cookie name is not accepted under another).
//! The issue time is inside the ciphertext: a client can neither read nor change it, so a
//! cookie's age is the server's word. Version 1 values (no issue time) are not accepted.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};

use crate::endpoint::EndpointId;

const VERSION: u8 = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const PAD: usize = 16;
/// The issue time's length in the plaintext.
const ISSUED_LEN: usize = 8;
/// The longest endpoint id a cookie can carry, in bytes.
pub(crate) const MAX_ID_LEN: usize = 255;
/// The longest plaintext: issue time, length byte and id, padded.
const MAX_PLAIN: usize = (ISSUED_LEN + 1 + MAX_ID_LEN).next_multiple_of(PAD);
/// The longest sealed value: version, nonce, plaintext, tag.
const MAX_SEALED: usize = 1 + NONCE_LEN + MAX_PLAIN + TAG_LEN;
/// Longer cookie values are not even decoded: the base64 length of the longest sealed value.
const MAX_ENCODED: usize = (MAX_SEALED * 4).div_ceil(3);
/// The base64 length of the shortest sealed value (one padded block).
const MIN_ENCODED: usize = ((1 + NONCE_LEN + PAD + TAG_LEN) * 4).div_ceil(3);
/// Room for base64's conservative estimate of `MAX_ENCODED` characters.
const DECODE_BUF: usize = MAX_ENCODED.div_ceil(4) * 3;

/// The 256-bit secret that seals sticky-session cookies.
///
/// Every proxy that should honour the others' cookies needs the same key: load it from your
/// secret store with [`CookieSecret::from_bytes`]. [`CookieSecret::generate`] makes a random one,
/// fine for a single process (cookies then stop working across restarts, which only costs
/// one re-balance per client). Anyone with the key can read and mint cookies; without it, a
/// cookie reveals nothing and cannot be forged.
#[derive(Clone)]
pub struct CookieSecret([u8; 32]);

impl CookieSecret {
    /// A key from 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        CookieSecret(bytes)
    }

    /// A random key, from the thread-local cryptographically secure generator of `rand`
    /// (seeded from the operating system).
    pub fn generate() -> Self {
        CookieSecret(rand::random())
    }

    /// The key's bytes, to store it and share it with other proxies.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieSecret(..)")
    }
}

/// Seals and opens cookie values for one cookie name.
#[derive(Clone)]
pub(crate) struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl Sealer {
    pub(crate) fn new(key: &CookieSecret) -> Self {
        Sealer {
            cipher: ChaCha20Poly1305::new(&key.0.into()),
        }
    }

    /// The cookie value naming `id`, issued at `issued` (seconds since the Unix epoch); `None`
    /// if the id is longer than [`MAX_ID_LEN`].
    pub(crate) fn seal(&self, cookie_name: &str, id: &EndpointId, issued: u64) -> Option<String> {
        let id = id.as_str().as_bytes();
        if id.len() > MAX_ID_LEN {
            return None;
        }
        let plain_len = (ISSUED_LEN + 1 + id.len()).next_multiple_of(PAD);
        let mut buf = [0u8; MAX_SEALED];
        let nonce: [u8; NONCE_LEN] = rand::random();
        buf[0] = VERSION;
        buf[1..1 + NONCE_LEN].copy_from_slice(&nonce);
        let body = 1 + NONCE_LEN;
        buf[body..body + ISSUED_LEN].copy_from_slice(&issued.to_be_bytes());
        let at = body + ISSUED_LEN;
        buf[at] = id.len() as u8;
        buf[at + 1..at + 1 + id.len()].copy_from_slice(id);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                cookie_name.as_bytes(),
                &mut buf[body..body + plain_len],
            )
            .ok()?;
        buf[body + plain_len..body + plain_len + TAG_LEN].copy_from_slice(&tag);
        Some(URL_SAFE_NO_PAD.encode(&buf[..body + plain_len + TAG_LEN]))
    }

    /// Whether `value` could be a sealed value at all (length only): what fails this is
    /// rejected without decoding or decrypting.
    pub(crate) fn plausible(value: &[u8]) -> bool {
        (MIN_ENCODED..=MAX_ENCODED).contains(&value.len())
    }

    /// The endpoint id in a cookie value and its issue time (seconds since the Unix epoch), or
    /// `None` if the value was not sealed by this key for this cookie name (forged, garbled,
    /// truncated, another key's, not base64, too long, an older format).
    pub(crate) fn open(&self, cookie_name: &str, value: &[u8]) -> Option<(EndpointId, u64)> {
        if !Self::plausible(value) {
            return None;
        }
        let mut buf = [0u8; DECODE_BUF];
        let n = URL_SAFE_NO_PAD.decode_slice(value, &mut buf).ok()?;
        let sealed = &mut buf[..n];
        let body = 1 + NONCE_LEN;
        if sealed.len() < body + PAD + TAG_LEN || sealed[0] != VERSION {
            return None;
        }
        let (head, rest) = sealed.split_at_mut(body);
        let (plain, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        if plain.len() % PAD != 0 {
            return None;
        }
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&head[1..]),
                cookie_name.as_bytes(),
                plain,
                Tag::from_slice(tag),
            )
            .ok()?;
        // Authentic from here on; still check the layout rather than trust it.
        let (issued, plain) = plain.split_at(ISSUED_LEN);
        let issued = u64::from_be_bytes(issued.try_into().ok()?);
        let len = usize::from(plain[0]);
        let id = plain.get(1..1 + len)?;
        if plain[1 + len..].iter().any(|&b| b != 0) {
            return None;
        }
        let id = std::str::from_utf8(id).ok().map(EndpointId::new)?;
        Some((id, issued))
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let s = Sealer::new(&CookieSecret::from_bytes([7; 32]));
        let id = EndpointId::new("10.0.0.7:8080");
        let v = s.seal("lb", &id, 1_700_000_000).unwrap();
        assert!(!v.contains("10.0.0.7") && !v.contains("8080"));
        assert_eq!(
            s.open("lb", v.as_bytes()),
            Some((id.clone(), 1_700_000_000))
        );
        // A fresh nonce each time: two cookies for one endpoint differ.
        assert_ne!(s.seal("lb", &id, 1_700_000_000).unwrap(), v);
        // Another cookie name, another key, any change: rejected.
        assert_eq!(s.open("other", v.as_bytes()), None);
        let s2 = Sealer::new(&CookieSecret::from_bytes([8; 32]));
        assert_eq!(s2.open("lb", v.as_bytes()), None);
        for i in 0..v.len() {
            let mut b = v.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            assert_eq!(s.open("lb", &b), None, "flipped char {i}");
        }
        for cut in 0..v.len() {
            assert_eq!(s.open("lb", &v.as_bytes()[..cut]), None);
        }
        assert_eq!(s.open("lb", b"\xff\xfe"), None);
        assert_eq!(s.open("lb", &[b'A'; 1000]), None);
        // The longest id fits; a longer one is not sealed.
        let long = EndpointId::new("x".repeat(MAX_ID_LEN));
        let v = s.seal("lb", &long, u64::MAX).unwrap();
        assert_eq!(v.len(), MAX_ENCODED);
        assert_eq!(s.open("lb", v.as_bytes()), Some((long, u64::MAX)));
        assert_eq!(
            s.seal("lb", &EndpointId::new("x".repeat(MAX_ID_LEN + 1)), 0),
            None
        );
        // The shortest value is as long as the shortest id's.
        let short = s.seal("lb", &EndpointId::new(""), 0).unwrap();
        assert_eq!(short.len(), MIN_ENCODED);
        assert_eq!(
            s.open("lb", short.as_bytes()),
            Some((EndpointId::new(""), 0))
        );
        assert_eq!(
            format!("{:?}", CookieSecret::generate()),
            "CookieSecret(..)"
        );
    }

    proptest::proptest! {
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..500)) {
            let s = Sealer::new(&CookieSecret::from_bytes([1; 32]));
            proptest::prop_assert_eq!(s.open("lb", &bytes), None);
        }

        #[test]
        fn open_base64_never_panics(v in "[A-Za-z0-9_-]{0,420}") {
            let s = Sealer::new(&CookieSecret::from_bytes([1; 32]));
            proptest::prop_assert_eq!(s.open("lb", v.as_bytes()), None);
        }
    }
}
