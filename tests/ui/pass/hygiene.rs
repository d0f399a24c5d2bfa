//! Names the generated code uses internally do not clash with the user's: functions named
//! like its locals, a raw identifier, a `Result` alias and a local `core` module.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use reliable_mq::{Delivery, HandlerError, consumer};

#[allow(dead_code)]
mod core {}

type Result<T> = std::result::Result<T, HandlerError>;

#[allow(dead_code)]
struct Box;

#[allow(dead_code)]
enum Option {
    Some,
    None,
}

#[consumer(queue = "a", dlx = "a.dlx")]
async fn delivery(payload: u64, delivery: &Delivery) -> Result<()> {
    let _ = (payload, delivery.attempt());
    Ok(())
}

#[consumer(queue = "b", dlx = "b.dlx")]
async fn payload(delivery: u64) -> Result<()> {
    let _ = delivery;
    Ok(())
}

#[consumer(queue = "c", dlx = "c.dlx")]
async fn decode(error: u64) -> Result<()> {
    let _ = error;
    Ok(())
}

#[consumer(queue = "d", dlx = "d.dlx")]
async fn r#match(_n: u64) -> Result<()> {
    Ok(())
}

fn main() {
    assert_eq!(reliable_mq::__private::model(&delivery::SPEC).queue(), "a");
    assert_eq!(reliable_mq::__private::model(&payload::SPEC).queue(), "b");
    assert_eq!(reliable_mq::__private::model(&decode::SPEC).queue(), "c");
    assert!(
        r#match::SPEC.name().ends_with("::match"),
        "{}",
        r#match::SPEC.name()
    );
}
