//! Restoring runc containers with CRIU.
//!
//! [`rpc`] drives CRIU over its RPC protocol; [`container`] sets a runc container up around
//! it (bundle, mounts, namespaces, cgroups, stdio, console) and records its state. Around
//! it: [`preflight`] checks everything it can before CRIU starts, [`lsm`] rewrites the
//! images' LSM labels into a shadow images directory, [`cgroups`] places the container and
//! writes its limits, [`mounts`] prepares the rootfs's mount points, [`hooks`] runs the
//! config's OCI hooks, [`preload`] reads the pages files ahead of CRIU, [`lazy`] starts the
//! lazy-pages daemon a `--lazy-pages` restore needs, and [`lifecycle`] keeps a foreground
//! container company until it exits. [`dry_run`] reports all of it without doing any.

pub mod cgroups;
pub mod container;
pub mod dry_run;
pub mod hooks;
pub mod lazy;
pub mod lifecycle;
pub mod lsm;
pub mod mounts;
pub mod preflight;
pub mod preload;
pub mod rpc;
