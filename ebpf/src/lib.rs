//! Ferry's eBPF Service data plane: socket-level load balancing (programs in
//! `src/bpf/*.c`, built by build.rs; the loader comes next).

#[allow(dead_code)] // shared with build.rs, which reads the parts this crate does not
mod layout;
#[allow(dead_code)] // used by the loader
mod maps;

pub use maps::Protocol;

/// The object built from `src/bpf/sock_addr.c`.
pub static SOCK_ADDR_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock_addr.o"));
