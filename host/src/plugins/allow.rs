//! Outbound allow-lists: which origins a plugin's HTTP calls may reach.
//!
//! An entry is `scheme://host[:port]`. The host may start with `*.` to allow
//! every subdomain (not the bare domain); the port may be `*`; an omitted
//! port means the scheme's default. Paths are not part of an entry. A literal
//! IP address is allowed only by an entry naming that same address, and a
//! wildcard never matches an IP address.
//!
//! Entries are the plugin author's (literal in the manifest, or a manifest
//! default) or the operator's (a `{key}` entry whose value the operator set).
//! Only a request to exactly an operator's origin (scheme, host and port)
//! may reach loopback, private, link-local or cloud-metadata addresses;
//! `outbound` enforces that on literal addresses and on the addresses a
//! name resolves to.

use url::{Host, Url};

/// One allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: HostPattern,
    /// `None` = any port.
    port: Option<u16>,
    /// Listed by the operator (through a setting), not by the plugin.
    operator: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com` → suffix `.example.com`.
    Subdomains(String),
}

/// A parsed allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    origins: Vec<Origin>,
}

/// An entry that is not `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not an origin like https://api.example.com[:port]: {reason}")]
pub struct AllowListError {
    entry: String,
    reason: String,
}

impl AllowList {
    /// Parse the plugin author's entries; the first bad one is the error.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<AllowList, AllowListError> {
        AllowList::parse_entries(entries.into_iter().map(|e| (e, false)))
    }

    /// Parse entries, each marked as the operator's or not.
    pub fn parse_entries<'a>(entries: impl IntoIterator<Item = (&'a str, bool)>) -> Result<AllowList, AllowListError> {
        let origins = entries
            .into_iter()
            .map(|(entry, operator)| parse_entry(entry).map(|o| Origin { operator, ..o }))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { origins })
    }

    /// Whether `url` may be requested.
    pub fn allows(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let is_ip = !matches!(url.host(), Some(Host::Domain(_)));
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let port = url.port_or_known_default();
        self.origins.iter().any(|o| {
            o.scheme == url.scheme()
                && o.port.is_none_or(|p| Some(p) == port)
                && match &o.host {
                    HostPattern::Exact(h) => *h == host,
                    HostPattern::Subdomains(suffix) => {
                        !is_ip && host.ends_with(suffix.as_str()) && host.len() > suffix.len()
                    }
                }
        })
    }

    /// Whether `url` is exactly an origin the operator set (scheme, host and
    /// port): only such a request may reach an internal address.
    pub fn is_operator_origin(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else { return false };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.origins.iter().any(|o| {
            o.operator
                && o.scheme == url.scheme()
                && o.port.is_some()
                && o.port == url.port_or_known_default()
                && o.host == HostPattern::Exact(host.clone())
        })
    }

    /// The entries as written back, for listings.
    pub fn describe(&self) -> Vec<String> {
        self.origins
            .iter()
            .map(|o| {
                let host = match &o.host {
                    HostPattern::Exact(h) => h.clone(),
                    HostPattern::Subdomains(s) => format!("*{s}"),
                };
                match o.port {
                    Some(p) => format!("{}://{host}:{p}", o.scheme),
                    None => format!("{}://{host}:*", o.scheme),
                }
            })
            .collect()
    }
}

fn parse_entry(entry: &str) -> Result<Origin, AllowListError> {
    let fail = |reason: &str| AllowListError { entry: entry.to_string(), reason: reason.to_string() };
    let (scheme, rest) = entry.split_once("://").ok_or_else(|| fail("missing scheme"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(fail("scheme must be http or https"));
    }
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(fail("an entry is an origin only: no path, query or credentials"));
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    // `[v6]:port` keeps its colons inside the brackets.
    let split_at = match rest.rfind(']') {
        Some(close) => rest[close..].find(':').map(|i| close + i),
        None => rest.rfind(':'),
    };
    let (host, port) = match split_at {
        Some(i) => {
            let p = &rest[i + 1..];
            let port = if p == "*" { None } else { Some(p.parse::<u16>().map_err(|_| fail("bad port"))?) };
            (&rest[..i], port)
        }
        None => (rest, Some(default_port)),
    };
    if host.is_empty() {
        return Err(fail("empty host"));
    }
    let host = host.to_ascii_lowercase();
    let pattern = match host.strip_prefix("*.") {
        Some(domain) if !domain.is_empty() && !domain.contains('*') => HostPattern::Subdomains(format!(".{domain}")),
        _ if host.contains('*') => return Err(fail("a wildcard may only be a leading `*.`")),
        _ => {
            // Normalise through the URL parser so 127.000.000.001 and friends
            // compare as the URL the plugin sends will.
            let url = Url::parse(&format!("{scheme}://{host}/")).map_err(|_| fail("bad host"))?;
            HostPattern::Exact(url.host_str().unwrap_or(&host).to_string())
        }
    };
    Ok(Origin { scheme, host: pattern, port, operator: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(entries: &[&str], url: &str) -> bool {
        AllowList::parse(entries.iter().copied()).unwrap().allows(&Url::parse(url).unwrap())
    }

    #[test]
    fn exact_origin_with_default_port() {
        assert!(allows(&["https://graph.facebook.com"], "https://graph.facebook.com/v21.0/1/events"));
        assert!(allows(&["https://graph.facebook.com"], "https://GRAPH.facebook.com./x"));
        assert!(!allows(&["https://graph.facebook.com"], "http://graph.facebook.com/"));
        assert!(!allows(&["https://graph.facebook.com"], "https://graph.facebook.com:8443/"));
        assert!(!allows(&["https://graph.facebook.com"], "https://graph.facebook.com.evil.net/"));
    }

    #[test]
    fn explicit_and_any_port() {
        assert!(allows(&["http://127.0.0.1:8080"], "http://127.0.0.1:8080/x"));
        assert!(!allows(&["http://127.0.0.1:8080"], "http://127.0.0.1:8081/x"));
        assert!(allows(&["http://localhost:*"], "http://localhost:1234/"));
    }

    #[test]
    fn subdomain_wildcard_excludes_bare_domain() {
        assert!(allows(&["https://*.brevo.com"], "https://api.brevo.com/v3/smtp/email"));
        assert!(!allows(&["https://*.brevo.com"], "https://brevo.com/"));
        assert!(!allows(&["https://*.brevo.com"], "https://notbrevo.com/"));
    }

    #[test]
    fn literal_ips_need_a_literal_entry() {
        assert!(!allows(&["https://*.example.com", "http://127.0.0.1:*"], "http://169.254.169.254/latest/meta-data"));
        assert!(allows(&["http://169.254.169.254"], "http://169.254.169.254/latest"));
        assert!(!allows(&[], "http://[::1]/"));
    }

    #[test]
    fn a_wildcard_never_matches_an_ip_address() {
        assert!(!allows(&["http://*.0.0.1:*"], "http://127.0.0.1:8080/"));
        assert!(!allows(&["http://*.254.169.254"], "http://169.254.169.254/"));
        assert!(!allows(&["http://*.1]:*"], "http://[::1]:80/"));
        assert!(allows(&["http://*.example.com:*"], "http://a.example.com:8080/"));
    }

    #[test]
    fn only_exactly_an_operator_origin_is_one() {
        let list = AllowList::parse_entries([
            ("http://127.0.0.1:9", true),
            ("http://127.0.0.1:*", false),
            ("http://localhost:9", false),
            ("https://*.x.com", true),
        ])
        .unwrap();
        let is = |u: &str| list.is_operator_origin(&Url::parse(u).unwrap());
        assert!(is("http://127.0.0.1:9/events"));
        // The same host on another port or scheme is the plugin's entry, not the operator's.
        assert!(!is("http://127.0.0.1:6379/") && !is("https://127.0.0.1:9/"));
        assert!(!is("http://localhost:9/") && !is("https://a.x.com/"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "graph.facebook.com",
            "ftp://x.com",
            "https://x.com/path",
            "https://a.*.com",
            "https://u:p@x.com",
            "https://x.com:port",
        ] {
            assert!(AllowList::parse([bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_with_trailing_slash_is_an_origin() {
        assert!(allows(&["https://api.brevo.com/"], "https://api.brevo.com/v3/smtp/email"));
    }
}
