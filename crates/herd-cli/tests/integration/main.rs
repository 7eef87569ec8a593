//! Integration tests: the real `herd` binary, real worker programs, real
//! sockets on 127.0.0.1. One binary, a module per area; the library driven
//! in-process is in `tests/library` (a cluster owns process-wide state).

mod bad_input;
mod control;
mod demo;
mod deploy;
mod examples;
mod launchers;
mod limits;
mod logs;
mod metrics;
mod node;
mod orphans;
mod readiness;
mod reload;
mod scaling;
mod sockets;
mod stop;
mod supervision;
mod util;
