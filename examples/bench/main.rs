//! Benchmarks of reliable-mq against raw lapin, in one process run, on the same broker,
//! queues and message sizes. Ratios matter, not absolute numbers: the machine is shared.
//!
//! ```text
//! cargo run --release --example bench -- publish [--n 20000] [--reps 5] [--window 1000]
//!                                               [--one-by-one-n 2000] [--concurrency 1000]
//! ```
//!
//! Modes are functions in their own module (`publish.rs`); add `consume`, `latency` or
//! `rss` the same way: a module with `run(&Args)` and a line in `main`'s dispatch.
//! Results are written up in BENCHMARKS.md.

mod common;
mod publish;

use common::Args;

#[tokio::main]
async fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\n\n{}", common::USAGE);
            std::process::exit(2);
        }
    };
    let result = match args.mode.as_str() {
        "help" | "--help" | "-h" => {
            println!("{}", common::USAGE);
            Ok(())
        }
        "publish" => publish::run(&args).await,
        other => Err(format!("unknown mode {other:?}\n\n{}", common::USAGE)),
    };
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
