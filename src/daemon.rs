//! `dispatch watch`: the daemon (being written).

use std::path::PathBuf;

use crate::cli::Global;
use crate::error::Error;

pub fn run(_g: &Global, _dirs: Vec<PathBuf>) -> Result<u8, Error> {
    Err(Error::Fatal("dispatch watch: not implemented yet".into()))
}
