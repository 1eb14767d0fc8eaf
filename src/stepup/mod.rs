//! The step-up domain: a change's state machine, the request digest that binds a confirmation
//! to one exact request, and the services that hold, confirm, release and cancel changes.

pub mod digest;
pub mod service;
pub mod state;

pub use service::{HeldRequest, StepUp};
pub use state::{Change, Event, Refusal, State, Transition};
