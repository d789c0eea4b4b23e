//! `poseidon-agent`: see the library's documentation.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(poseidon_agent::main_with_args(std::env::args().collect()));
}
