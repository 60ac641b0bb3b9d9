//! From a parsed request to what answers it: an action for the VMM, or a
//! response the server gives itself (version, 404, 405, bad body).

use serde::de::DeserializeOwned;

use super::http::{Request, Response};
use super::types::{
    ActionBody, ActionType, CreateSnapshotParams, LoadSnapshotParams, MergeDiffParams, PatchVm,
    VersionInfo, VmStateChange,
};
use super::{ApiAction, API_VERSION};

/// Every route and the methods it allows (the `Allow` header of a 405).
const ROUTES: &[(&str, &str)] = &[
    ("/vm", "GET, PATCH"),
    ("/snapshot/create", "PUT"),
    ("/snapshot/load", "PUT"),
    ("/snapshot/merge", "PUT"),
    ("/snapshot/memory-stats", "GET"),
    ("/actions", "PUT"),
    ("/version", "GET"),
];

/// Who answers a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// The VMM, through the request channel.
    Vmm(ApiAction),
    /// The server itself.
    Local(Response),
}

pub(crate) fn route(req: &Request) -> Routed {
    match route_inner(req) {
        Ok(action) => Routed::Vmm(action),
        Err(resp) => Routed::Local(resp),
    }
}

fn route_inner(req: &Request) -> Result<ApiAction, Response> {
    let Some(&(path, allow)) = ROUTES.iter().find(|(p, _)| *p == req.path) else {
        return Err(Response::fault(
            404,
            &format!("no such resource: {}", req.path),
        ));
    };
    match (req.method.as_str(), path) {
        ("GET", "/vm") => Ok(ApiAction::GetVm),
        ("PATCH", "/vm") => Ok(match body::<PatchVm>(&req.body)?.state {
            VmStateChange::Paused => ApiAction::Pause,
            VmStateChange::Resumed => ApiAction::Resume,
        }),
        ("PUT", "/snapshot/create") => {
            let p: CreateSnapshotParams = body(&req.body)?;
            p.validate().map_err(|m| Response::fault(400, &m))?;
            Ok(ApiAction::CreateSnapshot(p))
        }
        ("PUT", "/snapshot/load") => {
            let p: LoadSnapshotParams = body(&req.body)?;
            p.validate().map_err(|m| Response::fault(400, &m))?;
            Ok(ApiAction::LoadSnapshot(p))
        }
        ("PUT", "/snapshot/merge") => {
            let p: MergeDiffParams = body(&req.body)?;
            p.validate().map_err(|m| Response::fault(400, &m))?;
            Ok(ApiAction::MergeDiff(p))
        }
        ("PUT", "/actions") => match body::<ActionBody>(&req.body)?.action_type {
            ActionType::Stop => Ok(ApiAction::Stop),
            ActionType::SaveWorkingSet => Ok(ApiAction::SaveWorkingSet),
        },
        ("GET", "/snapshot/memory-stats") => Ok(ApiAction::MemoryStats),
        ("GET", "/version") => Err(version()),
        (method, _) => {
            let mut resp = Response::fault(
                405,
                &format!("{method} is not allowed on {path}; allowed: {allow}"),
            );
            resp.allow = Some(allow);
            Err(resp)
        }
    }
}

fn version() -> Response {
    let info = VersionInfo {
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        api_version: API_VERSION.to_string(),
    };
    match serde_json::to_value(info) {
        Ok(v) => Response::json(&v),
        Err(e) => Response::fault(500, &format!("cannot encode the version: {e}")),
    }
}

/// Decodes a JSON body; serde's message (field, line, column) goes back to
/// the user as is.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    if bytes.trim_ascii().is_empty() {
        return Err(Response::fault(
            400,
            "the request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| Response::fault(400, &format!("invalid request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI file documents exactly the routes and methods served.
    #[test]
    fn openapi_file_lists_every_route_and_method() {
        let spec = include_str!("../../api/openapi.yaml");
        let mut documented: Vec<(String, String)> = Vec::new();
        let mut path = None;
        for line in spec.lines() {
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if !line.starts_with("    ") && !line.trim().is_empty() {
                path = None;
            } else if let (Some(p), Some(m)) = (
                &path,
                line.strip_prefix("    ")
                    .and_then(|l| l.strip_suffix(':'))
                    .filter(|m| ["get", "put", "patch", "post", "delete"].contains(m)),
            ) {
                documented.push((p.clone(), m.to_uppercase()));
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .flat_map(|(p, methods)| {
                methods
                    .split(", ")
                    .map(move |m| (p.to_string(), m.to_string()))
            })
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    fn fault(r: Routed) -> (u16, String, Option<&'static str>) {
        let Routed::Local(resp) = r else {
            panic!("expected a local answer, got {r:?}");
        };
        let v: serde_json::Value = serde_json::from_slice(&resp.body.unwrap()).unwrap();
        let msg = v["fault_message"].as_str().unwrap_or_default().to_string();
        (resp.status, msg, resp.allow)
    }

    #[test]
    fn actions() {
        let cases = [
            (req("GET", "/vm", ""), ApiAction::GetVm),
            (
                req("PATCH", "/vm", r#"{"state":"Paused"}"#),
                ApiAction::Pause,
            ),
            (
                req("PATCH", "/vm", r#" {"state":"Resumed"} "#),
                ApiAction::Resume,
            ),
            (
                req("PUT", "/actions", r#"{"action_type":"Stop"}"#),
                ApiAction::Stop,
            ),
            (
                req(
                    "PUT",
                    "/snapshot/create",
                    r#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Diff"}"#,
                ),
                ApiAction::CreateSnapshot(CreateSnapshotParams {
                    snapshot_type: super::super::SnapshotType::Diff,
                    snapshot_path: "/s".into(),
                    mem_file_path: "/m".into(),
                }),
            ),
            (
                req(
                    "PUT",
                    "/snapshot/merge",
                    r#"{"base_mem_file_path":"b","diff_mem_file_path":"d","snapshot_path":"s"}"#,
                ),
                ApiAction::MergeDiff(MergeDiffParams {
                    base_mem_file_path: "b".into(),
                    diff_mem_file_path: "d".into(),
                    snapshot_path: "s".into(),
                }),
            ),
        ];
        for (r, want) in cases {
            assert_eq!(route(&r), Routed::Vmm(want), "{r:?}");
        }
        let r = route(&req(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path":"s","mem_file_path":"m"}"#,
        ));
        assert!(
            matches!(r, Routed::Vmm(ApiAction::LoadSnapshot(_))),
            "{r:?}"
        );
    }

    #[test]
    fn version_is_local() {
        let Routed::Local(resp) = route(&req("GET", "/version", "")) else {
            panic!("version goes to the VMM");
        };
        assert_eq!(resp.status, 200);
        let v: VersionInfo = serde_json::from_slice(&resp.body.unwrap()).unwrap();
        assert_eq!(v.api_version, API_VERSION);
        assert_eq!(v.vmm_version, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn errors() {
        assert_eq!(fault(route(&req("GET", "/nope", ""))).0, 404);
        assert_eq!(fault(route(&req("GET", "/vm/", ""))).0, 404);
        assert_eq!(
            fault(route(&req("PUT", "/vm", ""))),
            (
                405,
                "PUT is not allowed on /vm; allowed: GET, PATCH".into(),
                Some("GET, PATCH")
            )
        );
        assert_eq!(fault(route(&req("DELETE", "/version", ""))).2, Some("GET"));
        let cases = [
            ("PATCH", "/vm", "", "body is empty"),
            ("PATCH", "/vm", "{", "EOF while parsing"),
            (
                "PATCH",
                "/vm",
                r#"{"state":"Running"}"#,
                "unknown variant `Running`, expected `Paused` or `Resumed`",
            ),
            (
                "PATCH",
                "/vm",
                r#"{"state":"paused"}"#,
                "unknown variant `paused`",
            ),
            (
                "PATCH",
                "/vm",
                r#"{"state":"Paused","x":1}"#,
                "unknown field `x`",
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type":"InstanceStart"}"#,
                "unknown variant",
            ),
            (
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_path":"","mem_file_path":"m"}"#,
                "`snapshot_path` must not be empty",
            ),
            (
                "PUT",
                "/snapshot/create",
                r#"{"snapshot_path":"s"}"#,
                "missing field `mem_file_path`",
            ),
            (
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path":"s","mem_backend":{"backend_type":"UFFD","backend_path":"m"}}"#,
                "unknown variant `UFFD`",
            ),
            (
                "PUT",
                "/snapshot/merge",
                r#"{"base_mem_file_path":"b","diff_mem_file_path":"b","snapshot_path":"s"}"#,
                "must differ",
            ),
            ("PUT", "/snapshot/load", "[1]", "invalid type"),
        ];
        for (m, p, b, want) in cases {
            let (status, msg, _) = fault(route(&req(m, p, b)));
            assert_eq!(status, 400, "{m} {p} {b}");
            assert!(msg.contains(want), "{m} {p} {b}: {msg}");
        }
    }
}
