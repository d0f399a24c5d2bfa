//! The generated type has the function's visibility: `pub`, `pub(crate)` and private
//! functions all expand, and `SPEC` is reachable wherever the function is.
#![deny(unused, non_camel_case_types, non_upper_case_globals)]

use reliable_mq::{App, Config, ConsumerSpec};

mod handlers {
    use reliable_mq::{HandlerError, consumer};

    #[consumer(queue = "public", dlx = "public.dlx")]
    pub async fn public(_n: u64) -> Result<(), HandlerError> {
        Ok(())
    }

    #[consumer(queue = "crate", dlx = "crate.dlx")]
    pub(crate) async fn crate_wide(_n: u64) -> Result<(), HandlerError> {
        Ok(())
    }

    #[consumer(queue = "private", dlx = "private.dlx")]
    async fn private(_n: u64) -> Result<(), HandlerError> {
        Ok(())
    }

    pub fn private_spec() -> reliable_mq::ConsumerSpec {
        private::SPEC
    }

    pub mod nested {
        use reliable_mq::{HandlerError, consumer};

        #[consumer(queue = "nested", dlx = "nested.dlx")]
        pub(super) async fn nested(_n: u64) -> Result<(), HandlerError> {
            Ok(())
        }

        pub fn spec() -> reliable_mq::ConsumerSpec {
            nested::SPEC
        }
    }
}

fn main() {
    let specs: [ConsumerSpec; 4] = [
        handlers::public::SPEC,
        handlers::crate_wide::SPEC,
        handlers::private_spec(),
        handlers::nested::spec(),
    ];
    assert!(
        specs[0].name().ends_with("handlers::public"),
        "{}",
        specs[0].name()
    );
    assert!(
        specs[3].name().ends_with("handlers::nested::nested"),
        "{}",
        specs[3].name()
    );

    // Registering by hand, as `App::consumer(name::SPEC)`; nothing connects until `run`.
    let app = specs
        .into_iter()
        .fold(App::new(Config::default()), |app, spec| app.consumer(spec));
    assert_eq!(app.consumers().len(), 4);
    assert_eq!(app.consumers()[2].queue(), "private");
}
