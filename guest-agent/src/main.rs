//! `vmm-agent`: the in-guest agent. Started by the rootfs init with no
//! arguments; listens on vsock port 52 (override with `--port N`) and serves
//! each host connection on its own thread. Logs go to stderr (the console)
//! only: the agent must never write to disk, which may be frozen.
//!
//! `vmm-agent vsock-cat --listen PORT | --connect CID:PORT` is a diagnostic
//! that moves one byte stream over one vsock connection (tests measure the
//! vsock device with it); see [`vsock_cat`].

use std::sync::Arc;
use std::time::Duration;

use guest_agent::proto::{AGENT_VERSION, DEFAULT_PORT, PROTOCOL_VERSION};
use guest_agent::server::{serve_connection, Agent};
use guest_agent::vsock::VsockListener;

/// PATH for programs run by `exec` when init gave the agent none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn parse_port() -> Result<u32, String> {
    let mut args = std::env::args().skip(1);
    let mut port = DEFAULT_PORT;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                let v = args.next().ok_or("--port needs a value")?;
                port = v.parse().map_err(|_| format!("invalid port {v:?}"))?;
            }
            "--version" => {
                println!("vmm-agent {AGENT_VERSION} (protocol {PROTOCOL_VERSION})");
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?} (usage: vmm-agent [--port N])"
                ))
            }
        }
    }
    Ok(port)
}

/// Binds the listener, retrying every second until a vsock device appears.
fn bind_with_retry(port: u32) -> VsockListener {
    let mut logged = false;
    loop {
        match VsockListener::bind(port) {
            Ok(l) => return l,
            Err(e) => {
                if !logged {
                    eprintln!(
                        "vmm-agent: cannot listen on vsock port {port}: {e}; retrying every second"
                    );
                    logged = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("vsock-cat") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        std::process::exit(vsock_cat::main(&args));
    }
    let port = match parse_port() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmm-agent: {e}");
            std::process::exit(2);
        }
    };
    if std::env::var_os("PATH").is_none() {
        // Single-threaded here, so changing the environment is sound.
        std::env::set_var("PATH", DEFAULT_PATH);
    }
    let agent = Arc::new(Agent::system());
    // A previous agent may have died with filesystems frozen.
    match agent.freeze_controller().thaw_all() {
        Ok(thawed) if !thawed.is_empty() => eprintln!("vmm-agent: thawed {thawed:?} left frozen"),
        Ok(_) => {}
        Err(e) => eprintln!("vmm-agent: startup thaw: {e}"),
    }
    let listener = bind_with_retry(port);
    eprintln!("vmm-agent {AGENT_VERSION}: listening on vsock port {port}");
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vmm-agent: accept: {e}");
                // Out of descriptors or memory: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let agent = Arc::clone(&agent);
        let peer = (conn.peer_cid(), conn.peer_port());
        let spawned = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                if let Err(e) = serve_connection(&agent, conn) {
                    eprintln!("vmm-agent: connection from {}:{}: {e}", peer.0, peer.1);
                }
            });
        if let Err(e) = spawned {
            eprintln!("vmm-agent: cannot start connection thread: {e}");
        }
    }
}

/// The `vsock-cat` diagnostic: one vsock connection, one byte stream.
///
/// `--listen PORT` accepts one connection and copies it to stdout;
/// `--connect CID:PORT` copies stdin to a new connection, shuts down its write
/// side and copies what the peer sends back to stdout until end of file. Both
/// report the bytes moved and the time taken on stderr as
/// `vsock-cat: sent|received N bytes in S s`.
mod vsock_cat {
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use guest_agent::vsock::VsockListener;

    /// Buffer for each copy: large enough that per-call overhead does not
    /// dominate a throughput measurement.
    const BUF_SIZE: usize = 256 * 1024;

    const USAGE: &str = "usage: vmm-agent vsock-cat --listen PORT | --connect CID:PORT";

    /// What `vsock-cat` could not do.
    #[derive(Debug, thiserror::Error)]
    pub enum CatError {
        #[error("{0} ({USAGE})")]
        Usage(String),
        #[error("listening on vsock port {port}: {source}")]
        Listen { port: u32, source: io::Error },
        #[error("accepting on vsock port {port}: {source}")]
        Accept { port: u32, source: io::Error },
        #[error("connecting to vsock {cid}:{port}: {source}")]
        Connect {
            cid: u32,
            port: u32,
            source: io::Error,
        },
        #[error("{what}: {source}")]
        Io {
            what: &'static str,
            source: io::Error,
        },
    }

    /// The parsed command line.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Mode {
        Listen { port: u32 },
        Connect { cid: u32, port: u32 },
    }

    fn number(text: &str, what: &str) -> Result<u32, CatError> {
        text.parse()
            .map_err(|_| CatError::Usage(format!("invalid {what} {text:?}")))
    }

    /// Parses the arguments after `vsock-cat`.
    pub fn parse(args: &[String]) -> Result<Mode, CatError> {
        match args {
            [flag, port] if flag == "--listen" => Ok(Mode::Listen {
                port: number(port, "port")?,
            }),
            [flag, addr] if flag == "--connect" => {
                let (cid, port) = addr
                    .split_once(':')
                    .ok_or_else(|| CatError::Usage(format!("expected CID:PORT, got {addr:?}")))?;
                Ok(Mode::Connect {
                    cid: number(cid, "CID")?,
                    port: number(port, "port")?,
                })
            }
            _ => Err(CatError::Usage(format!("unexpected arguments {args:?}"))),
        }
    }

    /// Runs `vsock-cat`; returns the process exit code.
    pub fn main(args: &[String]) -> i32 {
        let result = parse(args).and_then(|mode| match mode {
            Mode::Listen { port } => listen(port),
            Mode::Connect { cid, port } => connect(cid, port),
        });
        match result {
            Ok(()) => 0,
            Err(e @ CatError::Usage(_)) => {
                eprintln!("vmm-agent vsock-cat: {e}");
                2
            }
            Err(e) => {
                eprintln!("vmm-agent vsock-cat: {e}");
                1
            }
        }
    }

    /// Copies `from` to `to` until end of file; returns the bytes copied.
    fn copy(
        from: &mut impl Read,
        to: &mut impl Write,
        what: &'static str,
    ) -> Result<u64, CatError> {
        let mut buf = vec![0u8; BUF_SIZE];
        let mut total = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(CatError::Io { what, source }),
            };
            to.write_all(&buf[..n])
                .map_err(|source| CatError::Io { what, source })?;
            total += n as u64;
        }
        to.flush().map_err(|source| CatError::Io { what, source })?;
        Ok(total)
    }

    fn report(verb: &str, bytes: u64, elapsed: Duration) {
        eprintln!(
            "vsock-cat: {verb} {bytes} bytes in {:.3} s",
            elapsed.as_secs_f64()
        );
    }

    fn listen(port: u32) -> Result<(), CatError> {
        let listener =
            VsockListener::bind(port).map_err(|source| CatError::Listen { port, source })?;
        let mut conn = listener
            .accept()
            .map_err(|source| CatError::Accept { port, source })?;
        // Only one connection: later connectors are refused rather than queued.
        drop(listener);
        let start = Instant::now();
        let bytes = copy(&mut conn, &mut io::stdout().lock(), "vsock to stdout")?;
        report("received", bytes, start.elapsed());
        Ok(())
    }

    /// Opens a connected AF_VSOCK stream socket.
    fn connect_socket(cid: u32, port: u32) -> Result<File, CatError> {
        let err = |source| CatError::Connect { cid, port, source };
        // SAFETY: socket(2) with constant arguments; no memory is passed.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        loop {
            // SAFETY: `addr` is a valid sockaddr_vm and we pass its exact
            // size; the kernel only reads it during the call.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_vm).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                return Ok(File::from(fd));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(err(e));
            }
        }
    }

    fn connect(cid: u32, port: u32) -> Result<(), CatError> {
        let mut conn = connect_socket(cid, port)?;
        let start = Instant::now();
        let sent = copy(&mut io::stdin().lock(), &mut conn, "stdin to vsock")?;
        // SAFETY: shutdown(2) on a socket we own; no memory is passed.
        if unsafe { libc::shutdown(conn.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(CatError::Io {
                what: "shutting down the write side",
                source: io::Error::last_os_error(),
            });
        }
        // The peer closing its side means it has read everything we sent.
        let back = copy(&mut conn, &mut io::stdout().lock(), "vsock to stdout")?;
        report("sent", sent, start.elapsed());
        if back > 0 {
            report("received", back, start.elapsed());
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn args(list: &[&str]) -> Vec<String> {
            list.iter().map(|s| s.to_string()).collect()
        }

        #[test]
        fn parses_modes() {
            assert_eq!(
                parse(&args(&["--listen", "5000"])).unwrap(),
                Mode::Listen { port: 5000 }
            );
            assert_eq!(
                parse(&args(&["--connect", "2:5001"])).unwrap(),
                Mode::Connect { cid: 2, port: 5001 }
            );
            for bad in [
                &["--listen"][..],
                &["--listen", "x"],
                &["--connect", "2"],
                &["--connect", "a:1"],
                &["--connect", "2:"],
                &["--bogus", "1"],
                &[],
            ] {
                assert!(
                    matches!(parse(&args(bad)), Err(CatError::Usage(_))),
                    "{bad:?}"
                );
            }
        }

        #[test]
        fn copy_counts_bytes() {
            let data = vec![7u8; BUF_SIZE * 2 + 3];
            let mut out = Vec::new();
            let n = copy(&mut &data[..], &mut out, "test").unwrap();
            assert_eq!(n, data.len() as u64);
            assert_eq!(out, data);
        }
    }
}
