//! The stores every test runs on.

pub use fount_store::testing::stores;
