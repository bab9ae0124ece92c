//! The read-only views of [`Lb`]: what `xlb status`, `service list`,
//! `backend list`, `sessions list|where` and `stats` show, read from the
//! owner's state and the kernel's maps (the KERNEL column is the map's, not
//! what the daemon meant to write). Nothing here changes anything.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use anyhow::{Result, bail};
use lb_common::{AffinityKey, BACKEND_EMPTY, FAMILY_V4, NO_BACKEND, mask_addr};

use super::lb::{BackendRef, Lb, admin_name, state_name, unix_ms};
use super::state::Admin;
use crate::api::{
    BackendInfo, Failure, FailureKind, ServiceInfo, SessionInfo, StatusInfo, WhereInfo,
};
use crate::config::{BackendState, HealthVia, format_mac};
use crate::dataplane::addr_words;
use crate::sessions::{ip_from_words, monotonic_ns};
use crate::stats;

impl Lb {
    /// `xlb status`.
    pub fn status(&self) -> Result<StatusInfo> {
        let backends: usize = self
            .writer
            .effective()
            .services
            .iter()
            .map(|s| s.backends.len())
            .sum();
        let up = self
            .writer
            .effective()
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.state == BackendState::Active)
            .count();
        // Counted beside the owner (`daemon/counts.rs`): a walk here would hold
        // every queued health transition behind it.
        let counted = self.counts().latest();
        Ok(StatusInfo {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            state_file: self.base.state_file.display().to_string(),
            interface: self.base.interface.clone(),
            pins: self.base.pin_path().display().to_string(),
            adopted: self.adopted,
            services: self.writer.effective().services.len(),
            backends,
            backends_up: up,
            panic_services: self
                .panic
                .iter()
                .filter(|(_, p)| p.active)
                .map(|(s, _)| s.clone())
                .collect(),
            sessions: counted.map_or(0, |c| c.sessions),
            protected_sessions: counted.map_or(0, |c| c.protected),
            sessions_counted_ms_ago: counted.map(|c| c.age_ms()),
            in_sync: self.writer.dirty().is_none(),
            last_write_error: self.writer.dirty().map(str::to_owned),
            reconcile_repairs: self.writer.repairs().values().sum(),
            fingerprint: self.cluster.fingerprint.clone(),
        })
    }

    /// `xlb service list`.
    pub fn services(&self) -> Vec<ServiceInfo> {
        self.writer
            .effective()
            .services
            .iter()
            .map(|s| ServiceInfo {
                name: s.name.clone(),
                id: self
                    .writer
                    .service_ids()
                    .get(&s.name)
                    .copied()
                    .unwrap_or(u32::MAX),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol.to_string(),
                backends: s.backends.len(),
                backends_up: s
                    .backends
                    .iter()
                    .filter(|b| b.state == BackendState::Active)
                    .count(),
                panic: self.panic.get(&s.name).is_some_and(|p| p.active),
                health: s.health.as_ref().map(|h| {
                    format!(
                        "{} port {}{} every {} (timeout {}, rise {}, fall {})",
                        h.kind,
                        h.port,
                        match h.via {
                            HealthVia::Direct => "",
                            HealthVia::Tunnel => " of the vip through the tunnel",
                        },
                        humantime::format_duration(h.interval),
                        humantime::format_duration(h.timeout),
                        h.rise,
                        h.fall
                    )
                }),
            })
            .collect()
    }

    /// `xlb backend list`.
    pub fn backends(&self, service: Option<&str>) -> Result<Vec<BackendInfo>> {
        if let Some(name) = service {
            if !self
                .writer
                .effective()
                .services
                .iter()
                .any(|s| s.name == name)
            {
                return Err(Failure::new(
                    FailureKind::NotFound,
                    format!("no service named {name:?}"),
                )
                .into());
            }
        }
        let counts = self.counts().latest();
        let now = unix_ms();
        // Admin comes from the configured state: `effective` already holds the derived kernel state.
        let configured = self.effective_config()?;
        let mut out = Vec::new();
        for svc in &self.writer.effective().services {
            if service.is_some_and(|n| n != svc.name) {
                continue;
            }
            for be in &svc.backends {
                let r = BackendRef {
                    service: svc.name.clone(),
                    backend: be.name.clone(),
                };
                let as_configured = configured
                    .services
                    .iter()
                    .find(|s| s.name == svc.name)
                    .and_then(|s| s.backends.iter().find(|b| b.name == be.name));
                let d = self.derived(&svc.name, as_configured.unwrap_or(be));
                let id = self
                    .writer
                    .backend_ids()
                    .get(&r)
                    .copied()
                    .unwrap_or(u32::MAX);
                let health = self.health.get(&r);
                out.push(BackendInfo {
                    service: svc.name.clone(),
                    name: be.name.clone(),
                    id,
                    address: be.address,
                    mac: format_mac(&be.mac),
                    weight: be.weight,
                    admin: admin_name(d.admin).to_string(),
                    health: match health {
                        None => "unchecked",
                        Some(h) if h.up => "up",
                        Some(_) => "down",
                    }
                    .to_string(),
                    // What the kernel really holds, not what this daemon meant to write.
                    state: self
                        .writer
                        .maps()
                        .backends
                        .get(&id, 0)
                        .map_or("unknown", |k| state_name(k.state))
                        .to_string(),
                    sessions: counts.map_or(0, |c| c.of(id)),
                    drain_left_ms: match d.admin {
                        Admin::Draining {
                            deadline_unix_ms: Some(t),
                        } => Some(t.saturating_sub(now)),
                        _ => None,
                    },
                    reason: health.and_then(|h| h.reason.clone()),
                });
            }
        }
        Ok(out)
    }

    pub(super) fn id_filters(
        &self,
        service: Option<&str>,
        backend: Option<&str>,
    ) -> Result<(Option<u32>, Option<HashSet<u32>>)> {
        let sid = match service {
            Some(name) => Some(*self.writer.service_ids().get(name).ok_or_else(|| {
                Failure::new(FailureKind::NotFound, format!("no service named {name:?}"))
            })?),
            None => None,
        };
        let bids = match backend {
            Some(name) => {
                let ids: HashSet<u32> = self
                    .writer
                    .backend_ids()
                    .iter()
                    .filter(|(r, _)| r.backend == name && service.is_none_or(|s| r.service == s))
                    .map(|(_, id)| *id)
                    .collect();
                if ids.is_empty() {
                    return Err(Failure::new(
                        FailureKind::NotFound,
                        format!("no backend named {name:?}"),
                    )
                    .into());
                }
                Some(ids)
            }
            None => None,
        };
        Ok((sid, bids))
    }

    /// What `xlb sessions list` needs to walk the maps without the owner:
    /// the pin directory, the filter, and the names of the ids.
    pub fn session_lister(
        &self,
        service: Option<&str>,
        backend: Option<&str>,
    ) -> Result<SessionLister> {
        let (sid, bids) = self.id_filters(service, backend)?;
        Ok(SessionLister {
            dir: self.writer.maps().dir.clone(),
            filter: crate::sessions::Filter {
                service_id: sid,
                backends: bids,
                limit: crate::api::MAX_SESSIONS_LISTED,
            },
            backends: self
                .writer
                .backend_ids()
                .iter()
                .map(|(r, id)| (*id, r.backend.clone()))
                .collect(),
            services: self
                .writer
                .service_ids()
                .iter()
                .map(|(n, id)| (*id, n.clone()))
                .collect(),
        })
    }

    /// `xlb sessions where`.
    pub fn where_is(&self, client: IpAddr, service: Option<&str>) -> Result<Vec<WhereInfo>> {
        let records = self.writer.service_records()?;
        let names: HashMap<u32, &BackendRef> = self
            .writer
            .backend_ids()
            .iter()
            .map(|(r, id)| (*id, r))
            .collect();
        let mut out = Vec::new();
        let now = monotonic_ns();
        for svc in &self.writer.effective().services {
            if service.is_some_and(|n| n != svc.name) || svc.vip.is_ipv4() != client.is_ipv4() {
                continue;
            }
            let Some(record) = self
                .writer
                .service_ids()
                .get(&svc.name)
                .and_then(|id| records.get(id))
            else {
                continue;
            };
            let masked = mask_addr(&addr_words(client), &record.mask);
            let family = if client.is_ipv4() {
                FAMILY_V4
            } else {
                lb_common::FAMILY_V6
            };
            let key = AffinityKey {
                service_id: record.id,
                addr: masked,
            };
            let maglev = self.writer.maglev_choice(record, &masked)?;
            let (id, source, idle_ms, expired, protected) = match self.writer.maps().session(&key) {
                Some((v, protected)) => {
                    let idle = now.saturating_sub(v.last_seen_ns);
                    (
                        v.backend_id,
                        "session",
                        Some(idle / 1_000_000),
                        idle >= record.timeout_ns,
                        protected,
                    )
                }
                None => (maglev, "maglev", None, false, false),
            };
            let name = |id: u32| {
                (id != NO_BACKEND).then(|| {
                    names
                        .get(&id)
                        .map_or_else(|| format!("#{id}"), |r| r.backend.clone())
                })
            };
            let address = |id: u32| {
                self.writer
                    .maps()
                    .backends
                    .get(&id, 0)
                    .ok()
                    .filter(|b| b.state != BACKEND_EMPTY)
                    .map(|b| ip_from_words(&b.addr, b.family))
            };
            out.push(WhereInfo {
                service: svc.name.clone(),
                client: ip_from_words(&masked, family),
                backend: name(id),
                backend_address: address(id),
                source: source.to_string(),
                protected,
                idle_ms,
                expired,
                maglev_backend: name(maglev),
                maglev_backend_address: address(maglev),
            });
        }
        if out.is_empty() {
            bail!(
                "no service of {client}'s address family{}",
                service.map(|s| format!(" named {s:?}")).unwrap_or_default()
            );
        }
        Ok(out)
    }

    /// `xlb stats`.
    pub fn stats(&self) -> Result<stats::Snapshot> {
        let mut snap = stats::snapshot(self.writer.maps())?;
        snap.name(
            self.writer
                .service_ids()
                .iter()
                .map(|(n, id)| (*id, n.clone())),
            self.writer
                .backend_ids()
                .iter()
                .map(|(r, id)| (*id, r.service.clone(), r.backend.clone())),
        );
        Ok(snap)
    }
}

/// `xlb sessions list`, walked with descriptors of its own (a walk of
/// millions of sessions takes seconds: never on the owner).
pub struct SessionLister {
    dir: std::path::PathBuf,
    filter: crate::sessions::Filter,
    backends: HashMap<u32, String>,
    services: HashMap<u32, String>,
}

impl SessionLister {
    /// The sessions, at most [`crate::api::MAX_SESSIONS_LISTED`].
    pub fn list(self) -> Result<Vec<SessionInfo>> {
        let maps = crate::pins::PinnedMaps::open(&self.dir)?;
        let (list, matched) = crate::sessions::list_where(&maps, &self.filter)?;
        if matched > list.len() {
            tracing::info!(
                listed = list.len(),
                matched,
                "sessions list: {matched} sessions match; listed the first {}",
                list.len()
            );
        }
        Ok(list
            .into_iter()
            .map(|s| SessionInfo {
                service: self
                    .services
                    .get(&s.service_id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", s.service_id)),
                client: s.client,
                prefix: s.prefix,
                backend: self
                    .backends
                    .get(&s.backend_id)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", s.backend_id)),
                backend_address: s.backend,
                idle_ms: s.idle_ms,
                protected: s.protected,
            })
            .collect())
    }
}
