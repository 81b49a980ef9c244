//! The Container Network Interface protocol, as Ferry's plugins speak it.
//!
//! A plugin is one short-lived process per call: the runtime sets `CNI_*` environment
//! variables, writes the network configuration on stdin and reads a result or an error
//! object on stdout. This crate does everything around the plugin's own logic:
//!
//! - [`env`] reads and validates the `CNI_*` variables for the verb at hand,
//! - [`args`] parses `CNI_ARGS`,
//! - [`config`] reads the fields every network configuration shares (and
//!   `runtimeConfig` capabilities), leaving the plugin's own fields to the plugin,
//! - [`result`] holds one result model and writes it in any supported spec version,
//! - [`error`] carries the spec's error codes,
//! - [`plugin`] dispatches a verb to a [`plugin::Plugin`] and prints what it returns,
//! - [`delegate`] runs another plugin (IPAM) found through `CNI_PATH`.

pub mod args;
pub mod config;
pub mod delegate;
pub mod env;
pub mod error;
pub mod plugin;
pub mod result;
pub mod version;

pub use config::{Attachment, NetConf, PortMapping, RuntimeConfig};
pub use env::{Command, Env};
pub use error::{Code, Error};
pub use plugin::{run, Plugin, Request};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::Version;
