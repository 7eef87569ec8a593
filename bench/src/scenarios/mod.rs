//! Scenarios: each is one file with a `run(ctx, results)` function that
//! measures, appends a markdown section, and records targets and chart data.
//! Adding a figure is adding a file and a line in [`ALL`].

use anyhow::Result;

use crate::report::Results;
use crate::systems::Ctx;

pub mod chaos;
pub mod coldstart;
pub mod ipc;
pub mod memory;
pub mod recovery;
pub mod reload;
pub mod roundrobin;
pub mod throughput;

/// A scenario's name and entry point.
pub type Scenario = (&'static str, fn(&Ctx, &mut Results) -> Result<()>);

/// Every scenario, in report order.
pub const ALL: &[Scenario] = &[
    ("throughput", throughput::run),
    ("roundrobin", roundrobin::run),
    ("memory", memory::run),
    ("recovery", recovery::run),
    ("coldstart", coldstart::run),
    ("ipc", ipc::run),
    ("reload", reload::run),
    ("chaos", chaos::run),
];
