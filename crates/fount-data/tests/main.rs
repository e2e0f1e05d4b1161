//! fount-data tests: one binary, one module per concern.

mod agreement;
mod rules;
