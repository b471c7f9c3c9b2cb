//! The PostgreSQL work of a blue-green switch, over tokio-postgres.

pub mod pg;
