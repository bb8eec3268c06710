//! The admin actions of the status page: drain, undrain and weight, posted as HTML forms
//! (answered with a redirect to the page) or as JSON objects (answered with JSON).

use bytes::Bytes;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::{respond, see_other, text, StatusPage};
use crate::endpoint::{Endpoint, EndpointId};
use crate::error::BoxError;

/// The largest form or JSON body read: three short fields.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// How an action was posted, and so how it is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// `application/x-www-form-urlencoded`: `303` back to the page, errors as text.
    Form,
    /// `application/json`: `200` with the endpoint's new weight, errors as `{"error": ..}`.
    Json,
}

/// An admin action, from the last segment of its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Drain,
    Undrain,
    Weight,
}

impl Action {
    pub(super) fn from_path(segment: &str) -> Option<Action> {
        match segment {
            "drain" => Some(Action::Drain),
            "undrain" => Some(Action::Undrain),
            "weight" => Some(Action::Weight),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Action::Drain => "drain",
            Action::Undrain => "undrain",
            Action::Weight => "weight",
        }
    }
}

/// Refuses a request another site's page made a browser send (cross-site request forgery):
/// an `Origin` that is not this host, or `Sec-Fetch-Site` saying it came from elsewhere.
/// Clients that send neither (curl, scripts) are not browsers driven by another site.
pub(super) fn check_origin<B>(req: &Request<B>) -> Result<(), String> {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if site != b"same-origin" && site != b"none" {
            return Err(format!(
                "cross-site request refused (Sec-Fetch-Site: {})",
                String::from_utf8_lossy(site)
            ));
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).map(|h| h.as_bytes());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
        })
        .map(str::as_bytes);
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(format!(
            "cross-origin request refused (Origin: {})",
            String::from_utf8_lossy(origin.as_bytes())
        )),
    }
}

/// The fields of an action's form.
#[derive(Debug)]
struct Form {
    pool: String,
    endpoint: String,
    weight: Option<String>,
}

fn parse_form(body: &[u8]) -> Result<Form, String> {
    let (mut pool, mut endpoint, mut weight) = (None, None, None);
    for (key, value) in form_urlencoded::parse(body) {
        let slot = match &*key {
            "pool" => &mut pool,
            "endpoint" => &mut endpoint,
            "weight" => &mut weight,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("field {key:?} given twice"));
        }
        *slot = Some(value.into_owned());
    }
    Ok(Form {
        pool: pool.ok_or("missing field \"pool\"")?,
        endpoint: endpoint.ok_or("missing field \"endpoint\"")?,
        weight,
    })
}

/// A weight from a form: a whole number from 0 to [`Endpoint::MAX_WEIGHT`].
fn parse_weight(value: Option<&str>) -> Result<u32, String> {
    let value = value.ok_or("missing field \"weight\"")?.trim();
    match value.parse::<u32>() {
        Ok(w) if w <= Endpoint::MAX_WEIGHT => Ok(w),
        Ok(_) => Err(format!(
            "weight {value} is too large (at most {})",
            Endpoint::MAX_WEIGHT
        )),
        Err(_) => Err(format!(
            "weight {value:?} is not a whole number from 0 to {}",
            Endpoint::MAX_WEIGHT
        )),
    }
}

/// The fields of a JSON action: `{"pool": "..", "endpoint": "..", "weight": N}`.
fn parse_json(body: &[u8]) -> Result<Form, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let obj = value.as_object().ok_or("send a JSON object")?;
    let string = |name: &str| -> Result<Option<String>, String> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            // A weight may be a number; its text is checked as a form's would be.
            Some(serde_json::Value::Number(n)) if name == "weight" => Ok(Some(n.to_string())),
            Some(other) => Err(format!("field {name:?} is not a string: {other}")),
        }
    };
    Ok(Form {
        pool: string("pool")?.ok_or("missing field \"pool\"")?,
        endpoint: string("endpoint")?.ok_or("missing field \"endpoint\"")?,
        weight: string("weight")?,
    })
}

/// A JSON answer.
fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = value.to_string();
    body.push('\n');
    respond(status, "application/json", body)
}

/// Reads the form or JSON object, applies the action, and answers: `303` back to the page
/// for a form, `200` with `{"pool", "endpoint", "action", "weight"}` for JSON; `400`/`413`/
/// `415` with the reason (as `{"error": ..}` for JSON).
pub(super) async fn run<B>(
    page: &StatusPage,
    action: Action,
    req: Request<B>,
) -> Response<Full<Bytes>>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let media = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    let encoding = match media {
        Some(m) if m.eq_ignore_ascii_case("application/x-www-form-urlencoded") => Encoding::Form,
        Some(m) if m.eq_ignore_ascii_case("application/json") => Encoding::Json,
        _ => {
            return text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the form as application/x-www-form-urlencoded, or a JSON object as \
                 application/json",
            )
        }
    };
    let failed = |status: StatusCode, why: String| match encoding {
        Encoding::Form => text(status, why),
        Encoding::Json => json(status, &serde_json::json!({ "error": why })),
    };
    let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return failed(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body too large (at most {MAX_FORM_BYTES} bytes)"),
            )
        }
        Err(e) => {
            return failed(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    };
    let form = match encoding {
        Encoding::Form => parse_form(&body),
        Encoding::Json => parse_json(&body),
    };
    match form.and_then(|form| apply(page, action, &form)) {
        Ok(done) if encoding == Encoding::Form => see_other(&page.inner.path, done.note),
        Ok(done) => json(
            StatusCode::OK,
            &serde_json::json!({
                "pool": done.pool,
                "endpoint": done.endpoint.as_str(),
                "action": action.as_str(),
                "weight": done.weight,
            }),
        ),
        Err(why) => failed(
            StatusCode::BAD_REQUEST,
            format!("{}: {why}", action.as_str()),
        ),
    }
}

/// What an applied action did.
struct Done {
    pool: String,
    endpoint: EndpointId,
    weight: u32,
    note: String,
}

/// Applies `action` with the fields of `form`; what it did, or why not.
fn apply(page: &StatusPage, action: Action, form: &Form) -> Result<Done, String> {
    let weight = match action {
        Action::Weight => Some(parse_weight(form.weight.as_deref())?),
        _ => None,
    };
    let (index, named) = page
        .inner
        .pools
        .iter()
        .enumerate()
        .find(|(_, p)| p.name == form.pool)
        .ok_or_else(|| format!("no pool named {:?}", form.pool))?;
    let id = EndpointId::from(form.endpoint.as_str());
    let current = named
        .source
        .stats()
        .endpoint(id.as_str())
        .map(|e| e.weight)
        .ok_or_else(|| format!("no endpoint {:?} in pool {:?}", form.endpoint, form.pool))?;
    let mut drained = page.inner.drained.lock().unwrap_or_else(|e| e.into_inner());
    let key = (index, id.clone());
    let (new, note) = match (action, weight) {
        (Action::Drain, _) => {
            if current > 0 {
                drained.insert(key, current);
            }
            (0, format!("drained {id} in pool {}", form.pool))
        }
        (Action::Undrain, _) => {
            let back = match current {
                0 => drained.remove(&key).unwrap_or(1),
                w => w,
            };
            (
                back,
                format!("{id} in pool {} back at weight {back}", form.pool),
            )
        }
        (Action::Weight, Some(w)) => {
            if w == 0 && current > 0 {
                drained.insert(key, current);
            } else if w > 0 {
                drained.remove(&key);
            }
            (w, format!("{id} in pool {} at weight {w}", form.pool))
        }
        (Action::Weight, None) => unreachable!("parsed above"),
    };
    if !named.source.set_weight(&id, new) {
        // Removed between the look-up and now.
        return Err(format!(
            "no endpoint {:?} in pool {:?}",
            form.endpoint, form.pool
        ));
    }
    tracing::info!(pool = %form.pool, endpoint = %id, action = action.as_str(), weight = new, "status page admin action");
    Ok(Done {
        pool: form.pool.clone(),
        endpoint: id,
        weight: new,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_weights_are_checked() {
        let f = parse_form(b"pool=api&endpoint=10.0.0.1%3A80&weight=3&x=y").unwrap();
        assert_eq!(f.pool, "api");
        assert_eq!(f.endpoint, "10.0.0.1:80");
        assert_eq!(f.weight.as_deref(), Some("3"));
        assert!(parse_form(b"pool=api").unwrap_err().contains("endpoint"));
        assert!(parse_form(b"pool=a&pool=b&endpoint=e")
            .unwrap_err()
            .contains("twice"));
        assert_eq!(parse_weight(Some(" 7 ")), Ok(7));
        assert_eq!(parse_weight(Some("0")), Ok(0));
        assert!(parse_weight(Some("-1"))
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_weight(Some("abc"))
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_weight(Some("10001"))
            .unwrap_err()
            .contains("too large"));
        assert!(parse_weight(None).unwrap_err().contains("missing"));
    }

    #[test]
    fn json_actions_are_checked() {
        let f = parse_json(br#"{"pool": "api", "endpoint": "a:1", "weight": 3}"#).unwrap();
        assert_eq!((f.pool.as_str(), f.endpoint.as_str()), ("api", "a:1"));
        assert_eq!(parse_weight(f.weight.as_deref()), Ok(3));
        let f = parse_json(br#"{"pool": "api", "endpoint": "a:1", "weight": -2}"#).unwrap();
        assert!(parse_weight(f.weight.as_deref()).is_err());
        assert!(parse_json(br#"{"pool": "api"}"#)
            .unwrap_err()
            .contains("endpoint"));
        assert!(parse_json(br#"{"pool": 1, "endpoint": "e"}"#)
            .unwrap_err()
            .contains("not a string"));
        assert!(parse_json(b"[1]").unwrap_err().contains("object"));
        assert!(parse_json(b"{").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn cross_origin_posts_are_refused() {
        let req = |headers: &[(&str, &str)]| {
            let mut b = Request::post("/status/drain").header("host", "127.0.0.1:9000");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        assert!(check_origin(&req(&[])).is_ok());
        assert!(check_origin(&req(&[("origin", "http://127.0.0.1:9000")])).is_ok());
        assert!(check_origin(&req(&[("sec-fetch-site", "same-origin")])).is_ok());
        assert!(check_origin(&req(&[("origin", "http://evil.example")])).is_err());
        assert!(check_origin(&req(&[("origin", "null")])).is_err());
        assert!(check_origin(&req(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(check_origin(&req(&[("sec-fetch-site", "same-site")])).is_err());
    }
}
