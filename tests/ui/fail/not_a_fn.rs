use reliable_mq::consumer;

#[consumer(queue = "orders", dlx = "orders.dlx")]
struct Order {
    id: u64,
}

fn main() {}
