use reliable_mq::consumer;

#[consumer(queue = "orders", dlx = "orders.dlx")]
async fn reserve_stock(_id: u64) {}

fn main() {}
