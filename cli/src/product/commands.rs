//! The sandbox commands: `use`, `ls`, `status`, `stop`, `rm`, `logs`.

use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::client;
use guest_agent::proto::{ExecRequest, ExecTtyRequest};
use serde_json::{json, Value};

use super::args::{LogsArgs, LsArgs, RmArgs, StatusArgs, StopArgs, UseArgs};
use super::clock::{format_local, format_utc, now};
use super::config::{self, DEFAULT_CMDLINE};
use super::cron::Schedule;
use super::error::{Error, Result};
use super::guest;
use super::names;
use super::net::{self, NetMeta};
use super::output::{human_size, json, Format, Table};
use super::sandbox::{BootSpec, Guest, Sandbox, Status};
use super::snap_remove::{self, Pinned};
use super::snapshot::{self, SnapStatus};
use super::store::Kind;
use super::Ctx;

/// Creates the sandbox if missing (booted, or restored from `--snapshot`)
/// and makes sure it runs; the caller holds no lock afterwards.
pub fn ensure_sandbox(ctx: &Ctx, a: &UseArgs) -> Result<Sandbox> {
    names::validate("sandbox", &a.name)?;
    if let Some(snap) = &a.snapshot {
        names::validate("snapshot", snap)?;
    }
    let mut lock = None;
    if !Sandbox::exists(ctx, &a.name) {
        // Everything a creation needs is found (and a snapshot pinned)
        // before the name is locked.
        let plan = plan_creation(ctx, a)?;
        let held = ctx.store.lock_new_sandbox(&a.name)?;
        if !Sandbox::exists(ctx, &a.name) {
            // The TAP is checked free as the sandbox is recorded.
            return match plan {
                Plan::Boot(spec) => Sandbox::create_boot(ctx, &a.name, &spec, &held),
                Plan::Snapshot(pin, net) => {
                    Sandbox::create_from_snapshot(ctx, &a.name, *pin, net, &held)
                }
            };
        }
        lock = Some(held); // created meanwhile by another command
    }
    let _lock = match lock {
        Some(l) => l,
        None => ctx.store.lock_sandbox(&a.name)?,
    };
    let mut sb = Sandbox::load(ctx, &a.name)?;
    if let Some(snap) = &a.snapshot {
        return Err(Error::Invalid(format!(
            "sandbox {} already exists; --snapshot {snap} applies only when creating one \
             (`vmm snapshot restore {snap} --into NEW`)",
            a.name
        )));
    }
    sb.require_ready()?;
    let creation_only = a.image.is_some()
        || a.kernel.is_some()
        || a.rootfs.is_some()
        || a.vcpus.is_some()
        || a.mem_mib.is_some()
        || a.cmdline.is_some()
        || a.tap.is_some();
    if creation_only {
        log::warn!(
            "sandbox {} exists: --image, --kernel, --rootfs, --vcpus, --mem-mib, --cmdline \
             and --tap apply only when creating one",
            a.name
        );
    }
    sb.ensure_running(ctx)?;
    Ok(sb)
}

/// How a missing sandbox is to be created.
enum Plan {
    Boot(BootSpec),
    Snapshot(Box<Pinned>, Option<NetMeta>),
}

fn plan_creation(ctx: &Ctx, a: &UseArgs) -> Result<Plan> {
    if let Some(snap) = &a.snapshot {
        let pin = snap_remove::pin(ctx, snap)?;
        let net = net::for_snapshot(&pin.meta, a.tap.as_deref(), a.mac.as_deref())?;
        return Ok(Plan::Snapshot(Box::new(pin), net));
    }
    let cfg = &ctx.config;
    let (kernel, rootfs) = match &a.image {
        Some(image) => config::image(&ctx.store, cfg, image)?,
        None => (
            config::default_kernel(a.kernel.as_deref(), cfg)?,
            config::resolve(
                "rootfs",
                a.rootfs.as_deref(),
                "VMM_ROOTFS",
                cfg.rootfs.as_deref(),
                ("rootfs-", "rootfs.ext4"),
            )?,
        ),
    };
    let net = net::for_boot(a.tap.as_deref(), a.mac.as_deref());
    Ok(Plan::Boot(BootSpec {
        guest: Guest {
            kernel: kernel.path,
            cmdline: a
                .cmdline
                .clone()
                .or_else(|| cfg.cmdline.clone())
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            vcpus: a.vcpus.or(cfg.vcpus).unwrap_or(1),
            mem_mib: a.mem_mib.or(cfg.mem_mib).unwrap_or(256),
            image: a.image.clone(),
        },
        rootfs: rootfs.path,
        net,
    }))
}

/// `vmm use NAME [-- CMD ...]`.
pub fn use_(ctx: &Ctx, a: UseArgs) -> Result<i32> {
    let sb = ensure_sandbox(ctx, &a)?;
    // `--env` was checked while parsing, before anything was created.
    let base = |argv: Vec<String>| -> Result<ExecRequest> {
        let mut req = ExecRequest::new(argv);
        req.env = a.env.clone();
        req.cwd = a.workdir.clone();
        req.timeout_ms = a
            .timeout
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Ok(req)
    };
    if a.command.is_empty() {
        return shell(&sb, base);
    }
    let mut req = base(a.command.clone())?;
    if a.stdin {
        std::io::stdin()
            .read_to_end(&mut req.stdin)
            .map_err(|e| Error::io("reading", Path::new("stdin"), e))?;
    }
    let t0 = Instant::now();
    let code = guest::exec_streamed(&sb, &req)?;
    sb.record_exec(&a.command, code, t0.elapsed());
    Ok(code)
}

/// `vmm use NAME` without a command. With stdin a terminal: the guest user's
/// login shell on a terminal in the guest (raw keys, Ctrl-C, window size,
/// full-screen programs), like `ssh`, with its escapes (`~.` at the start of
/// a line disconnects, exit 255; `~~` types a `~`; SIGTERM, SIGHUP and
/// SIGQUIT restore the terminal and exit 128+N). With stdin a pipe or a
/// regular file, input given on purpose, `sh` reads it, so
/// `echo ls | vmm use NAME` and `vmm use NAME < script` run the script.
/// Anything else (`/dev/null`, other devices, sockets: what service managers
/// and `ssh` without `-t` hand over, possibly never ending) runs nothing: the
/// sandbox is up, exit 0. A session is one entry of the exec history.
fn shell(sb: &Sandbox, base: impl Fn(Vec<String>) -> Result<ExecRequest>) -> Result<i32> {
    use guest_agent::client::{SessionEnd, DISCONNECT_EXIT_CODE};
    use guest_agent::terminal::{is_pipe_or_file, ESCAPE_HELP};
    use std::os::fd::AsFd;

    let t0 = Instant::now();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        if !is_pipe_or_file(stdin.as_fd()) {
            return Ok(0);
        }
        let argv = vec!["sh".to_string()];
        let mut req = base(argv.clone())?;
        stdin
            .lock()
            .read_to_end(&mut req.stdin)
            .map_err(|e| Error::io("reading", Path::new("stdin"), e))?;
        let code = guest::exec_streamed(sb, &req)?;
        sb.record_exec(&argv, code, t0.elapsed());
        return Ok(code);
    }
    let opts = base(Vec::new())?;
    let req = ExecTtyRequest {
        env: opts.env,
        cwd: opts.cwd,
        timeout_ms: opts.timeout_ms,
        ..ExecTtyRequest::default()
    };
    let mut c = guest::connect(sb, Duration::from_secs(30))?;
    eprintln!(
        "sandbox {}: terminal session; exit or Ctrl-D leaves, {ESCAPE_HELP}",
        sb.meta.name
    );
    let end = client::run_interactive(&mut c, req).map_err(|e| Error::Agent {
        sandbox: sb.meta.name.clone(),
        message: e.to_string(),
    })?;
    let code = match end {
        SessionEnd::Exited(exit) => guest::exit_code(&exit),
        SessionEnd::Disconnected => {
            // Not eprintln!: a failed write to stderr must not panic here.
            let _ = writeln!(
                std::io::stderr(),
                "\nsandbox {}: disconnected (~.)",
                sb.meta.name
            );
            DISCONNECT_EXIT_CODE
        }
        SessionEnd::Signal(sig) => 128 + sig,
    };
    sb.record_exec(&["(login shell, terminal)".to_string()], code, t0.elapsed());
    Ok(code)
}

/// Every sandbox, failed ones included.
/// Every sandbox that can be read, for listings: one that cannot (damaged
/// or hand-copied metadata) is named on stderr and left out, so it does not
/// hide the others; `vmm status NAME` and `vmm rm NAME` say what is wrong.
fn all_sandboxes(ctx: &Ctx) -> Result<Vec<Sandbox>> {
    let mut out = Vec::new();
    for name in ctx.store.names(Kind::Sandbox)? {
        match Sandbox::load(ctx, &name) {
            Ok(sb) => out.push(sb),
            Err(Error::NoSandbox(_)) => {}
            Err(e) => eprintln!("vmm: sandbox {name} left out: {e}"),
        }
    }
    Ok(out)
}

fn sandbox_json(sb: &Sandbox, status: Status) -> Value {
    let m = &sb.meta;
    json!({
        "name": m.name,
        "status": status.as_str(),
        "failure": sb.failure(),
        "vcpus": m.vcpus,
        "mem_mib": m.mem_mib,
        "created": format_utc(m.created),
        "pid": m.pid.filter(|_| sb.vmm_alive()),
        "origin": m.origin,
        "tap": m.net.as_ref().map(|n| &n.tap),
        "mac": m.net.as_ref().and_then(|n| n.mac.as_ref()),
        "schedule": m.schedule.as_ref().map(|s| &s.spec),
    })
}

/// `vmm ls`.
pub fn ls(ctx: &Ctx, a: &LsArgs) -> Result<i32> {
    let all = all_sandboxes(ctx)?;
    let statuses: Vec<Status> = all.iter().map(Sandbox::status).collect();
    match a.output {
        Format::Json => {
            let v: Vec<Value> = all
                .iter()
                .zip(&statuses)
                .map(|(sb, st)| sandbox_json(sb, *st))
                .collect();
            print!("{}", json(&v));
        }
        Format::Table => {
            let mut t = Table::new(&["NAME", "STATUS", "CPU", "MEMORY", "CREATED"]);
            for (sb, st) in all.iter().zip(&statuses) {
                t.row(vec![
                    sb.meta.name.clone(),
                    st.as_str().to_string(),
                    sb.meta.vcpus.to_string(),
                    format!("{} MiB", sb.meta.mem_mib),
                    format_local(sb.meta.created),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(0)
}

/// `vmm status [NAME]`.
pub fn status(ctx: &Ctx, a: &StatusArgs) -> Result<i32> {
    let v = match &a.name {
        Some(name) => {
            let sb = Sandbox::load(ctx, name)?;
            let st = sb.status();
            let mut v = sandbox_json(&sb, st);
            let next = sb
                .meta
                .schedule
                .as_ref()
                .and_then(|s| Schedule::parse(&s.spec).ok())
                .and_then(|s| s.next_after(now()))
                .map(format_utc);
            let extra = json!({
                "started": sb.meta.started.filter(|_| sb.vmm_alive()).map(format_utc),
                "image": sb.meta.image,
                "kernel": sb.meta.kernel,
                "cmdline": sb.meta.cmdline,
                "diff_base": sb.meta.mem_baseline,
                "next_scheduled_snapshot": next,
                "disk_usage_bytes": sb.disk_usage(),
                "dir": sb.paths.dir,
                "api_socket": sb.paths.api_sock,
                "vsock_socket": sb.paths.vsock,
                "serial_log": sb.paths.serial,
            });
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            v
        }
        None => {
            let cfg = &ctx.config;
            let guess = |what, env, conf: Option<&Path>, pat| match config::resolve(
                what, None, env, conf, pat,
            ) {
                Ok(r) => json!({ "path": r.path, "from": r.source }),
                Err(e) => json!({ "error": e.to_string() }),
            };
            let sandboxes = all_sandboxes(ctx)?;
            let running = sandboxes.iter().filter(|s| s.vmm_alive()).count();
            let snaps = snapshot::list_readable(ctx)?;
            json!({
                "state_dir": ctx.store.root(),
                "default_kernel": guess("kernel", "VMM_KERNEL", cfg.kernel.as_deref(), ("kernel-", "vmlinux")),
                "default_rootfs": guess("rootfs", "VMM_ROOTFS", cfg.rootfs.as_deref(), ("rootfs-", "rootfs.ext4")),
                "images": config::image_names(&ctx.store)?,
                "default_cmdline": cfg.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
                "sandboxes": sandboxes.len(),
                "sandboxes_not_stopped": running,
                "snapshots": snaps.len(),
                "snapshots_ready": snaps.iter().filter(|s| s.status == SnapStatus::Ready).count(),
                "snapshot_bytes": snaps.iter().map(|s| s.size_bytes).sum::<u64>(),
            })
        }
    };
    match a.output {
        Format::Json => print!("{}", json(&v)),
        Format::Table => print!("{}", key_values(&v)),
    }
    Ok(0)
}

/// `key: value` lines of a JSON object (nested objects inline).
fn key_values(v: &Value) -> String {
    let mut out = String::new();
    if let Some(o) = v.as_object() {
        let width = o.keys().map(String::len).max().unwrap_or(0) + 1;
        for (k, val) in o {
            let text = match val {
                Value::Null => "-".to_string(),
                Value::String(s) => s.clone(),
                Value::Number(n) if k.ends_with("_bytes") => human_size(n.as_u64().unwrap_or(0)),
                Value::Array(items) if items.iter().all(Value::is_string) => {
                    let names: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                    if names.is_empty() {
                        "-".to_string()
                    } else {
                        names.join(", ")
                    }
                }
                Value::Object(m) if m.contains_key("path") => format!(
                    "{} (from {})",
                    m["path"].as_str().unwrap_or(""),
                    m.get("from").and_then(Value::as_str).unwrap_or("")
                ),
                Value::Object(m) if m.contains_key("error") => {
                    m["error"].as_str().unwrap_or("").to_string()
                }
                other => other.to_string(),
            };
            out.push_str(&format!("{:width$}  {text}\n", format!("{k}:")));
        }
    }
    out
}

/// `vmm stop NAME [-f]`.
pub fn stop(ctx: &Ctx, a: &StopArgs) -> Result<i32> {
    // Found before locking: no lock file for a name that does not exist.
    Sandbox::load(ctx, &a.name)?;
    let _lock = ctx.store.lock_sandbox(&a.name)?;
    let mut sb = Sandbox::load(ctx, &a.name)?;
    sb.stop(ctx, a.force)?;
    Ok(0)
}

/// `vmm rm NAME [-f]`: also a sandbox whose creation failed or was
/// interrupted (its VMM may still run: -f).
pub fn rm(ctx: &Ctx, a: &RmArgs) -> Result<i32> {
    Sandbox::load(ctx, &a.name)?;
    let lock = ctx.store.lock_sandbox(&a.name)?;
    let mut sb = Sandbox::load(ctx, &a.name)?;
    if sb.vmm_alive() {
        if !a.force {
            return Err(Error::Invalid(format!(
                "sandbox {} is {}; stop it first or use -f",
                a.name,
                sb.status().as_str()
            )));
        }
        sb.stop(ctx, true)?;
    }
    Sandbox::remove(ctx, &a.name, &lock)?;
    Ok(0)
}

/// `vmm logs NAME [--follow] [--tail N] [--exec]`.
pub fn logs(ctx: &Ctx, a: &LogsArgs) -> Result<i32> {
    let sb = Sandbox::load(ctx, &a.name)?;
    let path = if a.exec {
        &sb.paths.history
    } else {
        &sb.paths.serial
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("reading", path, e)),
    };
    let start = match a.tail {
        Some(n) => tail_start(&text, n),
        None => 0,
    };
    let mut out = std::io::stdout();
    let _ = out.write_all(&text[start..]);
    let _ = out.flush();
    if !a.follow {
        return Ok(0);
    }
    let mut pos = text.len() as u64;
    loop {
        let alive = sb.vmm_alive();
        if let Ok(mut f) = std::fs::File::open(path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < pos {
                pos = 0; // the log was restarted (a new boot)
            }
            if len > pos && f.seek(SeekFrom::Start(pos)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    pos += n as u64;
                    if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                        return Ok(0); // reader went away
                    }
                }
            }
        }
        if !alive {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Offset where the last `n` lines of `text` begin.
fn tail_start(text: &[u8], n: usize) -> usize {
    if n == 0 {
        return text.len();
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        let t = b"a\nb\nc\n";
        assert_eq!(&t[tail_start(t, 1)..], b"c\n");
        assert_eq!(&t[tail_start(t, 2)..], b"b\nc\n");
        assert_eq!(&t[tail_start(t, 9)..], t);
        assert_eq!(&t[tail_start(t, 0)..], b"");
        let u = b"a\nb";
        assert_eq!(&u[tail_start(u, 1)..], b"b");
        assert_eq!(tail_start(b"", 3), 0);
    }

    #[test]
    fn status_lines() {
        let v = json!({"name": "dev", "pid": null, "disk_usage_bytes": 2048, "images": ["a", "b"],
                       "default_kernel": {"path": "/k", "from": "config.json"}});
        let text = key_values(&v);
        assert!(text.contains("name:              dev\n"), "{text}");
        assert!(text.contains("pid:               -\n"), "{text}");
        assert!(text.contains("images:            a, b\n"), "{text}");
        assert!(text.contains("disk_usage_bytes:  2.0 KiB\n"), "{text}");
        assert!(
            text.contains("default_kernel:    /k (from config.json)\n"),
            "{text}"
        );
    }
}
