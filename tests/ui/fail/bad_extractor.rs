use reliable_mq::{Delivery, HandlerError, State, consumer};

#[derive(Clone)]
struct Db;

// A plain extra parameter has no source: the error says to register it as state.
#[consumer(queue = "a", dlx = "a.dlx")]
async fn plain(_id: u64, _db: Db) -> Result<(), HandlerError> {
    Ok(())
}

// State is taken by value.
#[consumer(queue = "b", dlx = "b.dlx")]
async fn by_ref(_id: u64, _db: &State<Db>) -> Result<(), HandlerError> {
    Ok(())
}

// The payload comes first.
#[consumer(queue = "c", dlx = "c.dlx")]
async fn state_first(_db: State<Db>, _id: u64) -> Result<(), HandlerError> {
    Ok(())
}

// One delivery is enough.
#[consumer(queue = "d", dlx = "d.dlx")]
async fn twice(_id: u64, _a: &Delivery, _b: &Delivery) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
