//! `vmm-agent`: the in-guest agent. Started by the rootfs init with no
//! arguments; listens on vsock port 52 (override with `--port N`) and serves
//! each host connection on its own thread. Logs go to stderr (the console)
//! only: the agent must never write to disk, which may be frozen.

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
