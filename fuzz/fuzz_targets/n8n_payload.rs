#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| micro8gents::fuzzing::n8n_payload(data));
