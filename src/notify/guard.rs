//! The server-side request forgery guard for notices.
//!
//! A business sets its own `notify_url`, so the worker must not be talked into
//! posting to its own network: loopback, private, link-local, shared (CGNAT),
//! cloud-metadata and other non-public addresses are refused unless
//! `NOTIFY_ALLOW_PRIVATE_NETWORKS=true`. The check sits in the HTTP client's
//! resolver ([`GuardedResolver`]), so the addresses checked are the very ones
//! the client connects to: a name that resolves to a public address now and to
//! `127.0.0.1` a moment later (DNS rebinding) is checked again at connect time.
//! A URL whose host is an IP literal never reaches a resolver, so
//! [`check_url`] checks it before sending.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Why a notice was not sent to an address. Holds no secret: the host and the address only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{host} is {addr}, a {class} address; notices go to public addresses only (NOTIFY_ALLOW_PRIVATE_NETWORKS=true allows private ones)"
)]
pub struct Refused {
    pub host: String,
    pub addr: IpAddr,
    pub class: &'static str,
}

/// Why a `notify_url` cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    #[error("config.notify_url is not a URL")]
    Unparsable,
    #[error("config.notify_url must be http or https, not {0:?}")]
    Scheme(String),
    #[error("config.notify_url has no host")]
    NoHost,
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// The class of address that is refused, or `None` for a public one. With
/// `allow_private`, loopback, private, link-local, CGNAT and unique-local
/// addresses pass; cloud-metadata, unspecified, multicast, broadcast and
/// reserved addresses never do (no receiver lives there).
pub fn refusal(ip: IpAddr, allow_private: bool) -> Option<&'static str> {
    let (class, private_kind) = match ip {
        IpAddr::V4(v4) => classify_v4(v4)?,
        IpAddr::V6(v6) => classify_v6(v6)?,
    };
    if private_kind && allow_private { None } else { Some(class) }
}

/// `(class, whether NOTIFY_ALLOW_PRIVATE_NETWORKS lets it through)`.
type Class = (&'static str, bool);

fn classify_v4(ip: Ipv4Addr) -> Option<Class> {
    let [a, b, c, _] = ip.octets();
    let class = match (a, b, c) {
        // Cloud metadata services: AWS/GCP/Azure/OpenStack, and Alibaba's (inside CGNAT).
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(169, 254, 170, 2) => {
            ("cloud-metadata", false)
        }
        _ if ip == Ipv4Addr::new(100, 100, 100, 200) => ("cloud-metadata", false),
        (0, _, _) => ("unspecified", false),
        (127, _, _) => ("loopback", true),
        (10, _, _) => ("private", true),
        (172, 16..=31, _) => ("private", true),
        (192, 168, _) => ("private", true),
        (169, 254, _) => ("link-local", true),
        (100, 64..=127, _) => ("shared (CGNAT)", true),
        (192, 0, 0) => ("reserved", false),
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => ("documentation", false),
        (198, 18..=19, _) => ("benchmarking", false),
        (224..=239, _, _) => ("multicast", false),
        (240..=255, _, _) => ("reserved", false),
        _ => return None,
    };
    Some(class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Class> {
    let seg = ip.segments();
    // Forms that carry an IPv4 address are judged by it, and refused whenever
    // that address would be: `::ffff:127.0.0.1` is loopback too.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4).map(|(class, private)| (mapped_class(class), private)).or(Some(("IPv4-mapped", true)));
    }
    let class = match seg {
        _ if ip.is_unspecified() => ("unspecified", false),
        _ if ip.is_loopback() => ("loopback", true),
        // AWS's IPv6 metadata endpoint, fd00:ec2::254 (inside unique-local).
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] => ("cloud-metadata", false),
        [s, ..] if s & 0xfe00 == 0xfc00 => ("private (unique local)", true),
        [s, ..] if s & 0xffc0 == 0xfe80 => ("link-local", true),
        [s, ..] if s & 0xffc0 == 0xfec0 => ("site-local", true),
        [s, ..] if s & 0xff00 == 0xff00 => ("multicast", false),
        // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach IPv4 hosts.
        [0, 0, 0, 0, 0, 0, _, _] => ("IPv4-compatible", true),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] | [0x64, 0xff9b, 1, ..] => ("NAT64", true),
        [0x2002, ..] => ("6to4", true),
        [0x2001, 0x0db8, ..] => ("documentation", false),
        [0x0100, 0, 0, 0, ..] => ("discard", false),
        _ => return None,
    };
    Some(class)
}

fn mapped_class(class: &'static str) -> &'static str {
    match class {
        "loopback" => "IPv4-mapped loopback",
        "private" => "IPv4-mapped private",
        "link-local" => "IPv4-mapped link-local",
        "cloud-metadata" => "IPv4-mapped cloud-metadata",
        "shared (CGNAT)" => "IPv4-mapped shared (CGNAT)",
        _ => "IPv4-mapped",
    }
}

/// Checks a `notify_url` before any request: scheme, host, and the address when
/// the host is an IP literal. Names are checked when they are resolved.
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, UrlProblem> {
    let url = Url::parse(raw.trim()).map_err(|_| UrlProblem::Unparsable)?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(UrlProblem::Scheme(url.scheme().to_string()));
    }
    let ip = match url.host() {
        None => return Err(UrlProblem::NoHost),
        Some(Host::Domain(_)) => None,
        Some(Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
    };
    if let Some(addr) = ip
        && let Some(class) = refusal(addr, allow_private)
    {
        return Err(Refused { host: addr.to_string(), addr, class }.into());
    }
    Ok(url)
}

/// The URL as it may be logged: scheme, host and port, never the path, query or
/// credentials (a workflow's webhook path is a bearer secret of its own).
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The HTTP client's resolver: the system's resolver, then the guard over every
/// address it returned. A name with any refused address is refused as a whole,
/// so the client cannot fall through to it.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for a in &addrs {
                if let Some(class) = refusal(a.ip(), allow_private) {
                    let refused: Box<dyn std::error::Error + Send + Sync> =
                        Box::new(Refused { host: host.clone(), addr: a.ip(), class });
                    return Err(refused);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Finds a guard refusal anywhere in an error's chain of causes (the client
/// wraps the resolver's error twice or more).
pub fn refused_in(err: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        refusal(s.parse().unwrap(), false)
    }

    #[test]
    fn public_addresses_pass() {
        for a in ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"] {
            assert_eq!(class(a), None, "{a}");
        }
        // Just outside the refused ranges.
        for a in ["172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0", "11.0.0.0", "192.169.0.1"] {
            assert_eq!(class(a), None, "{a}");
        }
    }

    #[test]
    fn non_public_addresses_are_refused_by_class() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.254", "private"),
            ("192.168.1.10", "private"),
            ("169.254.1.1", "link-local"),
            ("169.254.169.254", "cloud-metadata"),
            ("100.100.100.200", "cloud-metadata"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fc00::1", "private (unique local)"),
            ("fd12:3456::1", "private (unique local)"),
            ("fd00:ec2::254", "cloud-metadata"),
            ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
            ("::ffff:10.0.0.1", "IPv4-mapped private"),
            ("::ffff:169.254.169.254", "IPv4-mapped cloud-metadata"),
            ("::ffff:8.8.8.8", "IPv4-mapped"),
            ("::127.0.0.1", "IPv4-compatible"),
            ("64:ff9b::7f00:1", "NAT64"),
            ("2002:7f00:1::1", "6to4"),
            ("ff02::1", "multicast"),
        ];
        for (addr, want) in cases {
            assert_eq!(class(addr), Some(want), "{addr}");
        }
    }

    #[test]
    fn allowing_private_networks_never_allows_metadata_or_unspecified() {
        let allow = |s: &str| refusal(s.parse().unwrap(), true);
        for a in ["127.0.0.1", "10.0.0.1", "192.168.0.2", "::1", "fd12::1", "::ffff:127.0.0.1", "100.64.1.1"] {
            assert_eq!(allow(a), None, "{a}");
        }
        for a in ["169.254.169.254", "fd00:ec2::254", "0.0.0.0", "::", "100.100.100.200", "::ffff:169.254.169.254"] {
            assert!(allow(a).is_some(), "{a}");
        }
    }

    #[test]
    fn urls_are_checked_for_scheme_host_and_literal_addresses() {
        assert!(check_url("https://n8n.example.com/webhook/abc", false).is_ok());
        assert!(check_url("http://n8n.example.com:5678/webhook/abc", false).is_ok());
        assert_eq!(check_url("ftp://n8n.example.com/x", false).unwrap_err(), UrlProblem::Scheme("ftp".into()));
        assert_eq!(check_url("file:///etc/passwd", false).unwrap_err(), UrlProblem::Scheme("file".into()));
        assert_eq!(check_url("not a url", false).unwrap_err(), UrlProblem::Unparsable);
        let refused = check_url("http://127.0.0.1:8080/x", false).unwrap_err();
        assert!(matches!(&refused, UrlProblem::Refused(r) if r.class == "loopback"), "{refused:?}");
        assert!(refused.to_string().contains("NOTIFY_ALLOW_PRIVATE_NETWORKS"));
        assert!(check_url("http://[::ffff:7f00:1]/x", false).is_err());
        // Decimal and hex spellings of 127.0.0.1 are parsed by the URL parser as IPv4.
        assert!(check_url("http://2130706433/x", false).is_err());
        assert!(check_url("http://0x7f.1/x", false).is_err());
        assert!(check_url("http://127.0.0.1:8080/x", true).is_ok());
    }

    #[test]
    fn the_logged_form_of_a_url_has_no_path_query_or_credentials() {
        let url = Url::parse("https://user:pw@n8n.example.com:8443/webhook/secret-path?token=t").unwrap();
        assert_eq!(origin(&url), "https://n8n.example.com:8443");
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_that_resolves_to_loopback() {
        let r = GuardedResolver { allow_private: false };
        let err = match r.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e,
        };
        let refused = refused_in(err.as_ref()).expect("a guard refusal");
        assert_eq!(refused.host, "localhost");
        assert!(refused.class.contains("loopback"), "{refused}");
        let allowed = GuardedResolver { allow_private: true };
        let addrs: Vec<_> = match allowed.resolve("localhost".parse().unwrap()).await {
            Ok(a) => a.collect(),
            Err(e) => panic!("allowed: {e}"),
        };
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
