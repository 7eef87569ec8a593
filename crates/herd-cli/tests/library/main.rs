//! The library API driven in-process, as a Rust primary would: real
//! clusters of real worker processes.
//!
//! A separate binary from `integration` because a cluster owns
//! process-wide state: it becomes the child subreaper, reaps children of
//! its process it does not know (which would take the exit statuses of
//! other tests' `herd` processes), and installs signal dispositions. Here
//! every test holds [`util::serial`], so one cluster runs at a time and
//! nothing else shares its process.

mod api;
mod node;
#[path = "../integration/util.rs"]
#[allow(dead_code)]
mod util;

/// Held by every test here: one cluster at a time in this process.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}
