//! The README's performance section, generated from results: machine,
//! date, the commands that produced it, the plot and the tables. Only the
//! text between two marker lines is replaced; a README without exactly one
//! pair of markers, in order, is left untouched and reported.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use crate::error::{BenchError, Result};
use crate::report::{self, Record};

/// The line before the generated text.
pub const BEGIN: &str = "<!-- perf:begin -->";
/// The line after it.
pub const END: &str = "<!-- perf:end -->";

/// Why the markers do not delimit one section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkerError {
    #[error(
        "no `{0}` line: put a `{BEGIN}` line and a `{END}` line where the \
         generated performance section goes"
    )]
    Missing(&'static str),
    #[error("`{0}` is on {1} lines; it must be on exactly one")]
    Repeated(&'static str, usize),
    #[error("the `{END}` line comes before the `{BEGIN}` line")]
    Reversed,
}

/// Byte offsets of the lines that are exactly `marker` (surrounding
/// whitespace allowed): (start of the line, just after its line break).
fn marker_lines(text: &str, marker: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        if line.trim() == marker {
            found.push((start, start + line.len()));
        }
        start += line.len();
    }
    found
}

fn one(text: &str, marker: &'static str) -> std::result::Result<(usize, usize), MarkerError> {
    match marker_lines(text, marker).as_slice() {
        [] => Err(MarkerError::Missing(marker)),
        [only] => Ok(*only),
        many => Err(MarkerError::Repeated(marker, many.len())),
    }
}

/// `text` with everything between the marker lines replaced by `body`
/// (the marker lines and everything outside them are kept byte for byte).
pub fn replace_section(text: &str, body: &str) -> std::result::Result<String, MarkerError> {
    let (_, after_begin) = one(text, BEGIN)?;
    let (end_start, _) = one(text, END)?;
    if end_start < after_begin {
        return Err(MarkerError::Reversed);
    }
    let mut out = String::with_capacity(text.len() + body.len());
    out.push_str(&text[..after_begin]);
    if !out.ends_with('\n') {
        // The begin marker was the last line without a line break; the end
        // marker cannot follow it, so this is unreachable, but stay safe.
        out.push('\n');
    }
    out.push_str(body);
    if !body.is_empty() && !body.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&text[end_start..]);
    Ok(out)
}

/// Rewrites the section of the README at `path` with `body`; the file is
/// replaced atomically (written beside it, then renamed), and not at all
/// when the markers are wrong.
pub fn update_file(path: &Path, body: &str) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(BenchError::file("reading", path))?;
    let new = replace_section(&text, body).map_err(|source| BenchError::Readme {
        path: path.to_path_buf(),
        source,
    })?;
    if new == text {
        return Ok(());
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".vmm-bench.tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, new).map_err(BenchError::file("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BenchError::file("replacing", path)(e)
    })
}

/// A command line as one would type it: the program by its file name,
/// arguments single-quoted when the shell would split or expand them.
pub fn shell_line(argv: &[String]) -> String {
    let mut words = Vec::with_capacity(argv.len());
    for (i, arg) in argv.iter().enumerate() {
        let word = if i == 0 {
            Path::new(arg)
                .file_name()
                .map_or(arg.clone(), |n| n.to_string_lossy().into_owned())
        } else {
            arg.clone()
        };
        let plain = !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./,=:+@%".contains(c));
        words.push(if plain {
            word
        } else {
            format!("'{}'", word.replace('\'', r"'\''"))
        });
    }
    words.join(" ")
}

/// `target` relative to the directory `from` (both made absolute against
/// the current directory first), for a link inside the README.
pub fn relative_link(from: &Path, target: &Path) -> String {
    let abs = |p: &Path| -> Vec<String> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let mut parts: Vec<String> = Vec::new();
        for c in p.components() {
            match c {
                Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
                Component::ParentDir => {
                    parts.pop();
                }
                _ => {}
            }
        }
        parts
    };
    let (from, to) = (abs(from), abs(target));
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel: Vec<String> = vec!["..".to_string(); from.len() - common];
    rel.extend(to[common..].iter().cloned());
    rel.join("/")
}

/// What the generated section says besides the tables.
pub struct SectionInput<'a> {
    pub records: &'a [Record],
    /// The results files it was generated from, as given.
    pub json: &'a [PathBuf],
    /// The plot's link text (relative to the README), if there is a plot.
    pub png_link: Option<String>,
    /// The command generating the section.
    pub this_command: String,
    /// Free text about the conditions (e.g. the machine's load).
    pub note: Option<&'a str>,
}

/// The Markdown between the markers.
pub fn section(input: &SectionInput) -> String {
    let mut out = String::new();
    let files: Vec<String> = input
        .json
        .iter()
        .map(|p| format!("`{}`", p.display()))
        .collect();
    let _ = writeln!(
        out,
        "_Generated by `vmm-bench readme` from {}; edit the harness, not this text._\n",
        files.join(", ")
    );

    // Each distinct run (machine + command) once, in order of appearance.
    let mut runs: Vec<(&crate::machine::MachineInfo, bool)> = Vec::new();
    for r in input.records {
        let key = |m: &crate::machine::MachineInfo| (m.command.clone(), m.started_utc.clone());
        if !runs.iter().any(|(m, _)| key(m) == key(&r.machine)) {
            runs.push((&r.machine, r.label.is_some()));
        }
    }
    for (m, nested) in runs {
        let when = m.started_utc.as_deref().unwrap_or("unknown date");
        let what = if nested {
            "Nested run started"
        } else {
            "Measured"
        };
        let _ = writeln!(out, "- {what} {when} on {}.", report::machine_line(m));
        if let Some(load) = &m.loadavg {
            let _ = writeln!(out, "  Load average at start: {load}.");
        }
        if !m.command.is_empty() {
            let _ = writeln!(out, "  Command: `{}`", shell_line(&m.command));
        }
    }
    let _ = writeln!(out, "- This section: `{}`", input.this_command);
    if let Some(note) = input.note {
        let _ = writeln!(out, "- Note: {note}");
    }
    out.push('\n');
    if let Some(link) = &input.png_link {
        let _ = writeln!(
            out,
            "![Snapshot and restore time against guest memory size]({link})\n"
        );
    }
    let md = report::markdown(input.records);
    // The tables without report::markdown's own machine line (said above).
    let tables = match md.split_once("\n\n") {
        Some((first, rest)) if first.starts_with("Machine: ") => rest,
        _ => md.as_str(),
    };
    out.push_str(tables.trim_end());
    out.push('\n');
    // What each scenario's figures mean, once per scenario.
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for r in input.records {
        for n in &r.notes {
            if !seen.contains(&(r.scenario.as_str(), n.as_str())) {
                seen.push((&r.scenario, n));
            }
        }
    }
    if !seen.is_empty() {
        out.push_str("\nNotes:\n");
        for (scenario, note) in seen {
            let _ = writeln!(out, "- `{scenario}`: {note}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = "# x\n\n## Performance\n\n<!-- perf:begin -->\nold\ntext\n<!-- perf:end -->\n\n## After\nkeep\n";

    #[test]
    fn replaces_only_between_markers() {
        let new = replace_section(README, "new body").unwrap();
        assert_eq!(
            new,
            "# x\n\n## Performance\n\n<!-- perf:begin -->\nnew body\n<!-- perf:end -->\n\n## After\nkeep\n"
        );
        // Idempotent, and an empty body leaves the markers adjacent.
        assert_eq!(replace_section(&new, "new body").unwrap(), new);
        let empty = replace_section(README, "").unwrap();
        assert!(empty.contains("<!-- perf:begin -->\n<!-- perf:end -->\n"));
        // CRLF files and indented markers.
        let crlf = "a\r\n  <!-- perf:begin -->\r\nold\r\n<!-- perf:end -->\r\nb\r\n";
        assert_eq!(
            replace_section(crlf, "n\n").unwrap(),
            "a\r\n  <!-- perf:begin -->\r\nn\n<!-- perf:end -->\r\nb\r\n"
        );
    }

    #[test]
    fn wrong_markers_are_errors() {
        assert_eq!(
            replace_section("# x\n", "b"),
            Err(MarkerError::Missing(BEGIN))
        );
        assert_eq!(
            replace_section("<!-- perf:begin -->\nx\n", "b"),
            Err(MarkerError::Missing(END))
        );
        let twice = format!("{README}<!-- perf:begin -->\n");
        assert_eq!(
            replace_section(&twice, "b"),
            Err(MarkerError::Repeated(BEGIN, 2))
        );
        assert_eq!(
            replace_section("<!-- perf:end -->\n<!-- perf:begin -->\n", "b"),
            Err(MarkerError::Reversed)
        );
        // A marker inside a longer line does not count.
        assert_eq!(
            replace_section("see `<!-- perf:begin -->` and <!-- perf:end -->\n", "b"),
            Err(MarkerError::Missing(BEGIN))
        );
    }

    #[test]
    fn file_is_untouched_when_markers_are_wrong() {
        let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir()).unwrap();
        let path = dir.path().join("README.md");
        std::fs::write(&path, "# no markers\n").unwrap();
        let err = update_file(&path, "body").unwrap_err().to_string();
        assert!(
            err.contains("README.md") && err.contains("perf:begin"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# no markers\n");
        std::fs::write(&path, README).unwrap();
        update_file(&path, "body\n").unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("<!-- perf:begin -->\nbody\n<!-- perf:end -->"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
        let missing = dir.path().join("nope.md");
        assert!(update_file(&missing, "b")
            .unwrap_err()
            .to_string()
            .contains("nope.md"));
    }

    #[test]
    fn commands_and_links() {
        let argv: Vec<String> = [
            "/work/targets/x/release/vmm-bench",
            "--mem-mib",
            "128,512",
            "--note",
            "it's busy",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            shell_line(&argv),
            r"vmm-bench --mem-mib 128,512 --note 'it'\''s busy' ''"
        );
        assert_eq!(
            relative_link(Path::new("/a/b"), Path::new("/a/b/c/d.png")),
            "c/d.png"
        );
        assert_eq!(
            relative_link(Path::new("/a/b/x"), Path::new("/a/c/../b/d.png")),
            "../d.png"
        );
    }

    #[test]
    fn section_has_machine_commands_plot_and_tables() {
        let json = r#"[{"scenario":"snapshot-full","target":"vmm","mem_mib":128,"vcpus":1,"runs":1,
            "warmup":1,"error":null,"metrics":{"total":{"unit":"ms","min":1.0,"median":2.0,
            "max":3.0,"samples":[1.0,2.0,3.0]}},"notes":["total is all of it"],"details":null,"machine":{
            "cpu_model":"Test CPU","host_kernel":"6.1.0","kvm_module":"kvm_pvm","nproc":2,
            "mem_total_mib":1024,"temp_fs":"ext4","vmm_commit":"abc","vmm_version":"0.1.0",
            "firecracker_version":null,"started_utc":"2026-11-25T03:00:00Z",
            "loadavg":"1.00 0.50 0.25","command":["/x/vmm-bench","--runs","2"]}}]"#;
        let records: Vec<Record> = serde_json::from_str(json).unwrap();
        let text = section(&SectionInput {
            records: &records,
            json: &[PathBuf::from("r.json")],
            png_link: Some("benches/results/p.png".into()),
            this_command: "vmm-bench readme --json r.json".into(),
            note: Some("quiet machine"),
        });
        for needle in [
            "`r.json`",
            "2026-11-25T03:00:00Z",
            "Test CPU (2 CPUs, 1024 MiB), host kernel 6.1.0, kvm_pvm",
            "Load average at start: 1.00 0.50 0.25",
            "Command: `vmm-bench --runs 2`",
            "This section: `vmm-bench readme --json r.json`",
            "Note: quiet machine",
            "](benches/results/p.png)",
            "| snapshot-full | 128 MiB, 1 vCPU | total | ms | 1.000 | 2.000 | 3.000 |",
            "- `snapshot-full`: total is all of it",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!text.contains("Machine: "), "{text}");
    }
}
