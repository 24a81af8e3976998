//! Empty library target: lets `userspace` name this crate as a
//! build-dependency so cargo rebuilds the eBPF object when it changes.
#![no_std]
