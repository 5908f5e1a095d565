//! VCS hooks (being written).

use crate::cli::{Global, HookCmd};
use crate::error::Error;

pub fn run(_g: &Global, _h: HookCmd) -> Result<u8, Error> {
    Err(Error::Fatal("dispatch hook: not implemented yet".into()))
}
