//! Sandbox and snapshot names: 1 to 40 of lowercase letters, digits and
//! hyphens, so they are safe as file names, in sockets paths and in shells.
//! And snapshot ids: names can be reused, ids are not.

use super::clock::LocalTime;
use super::error::{Error, Result};

/// Longest name.
pub const MAX_NAME_LEN: usize = 40;

/// Checks a user-given name; `what` is "sandbox" or "snapshot".
pub fn validate(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::Invalid(format!(
            "{what} name {name:?} must be 1 to {MAX_NAME_LEN} characters long"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(Error::Invalid(format!(
            "{what} name {name:?} has {c:?}; use lowercase letters, digits and hyphens"
        )));
    }
    Ok(())
}

/// A fresh random 128-bit id in hex: what tells two snapshots apart that
/// had the same name at different times. Read from /dev/urandom (allowed to
/// the VMM's scheduler thread, which takes snapshots too).
pub fn random_id() -> Result<String> {
    use std::io::Read;
    let path = std::path::Path::new("/dev/urandom");
    let mut bytes = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading", path, e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The automatic snapshot name `SANDBOX-YYYYMMDD-HHMMSS` (local time); the
/// sandbox part is shortened so the whole stays within the limit.
pub fn auto_snapshot_name(sandbox: &str, at: &LocalTime) -> String {
    let stamp = format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        at.year, at.month, at.day, at.hour, at.minute, at.second
    );
    let room = MAX_NAME_LEN - stamp.len() - 1;
    let prefix = sandbox[..sandbox.len().min(room)].trim_end_matches('-');
    if prefix.is_empty() {
        stamp
    } else {
        format!("{prefix}-{stamp}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_names() {
        for ok in ["a", "dev", "my-box-2", "0", &"x".repeat(40)] {
            validate("sandbox", ok).unwrap();
        }
        let cases = [
            ("", "1 to 40"),
            (&"x".repeat(41) as &str, "1 to 40"),
            ("Dev", "'D'"),
            ("a_b", "'_'"),
            ("a.b", "'.'"),
            ("../x", "'.'"),
            ("a b", "' '"),
            ("é", "'é'"),
        ];
        for (name, want) in cases {
            let e = validate("snapshot", name).unwrap_err().to_string();
            assert!(e.contains(want), "{name:?}: {e}");
            assert!(e.starts_with("snapshot name"), "{e}");
        }
    }

    #[test]
    fn ids_are_random_hex() {
        let a = random_id().unwrap();
        let b = random_id().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn auto_names_are_valid_and_bounded() {
        let t = LocalTime {
            year: 2026,
            month: 3,
            day: 7,
            hour: 9,
            minute: 5,
            second: 1,
            weekday: 6,
        };
        assert_eq!(auto_snapshot_name("dev", &t), "dev-20260307-090501");
        let long = "a".repeat(40);
        let n = auto_snapshot_name(&long, &t);
        assert_eq!(n.len(), 40);
        validate("snapshot", &n).unwrap();
        // A prefix cut on a hyphen does not leave a double hyphen.
        let n = auto_snapshot_name(&format!("{}-b", "a".repeat(23)), &t);
        assert!(!n.contains("--"), "{n}");
        validate("snapshot", &n).unwrap();
    }
}
