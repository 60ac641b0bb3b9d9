//! The snapshot state-file loader: `snapshot::decode` into untyped JSON and into the real
//! `vmm::snapshot::MicrovmState`, then the checks restore runs before touching KVM (memory
//! layout, VM configuration); and the working-set file loader on a real file.
//!
//! The first byte picks the mode, so the fuzzer is not stopped by the checksum:
//! - 0: the rest is a state file, as is (header, length and CRC checks);
//! - 1: the rest is a state-file payload; the target seals it with a valid header and CRC64,
//!   so mutations reach the JSON and the state types;
//! - 2: the rest is a working-set file, loaded for a 64 MiB memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::MicrovmState;
use vmm_fuzz::ScratchDir;

/// Guest memory size the working-set offsets are checked against.
const WS_MEM_SIZE: u64 = 64 << 20;

fn scratch() -> &'static ScratchDir {
    static DIR: OnceLock<ScratchDir> = OnceLock::new();
    DIR.get_or_init(|| ScratchDir::new("snap").expect("scratch dir"))
}

fn decode_state(file: &[u8]) {
    if let Ok(v) = snapshot::decode::<serde_json::Value>(file) {
        // What decodes re-encodes to a file that decodes to the same value.
        let again = snapshot::encode(&v).expect("encode a decoded value");
        let back: serde_json::Value = snapshot::decode(&again).expect("decode re-encoded file");
        assert_eq!(back, v);
    }
    if let Ok(state) = snapshot::decode::<MicrovmState>(file) {
        let _ = state.memory_layout.validate();
        let _ = state.config.validate();
        let _ = state.config.disks();
        let _ = state.config.profile();
        // The decoded state serializes back (what `snapshot create` of a restored VM does).
        snapshot::encode(&state).expect("encode a decoded MicrovmState");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => decode_state(rest),
        1 => decode_state(&vmm_fuzz::seeds::seal_state(rest)),
        _ => {
            let path = scratch().0.join("memory.ws");
            std::fs::write(&path, rest).expect("write working set");
            if let Ok(offsets) = snapshot::uffd::working_set::load(&path, WS_MEM_SIZE) {
                for o in offsets {
                    assert!(o < WS_MEM_SIZE && o % 4096 == 0, "offset {o:#x} accepted");
                }
            }
        }
    }
});
