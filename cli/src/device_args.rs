//! Parsing of the device flags `--drive`, `--net` and `--vsock`: comma
//! separated `key=value` lists (bare `ro` for read-only drives).

use std::path::PathBuf;

use vmm::devices_config::{BlockConfig, NetConfig, VsockConfig};

fn pairs(spec: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (p.trim(), None),
        })
}

fn value<'a>(flag: &str, key: &str, v: Option<&'a str>) -> Result<&'a str, String> {
    match v {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("{flag}: `{key}` needs a value ({key}=...)")),
    }
}

/// `--drive path=FILE[,ro][,id=NAME]`
pub fn parse_drive(spec: &str) -> Result<BlockConfig, String> {
    let (mut path, mut read_only, mut id) = (None, false, None);
    for (k, v) in pairs(spec) {
        match k {
            "path" => path = Some(PathBuf::from(value("--drive", k, v)?)),
            "ro" | "readonly" if v.is_none() => read_only = true,
            "id" => id = Some(value("--drive", k, v)?.to_string()),
            other => {
                return Err(format!(
                    "--drive: unknown key `{other}` (expected path=, ro, id=)"
                ))
            }
        }
    }
    let path = path.ok_or("--drive: path=FILE is required")?;
    Ok(BlockConfig {
        path,
        read_only,
        id,
    })
}

/// `--net tap=NAME[,mac=aa:bb:cc:dd:ee:ff]`
pub fn parse_net(spec: &str) -> Result<NetConfig, String> {
    let (mut tap, mut mac) = (None, None);
    for (k, v) in pairs(spec) {
        match k {
            "tap" => tap = Some(value("--net", k, v)?.to_string()),
            "mac" => {
                let text = value("--net", k, v)?;
                mac = Some(
                    text.parse()
                        .map_err(|e| format!("--net: mac {text}: {e}"))?,
                );
            }
            other => {
                return Err(format!(
                    "--net: unknown key `{other}` (expected tap=, mac=)"
                ))
            }
        }
    }
    let tap = tap.ok_or("--net: tap=NAME is required")?;
    Ok(NetConfig { tap, mac })
}

/// `--vsock cid=N,uds=PATH`
pub fn parse_vsock(spec: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut uds) = (None, None);
    for (k, v) in pairs(spec) {
        match k {
            "cid" => {
                let text = value("--vsock", k, v)?;
                cid = Some(
                    text.parse::<u64>()
                        .map_err(|_| format!("--vsock: cid {text} is not a number"))?,
                );
            }
            "uds" => uds = Some(PathBuf::from(value("--vsock", k, v)?)),
            other => {
                return Err(format!(
                    "--vsock: unknown key `{other}` (expected cid=, uds=)"
                ))
            }
        }
    }
    Ok(VsockConfig {
        guest_cid: cid.ok_or("--vsock: cid=N is required")?,
        uds_path: uds.ok_or("--vsock: uds=PATH is required")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives() {
        let d = parse_drive("path=/a.img,ro,id=data").unwrap();
        assert_eq!(
            (d.path, d.read_only, d.id.as_deref()),
            (PathBuf::from("/a.img"), true, Some("data"))
        );
        assert!(!parse_drive("path=/a").unwrap().read_only);
        assert!(parse_drive("ro")
            .unwrap_err()
            .contains("path=FILE is required"));
        assert!(parse_drive("path=").unwrap_err().contains("needs a value"));
        assert!(parse_drive("path=/a,size=3")
            .unwrap_err()
            .contains("unknown key `size`"));
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.tap, "tap0");
        assert!(n.mac.is_some());
        assert!(parse_net("tap=tap0,mac=zz").unwrap_err().contains("mac zz"));
        assert!(parse_net("mac=02:00:00:00:00:01")
            .unwrap_err()
            .contains("tap=NAME"));
    }

    #[test]
    fn vsocks() {
        let v = parse_vsock("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (3, PathBuf::from("/tmp/v.sock")));
        assert!(parse_vsock("cid=x,uds=/a")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_vsock("uds=/a").unwrap_err().contains("cid=N"));
    }
}
