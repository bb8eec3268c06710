//! Endpoints, ids, tiers and health in configuration files and JSON (feature `serde`).
//!
//! An [`Endpoint`] is written either as a string (`"10.0.0.7:8080"`: id and address; any
//! other text: a name without an address, as [`Endpoint::from`] reads it) or as a table with
//! `addr`, `id` (default: the address), `host` (the name TLS to the backend verifies and
//! sends as SNI; default none), `weight` (default 1, at most [`Endpoint::MAX_WEIGHT`]),
//! `tier` (default 0) and `zone` (default none; see [`Endpoint::with_zone`]). It is
//! serialised as the table.

use std::fmt;
use std::net::SocketAddr;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use super::{Endpoint, EndpointId, Health, Tier};

impl Serialize for EndpointId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EndpointId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(EndpointId::from)
    }
}

impl Serialize for Tier {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

impl<'de> Deserialize<'de> for Tier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u8::deserialize(d).map(Tier)
    }
}

impl Serialize for Health {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Health::Healthy => "healthy",
            Health::Down => "down",
            Health::Ejected => "ejected",
        })
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_struct("Endpoint", 6)?;
        t.serialize_field("id", &self.id)?;
        match self.addr {
            Some(addr) => t.serialize_field("addr", &addr)?,
            None => t.skip_field("addr")?,
        }
        match &self.host {
            Some(host) => t.serialize_field("host", &**host)?,
            None => t.skip_field("host")?,
        }
        t.serialize_field("weight", &self.weight)?;
        t.serialize_field("tier", &self.tier)?;
        match &self.zone {
            Some(zone) => t.serialize_field("zone", &**zone)?,
            None => t.skip_field("zone")?,
        }
        t.end()
    }
}

/// The table form of an endpoint.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    id: Option<String>,
    addr: Option<SocketAddr>,
    host: Option<String>,
    #[serde(default = "one", deserialize_with = "weight")]
    weight: u32,
    #[serde(default)]
    tier: Tier,
    zone: Option<String>,
}

fn one() -> u32 {
    1
}

/// A weight from 0 to [`Endpoint::MAX_WEIGHT`]; larger is an error, not clamped, so a typo
/// in a file is caught.
fn weight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let w = u32::deserialize(d)?;
    if w > Endpoint::MAX_WEIGHT {
        return Err(de::Error::custom(format_args!(
            "weight {w} is too large (at most {})",
            Endpoint::MAX_WEIGHT
        )));
    }
    Ok(w)
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EndpointVisitor;

        impl<'de> Visitor<'de> for EndpointVisitor {
            type Value = Endpoint;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address such as \"10.0.0.7:8080\" or a table with addr, id, host, weight, tier and zone")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Endpoint, E> {
                if v.trim().is_empty() {
                    return Err(E::custom("an endpoint cannot be empty"));
                }
                Ok(Endpoint::from(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Endpoint, A::Error> {
                let t = Table::deserialize(MapAccessDeserializer::new(map))?;
                let id = match (t.id, t.addr) {
                    (Some(id), _) if id.trim().is_empty() => {
                        return Err(de::Error::custom("an endpoint's id cannot be empty"))
                    }
                    (Some(id), _) => EndpointId::from(id),
                    (None, Some(addr)) => EndpointId::from(addr),
                    (None, None) => {
                        return Err(de::Error::custom("an endpoint needs an addr or an id"))
                    }
                };
                let mut e = Endpoint::new(id).with_weight(t.weight).with_tier(t.tier);
                if let Some(host) = t.host.filter(|h| !h.is_empty()) {
                    e = e.with_host(host);
                }
                if let Some(zone) = t.zone {
                    e = e.with_zone(zone);
                }
                e.addr = t.addr;
                Ok(e)
            }
        }

        d.deserialize_any(EndpointVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::value::{Error, StrDeserializer};
    use serde::de::IntoDeserializer;

    #[test]
    fn an_endpoint_reads_from_a_string() {
        let d: StrDeserializer<'_, Error> = "127.0.0.1:80".into_deserializer();
        let e = Endpoint::deserialize(d).unwrap();
        assert_eq!(e.id().as_str(), "127.0.0.1:80");
        assert_eq!(e.socket_addr(), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(e.weight(), 1);
        let d: StrDeserializer<'_, Error> = "".into_deserializer();
        assert!(Endpoint::deserialize(d).is_err());
    }

    #[test]
    fn an_endpoint_round_trips_as_a_table() {
        let e = Endpoint::new("api-1")
            .with_addr("10.0.0.7:8080".parse().unwrap())
            .with_host("api.internal")
            .with_weight(3)
            .with_tier(Tier::BACKUP)
            .with_zone("eu-west-1a");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"id":"api-1","addr":"10.0.0.7:8080","host":"api.internal","weight":3,"tier":1,"zone":"eu-west-1a"}"#
        );
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), e);
        let named = Endpoint::new("spare");
        let json = serde_json::to_string(&named).unwrap();
        assert_eq!(json, r#"{"id":"spare","weight":1,"tier":0}"#);
        assert_eq!(serde_json::from_str::<Endpoint>(&json).unwrap(), named);
    }
}
