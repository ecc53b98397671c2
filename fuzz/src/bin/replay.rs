//! The fuzz check as a plain binary, for stable Rust (libFuzzer's coverage guidance needs
//! nightly's `cargo fuzz`):
//!
//! - `replay PATH...`: runs every file (or every file in every folder) as one input, such as
//!   the corpus in `corpus/http_key_rebuild` or a crash file `cargo fuzz` saved;
//! - `replay --random N [SEED]`: runs N inputs made by a seeded generator, 0 to 511 bytes each.
//!
//! A violated rule panics with the input's name (or number), so it can be saved and replayed.

use std::path::{Path, PathBuf};

fn files(path: &Path, out: &mut Vec<PathBuf>) {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for p in paths {
                files(&p, out);
            }
        }
        Err(_) => out.push(path.to_path_buf()),
    }
}

/// xorshift64*: enough to spread inputs over the decoder's choices, and reproducible.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--random") {
        let n: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
        let mut state: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0x5EED) | 1;
        let mut served = tower_coalesce_fuzz::Served::default();
        for i in 0..n {
            let len = (next(&mut state) % 512) as usize;
            let input: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
            let Ok(s) = std::panic::catch_unwind(|| tower_coalesce_fuzz::check(&input)) else {
                let name = format!("crash-random-{i}");
                std::fs::write(&name, &input).expect("save the failing input");
                eprintln!("input {i} failed; saved as {name}");
                std::process::exit(1);
            };
            served.add(s);
        }
        println!("{n} random inputs: all passed; waiters served: {served:?}");
        return;
    }
    let mut inputs = Vec::new();
    for a in &args {
        files(Path::new(a), &mut inputs);
    }
    let mut served = tower_coalesce_fuzz::Served::default();
    for path in &inputs {
        let data = std::fs::read(path).expect("readable input");
        match std::panic::catch_unwind(|| tower_coalesce_fuzz::check(&data)) {
            Ok(s) => served.add(s),
            Err(_) => {
                eprintln!("{} failed", path.display());
                std::process::exit(1);
            }
        }
    }
    println!(
        "{} inputs: all passed; waiters served: {served:?}",
        inputs.len()
    );
}
