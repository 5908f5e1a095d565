//! `dispatch status [--json]`: ask the running daemon (its status server)
//! what it is doing. Exit 0 when nothing is parked, 1 otherwise (and when no
//! daemon answers).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::app::Global;
use crate::config::Config;
use crate::error::{code, Error, StatusQuery};

/// How long `dispatch status` waits for the daemon.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the daemon writes the address its status server is bound to.
pub fn address_file(state_dir: &Path) -> PathBuf {
    state_dir.join("status.addr")
}

/// The daemon's address: `status_listen`, or (port 0) what it wrote.
fn address(config: &Config) -> Result<SocketAddr, StatusQuery> {
    let listen = config.settings.status_listen.ok_or(StatusQuery::Off)?;
    if listen.port() != 0 {
        return Ok(listen);
    }
    let file = address_file(&config.settings.state_dir);
    let text = std::fs::read_to_string(&file).map_err(|cause| StatusQuery::NoAddress {
        file: file.clone(),
        cause,
    })?;
    text.trim().parse().map_err(|_| StatusQuery::NoAddress {
        file,
        cause: std::io::Error::new(std::io::ErrorKind::InvalidData, "not ADDRESS:PORT"),
    })
}

/// GET `/api/v1/status`.
pub fn fetch(config: &Config) -> Result<Value, StatusQuery> {
    let addr = address(config)?;
    let agent = ureq::AgentBuilder::new().timeout(TIMEOUT).build();
    let mut req = agent.get(&format!("http://{addr}/api/v1/status"));
    if let Some(t) = &config.settings.status_token {
        req = req.set("Authorization", &format!("Bearer {}", t.expose()));
    }
    match req.call() {
        Ok(resp) => resp
            .into_json::<Value>()
            .map_err(|cause| StatusQuery::BadAnswer { addr, cause }),
        Err(ureq::Error::Status(status, _)) => Err(StatusQuery::Refused { addr, status }),
        Err(e) => Err(StatusQuery::Unreachable {
            addr,
            cause: Box::new(e),
        }),
    }
}

pub fn run(g: &Global) -> Result<u8, Error> {
    let config = g.load_config()?;
    let snap = fetch(&config).map_err(Error::Status)?;
    if g.json {
        println!("{snap}");
    } else {
        print!("{}", human(&snap));
    }
    let parked = snap["parked"].as_array().map_or(0, Vec::len);
    Ok(if parked == 0 { code::OK } else { code::FAILED })
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

fn size(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut x, mut i) = (n as f64, 0);
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

/// The snapshot for a person.
fn human(v: &Value) -> String {
    let mut out = String::new();
    let q = &v["queue"];
    out += &format!(
        "dispatch {} (pid {}), up {} s, config {}\n",
        s(&v["version"]),
        s(&v["pid"]),
        s(&v["uptime_s"]),
        s(&v["config"])
    );
    out += &format!(
        "queue: {} in flight, {} packages pending, {} waiting their turn, {} retries waiting\n",
        s(&q["in_flight"]),
        s(&q["pending"]),
        s(&q["waiting"]),
        s(&q["retries"])
    );
    let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
    for f in list("in_flight") {
        let total = f["total"].as_u64().unwrap_or(0);
        let done = if total > 0 {
            format!(
                " {} / {}",
                size(f["bytes"].as_u64().unwrap_or(0)),
                size(total)
            )
        } else {
            String::new()
        };
        out += &format!(
            "  {} → {}: {}{done} ({} ms)\n",
            s(&f["file"]),
            s(&f["host"]),
            s(&f["step"]),
            s(&f["elapsed_ms"])
        );
    }
    let parked = list("parked");
    out += &format!("parked: {}\n", parked.len());
    for p in parked {
        let why = if p["error"].is_null() {
            s(&p["reason"])
        } else {
            s(&p["error"])
        };
        out += &format!("  {} on {}: {why}\n", s(&p["file"]), s(&p["host"]));
        if let Some(tail) = p["output_tail"].as_str().filter(|t| !t.is_empty()) {
            for line in tail.lines() {
                out += &format!("    | {line}\n");
            }
        }
    }
    if let Some(hosts) = v["hosts"].as_object() {
        for (h, r) in hosts {
            out += &format!(
                "host {h}: {} {} at {}\n",
                s(&r["state"]),
                s(&r["file"]),
                s(&r["at"])
            );
        }
    }
    out
}
