//! Restoring containers with CRIU.
//!
//! So far this holds the CRIU RPC client ([`rpc`]): the `restore` command's container setup
//! (bundle, namespaces, cgroups, stdio, lifecycle) is still to be built on top of it.

pub mod rpc;
