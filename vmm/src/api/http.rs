//! A small, strict HTTP/1.1 request parser and response writer: just what a
//! JSON control API on a local socket needs. Bodies are framed by
//! Content-Length only (no chunked encoding); every size is bounded; any
//! framing doubt is an error that closes the connection.

use super::{MAX_BODY_SIZE, MAX_HEAD_SIZE};

/// A complete request: head and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    /// The path of the target (origin-form, or taken from absolute-form).
    pub path: String,
    pub body: Vec<u8>,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
}

/// A request the parser refuses; the connection closes after the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
}

/// What the parser has after the bytes fed so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// More bytes are needed.
    Incomplete,
    /// The head asked `Expect: 100-continue` and the body is still to come:
    /// send an interim 100 response, then feed more bytes.
    SendContinue,
    /// A full request; call again for any pipelined one behind it.
    Request(Request),
}

/// A parsed request head, kept while its body arrives.
#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    expect_continue: bool,
    content_length: usize,
    /// Bytes of the head, through its final empty line.
    len: usize,
}

/// Incremental request parser for one connection. Feed it bytes as they come;
/// it keeps whatever follows a complete request (pipelining).
#[derive(Debug, Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
    /// How far the search for the head's end has looked.
    scanned: usize,
    /// Where the line being scanned starts.
    line_start: usize,
    head: Option<Head>,
    continue_sent: bool,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the connection.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// True when no part of a request is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Advances as far as the buffered bytes allow.
    pub fn poll(&mut self) -> Result<Progress, HttpError> {
        if self.head.is_none() {
            let Some(len) = self.find_head_end() else {
                if self.buf.len() > MAX_HEAD_SIZE {
                    return Err(head_too_large());
                }
                return Ok(Progress::Incomplete);
            };
            if len > MAX_HEAD_SIZE {
                return Err(head_too_large());
            }
            let head = parse_head(self.buf.get(..len).unwrap_or_default(), len)?;
            self.head = Some(head);
        }
        let Some(head) = &self.head else {
            return Ok(Progress::Incomplete);
        };
        let total = head.len + head.content_length;
        if self.buf.len() >= total {
            let body = self.buf.get(head.len..total).unwrap_or_default().to_vec();
            let req = Request {
                method: head.method.clone(),
                path: head.path.clone(),
                body,
                keep_alive: head.keep_alive,
            };
            self.buf.drain(..total);
            self.head = None;
            self.scanned = 0;
            self.line_start = 0;
            self.continue_sent = false;
            return Ok(Progress::Request(req));
        }
        if head.expect_continue && !self.continue_sent {
            self.continue_sent = true;
            return Ok(Progress::SendContinue);
        }
        Ok(Progress::Incomplete)
    }

    /// Finds the empty line ending the head; returns the head's length.
    /// Lines end in LF, optionally preceded by CR. Empty lines before the
    /// request line are dropped, as RFC 9112 asks servers to tolerate.
    fn find_head_end(&mut self) -> Option<usize> {
        while let Some(&byte) = self.buf.get(self.scanned) {
            let i = self.scanned;
            self.scanned += 1;
            if byte != b'\n' {
                continue;
            }
            let line = self.buf.get(self.line_start..i).unwrap_or_default();
            let empty = line.is_empty() || line == b"\r";
            if empty && self.line_start == 0 {
                self.buf.drain(..=i);
                self.scanned = 0;
                continue;
            }
            if empty {
                return Some(i + 1);
            }
            self.line_start = i + 1;
        }
        None
    }
}

fn head_too_large() -> HttpError {
    HttpError::new(
        431,
        format!("request line and headers exceed {MAX_HEAD_SIZE} bytes"),
    )
}

/// RFC 9110 token characters (methods, header names).
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

fn parse_head(bytes: &[u8], len: usize) -> Result<Head, HttpError> {
    let mut lines = bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let (method, path, http11) = parse_request_line(request_line)?;

    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    let mut close = false;
    let mut keep_alive_token = false;
    for line in lines.filter(|l| !l.is_empty()) {
        if line.contains(&b'\r') {
            return Err(HttpError::bad("stray CR in a header line"));
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(HttpError::bad("folded header lines are not supported"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| HttpError::bad("header line without ':'"))?;
        let (name, value) = line.split_at(colon);
        if !is_token(name) {
            return Err(HttpError::bad(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        let value = value.get(1..).unwrap_or_default().trim_ascii();
        if value.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f) {
            return Err(HttpError::bad("control character in a header value"));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let value = String::from_utf8_lossy(value);
        match name.as_str() {
            "transfer-encoding" => {
                return Err(HttpError::new(
                    501,
                    "Transfer-Encoding is not supported; send Content-Length",
                ))
            }
            "content-length" => {
                let n = parse_content_length(&value)?;
                if content_length.is_some_and(|old| old != n) {
                    return Err(HttpError::bad("conflicting Content-Length headers"));
                }
                content_length = Some(n);
            }
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    close |= token.eq_ignore_ascii_case("close");
                    keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" => {
                if !value.eq_ignore_ascii_case("100-continue") {
                    return Err(HttpError::new(
                        417,
                        format!("unsupported expectation {value:?}"),
                    ));
                }
                expect_continue = true;
            }
            _ => {}
        }
    }

    let content_length = match content_length {
        Some(n) => n,
        None if method == "PUT" || method == "PATCH" => {
            return Err(HttpError::new(
                411,
                format!("{method} needs a Content-Length header"),
            ))
        }
        None => 0,
    };
    if content_length > MAX_BODY_SIZE {
        return Err(HttpError::new(
            413,
            format!("request body of {content_length} bytes exceeds {MAX_BODY_SIZE} bytes"),
        ));
    }
    Ok(Head {
        method,
        path,
        keep_alive: !close && (http11 || keep_alive_token),
        expect_continue: expect_continue && content_length > 0,
        content_length,
        len,
    })
}

/// Parses `METHOD SP target SP HTTP/1.x`; returns the method, the path and
/// whether the version is 1.1.
fn parse_request_line(line: &[u8]) -> Result<(String, String, bool), HttpError> {
    let text = std::str::from_utf8(line)
        .ok()
        .filter(|t| t.is_ascii())
        .ok_or_else(|| HttpError::bad("request line is not ASCII"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::bad(format!("malformed request line {text:?}")));
    };
    if !is_token(method.as_bytes()) {
        return Err(HttpError::bad(format!("invalid method {method:?}")));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.len() == 8 && v.starts_with("HTTP/") => {
            return Err(HttpError::new(
                505,
                format!("{v} is not supported; use HTTP/1.1"),
            ))
        }
        v => return Err(HttpError::bad(format!("invalid HTTP version {v:?}"))),
    };
    let path = parse_target(target)?;
    Ok((method.to_string(), path, http11))
}

/// Accepts origin-form (`/vm`) and absolute-form (`http://localhost/vm`).
fn parse_target(target: &str) -> Result<String, HttpError> {
    if target.bytes().any(|c| !c.is_ascii_graphic()) {
        return Err(HttpError::bad("invalid character in the request target"));
    }
    let path = if target.starts_with('/') {
        target
    } else if let Some(rest) = target.strip_prefix("http://") {
        rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/")
    } else {
        return Err(HttpError::bad(format!("invalid request target {target:?}")));
    };
    if path.contains(['?', '#']) {
        return Err(HttpError::bad("query strings are not supported"));
    }
    Ok(path.to_string())
}

fn parse_content_length(value: &str) -> Result<usize, HttpError> {
    let bad = || HttpError::bad(format!("invalid Content-Length {value:?}"));
    if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    // Anything that does not fit is far above the body limit anyway.
    Ok(value.parse::<usize>().unwrap_or(usize::MAX))
}

/// The interim answer to `Expect: 100-continue`.
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response ready to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    /// JSON body; `None` only for 204.
    pub body: Option<Vec<u8>>,
    /// Methods for the `Allow` header of a 405.
    pub allow: Option<&'static str>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    /// 200 with `value`, or 204 when `value` is null.
    pub fn json(value: &serde_json::Value) -> Self {
        if value.is_null() {
            return Self {
                status: 204,
                body: None,
                allow: None,
                close: false,
            };
        }
        Self {
            status: 200,
            body: Some(value.to_string().into_bytes()),
            allow: None,
            close: false,
        }
    }

    /// An error with `{"fault_message": message}`; a status outside 400..=599
    /// becomes 500.
    pub fn fault(status: u16, message: &str) -> Self {
        let status = if (400..=599).contains(&status) {
            status
        } else {
            500
        };
        let body = serde_json::json!({ "fault_message": message });
        Self {
            status,
            body: Some(body.to_string().into_bytes()),
            allow: None,
            close: false,
        }
    }

    /// The bytes to write.
    pub fn encode(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        head.push_str(concat!("Server: vmm/", env!("CARGO_PKG_VERSION"), "\r\n"));
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        // 204 carries neither a body nor Content-Length (RFC 9110 8.6).
        if let Some(body) = &self.body {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if let Some(body) = &self.body {
            out.extend_from_slice(body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        s if s < 500 => "Client Error",
        _ => "Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Result<Vec<Request>, HttpError> {
        let mut p = Parser::new();
        p.feed(bytes);
        let mut out = Vec::new();
        loop {
            match p.poll()? {
                Progress::Request(r) => out.push(r),
                Progress::SendContinue => {}
                Progress::Incomplete => return Ok(out),
            }
        }
    }

    fn one(bytes: &[u8]) -> Request {
        let mut reqs = parse_all(bytes).unwrap();
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        reqs.remove(0)
    }

    fn status_of(bytes: &[u8]) -> u16 {
        parse_all(bytes).unwrap_err().status
    }

    #[test]
    fn good_requests() {
        let r = one(b"GET /vm HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/vm"));
        assert!(r.body.is_empty() && r.keep_alive);

        let r = one(b"PATCH /vm HTTP/1.1\r\ncontent-LENGTH:  18 \r\n\r\n{\"state\":\"Paused\"}");
        assert_eq!(r.body, b"{\"state\":\"Paused\"}");

        // Bare LF line endings, absolute-form target, HTTP/1.0 closes.
        let r = one(b"GET http://localhost/version HTTP/1.0\nHost: x\n\n");
        assert_eq!(r.path, "/version");
        assert!(!r.keep_alive);
        let r = one(b"GET /vm HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(r.keep_alive);
        let r = one(b"GET /vm HTTP/1.1\r\nConnection: foo, close\r\n\r\n");
        assert!(!r.keep_alive);
        // Leading empty lines are tolerated.
        let r = one(b"\r\n\r\nGET /vm HTTP/1.1\r\n\r\n");
        assert_eq!(r.path, "/vm");
        // Same Content-Length twice is fine.
        let r = one(b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab");
        assert_eq!(r.body, b"ab");
    }

    #[test]
    fn malformed_classes() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET /vm\r\n\r\n", 400),
            (b"GET  /vm HTTP/1.1\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1 x\r\n\r\n", 400),
            (b"G(T /vm HTTP/1.1\r\n\r\n", 400),
            (b"GET vm HTTP/1.1\r\n\r\n", 400),
            (b"GET /vm?x=1 HTTP/1.1\r\n\r\n", 400),
            (b"GET /v\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
            (b"GET /vm HTTP/2.0\r\n\r\n", 505),
            (b"GET /vm HTTP/1.1x\r\n\r\n", 400),
            (b"GET /vm FTP/1.1\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\n: x\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nA: b\rc\r\n\r\n", 400),
            (b"GET /vm HTTP/1.1\r\nA: b\x01c\r\n\r\n", 400),
            (b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"PUT /vm HTTP/1.1\r\nContent-Length: 1,1\r\n\r\n", 400),
            (
                b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"PUT /vm HTTP/1.1\r\n\r\n", 411),
            (b"PATCH /vm HTTP/1.1\r\nHost: x\r\n\r\n", 411),
            (
                b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (b"PUT /vm HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n", 413),
            (
                b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
            (
                b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nExpect: magic\r\n\r\n",
                417,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                status_of(bytes),
                *want,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn size_limits() {
        // A head just under the limit parses; one byte more is refused even
        // before its end arrives.
        let mut req = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
        let fill = MAX_HEAD_SIZE - req.len() - 4;
        req.extend(std::iter::repeat_n(b'a', fill));
        req.extend_from_slice(b"\r\n\r\n");
        assert_eq!(req.len(), MAX_HEAD_SIZE);
        assert_eq!(one(&req).path, "/vm");
        req.insert(20, b'a');
        assert_eq!(status_of(&req), 431);
        let endless = vec![b'a'; MAX_HEAD_SIZE + 1];
        assert_eq!(status_of(&endless), 431);

        let body = vec![b' '; MAX_BODY_SIZE];
        let mut req =
            format!("PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        req.extend_from_slice(&body);
        assert_eq!(one(&req).body.len(), MAX_BODY_SIZE);
    }

    #[test]
    fn pipelined_requests() {
        let reqs = parse_all(
            b"GET /vm HTTP/1.1\r\n\r\nPUT /actions HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /version HTTP/1.1\r\nConnection: close\r\n\r\nGET /partial",
        )
        .unwrap();
        let paths: Vec<_> = reqs.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/vm", "/actions", "/version"]);
        assert_eq!(reqs[1].body, b"abc");
        assert!(!reqs[2].keep_alive);
    }

    #[test]
    fn byte_by_byte() {
        let wire = b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello\
GET /vm HTTP/1.1\r\n\r\n";
        let mut p = Parser::new();
        let mut got = Vec::new();
        let mut continues = 0;
        for &b in wire.iter() {
            p.feed(&[b]);
            loop {
                match p.poll().unwrap() {
                    Progress::Incomplete => break,
                    Progress::SendContinue => continues += 1,
                    Progress::Request(r) => got.push(r),
                }
            }
        }
        assert!(p.is_empty());
        assert_eq!(continues, 1);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].body, b"hello");
        assert_eq!(got[1].path, "/vm");
    }

    #[test]
    fn continue_only_when_body_pending() {
        let mut p = Parser::new();
        p.feed(b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nab");
        assert!(matches!(p.poll().unwrap(), Progress::Request(_)));
        let mut p = Parser::new();
        p.feed(b"PUT /x HTTP/1.1\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n");
        assert!(matches!(p.poll().unwrap(), Progress::Request(_)));
    }

    #[test]
    fn responses_encode() {
        let r = Response::json(&serde_json::json!({"a": 1}));
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            format!(
                "HTTP/1.1 200 OK\r\nServer: vmm/{}\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{{\"a\":1}}",
                env!("CARGO_PKG_VERSION")
            )
        );
        let r = Response::json(&serde_json::Value::Null);
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
        assert!(!text.contains("Content-Length") && text.ends_with("\r\n\r\n"));
        let mut r = Response::fault(700, "x\"y");
        r.close = true;
        r.allow = Some("GET");
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(text.contains("Allow: GET\r\nConnection: close\r\n"));
        assert!(text.ends_with(r#"{"fault_message":"x\"y"}"#));
    }
}
