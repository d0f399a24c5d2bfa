// Every problem of one consumer is reported in the same build.
use reliable_mq::consumer;

#[consumer(queue = "", prefech = 10, concurrency = 0, timeout = "1.5s", dedup_ttl = "1h")]
fn reserve_stock(_id: u64, _d: u32, _e: u32) {}

fn main() {}
