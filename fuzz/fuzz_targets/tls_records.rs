#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetgate::fuzzing::tls::records(data));
