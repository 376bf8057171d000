//! A config file is user input: parsing any text gives settings and ignore rules or an error,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = forkwatch::cli::config::parse_file(text, "fuzz.toml");
});
