//! The README's "Using threadgate from a tirea agent" example is `examples/tirea_agent.rs`
//! (compiled with the crate's examples), and it runs against a real gateway.

use crate::harness::{Gateway, Mode};

#[allow(dead_code)] // its `main` is the example binary's entry point, not called here
#[path = "../../examples/tirea_agent.rs"]
mod example;

/// The ```` ```rust ```` block of the README section `heading`.
fn readme_block(readme: &str, heading: &str) -> String {
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("the README has a section {heading:?}"))
        .1;
    let block = section
        .split_once("```rust\n")
        .expect("the section has a rust block")
        .1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_owned()
}

#[test]
fn readme_example_is_the_example_target() {
    let readme = include_str!("../../../../README.md");
    let example = include_str!("../../examples/tirea_agent.rs");
    assert_eq!(
        readme_block(readme, "## Using threadgate from a tirea agent"),
        example,
        "README.md's example and clients/rust/examples/tirea_agent.rs differ: copy the example into the README"
    );
}

#[tokio::test]
async fn readme_example_runs() {
    for mode in [Mode::Memory, Mode::Buffered] {
        let gw = Gateway::start(mode).await;
        tokio::time::timeout(std::time::Duration::from_secs(30), example::run(&gw.base()))
            .await
            .unwrap_or_else(|_| panic!("the example finishes against {mode:?}"))
            .unwrap_or_else(|e| panic!("the example fails against {mode:?}: {e}"));
        gw.stop().await;
    }
}
