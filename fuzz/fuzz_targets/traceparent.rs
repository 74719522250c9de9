#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| micro8gents::fuzzing::traceparent(data));
