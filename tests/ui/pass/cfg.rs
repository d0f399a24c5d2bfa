//! A `#[cfg]` after `#[consumer]` applies to the generated items too: a consumer whose
//! function is compiled out is not registered (and does not fail the build).
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use reliable_mq::{HandlerError, consumer};

#[consumer(queue = "never", dlx = "never.dlx")]
#[cfg(any())]
async fn never(_n: u64) -> Result<(), HandlerError> {
    Ok(())
}

#[consumer(queue = "always", dlx = "always.dlx")]
#[cfg(all())]
async fn always(_n: u64) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    assert_eq!(reliable_mq::__private::model(&always::SPEC).queue(), "always");
    // The generated type is `Debug`, for crates that deny missing Debug impls.
    assert_eq!(format!("{:?}", always {}), "always");
    assert!(reliable_mq::__private::registered().any(|spec| reliable_mq::__private::model(&spec).queue() == "always"));
    assert!(reliable_mq::__private::registered().all(|spec| reliable_mq::__private::model(&spec).queue() != "never"));
}
