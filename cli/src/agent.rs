//! `vmm agent`: talk to the guest agent through a VM's vsock Unix socket
//! (ping, exec with streamed output, an interactive shell on a guest
//! terminal, sync, freeze/thaw, file transfer).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use guest_agent::client::{self, AgentClient, SessionEnd, DISCONNECT_EXIT_CODE};
use guest_agent::proto::{ExecRequest, ExecTtyRequest, ExitInfo, OutputStream, DEFAULT_PORT};

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The VM's vsock Unix socket (`--vsock uds=PATH`).
    #[arg(long, value_name = "PATH")]
    uds: PathBuf,
    /// Agent port inside the guest.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u32,
    /// Seconds to wait for the agent to answer before giving up.
    #[arg(long, default_value_t = 30)]
    wait: u64,
    #[command(subcommand)]
    op: AgentOp,
}

#[derive(Subcommand, Debug)]
enum AgentOp {
    /// Wait until the agent answers, then print its version and uptime (JSON).
    Ping,
    /// Run a command in the guest; its output is streamed and its exit code
    /// becomes ours (128+N when killed by signal N, 124 on timeout).
    Exec {
        /// KEY=VALUE added to the environment (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// Kill the command after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Send our standard input to the command.
        #[arg(long)]
        stdin: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// An interactive shell (or CMD) on a terminal in the guest, like
    /// `ssh -t`: keys go to the guest raw (Ctrl-C included), the window size
    /// follows ours, and the exit code becomes ours. Without a terminal
    /// (stdin not one, or --no-tty) the command (default `sh`) reads our
    /// stdin through a pipe instead.
    ///
    /// Escapes, as in ssh, when stdin is a terminal: `~.` at the start of a
    /// line (after Enter, or first thing) disconnects, which hangs the
    /// session up in the guest, and exits 255; `~~` types a single `~`.
    /// SIGTERM, SIGHUP and SIGQUIT end the session the same way, restore
    /// the terminal and exit with 128+N.
    Shell {
        /// Ask for a terminal even when stdin is not one (e.g. a script piped
        /// in); the default is a terminal exactly when stdin is one.
        #[arg(long, conflicts_with = "no_tty")]
        tty: bool,
        /// Never ask for a terminal.
        #[arg(long)]
        no_tty: bool,
        /// KEY=VALUE added to the environment (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest (default: the shell's home).
        #[arg(long)]
        cwd: Option<String>,
        /// Kill the session after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// The command and its arguments (default: the guest user's login shell).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Flush all guest filesystems.
    Sync,
    /// Freeze guest filesystems (all writable block-backed ones by default);
    /// the agent thaws them itself after --timeout seconds.
    Freeze {
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        mountpoints: Vec<String>,
    },
    /// Thaw frozen filesystems.
    Thaw,
    /// Print a guest file to standard output.
    ReadFile { path: String },
    /// Write standard input to a guest file (atomically).
    WriteFile {
        path: String,
        /// Permission bits, octal.
        #[arg(long, default_value = "644")]
        mode: String,
    },
}

/// Runs `req` with its output streamed to our stdout and stderr.
fn exec_streamed(c: &mut AgentClient, req: &ExecRequest) -> client::Result<ExitInfo> {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    c.exec_streaming(req, |stream, data| {
        // A closed pipe on our side must not stop the command.
        let _ = match stream {
            OutputStream::Stdout => out.write_all(data).and_then(|_| out.flush()),
            OutputStream::Stderr => err.write_all(data).and_then(|_| err.flush()),
        };
    })
}

/// Our exit code after a terminal session: the program's (see
/// [`exit_code`]); 255 after `~.`, as ssh; 128+N after signal N.
fn session_exit_code(end: &SessionEnd) -> i32 {
    match end {
        SessionEnd::Exited(exit) => exit_code(exit),
        SessionEnd::Disconnected => {
            // Not eprintln!: a failed write to stderr must not panic here.
            let _ = writeln!(std::io::stderr(), "\nvmm: disconnected (~.)");
            DISCONNECT_EXIT_CODE
        }
        SessionEnd::Signal(sig) => 128 + sig,
    }
}

/// The shell convention: the code, 128+N when killed by signal N, 124 on timeout.
fn exit_code(exit: &ExitInfo) -> i32 {
    if exit.timed_out {
        124
    } else if let Some(sig) = exit.signal {
        128 + sig
    } else {
        exit.exit_code.unwrap_or(1)
    }
}

fn connect(args: &AgentArgs) -> Result<AgentClient, String> {
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    client::wait_ready(&args.uds, args.port, deadline)
        .map(|(c, _)| c)
        .map_err(|e| format!("guest agent at {}: {e}", args.uds.display()))
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: AgentArgs) -> i32 {
    match run_op(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
    }
}

fn run_op(args: &AgentArgs) -> Result<i32, String> {
    let agent_err = |e: client::ClientError| format!("guest agent: {e}");
    match &args.op {
        AgentOp::Ping => {
            let deadline = Instant::now() + Duration::from_secs(args.wait);
            let (_, info) = client::wait_ready(&args.uds, args.port, deadline)
                .map_err(|e| format!("guest agent at {}: {e}", args.uds.display()))?;
            println!(
                "{}",
                serde_json::to_string(&info).map_err(|e| e.to_string())?
            );
            Ok(0)
        }
        AgentOp::Exec {
            env,
            cwd,
            timeout,
            stdin,
            argv,
        } => {
            let mut req = ExecRequest::new(argv.iter().cloned());
            req.env = env.clone();
            req.cwd = cwd.clone();
            req.timeout_ms = timeout.map(|s| s.saturating_mul(1000));
            if *stdin {
                std::io::stdin()
                    .read_to_end(&mut req.stdin)
                    .map_err(|e| format!("reading stdin: {e}"))?;
            }
            let exit = exec_streamed(&mut connect(args)?, &req).map_err(agent_err)?;
            Ok(exit_code(&exit))
        }
        AgentOp::Shell {
            tty,
            no_tty,
            env,
            cwd,
            timeout,
            argv,
        } => {
            let timeout_ms = timeout.map(|s| s.saturating_mul(1000));
            let terminal = *tty || (!*no_tty && std::io::stdin().is_terminal());
            if terminal {
                let req = ExecTtyRequest {
                    argv: argv.clone(),
                    env: env.clone(),
                    cwd: cwd.clone(),
                    timeout_ms,
                    ..ExecTtyRequest::default()
                };
                let mut c = connect(args)?;
                let end = client::run_interactive(&mut c, req).map_err(agent_err)?;
                return Ok(session_exit_code(&end));
            }
            let argv = if argv.is_empty() {
                vec!["sh".to_string()]
            } else {
                argv.clone()
            };
            let mut req = ExecRequest::new(argv);
            req.env = env.clone();
            req.cwd = cwd.clone();
            req.timeout_ms = timeout_ms;
            std::io::stdin()
                .read_to_end(&mut req.stdin)
                .map_err(|e| format!("reading stdin: {e}"))?;
            let exit = exec_streamed(&mut connect(args)?, &req).map_err(agent_err)?;
            Ok(exit_code(&exit))
        }
        AgentOp::Sync => {
            connect(args)?.sync().map_err(agent_err)?;
            Ok(0)
        }
        AgentOp::Freeze {
            timeout,
            mountpoints,
        } => {
            let which = (!mountpoints.is_empty()).then(|| mountpoints.clone());
            let frozen = connect(args)?
                .freeze(which, Duration::from_secs(*timeout))
                .map_err(agent_err)?;
            println!("{}", frozen.join("\n"));
            Ok(0)
        }
        AgentOp::Thaw => {
            let thawed = connect(args)?.thaw().map_err(agent_err)?;
            println!("{}", thawed.join("\n"));
            Ok(0)
        }
        AgentOp::ReadFile { path } => {
            let data = connect(args)?.read_file(path, None).map_err(agent_err)?;
            std::io::stdout()
                .write_all(&data)
                .map_err(|e| format!("writing stdout: {e}"))?;
            Ok(0)
        }
        AgentOp::WriteFile { path, mode } => {
            let mode =
                u32::from_str_radix(mode, 8).map_err(|_| format!("--mode {mode} is not octal"))?;
            let mut data = Vec::new();
            std::io::stdin()
                .read_to_end(&mut data)
                .map_err(|e| format!("reading stdin: {e}"))?;
            connect(args)?
                .write_file(path, &data, mode)
                .map_err(agent_err)?;
            Ok(0)
        }
    }
}
