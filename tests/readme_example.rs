//! The README's "Testing your consumers" example, compiled and run exactly as written
//! there: `the_readme_shows_this_example` fails as soon as the README's code block and the
//! copy below differ, so the README cannot drift from the API.

// Kept byte for byte as in the README (so not formatted), where it is written as users
// write tests, with `unwrap`.
#[rustfmt::skip]
#[allow(clippy::unwrap_used)]
mod example {
// ---- the README's code block, verbatim ----
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reliable_mq::testing::TestApp;
use reliable_mq::{HandlerError, State, consumer};

#[derive(Clone, Default)]
struct Inventory(Arc<Mutex<HashMap<String, u32>>>);

#[derive(serde::Serialize, serde::Deserialize)]
struct Order { sku: String, qty: u32 }

#[consumer(queue = "orders", exchange = "shop", routing_key = "order.*", dlx = "orders.dlx",
           max_retries = 3, retry_delay = "1s")]
async fn reserve_stock(order: Order, State(stock): State<Inventory>) -> Result<(), HandlerError> {
    let mut stock = stock.0.lock().map_err(|_| HandlerError::retry("lock poisoned"))?;
    let Some(have) = stock.get(&order.sku).copied() else {
        return Err(HandlerError::reject(format!("unknown sku {}", order.sku)));
    };
    if have < order.qty {
        return Err(HandlerError::retry(format!("only {have} left")));
    }
    stock.insert(order.sku, have - order.qty);
    Ok(())
}

#[tokio::test]
async fn reserves_retries_and_dead_letters() {
    let inventory = Inventory::default();
    inventory.0.lock().unwrap().insert("apple".into(), 5);
    let mut app = TestApp::new()
        .consumer(reserve_stock::SPEC)
        .with_state(inventory.clone());

    let order = |sku: &str, qty| Order { sku: sku.into(), qty };
    app.publish("shop", "order.created", &order("apple", 2)).await.unwrap(); // success
    app.publish("shop", "order.created", &order("apple", 10)).await.unwrap(); // retried
    app.publish("shop", "order.created", &order("pear", 1)).await.unwrap(); // rejected
    app.run_until_idle().await;

    assert_eq!(app.handled("orders"), 1);
    assert_eq!(inventory.0.lock().unwrap()["apple"], 3);
    let delays: Vec<_> = app.retries("orders").iter().map(|r| r.delay).collect();
    assert_eq!(delays, [1, 2, 4].map(Duration::from_secs)); // the ladder, in no time
    let kinds: Vec<_> = app.dead_letters("orders").iter()
        .filter_map(|m| m.header("x-error-kind")).collect();
    assert_eq!(kinds, ["rejected", "retries-exhausted"]);
}
// ---- end of the README's code block ----
}

#[test]
fn the_readme_shows_this_example() {
    let readme = include_str!("../README.md");
    let this = include_str!("readme_example.rs");
    let section = readme
        .find("## Testing your consumers")
        .expect("the README has the section");
    let start = readme[section..].find("```rust\n").expect("a rust block") + section + 8;
    let len = readme[start..].find("```\n").expect("the block ends");
    let block = &readme[start..start + len];
    let begin = "// ---- the README's code block, verbatim ----\n";
    let copy_start = this.find(begin).expect("the marker") + begin.len();
    let copy_len = this[copy_start..]
        .find("// ---- end of the README's code block ----")
        .expect("the end marker");
    assert_eq!(
        &this[copy_start..copy_start + copy_len],
        block,
        "tests/readme_example.rs and the README's example differ"
    );
}
