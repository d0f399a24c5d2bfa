//! State for handlers: values registered once with the app ([`App::with_state`]) and
//! handed to each handler call as a clone, through the [`State`] extractor.
//!
//! Several state types are registered once each, keyed by their type: a handler taking
//! `State<Db>` and `State<Mailer>` gets each from its own registration. Registering the
//! same type again replaces the earlier value. A consumer that needs a type nobody
//! registered stops start-up with an error naming the consumer and the type.
//!
//! [`App::with_state`]: crate::App::with_state

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use crate::HandlerError;

/// A handler parameter that receives a clone of state registered with
/// [`App::with_state`](crate::App::with_state) (or [`run_with`](crate::run_with)).
///
/// It is a tuple struct, as in axum, so the parameter can destructure it:
///
/// ```
/// use reliable_mq::{consumer, HandlerError, State};
///
/// #[derive(Clone)]
/// struct Stock { /* a pool, a client ... */ }
///
/// #[derive(serde::Deserialize)]
/// struct Order { sku: String }
///
/// #[consumer(queue = "orders", dlx = "orders.dlx")]
/// async fn reserve(order: Order, State(stock): State<Stock>) -> Result<(), HandlerError> {
///     let _ = (order.sku, stock);
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct State<T>(pub T);

/// What state a value must be: cloned into each handler call, from any thread.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be handler state",
    label = "state must be `Clone + Send + Sync + 'static`",
    note = "wrap what is not `Clone` in an `Arc` (e.g. `State<Arc<MyClient>>`)"
)]
pub trait StateValue: Clone + Send + Sync + 'static {}
impl<T: Clone + Send + Sync + 'static> StateValue for T {}

/// A state type a handler needs, for the start-up check.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateType {
    pub(crate) id: TypeId,
    pub(crate) name: &'static str,
}

impl StateType {
    /// The state type `T`.
    pub fn of<T: StateValue>() -> Self {
        Self {
            id: TypeId::of::<T>(),
            name: std::any::type_name::<T>(),
        }
    }
}

/// Registered state, by type.
#[derive(Default, Clone)]
pub(crate) struct StateMap(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl StateMap {
    pub(crate) fn insert<T: StateValue>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(value));
    }

    pub(crate) fn contains(&self, ty: &StateType) -> bool {
        self.0.contains_key(&ty.id)
    }

    pub(crate) fn get<T: StateValue>(&self) -> Option<T> {
        self.0
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .cloned()
    }
}

impl std::fmt::Debug for StateMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Types only: state values may hold credentials.
        f.debug_struct("StateMap")
            .field("types", &self.0.len())
            .finish()
    }
}

/// The `State<T>` of one handler call. The app checks at start-up that every consumer's
/// state is registered, so a miss here means a delivery built by hand without it.
#[doc(hidden)]
pub fn extract_state<T: StateValue>(delivery: &crate::Delivery) -> Result<State<T>, HandlerError> {
    delivery.state::<T>().map(State).ok_or_else(|| {
        HandlerError::retry(format!(
            "no state of type `{}` is registered: add it with App::with_state",
            std::any::type_name::<T>()
        ))
    })
}
