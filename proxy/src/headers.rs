//! What the proxy checks and rewrites in request and response heads:
//! the `Host` rules of RFC 9112 §3.2 and RFC 9113 §8.3.1, hop-by-hop
//! headers (RFC 9110 §7.6.1), response framing (RFC 9112 §6.3), the
//! forwarding headers, and which protocol upgrades a request asks for.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

/// Why a request head is refused with 400 before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadHead {
    #[error("more than one Host header")]
    TwoHosts,
    #[error("an HTTP/1.1 request needs a Host header")]
    NoHost,
    #[error("the request names no host (neither :authority nor Host)")]
    NoAuthority,
    #[error("the Host header is not a valid host")]
    BadHost,
    #[error("the Host header and :authority name different hosts")]
    HostMismatch,
}

impl BadHead {
    /// The metric label of the refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TwoHosts => "two_hosts",
            Self::NoHost => "no_host",
            Self::NoAuthority => "no_authority",
            Self::BadHost => "bad_host",
            Self::HostMismatch => "host_mismatch",
        }
    }
}

/// The authority a request is routed by: the URI's (HTTP/2 `:authority`,
/// or an HTTP/1.1 absolute form, which overrides `Host`), else the single
/// `Host` header. Refuses what RFC 9112 §3.2 and RFC 9113 §8.3.1 call
/// malformed rather than guess which host was meant.
pub fn authority<'a>(
    version: Version,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<&'a str, BadHead> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(BadHead::TwoHosts);
    }
    let host = match host {
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|h| !h.is_empty() && h.parse::<http::uri::Authority>().is_ok())
                .ok_or(BadHead::BadHost)?,
        ),
        None => None,
    };
    if let Some(a) = uri.authority() {
        if version == Version::HTTP_2
            && let Some(h) = host
            && !h.eq_ignore_ascii_case(a.as_str())
        {
            return Err(BadHead::HostMismatch);
        }
        if version == Version::HTTP_11 && host.is_none() {
            return Err(BadHead::NoHost);
        }
        return Ok(a.as_str());
    }
    match host {
        Some(h) => Ok(h),
        None if version == Version::HTTP_11 => Err(BadHead::NoHost),
        None => Err(BadHead::NoAuthority),
    }
}

/// End-to-end headers a `Connection` header may never strip: without
/// them the request could not be routed, framed or understood.
const NEVER_HOP_BY_HOP: [HeaderName; 5] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::COOKIE,
    header::AUTHORIZATION,
];

/// Headers that belong to one connection, not to the request. An allowed
/// upgrade keeps `upgrade` and `connection: upgrade`; anything else
/// loses both (and `http2-settings`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .filter(|n| !NEVER_HOP_BY_HOP.contains(n))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("http2-settings"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        if upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `te: trailers` is end to end (gRPC needs it); other values are not.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// A response framed by `Transfer-Encoding` ignores any `Content-Length`
/// it also carries, and an intermediary must drop the latter (RFC 9112
/// §6.3): the body is re-framed for the client. Returns whether one was
/// dropped.
pub fn drop_conflicting_length(headers: &mut HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.remove(header::CONTENT_LENGTH);
        return true;
    }
    false
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the forwarding headers say of one client connection, made once
/// when it is accepted: its address as `x-forwarded-for` and `forwarded`
/// (RFC 7239, with the scheme) list it.
#[derive(Debug, Clone)]
pub struct Forwarding {
    pub scheme: &'static str,
    /// The peer's IP.
    for_ip: HeaderValue,
    /// `for=<ip>;proto=<scheme>`, an IPv6 address quoted.
    element: HeaderValue,
}

impl Forwarding {
    pub fn new(addr: std::net::SocketAddr, scheme: &'static str) -> Self {
        let ip = addr.ip();
        let node = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        // Addresses and the scheme are visible ASCII: always valid values.
        let value = |text: String| {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        };
        Self {
            scheme,
            for_ip: value(ip.to_string()),
            element: value(format!("for={node};proto={scheme}")),
        }
    }
}

/// Appends `last` to the list header `name`: all its values (as sent,
/// whatever their bytes) joined, or `last` alone (no copy) when it had
/// none.
fn append(headers: &mut HeaderMap, name: HeaderName, last: &HeaderValue) {
    let mut values = headers.get_all(&name).iter().peekable();
    if values.peek().is_none() {
        headers.insert(name, last.clone());
        return;
    }
    let mut list = Vec::with_capacity(128);
    for value in values {
        list.extend_from_slice(value.as_bytes());
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(last.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(list)) {
        headers.insert(name, v);
    }
}

/// A fresh request id: 128 random bits, as 32 lowercase hex digits.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::random();
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Tells the service who asked: the peer's address appended to
/// `x-forwarded-for` and to `forwarded` (RFC 7239, with the scheme),
/// `x-forwarded-proto` set, and an `x-request-id` added when absent.
pub fn forwarding_headers(headers: &mut HeaderMap, peer: &Forwarding) {
    append(headers, X_FORWARDED_FOR, &peer.for_ip);
    append(headers, header::FORWARDED, &peer.element);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(peer.scheme));
    if !headers.contains_key(X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID, request_id());
    }
}

/// The protocols an HTTP/1.1 request asks to switch to (lowercase), when
/// it asks (`Connection: upgrade` and an `Upgrade` header).
pub fn upgrade_request(version: Version, headers: &HeaderMap) -> Option<Vec<String>> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocols: Vec<String> = headers
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .flat_map(|v| {
            v.split(',')
                .map(|p| p.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty())
        .collect();
    (asks && !protocols.is_empty()).then_some(protocols)
}

/// Whether every protocol asked for is allowed. `h2c` never is: the
/// proxy speaks HTTP/2 to clients itself, and a tunnelled h2c connection
/// would bypass its routing (Envoy drops it too).
pub fn upgrade_allowed(asked: &[String], allowed: &[String]) -> bool {
    asked.iter().all(|p| {
        let name = p.split('/').next().unwrap_or_default();
        name != "h2c" && allowed.iter().any(|a| a == name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        // `te: trailers` is end to end; an upgrade keeps its two headers.
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn connection_never_strips_what_routing_and_framing_need() {
        let mut h = headers(&[
            ("connection", "close, Host, content-length, cookie, x-gone"),
            ("host", "shop.web"),
            ("content-length", "5"),
            ("cookie", "user=1"),
            ("x-gone", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["host"], "shop.web");
        assert_eq!(h["content-length"], "5");
        assert_eq!(h["cookie"], "user=1");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn host_rules_follow_rfc_9112_and_9113() {
        let uri = |u: &str| u.parse::<Uri>().unwrap();
        let h11 = Version::HTTP_11;
        assert_eq!(
            authority(h11, &uri("/x"), &headers(&[("host", "shop.web")])),
            Ok("shop.web")
        );
        assert_eq!(
            authority(
                h11,
                &uri("/x"),
                &headers(&[("host", "shop.web"), ("host", "evil.web")])
            ),
            Err(BadHead::TwoHosts)
        );
        assert_eq!(
            authority(h11, &uri("/x"), &HeaderMap::new()),
            Err(BadHead::NoHost)
        );
        assert_eq!(
            authority(h11, &uri("/x"), &headers(&[("host", "a b")])),
            Err(BadHead::BadHost)
        );
        // An absolute form overrides Host (RFC 9112 §3.2.2), which must
        // still be there.
        assert_eq!(
            authority(
                h11,
                &uri("http://shop.web/x"),
                &headers(&[("host", "other")])
            ),
            Ok("shop.web")
        );
        assert_eq!(
            authority(h11, &uri("http://shop.web/x"), &HeaderMap::new()),
            Err(BadHead::NoHost)
        );
        // HTTP/1.0 may leave Host out; it then has no route, not a 400.
        assert_eq!(
            authority(Version::HTTP_10, &uri("/x"), &HeaderMap::new()),
            Err(BadHead::NoAuthority)
        );
        // HTTP/2: :authority, and a Host that agrees with it.
        let h2 = Version::HTTP_2;
        assert_eq!(
            authority(h2, &uri("http://shop.web/x"), &HeaderMap::new()),
            Ok("shop.web")
        );
        assert_eq!(
            authority(
                h2,
                &uri("http://shop.web/x"),
                &headers(&[("host", "evil.web")])
            ),
            Err(BadHead::HostMismatch)
        );
    }

    #[test]
    fn a_chunked_response_loses_its_content_length() {
        let mut h = headers(&[("transfer-encoding", "chunked"), ("content-length", "0")]);
        assert!(drop_conflicting_length(&mut h));
        assert!(!h.contains_key("content-length"));
        let mut h = headers(&[("content-length", "3")]);
        assert!(!drop_conflicting_length(&mut h));
        assert_eq!(h["content-length"], "3");
    }

    #[test]
    fn upgrades_are_allowed_by_list_and_never_h2c() {
        let h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        let asked = upgrade_request(Version::HTTP_11, &h).unwrap();
        assert_eq!(asked, ["websocket"]);
        let allowed = vec!["websocket".to_string()];
        assert!(upgrade_allowed(&asked, &allowed));
        let h2c = upgrade_request(
            Version::HTTP_11,
            &headers(&[
                ("connection", "upgrade, http2-settings"),
                ("upgrade", "h2c"),
            ]),
        )
        .unwrap();
        assert!(!upgrade_allowed(&h2c, &["h2c".to_string()]));
        let both = vec!["websocket".to_string(), "tls/1.3".to_string()];
        assert!(!upgrade_allowed(&both, &allowed));
        // Without `Connection: upgrade` nothing is asked.
        assert!(upgrade_request(Version::HTTP_11, &headers(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn the_peer_is_appended_to_the_forwarding_headers() {
        let peer = Forwarding::new("10.1.2.3:5555".parse().unwrap(), "https");
        let mut h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.1"),
            ("forwarded", "for=203.0.113.9;proto=http"),
            ("x-forwarded-proto", "http"),
        ]);
        forwarding_headers(&mut h, &peer);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.1, 10.1.2.3");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=http, for=10.1.2.3;proto=https"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        // Values that are not UTF-8 are kept as sent.
        let mut odd = HeaderMap::new();
        odd.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        forwarding_headers(&mut odd, &peer);
        assert_eq!(odd["x-forwarded-for"].as_bytes(), b"caf\xe9, 10.1.2.3");
        let id = h["x-request-id"].to_str().unwrap().to_owned();
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        // A request id the client sent is kept; IPv6 peers are quoted.
        let v6 = Forwarding::new("[2001:db8::1]:80".parse().unwrap(), "http");
        let mut h = headers(&[("x-request-id", "abc")]);
        forwarding_headers(&mut h, &v6);
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }
}
