//! Consumers defined inside function bodies and blocks (as tests do): the expansion uses
//! no `super::` paths, and link-time registration works there too.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use reliable_mq::{HandlerError, consumer};

fn make_spec() -> reliable_mq::ConsumerSpec {
    #[consumer(queue = "inner", dlx = "inner.dlx")]
    async fn inner(_n: u64) -> Result<(), HandlerError> {
        Ok(())
    }
    inner::SPEC
}

fn main() {
    #[consumer(queue = "in-main", dlx = "in-main.dlx")]
    async fn in_main(_n: u64) -> Result<(), HandlerError> {
        Ok(())
    }

    let from_block = {
        #[consumer(queue = "in-block", dlx = "in-block.dlx")]
        pub async fn in_main(_n: u64) -> Result<(), HandlerError> {
            Ok(())
        }
        in_main::SPEC
    };

    assert_eq!(reliable_mq::__private::model(&in_main::SPEC).queue(), "in-main");
    assert_eq!(reliable_mq::__private::model(&from_block).queue(), "in-block");
    assert_eq!(reliable_mq::__private::model(&make_spec()).queue(), "inner");
    for queue in ["inner", "in-main", "in-block"] {
        assert!(
            reliable_mq::__private::registered().any(|spec| reliable_mq::__private::model(&spec).queue() == queue),
            "{queue} is not registered"
        );
    }
}
