//! Any text as a pipeline file (and as a `--set` override): an error or a config, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = recap::config::parse_str(text, "fuzz.yaml", &[]);
    // The same bytes as an override of a valid file.
    let base = "input:\n  path: urls.parquet\noutput:\n  path: out\n";
    let _ = recap::config::parse_str(base, "fuzz.yaml", &[text.to_string()]);
});
