//! With the `anyhow` feature, handlers return `anyhow::Result<()>` and use `?` and
//! `.context(..)`: retryable, the whole cause chain in the message.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use std::sync::Arc;

use anyhow::Context as _;
use reliable_mq::{Delivery, FailureKind, consumer};

#[consumer(queue = "uploads", dlx = "uploads.dlx")]
async fn read_upload(path: String) -> anyhow::Result<()> {
    std::fs::metadata(&path).context("reading the upload")?;
    Ok(())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let err = runtime
        .block_on(
            read_upload::SPEC
                .handler()
                .call(Arc::new(Delivery::for_test(br#""/does/not/exist""#.to_vec()))),
        )
        .expect_err("a missing file fails");
    assert_eq!(err.kind(), FailureKind::Error);
    assert!(err.message().starts_with("reading the upload: "), "{}", err.message());
}
