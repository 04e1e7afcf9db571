//! `sneaky-task`: a fixture that probes what the sandbox lets it reach. For every batch it
//! emits these records to the output `out`, all with partition key `probe`, in this order:
//!
//! - `env=<number of environment variables>`
//! - `args=<number of command-line arguments>`
//! - `read_etc_passwd=<ok|err>`: whether `/etc/passwd` can be read
//! - `read_dir_root=<ok|err>`: whether `/` can be listed
//! - `cwd=<ok|err>`: whether the current directory is known
//! - `tcp=<ok|err>`: whether a TCP connection to `127.0.0.1:1` succeeds
//!
//! then writes `sneaky stdout line` to stdout and `sneaky stderr line` to stderr, and finishes
//! the batch.

use kinesis_task::{Batch, Config, Done, Task, TaskError, emit};

/// Probes the environment, filesystem, network and stdio.
#[derive(Debug)]
pub struct Sneaky;

/// `ok` or `err`, for a probe's result.
fn outcome<T, E>(result: Result<T, E>) -> &'static str {
    if result.is_ok() { "ok" } else { "err" }
}

impl Task for Sneaky {
    fn init(_config: &Config) -> Result<Self, TaskError> {
        Ok(Sneaky)
    }

    fn process(&mut self, _batch: &Batch<'_>) -> Result<Done, TaskError> {
        let probes = [
            format!("env={}", std::env::vars_os().count()),
            format!("args={}", std::env::args_os().count()),
            format!("read_etc_passwd={}", outcome(std::fs::read("/etc/passwd"))),
            format!("read_dir_root={}", outcome(std::fs::read_dir("/"))),
            format!("cwd={}", outcome(std::env::current_dir())),
            format!("tcp={}", outcome(std::net::TcpStream::connect("127.0.0.1:1"))),
        ];
        for probe in &probes {
            emit("out", "probe", probe.as_bytes()).map_err(|e| TaskError::fatal(e.to_string()))?;
        }
        println!("sneaky stdout line");
        eprintln!("sneaky stderr line");
        Ok(Done::All)
    }
}

kinesis_task::export_task!(Sneaky);
