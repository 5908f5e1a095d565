//! Logging: log4rs from a YAML file (`--log-config`, `log_config`), else plain
//! stderr at the level asked for with `-q`/`-v`.
//!
//! Targets are module paths (`dispatch::transport::ssh`), so a `logger.yaml`
//! can turn up one stage. Lines carry the subject first (`name: host: …`).

use std::path::Path;

use log::LevelFilter;
use log4rs::append::console::{ConsoleAppender, Target};
use log4rs::config::{Appender, Config, Logger, Root};
use log4rs::encode::pattern::PatternEncoder;

/// The stderr pattern when no logger.yaml is given.
const STDERR_PATTERN: &str = "{d(%Y-%m-%d %H:%M:%S%.3f)} {h({l:5})} [{T}] {M}: {m}{n}";

/// Start logging. A broken logger.yaml is reported and stderr is used instead.
/// `results_on_stdout`: the command prints a line per result itself, so the
/// stderr fallback leaves out the per-file lines of `dispatch::job`.
pub fn init(
    file: Option<&Path>,
    level: LevelFilter,
    results_on_stdout: bool,
) -> Result<(), String> {
    if let Some(path) = file {
        match log4rs::config::load_config_file(path, Default::default()) {
            Ok(cfg) => {
                return log4rs::init_config(cfg)
                    .map(|_| ())
                    .map_err(|e| format!("{}: {e}", path.display()));
            }
            Err(e) => {
                init_stderr(level, results_on_stdout);
                return Err(format!(
                    "{}: cannot load log config ({e}); logging to stderr",
                    path.display()
                ));
            }
        }
    }
    init_stderr(level, results_on_stdout);
    Ok(())
}

fn init_stderr(level: LevelFilter, results_on_stdout: bool) {
    let console = ConsoleAppender::builder()
        .target(Target::Stderr)
        .encoder(Box::new(PatternEncoder::new(STDERR_PATTERN)))
        .build();
    // suppaftp traces every FTP command, PASS included: never below info
    let job_level = if results_on_stdout {
        LevelFilter::Off
    } else {
        level
    };
    let cfg = Config::builder()
        .appender(Appender::builder().build("stderr", Box::new(console)))
        .logger(Logger::builder().build("dispatch::job", job_level))
        .logger(Logger::builder().build("suppaftp", level.min(LevelFilter::Info)))
        .build(Root::builder().appender("stderr").build(level));
    if let Ok(cfg) = cfg {
        let _ = log4rs::init_config(cfg);
    }
}
