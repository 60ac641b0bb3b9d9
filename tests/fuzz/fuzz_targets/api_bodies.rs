//! The API's JSON bodies, decoded and validated as the routes do (serde, then `validate`),
//! without the HTTP layer: fast, so it reaches deep into the body types. A body that decodes
//! must serialize back to JSON that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use vmm::api::{ActionBody, CreateSnapshotParams, LoadSnapshotParams, MergeDiffParams, PatchVm};

fn check<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    data: &[u8],
    validate: impl Fn(&T) -> Result<(), String>,
) {
    let Ok(v) = serde_json::from_slice::<T>(data) else {
        return;
    };
    if let Err(msg) = validate(&v) {
        assert!(!msg.is_empty(), "validation failed without a message");
    }
    let again = serde_json::to_vec(&v).expect("serialize a decoded body");
    let back: T = serde_json::from_slice(&again).expect("decode a re-encoded body");
    assert_eq!(back, v, "round trip changed the body");
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the body type, as the route would.
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => check::<LoadSnapshotParams>(body, LoadSnapshotParams::validate),
        1 => check::<CreateSnapshotParams>(body, CreateSnapshotParams::validate),
        2 => check::<MergeDiffParams>(body, MergeDiffParams::validate),
        3 => check::<PatchVm>(body, |_| Ok(())),
        _ => check::<ActionBody>(body, |_| Ok(())),
    }
});
