//! `crate = "..."`: the generated code names the runtime by the path given, for services
//! that renamed the dependency (here an alias of it).
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

mod shop {
    pub use reliable_mq as mq;
}

#[shop::mq::consumer(queue = "renamed", dlx = "renamed.dlx", crate = "crate::shop::mq")]
async fn handle(_n: u64) -> Result<(), shop::mq::HandlerError> {
    Ok(())
}

fn main() {
    assert_eq!(handle::SPEC.queue(), "renamed");
}
