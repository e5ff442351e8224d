//! Getting an image's bytes from an `image_url`: a `data:` URI decoded in place, or an http(s)
//! URL fetched with a timeout, a byte cap and a guard against server-side request forgery.
//!
//! The guard resolves the host itself and refuses the whole request if any address is loopback,
//! private, link-local or otherwise not globally routable (unless the operator allows them); the
//! connection then goes to exactly the addresses that were checked, so a DNS answer that changes
//! between check and connect (rebinding) cannot slip through. Every redirect hop is checked the
//! same way before it is followed (its scheme and literal address by the redirect policy, its
//! name by the resolver when it connects), so a public URL that redirects to a private one is
//! refused without a connection to the private one.
//!
//! An operator may allow exact origins (`--allowed-media-host HOST:PORT`, an internal image
//! store): only that host on that port is exempt from the guard; a redirect from it to any other
//! address is judged like any other hop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{redirect, Url};

/// Limits of image fetching.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Largest image, in bytes, from a URL or a data URI.
    pub max_image_bytes: usize,
    /// Whole fetch (connect, redirects, body).
    pub fetch_timeout: Duration,
    /// Allow URLs that resolve to loopback / private / link-local addresses.
    pub allow_private: bool,
    /// Origins fetched although their addresses are not public (each exactly one host and port).
    pub allowed_hosts: Vec<MediaHost>,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_image_bytes: 20 * 1024 * 1024,
            fetch_timeout: Duration::from_secs(10),
            allow_private: false,
            allowed_hosts: Vec::new(),
        }
    }
}

/// One origin the operator allows although it is not public (`--allowed-media-host`): a host
/// (name or IP address, in the URL parser's normal form) and a port, both matched exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaHost {
    host: String,
    port: u16,
}

impl MediaHost {
    /// Whether `url`'s host and port (its scheme's default port when it names none) are this.
    fn is_origin_of(&self, url: &Url) -> bool {
        url.host_str() == Some(self.host.as_str()) && url.port_or_known_default() == Some(self.port)
    }
}

impl fmt::Display for MediaHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for MediaHost {
    type Err = String;

    /// `HOST:PORT`, the port required (no default: the exemption is for exactly one port).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not HOST:PORT (e.g. images.internal:8080 or 10.0.0.5:80)");
        let (_, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        // The URL parser's normal form, so that `LOCALHOST`, `0x7f.1` or `[0::1]` match the URLs
        // clients send.
        let url = Url::parse(&format!("http://{s}/")).map_err(|_| bad())?;
        if url.path() != "/" || !url.username().is_empty() || url.password().is_some() {
            return Err(bad());
        }
        let host = url.host_str().ok_or_else(bad)?.to_string();
        Ok(Self { host, port })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("invalid data URI: {0}")]
    InvalidDataUri(String),
    #[error("invalid base64 in data URI: {0}")]
    InvalidBase64(String),
    #[error("image is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("unsupported image URL scheme `{0}` (use data:, http: or https:)")]
    UnsupportedScheme(String),
    #[error("image URL refused: {0} is not a public address")]
    Forbidden(String),
    #[error("could not fetch image URL: {0}")]
    Fetch(String),
    #[error("image URL answered HTTP {0}")]
    Status(u16),
    #[error("image URL timed out")]
    Timeout,
}

/// Clients differ on base64 padding; both forms are accepted.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Redirects followed at most (curl's and browsers' limits are higher; an image needs few).
pub const MAX_REDIRECTS: usize = 5;

pub struct MediaFetcher {
    config: MediaConfig,
    guard: Guard,
    client: reqwest::Client,
}

impl MediaFetcher {
    pub fn new(config: MediaConfig) -> Result<Self, reqwest::Error> {
        let guard = Guard {
            allow_private: config.allow_private,
            allowed: config.allowed_hosts.clone().into(),
        };
        let redirect_guard = guard.clone();
        let client = reqwest::Client::builder()
            .timeout(config.fetch_timeout)
            .connect_timeout(config.fetch_timeout)
            // An operator's HTTP_PROXY would connect on our behalf, past the guard.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                guard: guard.clone(),
                timeout: config.fetch_timeout,
            }))
            // Each hop is checked before it is followed: a redirect to a literal private
            // address or another scheme is refused here, one to a name by the resolver.
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                match redirect_guard.check(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(err) => attempt.error(err),
                }
            }))
            .user_agent(concat!("tga-serve/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            config,
            guard,
            client,
        })
    }

    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    /// The image bytes behind an `image_url.url`.
    pub async fn load(&self, url: &str) -> Result<Vec<u8>, MediaError> {
        if let Some(rest) = url.strip_prefix("data:") {
            return decode_data_uri(rest, self.config.max_image_bytes);
        }
        let parsed = Url::parse(url).map_err(|e| MediaError::Fetch(format!("bad URL: {e}")))?;
        self.guard.check(&parsed)?;
        self.fetch(parsed).await
    }

    async fn fetch(&self, url: Url) -> Result<Vec<u8>, MediaError> {
        let limit = self.config.max_image_bytes;
        let mut response = self.client.get(url).send().await.map_err(classify)?;
        if response.status().is_redirection() {
            // reqwest hands back, unfollowed and without asking the policy, a redirect to a
            // scheme it cannot fetch (`file:`, `data:`, `gopher:`): refused by name, not as a
            // bare 3xx.
            let next = (response.headers().get(reqwest::header::LOCATION))
                .and_then(|location| location.to_str().ok())
                .and_then(|location| response.url().join(location).ok());
            if let Some(next) = next {
                self.guard.check(&next)?;
            }
        }
        if !response.status().is_success() {
            return Err(MediaError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(MediaError::TooLarge { limit });
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if bytes.len() + chunk.len() > limit {
                return Err(MediaError::TooLarge { limit });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

/// `data:[<mediatype>][;base64],<data>` (RFC 2397), given without the `data:` prefix.
fn decode_data_uri(rest: &str, limit: usize) -> Result<Vec<u8>, MediaError> {
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| MediaError::InvalidDataUri("no `,` before the data".into()))?;
    let mut params = meta.split(';');
    let mime = params
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if !mime.starts_with("image/") {
        return Err(MediaError::InvalidDataUri(format!(
            "media type `{mime}` is not an image type"
        )));
    }
    if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(MediaError::InvalidDataUri(
            "only base64-encoded data URIs are supported".into(),
        ));
    }
    // Checked before decoding, so a huge payload is refused without allocating for it.
    if data.len() / 4 * 3 > limit + 3 {
        return Err(MediaError::TooLarge { limit });
    }
    let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = BASE64
        .decode(data.as_bytes())
        .map_err(|e| MediaError::InvalidBase64(e.to_string()))?;
    if bytes.len() > limit {
        return Err(MediaError::TooLarge { limit });
    }
    Ok(bytes)
}

/// What may be fetched: public addresses, the operator's allowed origins, or (with
/// `allow_private`) anything over http(s).
#[derive(Debug, Clone)]
struct Guard {
    allow_private: bool,
    allowed: Arc<[MediaHost]>,
}

impl Guard {
    /// Scheme and literal-IP check of the URL a client sent and of every redirect hop
    /// (hostnames are checked when resolved, by [`GuardedResolver`]).
    fn check(&self, url: &Url) -> Result<(), MediaError> {
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(MediaError::UnsupportedScheme(other.to_string())),
        }
        let host = url
            .host_str()
            .ok_or_else(|| MediaError::Fetch("URL has no host".into()))?;
        if self.allow_private || self.allowed.iter().any(|h| h.is_origin_of(url)) {
            return Ok(());
        }
        // The URL parser has already normalised IPv4 spellings such as `2130706433` or `0x7f.1`.
        let Ok(ip) = literal_ip(host) else {
            // The resolver lets an allowed name resolve to private addresses without knowing
            // the port, so that name on any other port is refused here.
            if self.allowed.iter().any(|h| h.host == host) {
                let port = url.port_or_known_default().unwrap_or_default();
                return Err(MediaError::Forbidden(format!("{host}:{port}")));
            }
            return Ok(());
        };
        if !is_public(ip) {
            return Err(MediaError::Forbidden(ip.to_string()));
        }
        Ok(())
    }

    /// Whether `name` may resolve to non-public addresses: anything with `allow_private`, else
    /// the names of allowed origins (whose port [`Guard::check`] has checked before any
    /// connection is made).
    fn allows_private_name(&self, name: &str) -> bool {
        self.allow_private || self.allowed.iter().any(|h| h.host == name)
    }
}

fn literal_ip(host: &str) -> Result<IpAddr, std::net::AddrParseError> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
}

/// Whether `ip` is globally routable unicast: not loopback, private (RFC 1918, ULA), link-local,
/// shared (CGNAT), unspecified, broadcast, multicast, documentation, benchmarking or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let seg = v6.segments();
            let v4_at = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            // Transition spellings that route to an embedded IPv4 address are judged by it.
            if seg[0] == 0x2002 {
                // 6to4 2002:V4ADDR::/48
                return is_public_v4(v4_at(seg[1], seg[2]));
            }
            if seg[0] == 0x2001 && seg[1] == 0 {
                // Teredo 2001::/32: server IPv4 in bits 32..64, client IPv4 (inverted) in the
                // last 32; both must be public.
                let client = v4_at(!seg[6], !seg[7]);
                return is_public_v4(v4_at(seg[2], seg[3])) && is_public_v4(client);
            }
            if seg[..4] == [0; 4] && seg[4] == 0xffff && seg[5] == 0 {
                // SIIT IPv4-translated ::ffff:0:a.b.c.d (RFC 2765)
                return is_public_v4(v4_at(seg[6], seg[7]));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (seg[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
                || (seg[0] == 0x0064 && seg[1] == 0xff9b) // NAT64: reaches IPv4 space
                || seg[..6] == [0; 6]) // IPv4-compatible (deprecated) ::a.b.c.d
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

/// A DNS resolver that refuses names resolving to non-public addresses, and gives up when the
/// fetch's time is over (reqwest's timeout does not bound the system resolver's thread).
struct GuardedResolver {
    guard: Guard,
    timeout: Duration,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.guard.allows_private_name(name.as_str());
        let timeout = self.timeout;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let lookup = tokio::net::lookup_host((host.as_str(), 0));
            let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, lookup).await {
                Ok(found) => found?.collect(),
                Err(_) => {
                    let err: Box<dyn std::error::Error + Send + Sync> =
                        Box::new(MediaError::Timeout);
                    return Err(err);
                }
            };
            // The resolved address is not named: the client must not learn the server's
            // internal addresses from our errors.
            if !allow_private && addrs.iter().any(|addr| !is_public(addr.ip())) {
                let err: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(MediaError::Forbidden(host));
                return Err(err);
            }
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Maps a reqwest error to ours, finding the guard's refusal inside its source chain.
fn classify(err: reqwest::Error) -> MediaError {
    if err.is_timeout() {
        return MediaError::Timeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = source {
        if let Some(media) = current.downcast_ref::<MediaError>() {
            return media.clone();
        }
        source = current.source();
    }
    MediaError::Fetch(without_url(&err))
}

/// reqwest's message, minus the URL (which may carry credentials) and its `for url (...)`.
fn without_url(err: &reqwest::Error) -> String {
    let mut message = err.to_string();
    if let Some(i) = message.find(" for url (") {
        message.truncate(i);
    }
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        message = format!("{message}: {inner}");
        source = inner.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher(allow_private: bool) -> MediaFetcher {
        fetcher_allowing(allow_private, &[])
    }

    fn fetcher_allowing(allow_private: bool, allowed: &[&str]) -> MediaFetcher {
        MediaFetcher::new(MediaConfig {
            max_image_bytes: 64,
            fetch_timeout: Duration::from_secs(2),
            allow_private,
            allowed_hosts: allowed.iter().map(|h| h.parse().unwrap()).collect(),
        })
        .unwrap()
    }

    /// A loopback server that answers `/image` with 10 bytes, `/redirect/{status}?{url}` with
    /// that redirect to `url`, `/chain/{i}?{url}` with 301, 302, 307 then 308 (the last to
    /// `url`), and `/loop` with a redirect to itself.
    async fn redirecting_server() -> SocketAddr {
        use axum::extract::{Path, RawQuery};
        use axum::http::{header::LOCATION, StatusCode};
        use axum::routing::get;
        fn to(
            status: u16,
            location: String,
        ) -> (StatusCode, [(axum::http::HeaderName, String); 1]) {
            (
                StatusCode::from_u16(status).unwrap(),
                [(LOCATION, location)],
            )
        }
        let app = axum::Router::new()
            .route("/image", get(|| async { vec![7u8; 10] }))
            .route(
                "/redirect/{status}",
                get(
                    |Path(status): Path<u16>, RawQuery(url): RawQuery| async move {
                        to(status, url.unwrap_or_default())
                    },
                ),
            )
            .route(
                "/chain/{hop}",
                get(
                    |Path(hop): Path<usize>, RawQuery(url): RawQuery| async move {
                        let url = url.unwrap_or_default();
                        let status = [301, 302, 307, 308][hop];
                        if hop == 3 {
                            to(status, url)
                        } else {
                            to(status, format!("/chain/{}?{url}", hop + 1))
                        }
                    },
                ),
            )
            .route("/loop", get(|| async { to(302, "/loop".into()) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// A loopback listener that is never accepted from: a connection to it stays in its backlog,
    /// where [`assert_untouched`] finds it.
    fn trap() -> std::net::TcpListener {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    }

    fn assert_untouched(trap: &std::net::TcpListener) {
        match trap.accept() {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the redirect target was connected to: {other:?}"),
        }
    }

    #[test]
    fn allowed_hosts_are_exact_origins_in_the_url_normal_form() {
        for (given, host, port) in [
            ("images.internal:8080", "images.internal", 8080),
            ("LOCALHOST:80", "localhost", 80),
            ("0x7f.1:9", "127.0.0.1", 9),
            ("[0::1]:443", "[::1]", 443),
        ] {
            let parsed: MediaHost = given.parse().unwrap();
            assert_eq!(
                parsed,
                MediaHost {
                    host: host.into(),
                    port
                },
                "{given}"
            );
            assert_eq!(parsed.to_string(), format!("{host}:{port}"));
        }
        for bad in [
            "images.internal",
            "images.internal:http",
            ":80",
            "h:65536",
            "h:80/x",
            "user@h:80",
            "::1:80",
            "",
        ] {
            assert!(
                bad.parse::<MediaHost>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[tokio::test]
    async fn an_allowed_origin_is_fetched_and_its_other_ports_are_not() {
        let origin = redirecting_server().await;
        let port = origin.port();
        let trap = trap();
        let other = trap.local_addr().unwrap().port();
        for allowed in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
            let fetcher = fetcher_allowing(false, &[&allowed]);
            let host = allowed.split(':').next().unwrap();
            let image = format!("http://{host}:{port}/image");
            assert_eq!(
                fetcher.load(&image).await.unwrap(),
                vec![7u8; 10],
                "{allowed}"
            );
            // Redirects within the allowed origin are followed, through every status.
            let chain = format!("http://{host}:{port}/chain/0?/image");
            assert_eq!(
                fetcher.load(&chain).await.unwrap(),
                vec![7u8; 10],
                "{allowed}"
            );
            for url in [
                format!("http://{host}:{other}/x.png"),
                format!("http://127.0.0.2:{port}/image"),
                format!("http://[::1]:{port}/image"),
            ] {
                let err = fetcher.load(&url).await.unwrap_err();
                assert!(matches!(err, MediaError::Forbidden(_)), "{url}: {err:?}");
            }
        }
        assert_untouched(&trap);
    }

    #[tokio::test]
    async fn every_redirect_hop_is_checked_before_it_is_followed() {
        let origin = redirecting_server().await;
        let port = origin.port();
        let trap = trap();
        let trapped = trap.local_addr().unwrap().port();
        let fetcher = fetcher_allowing(false, &[&format!("127.0.0.1:{port}")]);
        let base = format!("http://127.0.0.1:{port}");
        let private = [
            format!("http://127.0.0.1:{trapped}/x.png"),
            format!("http://localhost:{trapped}/x.png"),
            format!("http://0x7f000001:{trapped}/x.png"),
            format!("https://127.0.0.1:{trapped}/x.png"),
            format!("http://[::ffff:127.0.0.1]:{trapped}/x.png"),
            format!("http://127.0.0.2:{port}/image"),
            "http://[::1]:9/x.png".into(),
            "http://169.254.169.254/latest/meta-data".into(),
            "http://10.0.0.1:9/x.png".into(),
            "http://[fd00::1]:9/x.png".into(),
        ];
        for target in &private {
            let mut urls: Vec<String> = [301, 302, 303, 307, 308]
                .iter()
                .map(|status| format!("{base}/redirect/{status}?{target}"))
                .collect();
            urls.push(format!("{base}/chain/0?{target}"));
            for url in urls {
                let err = fetcher.load(&url).await.unwrap_err();
                assert!(matches!(err, MediaError::Forbidden(_)), "{url}: {err:?}");
            }
        }
        for (target, scheme) in [
            ("file:///etc/passwd", "file"),
            ("gopher://127.0.0.1:9/_x", "gopher"),
            ("ftp://127.0.0.1:9/x.png", "ftp"),
            ("data:image/png;base64,iVBORw0KGgo=", "data"),
        ] {
            for url in [
                format!("{base}/redirect/302?{target}"),
                format!("{base}/chain/0?{target}"),
            ] {
                assert_eq!(
                    fetcher.load(&url).await,
                    Err(MediaError::UnsupportedScheme(scheme.into())),
                    "{url}"
                );
            }
        }
        match fetcher.load(&format!("{base}/loop")).await {
            Err(MediaError::Fetch(message)) => {
                assert!(message.contains("too many redirects"), "{message}")
            }
            other => panic!("a redirect loop gave {other:?}"),
        }
        assert_untouched(&trap);
        // Without the allowance even the first hop is refused.
        let err = super::tests::fetcher(false)
            .load(&format!("{base}/redirect/302?/image"))
            .await
            .unwrap_err();
        assert!(matches!(err, MediaError::Forbidden(_)), "{err:?}");
    }

    #[test]
    fn data_uri_decodes_with_or_without_padding() {
        assert_eq!(decode_data_uri("image/png;base64,aGk=", 64).unwrap(), b"hi");
        assert_eq!(decode_data_uri("image/png;base64,aGk", 64).unwrap(), b"hi");
        assert_eq!(
            decode_data_uri("IMAGE/JPEG;base64,aG\nk=", 64).unwrap(),
            b"hi"
        );
    }

    #[test]
    fn data_uri_refusals() {
        assert!(matches!(
            decode_data_uri("image/png;base64,@@@", 64),
            Err(MediaError::InvalidBase64(_))
        ));
        assert!(matches!(
            decode_data_uri("text/plain;base64,aGk=", 64),
            Err(MediaError::InvalidDataUri(_))
        ));
        assert!(matches!(
            decode_data_uri("image/png,raw", 64),
            Err(MediaError::InvalidDataUri(_))
        ));
        assert!(matches!(
            decode_data_uri("image/png;base64", 64),
            Err(MediaError::InvalidDataUri(_))
        ));
        let big = "A".repeat(200);
        assert_eq!(
            decode_data_uri(&format!("image/png;base64,{big}"), 64),
            Err(MediaError::TooLarge { limit: 64 })
        );
    }

    #[test]
    fn address_classification() {
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            // 6to4 of 127.0.0.1 and 192.168.0.1; Teredo with a private server or client; SIIT
            "2002:7f00:1::",
            "2002:c0a8:1::1",
            "2001:0:c0a8:1::ffff:ffff",
            "2001:0:808:808::3f57:fefe",
            "::ffff:0:7f00:1",
            "::ffff:0:a00:1",
        ];
        for ip in refused {
            assert!(!is_public(ip.parse().unwrap()), "{ip} should be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "2001:0:808:808::f7f7:f7f7",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} should be allowed");
        }
    }

    #[tokio::test]
    async fn private_urls_are_refused_before_any_connection() {
        let fetcher = fetcher(false);
        for url in [
            "http://127.0.0.1:1/x.png",
            "http://[::1]:1/x.png",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost:1/x.png",
        ] {
            let err = fetcher.load(url).await.unwrap_err();
            assert!(matches!(err, MediaError::Forbidden(_)), "{url}: {err:?}");
        }
    }

    #[tokio::test]
    async fn other_schemes_are_refused() {
        let err = fetcher(true).load("file:///etc/passwd").await.unwrap_err();
        assert_eq!(err, MediaError::UnsupportedScheme("file".into()));
    }

    #[tokio::test]
    async fn allowed_private_fetch_applies_the_byte_cap_and_status() {
        use axum::routing::get;
        let app = axum::Router::new()
            .route("/small", get(|| async { vec![1u8; 10] }))
            .route("/big", get(|| async { vec![1u8; 1000] }))
            .route(
                "/missing",
                get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let fetcher = fetcher(true);
        assert_eq!(
            fetcher.load(&format!("http://{addr}/small")).await.unwrap(),
            vec![1u8; 10]
        );
        assert_eq!(
            fetcher.load(&format!("http://{addr}/big")).await,
            Err(MediaError::TooLarge { limit: 64 })
        );
        assert_eq!(
            fetcher.load(&format!("http://{addr}/missing")).await,
            Err(MediaError::Status(404))
        );
        // The same server is refused when private addresses are not allowed.
        let port = addr.port();
        assert!(matches!(
            super::tests::fetcher(false)
                .load(&format!("http://localhost:{port}/small"))
                .await,
            Err(MediaError::Forbidden(_))
        ));
    }
}
