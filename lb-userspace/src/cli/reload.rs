//! `xlb reload`: the daemon re-reads its config (like SIGHUP) and applies the difference.

use anyhow::Result;
use xlb::api::Request;

use super::Ctx;

/// `xlb reload`.
pub fn run(ctx: &Ctx) -> Result<()> {
    ctx.change(&Request::Reload)
}
