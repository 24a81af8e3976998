//! The load target: an `http://HOST[:PORT]/PATH?QUERY` URL read and
//! resolved once, before any load starts.

use std::net::{SocketAddr, ToSocketAddrs};

/// Why a URL can't be a load target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "invalid URL '{0}': expected http://HOST[:PORT]/PATH, e.g. http://127.0.0.1:8000/?s=1k"
    )]
    Malformed(String),
    #[error("unsupported URL scheme in '{0}': only http:// is supported")]
    Scheme(String),
    #[error("invalid URL '{0}': bad port (expected 1-65535)")]
    Port(String),
    #[error("cannot resolve host '{host}' in URL '{url}': {source}")]
    Resolve {
        url: String,
        host: String,
        source: std::io::Error,
    },
}

/// A parsed, resolved HTTP target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// The `Host` header value (host, plus `:port` when not 80).
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path_and_query: String,
    /// The resolved address (the first one the resolver returns).
    pub addr: SocketAddr,
}

impl Target {
    /// Parses and resolves `url`.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let malformed = || TargetError::Malformed(url.to_string());
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _))
                if !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '+') =>
            {
                return Err(TargetError::Scheme(url.to_string()));
            }
            _ => return Err(malformed()),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path_and_query = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if authority.is_empty()
            || authority.contains('@')
            || path_and_query
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(malformed());
        }
        // Host and port; IPv6 literals are bracketed.
        let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
            let (h, after) = stripped.split_once(']').ok_or_else(malformed)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(malformed)?),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_ascii_whitespace() || c == '/') {
            return Err(malformed());
        }
        let port: u16 = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(TargetError::Port(url.to_string())),
            },
        };
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|source| TargetError::Resolve {
                url: url.to_string(),
                host: host.to_string(),
                source,
            })?
            .next()
            .ok_or_else(|| TargetError::Resolve {
                url: url.to_string(),
                host: host.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
        Ok(Self {
            url: url.to_string(),
            authority: authority.to_string(),
            path_and_query,
            addr,
        })
    }

    /// The request bytes for one GET, with `Connection: close` when
    /// `close` is set, else `keep-alive`.
    pub fn request_bytes(&self, close: bool) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: hvprof-load\r\nAccept: */*\r\nConnection: {}\r\n\r\n",
            self.path_and_query,
            self.authority,
            if close { "close" } else { "keep-alive" }
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:8000/?s=1k").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(t.path_and_query, "/?s=1k");
        assert_eq!(t.authority, "127.0.0.1:8000");
        let t = Target::parse("http://127.0.0.1:9?s=0").unwrap();
        assert_eq!(t.path_and_query, "/?s=0");
        let t = Target::parse("http://[::1]:81").unwrap();
        assert_eq!(t.path_and_query, "/");
        assert_eq!(t.addr.port(), 81);
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(matches!(
            Target::parse("127.0.0.1:80"),
            Err(TargetError::Malformed(_))
        ));
        assert!(matches!(
            Target::parse("http//x"),
            Err(TargetError::Malformed(_))
        ));
        assert!(matches!(
            Target::parse("https://127.0.0.1/"),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::parse("http://127.0.0.1:0/"),
            Err(TargetError::Port(_))
        ));
        assert!(matches!(
            Target::parse("http://127.0.0.1:99999/"),
            Err(TargetError::Port(_))
        ));
        assert!(matches!(
            Target::parse("http:///x"),
            Err(TargetError::Malformed(_))
        ));
    }
}
