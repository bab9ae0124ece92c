//! `xlb status`.

use anyhow::Result;
use xlb::api::{Request, Response};

use super::{Ctx, print_json, unexpected};

/// `xlb status`.
pub fn run(ctx: &Ctx) -> Result<()> {
    let s = match ctx.call(&Request::Status)? {
        Response::Status(s) => s,
        other => return unexpected(&other),
    };
    if ctx.json {
        return print_json(&s);
    }
    outln!("daemon      pid {}, up {}s", s.pid, s.uptime_s)?;
    outln!("config      {}", s.config)?;
    outln!("state file  {}", s.state_file)?;
    outln!(
        "dataplane   {} (pins {}, {})",
        s.interface,
        s.pins,
        if s.adopted {
            "adopted"
        } else {
            "attached anew"
        }
    )?;
    outln!(
        "services    {}; backends {} ({} taking new clients)",
        s.services,
        s.backends,
        s.backends_up
    )?;
    if !s.fingerprint.is_empty() {
        outln!("fingerprint {} (services, backends, tables)", s.fingerprint)?;
    }
    if s.protected_sessions > 0 {
        outln!(
            "sessions    {} ({} protected: their backend differs from the Maglev answer)",
            s.sessions,
            s.protected_sessions
        )?;
    } else {
        outln!("sessions    {}", s.sessions)?;
    }
    // Counts are walked beside the daemon; at millions of sessions a walk
    // takes seconds and status answers with the latest one. (None: not
    // counted yet, or a daemon older than this field.)
    if let Some(ms) = s.sessions_counted_ms_ago.filter(|ms| *ms >= 2_000) {
        outln!("            (counted {} s ago)", ms / 1000)?;
    }
    if !s.panic_services.is_empty() {
        outln!(
            "PANIC MODE  {} (every backend failing checks; all used anyway)",
            s.panic_services.join(", ")
        )?;
    }
    Ok(())
}
