use reliable_mq::consumer;

// `Box<dyn Error>` is not itself an `Error`: the message says how to convert it.
#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve(_id: u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Ok(())
}

fn main() {}
