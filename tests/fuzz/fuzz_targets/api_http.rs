//! The control API end to end: raw bytes on a connection to the real `ApiServer` (HTTP
//! parsing, routing, JSON body decoding and validation), with a stand-in VMM answering. Every
//! answer must be well-formed HTTP with JSON fault bodies, and the server must close the
//! connection promptly after the client's end of stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let out = vmm_fuzz::api::exchange(data);
    vmm_fuzz::api::check_responses(&out);
});
