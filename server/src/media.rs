//! Getting an image's bytes from an `image_url`: a `data:` URI decoded in place, or an http(s)
//! URL fetched with a timeout, a byte cap and a guard against server-side request forgery.
//!
//! The guard resolves the host itself and refuses the whole request if any address is loopback,
//! private, link-local or otherwise not globally routable (unless the operator allows them); the
//! connection then goes to exactly the addresses that were checked, so a DNS answer that changes
//! between check and connect (rebinding) cannot slip through. Redirects are checked the same way.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_image_bytes: 20 * 1024 * 1024,
            fetch_timeout: Duration::from_secs(10),
            allow_private: false,
        }
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

pub struct MediaFetcher {
    config: MediaConfig,
    client: reqwest::Client,
}

impl MediaFetcher {
    pub fn new(config: MediaConfig) -> Result<Self, reqwest::Error> {
        let allow_private = config.allow_private;
        let client = reqwest::Client::builder()
            .timeout(config.fetch_timeout)
            .connect_timeout(config.fetch_timeout)
            // An operator's HTTP_PROXY would connect on our behalf, past the guard.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private,
                timeout: config.fetch_timeout,
            }))
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    return attempt.error("too many redirects");
                }
                match check_url(attempt.url(), allow_private) {
                    Ok(()) => attempt.follow(),
                    Err(err) => attempt.error(err),
                }
            }))
            .user_agent(concat!("tga-serve/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { config, client })
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
        check_url(&parsed, self.config.allow_private)?;
        self.fetch(parsed).await
    }

    async fn fetch(&self, url: Url) -> Result<Vec<u8>, MediaError> {
        let limit = self.config.max_image_bytes;
        let mut response = self.client.get(url).send().await.map_err(classify)?;
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

/// Scheme and literal-IP check (hostnames are checked when resolved, by [`GuardedResolver`]).
fn check_url(url: &Url, allow_private: bool) -> Result<(), MediaError> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(MediaError::UnsupportedScheme(other.to_string())),
    }
    let host = url
        .host_str()
        .ok_or_else(|| MediaError::Fetch("URL has no host".into()))?;
    // The URL parser has already normalised IPv4 spellings such as `2130706433` or `0x7f.1`.
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    if !allow_private && !is_public(ip) {
        return Err(MediaError::Forbidden(ip.to_string()));
    }
    Ok(())
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
    allow_private: bool,
    timeout: Duration,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
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
        MediaFetcher::new(MediaConfig {
            max_image_bytes: 64,
            fetch_timeout: Duration::from_secs(2),
            allow_private,
        })
        .unwrap()
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
