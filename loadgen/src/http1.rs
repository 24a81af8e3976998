//! Minimal HTTP/1.x head parsing for the lean paths (the origin and the
//! close-mode client): the request or status line and the few headers that
//! decide framing (`Content-Length`, `Transfer-Encoding`, `Connection`).
//! Anything fancier goes through hyper.

/// Longest request or response head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a head could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed start line")]
    StartLine,
    #[error("unsupported HTTP version")]
    Version,
    #[error("malformed header line")]
    Header,
    #[error("bad Content-Length")]
    ContentLength,
}

/// Where the head ends (index just past the blank line), if complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    // Heads are short and usually arrive in one read: a plain scan is fine.
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The framing-relevant headers of a head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Framing {
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// `Connection: close` was present.
    pub close: bool,
    /// `Connection: keep-alive` was present.
    pub keep_alive: bool,
}

fn parse_headers(lines: &[u8]) -> Result<Framing, HeadError> {
    let mut f = Framing::default();
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HeadError::Header)?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let text = std::str::from_utf8(value).map_err(|_| HeadError::ContentLength)?;
            let n: u64 = text.parse().map_err(|_| HeadError::ContentLength)?;
            if f.content_length.is_some_and(|old| old != n) {
                return Err(HeadError::ContentLength);
            }
            f.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            f.chunked = value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    f.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    f.keep_alive = true;
                }
            }
        }
    }
    Ok(f)
}

fn split_start_line(head: &[u8]) -> (&[u8], &[u8]) {
    match head.iter().position(|&b| b == b'\n') {
        Some(i) => (
            head[..i].strip_suffix(b"\r").unwrap_or(&head[..i]),
            &head[i + 1..],
        ),
        None => (head, &[]),
    }
}

fn minor_version(v: &[u8]) -> Result<u8, HeadError> {
    match v {
        b"HTTP/1.1" => Ok(1),
        b"HTTP/1.0" => Ok(0),
        _ if v.starts_with(b"HTTP/") => Err(HeadError::Version),
        _ => Err(HeadError::StartLine),
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a [u8],
    pub target: &'a [u8],
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub framing: Framing,
    /// Length of the head including the blank line.
    pub len: usize,
}

impl RequestHead<'_> {
    /// Whether the connection stays open after the response.
    pub fn keep_alive(&self) -> bool {
        if self.minor == 0 {
            self.framing.keep_alive && !self.framing.close
        } else {
            !self.framing.close
        }
    }
}

/// Parses a request head at the start of `buf`; `Ok(None)` means more bytes
/// are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead<'_>>, HeadError> {
    let Some(len) = head_end(buf) else {
        return if buf.len() > MAX_HEAD {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let (start, rest) = split_start_line(&buf[..len]);
    let mut parts = start.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::StartLine);
    };
    let minor = minor_version(version)?;
    let framing = parse_headers(rest)?;
    Ok(Some(RequestHead {
        method,
        target,
        minor,
        framing,
        len,
    }))
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor: u8,
    pub framing: Framing,
    /// Length of the head including the blank line.
    pub len: usize,
}

/// Parses a response head at the start of `buf`; `Ok(None)` means more
/// bytes are needed.
pub fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
    let Some(len) = head_end(buf) else {
        return if buf.len() > MAX_HEAD {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let (start, rest) = split_start_line(&buf[..len]);
    let mut parts = start.splitn(3, |&b| b == b' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HeadError::StartLine);
    };
    let minor = minor_version(version)?;
    let status = std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (100..1000).contains(c))
        .ok_or(HeadError::StartLine)?;
    let framing = parse_headers(rest)?;
    Ok(Some(ResponseHead {
        status,
        minor,
        framing,
        len,
    }))
}

/// The text after the head, up to 120 bytes, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let end = body.len().min(120);
    String::from_utf8_lossy(&body[..end])
        .trim()
        .replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let r = parse_request(b"GET /?s=1k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nextra")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, b"GET");
        assert_eq!(r.target, b"/?s=1k");
        assert!(!r.keep_alive());
        assert_eq!(r.len, 51);
        let r = parse_request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive());
        let r = parse_request(b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.keep_alive());
        let r = parse_request(b"GET / HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert!(r.keep_alive());
        assert_eq!(
            parse_request(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HeadError::Version)
        );
        assert_eq!(parse_request(b"GARBAGE\r\n\r\n"), Err(HeadError::StartLine));
    }

    #[test]
    fn response_heads() {
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.framing.content_length, Some(12));
        assert!(r.framing.close);
        let r = parse_response(b"HTTP/1.0 404\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 404);
        assert!(r.framing.chunked);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            Err(HeadError::ContentLength)
        );
    }
}
