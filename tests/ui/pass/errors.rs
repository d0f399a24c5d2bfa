//! Return types: `HandlerError`, or any `std::error::Error + Send + Sync + 'static`, so
//! `?` works on library errors.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use std::sync::Arc;

use reliable_mq::{Delivery, FailureKind, HandlerError, consumer};

#[derive(serde::Deserialize)]
struct Upload {
    path: String,
}

#[consumer(queue = "uploads", dlx = "uploads.dlx")]
async fn read_upload(upload: Upload) -> Result<(), std::io::Error> {
    std::fs::metadata(&upload.path)?;
    Ok(())
}

#[consumer(queue = "numbers", dlx = "numbers.dlx")]
async fn parse_number(text: String) -> Result<(), HandlerError> {
    let _n: u32 = text.parse()?;
    let _v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(())
}

#[derive(Debug)]
struct Blip;

impl std::fmt::Display for Blip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database blip")
    }
}

impl std::error::Error for Blip {}

#[consumer(queue = "custom", dlx = "custom.dlx")]
async fn custom(_n: u64) -> Result<(), Blip> {
    Err(Blip)
}

type Outcome = Result<(), HandlerError>;

#[consumer(queue = "aliased", dlx = "aliased.dlx")]
async fn aliased(_n: u64) -> Outcome {
    Ok(())
}

fn call(spec: reliable_mq::ConsumerSpec, body: &str) -> Result<(), HandlerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(
        spec.handler()
            .call(Arc::new(Delivery::for_test(body.as_bytes().to_vec()))),
    )
}

fn main() {
    let missing = call(read_upload::SPEC, r#"{"path": "/does/not/exist"}"#).expect_err("no file");
    assert_eq!(missing.kind(), FailureKind::Error);

    let not_a_number = call(parse_number::SPEC, r#""abc""#).expect_err("not a number");
    assert_eq!(not_a_number.kind(), FailureKind::Error);
    assert!(call(parse_number::SPEC, r#""12""#).is_ok());

    let blip = call(custom::SPEC, "1").expect_err("always fails");
    assert_eq!(blip.kind(), FailureKind::Error);
    assert!(blip.message().contains("database blip"));

    assert!(call(aliased::SPEC, "1").is_ok());
}
