//! `reliable-mq`: operate a reliable-mq deployment from the shell (`dlq list|show|replay|purge`).
//! Install with `cargo install reliable-mq --features cli`; it reads `AMQP_URL`.

fn main() -> std::process::ExitCode {
    reliable_mq::dlq::main()
}
