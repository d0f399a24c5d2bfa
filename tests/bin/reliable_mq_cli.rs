//! The `reliable-mq` command line, built in this package so that `tests/dlq_tool.rs` can run
//! (and kill) the real binary as a child process (`CARGO_BIN_EXE_reliable-mq-cli`).

fn main() -> std::process::ExitCode {
    reliable_mq::dlq::main()
}
