//! Driving the real `xlb` binary inside a lab: its config, its commands, and
//! the client -> backend mapping observed through real traffic. Shared by
//! the end-to-end tests and the demo.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Output,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Lab, Proto,
    client::who_serves,
    servers::{HTTP_PORT, UDP_PORT},
};

/// XDP attach mode for `xlb run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Driver mode (needs the lab's XDP_PASS on the veth peer).
    Native,
    /// Generic (skb) mode.
    Generic,
}

impl Mode {
    /// The value of `xdp_mode` in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }
}

/// Path of the `xlb` binary: `$XLB_BIN` (set by `cargo xtask test`/`demo`),
/// else the release build next to this workspace.
pub fn xlb_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("XLB_BIN") {
        return Ok(PathBuf::from(path));
    }
    let guess = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/xlb");
    if guess.exists() {
        return Ok(guess);
    }
    bail!(
        "xlb binary not found: set XLB_BIN or build it (`cargo xtask test` does both); looked at {}",
        guess.display()
    )
}

/// An xlb config for `lab`: HTTP and UDP services on both VIPs, every lab
/// backend in each, maps pinned in the lab's private bpffs directory. No
/// backend has a `mac`: xlb resolves them from the kernel's neighbours, so
/// every tier that uses this config exercises the resolver.
pub fn lab_config(lab: &Lab, mode: Mode) -> String {
    let mut text = format!(
        "interface = \"{}\"\nxdp_mode = \"{}\"\npin_dir = \"{}\"\nmax_services = 4\n",
        lab.lb_if,
        mode.as_str(),
        lab.bpffs_dir().display()
    );
    let vips: [IpAddr; 2] = lab.vips();
    for vip in vips {
        let fam = if vip.is_ipv4() { "v4" } else { "v6" };
        for (name, port, proto) in [("http", HTTP_PORT, "tcp"), ("echo", UDP_PORT, "udp")] {
            text.push_str(&format!(
                "\n[[service]]\nname = \"{name}-{fam}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{proto}\"\n"
            ));
            for b in &lab.backends {
                text.push_str(&backend_block(b, vip));
            }
        }
    }
    text
}

/// The `[[service.backend]]` block of lab backend `b` in the service on `vip`.
pub fn backend_block(b: &crate::lab::Backend, vip: IpAddr) -> String {
    format!(
        "[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\n",
        b.name,
        b.addr_like(vip)
    )
}

/// Writes the lab config to a file named after the lab, in the temp dir.
pub fn write_lab_config(lab: &Lab, mode: Mode) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("{}.toml", lab.id));
    std::fs::write(&path, lab_config(lab, mode))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Runs `xlb ARGS` in the lab's LB namespace; fails with its output if it fails.
pub fn xlb(lab: &Lab, args: &[&str]) -> Result<Output> {
    let bin = xlb_bin()?;
    let bin = bin.to_str().context("xlb path is not UTF-8")?;
    let mut argv = vec![bin];
    argv.extend_from_slice(args);
    let out = lab.run_in_lb(&argv)?;
    if !out.status.success() {
        bail!(
            "xlb {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Client address and protocol -> the backend name that answered.
pub type Mapping = BTreeMap<(IpAddr, Proto), String>;

/// Asks every client address `rounds` times over `protos`; fails if any
/// client got two different backends (that is a broken session).
pub fn observe(lab: &Lab, protos: &[Proto], rounds: usize) -> Result<Mapping> {
    let mut mapping = Mapping::new();
    for round in 0..rounds {
        for src in lab.client_addrs() {
            for proto in protos {
                let name = who_serves(lab, src, *proto)
                    .with_context(|| format!("request from {src} over {proto:?}"))?;
                match mapping.get(&(src, *proto)) {
                    Some(prev) if *prev != name => bail!(
                        "client {src} over {proto:?} moved from {prev} to {name} in round {round}"
                    ),
                    Some(_) => {}
                    None => {
                        mapping.insert((src, *proto), name);
                    }
                }
            }
        }
    }
    Ok(mapping)
}

/// One decoded line of `xlb sessions --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLine {
    /// `vip:port/proto`.
    pub service: String,
    /// Masked client address.
    pub client: IpAddr,
    /// Backend address, if live.
    pub backend: Option<IpAddr>,
}

/// Runs `xlb sessions --json` and decodes it.
pub fn sessions(lab: &Lab, config: &Path) -> Result<Vec<SessionLine>> {
    let config = config.to_str().context("config path is not UTF-8")?;
    let out = xlb(lab, &["sessions", "--config", config, "--json"])?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("xlb sessions --json is not JSON")?;
    let list = json
        .as_array()
        .context("xlb sessions --json is not a list")?;
    list.iter()
        .map(|v| {
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            Ok(SessionLine {
                service: field("service").context("session without service")?,
                client: field("client")
                    .context("session without client")?
                    .parse()
                    .context("session client is not an address")?,
                backend: field("backend").map(|b| b.parse()).transpose()?,
            })
        })
        .collect()
}

/// The backend name owning `addr` in the lab.
pub fn backend_name(lab: &Lab, addr: IpAddr) -> Option<String> {
    lab.backends
        .iter()
        .find(|b| b.addr_like(addr) == addr)
        .map(|b| b.name.clone())
}
