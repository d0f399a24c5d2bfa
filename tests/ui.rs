//! Compile-time behaviour of `#[consumer]`: what it accepts (`ui/pass`, built and run) and
//! the error for each rule it enforces (`ui/fail`, each with its expected `.stderr`).
//!
//! After changing a message on purpose: `TRYBUILD=overwrite cargo test -p reliable-mq-tests
//! --test ui`, then read every changed `.stderr`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
}
