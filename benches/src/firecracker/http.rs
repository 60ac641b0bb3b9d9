//! A minimal HTTP/1.1 client over a Unix socket, enough for Firecracker's
//! API: one request per connection, JSON bodies, responses framed by
//! Content-Length (Firecracker answers 204 without a body, or JSON).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest response accepted (Firecracker's are a few hundred bytes).
const MAX_RESPONSE: usize = 1 << 20;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{what} {socket}: {source}")]
    Io {
        what: &'static str,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("{method} {path} answered {status}: {body}")]
    Status {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Client of one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// Every read and write on the socket gives up after `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// Sends one request and reads its response, whatever the status.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, HttpError> {
        let io = |what| {
            let socket = self.socket.clone();
            move |source| HttpError::Io {
                what,
                socket,
                source,
            }
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(io("connecting to"))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(io("setting timeouts on"))?;
        let body = body.map(|b| b.to_string());
        stream
            .write_all(&format_request(method, path, body.as_deref()))
            .map_err(io("writing to"))?;
        read_response(&mut stream).map_err(|e| match e {
            ReadError::Io(source) => io("reading from")(source),
            ReadError::Malformed(m) => HttpError::Malformed(m),
        })
    }

    /// Sends one request; a non-2xx status is an error carrying the body
    /// (Firecracker's `fault_message`).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, HttpError> {
        let r = self.request(method, path, body)?;
        if (200..300).contains(&r.status) {
            Ok(r)
        } else {
            Err(HttpError::Status {
                method: method.into(),
                path: path.into(),
                status: r.status,
                body: r.body,
            })
        }
    }
}

/// The bytes of a request.
pub fn format_request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(body) = body {
        req.push_str("Content-Type: application/json\r\n");
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        req.push_str("\r\n");
    }
    req.into_bytes()
}

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Malformed(String),
}

/// Reads one response: status line, headers, then a Content-Length body
/// (no body for 1xx/204/304; to end of stream without Content-Length).
fn read_response<R: Read>(r: &mut R) -> Result<Response, ReadError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_RESPONSE {
            return Err(ReadError::Malformed("headers too long".into()));
        }
        let n = r.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Malformed(format!(
                "connection closed after {} header bytes",
                buf.len()
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next());
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Malformed(format!("status line {status_line:?}")));
    }
    let status: u16 = code
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ReadError::Malformed(format!("status line {status_line:?}")))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Malformed(format!("header {line:?}")));
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        if name == "content-length" {
            let n: usize = value
                .parse()
                .map_err(|_| ReadError::Malformed(format!("Content-Length {value:?}")))?;
            if n > MAX_RESPONSE {
                return Err(ReadError::Malformed(format!("body of {n} bytes")));
            }
            length = Some(n);
        } else if name == "transfer-encoding" && !value.eq_ignore_ascii_case("identity") {
            return Err(ReadError::Malformed(format!(
                "unsupported Transfer-Encoding {value:?}"
            )));
        }
    }
    let mut body = buf.split_off(head_end + 4);
    let no_body = status < 200 || status == 204 || status == 304;
    match (no_body, length) {
        (true, _) => body.clear(),
        (false, Some(n)) => {
            while body.len() < n {
                let got = r.read(&mut chunk).map_err(ReadError::Io)?;
                if got == 0 {
                    return Err(ReadError::Malformed(format!(
                        "body ended at {} of {n} bytes",
                        body.len()
                    )));
                }
                body.extend_from_slice(&chunk[..got]);
            }
            body.truncate(n);
        }
        (false, None) => {
            r.take(MAX_RESPONSE as u64)
                .read_to_end(&mut body)
                .map_err(ReadError::Io)?;
        }
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn formats_requests() {
        let r = format_request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("PATCH /vm HTTP/1.1\r\n"));
        assert!(text.contains("Content-Length: 18\r\n\r\n{\"state\":\"Paused\"}"));
        let r = String::from_utf8(format_request("GET", "/", None)).unwrap();
        assert!(r.ends_with("Accept: application/json\r\n\r\n"));
        assert!(!r.contains("Content-Length"));
    }

    fn parse(raw: &[u8]) -> Result<Response, ReadError> {
        read_response(&mut &raw[..])
    }

    #[test]
    fn parses_responses() {
        let r = parse(
            b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        let r = parse(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 22\r\n\r\n{\"fault_message\":\"x\"}\nEXTRA").unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.body, "{\"fault_message\":\"x\"}\n");
        let r = parse(b"HTTP/1.0 200 OK\r\n\r\nuntil eof").unwrap();
        assert_eq!(r.body, "until eof");
    }

    #[test]
    fn rejects_malformed_responses() {
        for raw in [
            &b"SSH-2.0\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbadheader\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(ReadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// A real socket round trip: the server checks the request it receives.
    #[test]
    fn round_trip_over_a_unix_socket() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let sock = dir.path().join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 17\r\n\r\n{\"fault_message\":",
            ] {
                let (conn, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(conn);
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        length = v.trim().parse().unwrap();
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                reader.get_mut().write_all(answer.as_bytes()).unwrap();
                assert!(head.starts_with("PUT /actions HTTP/1.1\r\n"), "{head}");
                assert_eq!(body, br#"{"action_type":"InstanceStart"}"#);
            }
        });
        let client = ApiClient::new(&sock, Duration::from_secs(5));
        let body = serde_json::json!({"action_type": "InstanceStart"});
        let r = client.call("PUT", "/actions", Some(&body)).unwrap();
        assert_eq!(r.status, 204);
        let err = client.call("PUT", "/actions", Some(&body)).unwrap_err();
        assert!(
            matches!(err, HttpError::Status { status: 400, .. }),
            "{err}"
        );
        server.join().unwrap();
        let gone = ApiClient::new(&dir.path().join("none.sock"), Duration::from_secs(1));
        assert!(matches!(
            gone.request("GET", "/", None),
            Err(HttpError::Io { .. })
        ));
    }
}
