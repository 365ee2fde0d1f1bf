//! medfl end to end: real coordinator and site daemons on loopback, real data, real SQLite.

mod bad_updates;
mod big_model;
mod evaluation_resume;
mod examples;
mod fedavg;
mod hospital_control;
mod lifecycle;
mod privacy;
mod probes;
mod resilience;
mod security;
mod site_control;
mod site_input;
mod strategies;
mod text;
mod trial;
