//! The compiled zone: every name `lain dns` answers for, built from one cluster-state
//! snapshot into an immutable map that queries read without locks or IO.
//!
//! A zone is rebuilt whole when a snapshot is published and swapped in with `arc-swap`;
//! a query holds the `Arc` of the zone it started with, so an answer never mixes two
//! revisions. Lookups follow RFC 1034 §4.3.2: exact match, CNAME, closest-encloser wildcard,
//! NXDOMAIN; empty non-terminals exist (RFC 8020), so a name with only children is NODATA.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HINFO, MX, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use lain_state::records::appdomain;
use lain_state::{DnsType, EndpointRecord, Snapshot};

/// How deep a CNAME chain inside the zone is followed.
const MAX_CNAME_CHAIN: usize = 8;

/// SOA parameters of every apex.
#[derive(Debug, Clone)]
pub struct SoaSettings {
    /// The administrator mailbox; `hostmaster.{apex}` when `None`.
    pub rname: Option<Name>,
    /// Refresh, seconds.
    pub refresh: u32,
    /// Retry, seconds.
    pub retry: u32,
    /// Expire, seconds.
    pub expire: u32,
    /// Negative-caching TTL, seconds.
    pub minimum: u32,
    /// The SOA record's TTL.
    pub ttl: u32,
}

/// What the zone compiler needs from the configuration.
#[derive(Debug, Clone)]
pub struct ZoneSettings {
    /// Cluster domains, absolute and lower case; PTR records point into the first.
    pub domains: Vec<Name>,
    /// Reverse zones served with SOA and NS.
    pub reverse_zones: Vec<Name>,
    /// TTL of generated records.
    pub ttl: u32,
    /// Addresses of `ns.{apex}`.
    pub nameserver_addresses: Vec<IpAddr>,
    /// SOA parameters.
    pub soa: SoaSettings,
}

impl ZoneSettings {
    /// Settings from a validated configuration.
    pub fn from_config(cfg: &crate::config::ZoneConfig) -> Result<ZoneSettings, String> {
        let domains = cfg
            .domains
            .iter()
            .map(|d| crate::config::parse_domain(d))
            .collect::<Result<Vec<_>, _>>()?;
        let reverse_zones = cfg
            .reverse_zones
            .iter()
            .map(|d| crate::config::parse_domain(d))
            .collect::<Result<Vec<_>, _>>()?;
        let rname = cfg
            .soa
            .rname
            .as_deref()
            .map(crate::config::parse_domain)
            .transpose()?;
        Ok(ZoneSettings {
            domains,
            reverse_zones,
            ttl: cfg.ttl_secs,
            nameserver_addresses: cfg.nameserver_addresses.clone(),
            soa: SoaSettings {
                rname,
                refresh: cfg.soa.refresh_secs,
                retry: cfg.soa.retry_secs,
                expire: cfg.soa.expire_secs,
                minimum: cfg.soa.minimum_secs,
                ttl: cfg.soa.ttl_secs,
            },
        })
    }
}

/// Why a state record was left out of the zone; also the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// A generated or static name is not a valid DNS name (label over 63, name over 255).
    BadName,
    /// Static record data that does not parse for its type.
    BadData,
    /// A static record outside every served zone.
    OutsideZones,
    /// A CNAME next to other data at one name, or two records claiming one name.
    Conflict,
}

impl SkipReason {
    /// Every reason, for zeroing gauges.
    pub const ALL: [SkipReason; 4] = [
        SkipReason::BadName,
        SkipReason::BadData,
        SkipReason::OutsideZones,
        SkipReason::Conflict,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::BadName => "bad_name",
            SkipReason::BadData => "bad_data",
            SkipReason::OutsideZones => "outside_zones",
            SkipReason::Conflict => "conflict",
        }
    }
}

/// One left-out record, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The etcd key of the state record, or the generated name.
    pub what: String,
    /// Why.
    pub reason: SkipReason,
    /// Details.
    pub detail: String,
}

#[derive(Debug, Default, Clone)]
struct Node {
    /// RRsets by type, few per node, so a vector beats a map.
    rrsets: Vec<(RecordType, Vec<Record>)>,
    /// Rotate A/AAAA answers (per-proc and service names).
    rotate: bool,
    /// For service names: the client app whose `use_services` created it (per-client views).
    view_app: Option<Arc<str>>,
}

impl Node {
    fn get(&self, t: RecordType) -> Option<&[Record]> {
        self.rrsets
            .iter()
            .find(|(rt, _)| *rt == t)
            .map(|(_, r)| r.as_slice())
    }

    fn push(&mut self, r: Record) {
        let t = r.record_type();
        match self.rrsets.iter_mut().find(|(rt, _)| *rt == t) {
            Some((_, set)) => {
                if !set.iter().any(|x| x.data == r.data) {
                    set.push(r);
                }
            }
            None => self.rrsets.push((t, vec![r])),
        }
    }

    fn has_data(&self) -> bool {
        !self.rrsets.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Apex {
    /// The SOA with its TTL lowered to the negative TTL, for authority sections.
    negative_soa: Record,
}

/// The result of looking a name up in the zone.
#[derive(Debug, Clone, Default)]
pub struct Answer<'z> {
    /// NOERROR or NXDOMAIN.
    pub rcode: ResponseCode,
    /// The answer section.
    pub answers: Vec<Cow<'z, Record>>,
    /// The authority section (the SOA of negative answers).
    pub authorities: Vec<Cow<'z, Record>>,
    /// The additional section (addresses of SRV targets).
    pub additionals: Vec<Cow<'z, Record>>,
    /// How many consecutive rotations give different answers: the least common multiple of
    /// the sizes of the rotated sets in the answer, 1 when nothing rotated. Answers to
    /// `rotation` and `rotation + rotation_period` are the same, which is what lets a cache
    /// of encoded answers keep one answer per rotation.
    pub rotation_period: usize,
}

/// The zone's maps hash with foldhash instead of SipHash: a lookup hashes the query name
/// on every query, and the maps are only ever filled from cluster state, never from what a
/// client sends, so SipHash's defence against chosen keys buys nothing here.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// An immutable, compiled zone.
#[derive(Debug, Default)]
pub struct Zone {
    nodes: FastMap<LowerName, Node>,
    apexes: FastMap<LowerName, Apex>,
    /// Instance address → app, for per-client views. Addresses shared by several apps are
    /// left out: such a client cannot be told apart.
    owners: FastMap<IpAddr, Arc<str>>,
    records: usize,
    skipped: Vec<Skipped>,
    revision: i64,
    /// TTL of synthesized answers (RFC 8482 HINFO).
    ttl: u32,
}

impl Zone {
    /// The number of records served.
    pub fn record_count(&self) -> usize {
        self.records
    }

    /// The state records left out, with reasons.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The cluster-state revision the zone was built from.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The app an instance address belongs to, when exactly one app uses it.
    pub fn owner_of(&self, ip: IpAddr) -> Option<&str> {
        self.owners.get(&ip).map(|a| &**a)
    }

    /// Every record, in presentation form sorted by name, for the admin `/zone` page.
    pub fn dump(&self) -> String {
        let mut lines: Vec<String> = self
            .nodes
            .values()
            .flat_map(|n| n.rrsets.iter().flat_map(|(_, rs)| rs.iter()))
            .map(|r| format!("{} {} IN {} {}", r.name, r.ttl, r.record_type(), r.data))
            .collect();
        lines.sort();
        lines.join("\n") + "\n"
    }

    /// The apex a name belongs to, if it is inside a served zone.
    /// The deepest apex wins (`lain.local.` before `local.`). There are a handful of apexes,
    /// so a scan without allocating beats walking up the name one copied label at a time.
    fn apex_of(&self, name: &LowerName) -> Option<(&LowerName, &Apex)> {
        self.apexes
            .iter()
            .filter(|(apex, _)| apex.zone_of(name))
            .max_by_key(|(apex, _)| apex.num_labels())
    }

    fn visible(&self, name: &LowerName, viewer: Option<&str>) -> Option<&Node> {
        let node = self.nodes.get(name)?;
        match (&node.view_app, viewer) {
            (Some(owner), Some(v)) if &**owner != v => None,
            _ => Some(node),
        }
    }

    /// Looks a query up. `None` means the name is outside every served zone (forward it or
    /// refuse). `viewer` is the app of the querying instance when views are on; `rotation`
    /// picks where rotated address sets start.
    pub fn lookup(
        &self,
        qname: &LowerName,
        qtype: RecordType,
        viewer: Option<&str>,
        rotation: usize,
    ) -> Option<Answer<'_>> {
        let mut answer = Answer {
            rotation_period: 1,
            ..Answer::default()
        };
        match self.apex_of(qname) {
            Some((apex_name, apex)) => {
                self.resolve(
                    qname,
                    qtype,
                    viewer,
                    rotation,
                    apex_name,
                    apex,
                    &mut answer,
                    0,
                );
                Some(answer)
            }
            None => {
                // Instance PTR records outside configured reverse zones: answer what we know,
                // and let everything else go to the forwarder.
                let node = self.nodes.get(qname)?;
                let set = node.get(qtype)?;
                answer.answers.extend(set.iter().map(Cow::Borrowed));
                Some(answer)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn resolve<'z>(
        &'z self,
        qname: &LowerName,
        qtype: RecordType,
        viewer: Option<&str>,
        rotation: usize,
        apex_name: &LowerName,
        apex: &'z Apex,
        answer: &mut Answer<'z>,
        depth: usize,
    ) {
        let (node, synthesized) = match self.visible(qname, viewer) {
            Some(node) => (node, false),
            None => match self.wildcard(qname, apex_name, viewer) {
                Some(node) => (node, true),
                None => {
                    answer.rcode = ResponseCode::NXDomain;
                    answer.authorities.push(Cow::Borrowed(&apex.negative_soa));
                    return;
                }
            },
        };
        let owner = || -> Name { Name::from(qname) };
        if qtype == RecordType::ANY {
            // RFC 8482: one small synthesized record instead of everything at the name.
            if node.has_data() {
                answer.answers.push(Cow::Owned(Record::from_rdata(
                    owner(),
                    self.ttl,
                    RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
                )));
            } else {
                answer.authorities.push(Cow::Borrowed(&apex.negative_soa));
            }
            return;
        }
        if let Some(set) = node.get(qtype) {
            let start = if node.rotate && !set.is_empty() {
                answer.rotation_period = lcm(answer.rotation_period, set.len());
                rotation % set.len()
            } else {
                0
            };
            for r in set[start..].iter().chain(set[..start].iter()) {
                if synthesized {
                    let mut r = r.clone();
                    r.name = owner();
                    answer.answers.push(Cow::Owned(r));
                } else {
                    answer.answers.push(Cow::Borrowed(r));
                }
            }
            if qtype == RecordType::SRV {
                for r in set {
                    if let RData::SRV(srv) = &r.data {
                        let target = LowerName::from(&srv.target);
                        if let Some(n) = self.nodes.get(&target) {
                            for t in [RecordType::A, RecordType::AAAA] {
                                if let Some(addrs) = n.get(t) {
                                    answer.additionals.extend(addrs.iter().map(Cow::Borrowed));
                                }
                            }
                        }
                    }
                }
            }
            return;
        }
        if qtype != RecordType::CNAME
            && let Some([cname]) = node.get(RecordType::CNAME)
        {
            if synthesized {
                let mut r = cname.clone();
                r.name = owner();
                answer.answers.push(Cow::Owned(r));
            } else {
                answer.answers.push(Cow::Borrowed(cname));
            }
            if let RData::CNAME(CNAME(target)) = &cname.data
                && depth < MAX_CNAME_CHAIN
            {
                let target = LowerName::from(target);
                if let Some((t_apex_name, t_apex)) = self.apex_of(&target) {
                    self.resolve(
                        &target,
                        qtype,
                        viewer,
                        rotation,
                        t_apex_name,
                        t_apex,
                        answer,
                        depth + 1,
                    );
                }
            }
            return;
        }
        // The name exists with other types: NODATA.
        answer.authorities.push(Cow::Borrowed(&apex.negative_soa));
    }

    /// The wildcard node matching `qname` at its closest encloser (RFC 4592), if any.
    fn wildcard(&self, qname: &LowerName, apex: &LowerName, viewer: Option<&str>) -> Option<&Node> {
        if qname == apex {
            return None;
        }
        let mut encloser = qname.base_name();
        loop {
            if self.visible(&encloser, viewer).is_some() {
                break;
            }
            if &encloser == apex || encloser.is_root() {
                return None;
            }
            encloser = encloser.base_name();
        }
        let wild = Name::from(&encloser).prepend_label("*").ok()?;
        self.nodes.get(&LowerName::from(wild))
    }
}

/// The least common multiple, saturating at `usize::MAX`.
fn lcm(a: usize, b: usize) -> usize {
    fn gcd(mut a: usize, mut b: usize) -> usize {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    if a == 0 || b == 0 {
        return 0;
    }
    (a / gcd(a, b)).saturating_mul(b)
}

/// The reverse-lookup name of an address (`4.3.2.1.in-addr.arpa.`, nibbles for IPv6).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

/// Builds zones from snapshots.
struct Builder<'s> {
    settings: &'s ZoneSettings,
    nodes: FastMap<LowerName, Node>,
    skipped: Vec<Skipped>,
}

impl Builder<'_> {
    fn name(&mut self, text: &str, what: &str) -> Option<Name> {
        match Name::from_ascii(text) {
            Ok(mut n) => {
                n.set_fqdn(true);
                Some(n.to_lowercase())
            }
            Err(e) => {
                self.skip(what, SkipReason::BadName, format!("{text:?}: {e}"));
                None
            }
        }
    }

    fn skip(&mut self, what: &str, reason: SkipReason, detail: String) {
        self.skipped.push(Skipped {
            what: what.to_string(),
            reason,
            detail,
        });
    }

    fn node(&mut self, name: &Name) -> &mut Node {
        self.nodes.entry(LowerName::from(name)).or_default()
    }

    fn add(&mut self, name: &Name, ttl: u32, data: RData) {
        self.node(name)
            .push(Record::from_rdata(name.clone(), ttl, data));
    }

    fn address(ip: IpAddr) -> RData {
        match ip {
            IpAddr::V4(v4) => RData::A(A::from(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA::from(v6)),
        }
    }
}

/// Compiles a zone from a snapshot. Never fails: what cannot be served is skipped and
/// listed in [`Zone::skipped`].
pub fn compile(snap: &Snapshot, settings: &ZoneSettings, serial: u32) -> Zone {
    let ttl = settings.ttl;
    let mut b = Builder {
        settings,
        nodes: FastMap::default(),
        skipped: Vec::new(),
    };
    let mut apexes = FastMap::default();

    // SOA and NS at every apex.
    for apex in settings.domains.iter().chain(&settings.reverse_zones) {
        let ns_host = apex.prepend_label("ns").unwrap_or_else(|_| apex.clone());
        let rname = match &b.settings.soa.rname {
            Some(r) => r.clone(),
            None => apex
                .prepend_label("hostmaster")
                .unwrap_or_else(|_| apex.clone()),
        };
        let s = &b.settings.soa;
        let soa = SOA::new(
            ns_host.clone(),
            rname,
            serial,
            s.refresh.min(i32::MAX as u32) as i32,
            s.retry.min(i32::MAX as u32) as i32,
            s.expire.min(i32::MAX as u32) as i32,
            s.minimum,
        );
        let negative_soa =
            Record::from_rdata(apex.clone(), s.ttl.min(s.minimum), RData::SOA(soa.clone()));
        b.add(apex, s.ttl, RData::SOA(soa));
        b.add(apex, s.ttl, RData::NS(NS(ns_host.clone())));
        if settings.domains.contains(apex) {
            for ip in &settings.nameserver_addresses {
                b.add(&ns_host, ttl, Builder::address(*ip));
            }
        }
        apexes.insert(LowerName::from(apex), Apex { negative_soa });
    }

    // Instances, grouped by (app, proc) and sorted by instance number.
    let mut procs: BTreeMap<(&str, &str), Vec<&EndpointRecord>> = BTreeMap::new();
    for item in snap.endpoints.values() {
        let e = &item.value;
        procs
            .entry((e.app.as_str(), e.proc_name.as_str()))
            .or_default()
            .push(e);
    }
    let mut owners: HashMap<IpAddr, Option<Arc<str>>> = HashMap::new();
    let mut app_names: HashMap<&str, Arc<str>> = HashMap::new();
    for ((app, proc_name), instances) in procs.iter_mut() {
        instances.sort_by_key(|e| e.instance);
        let app_arc = app_names
            .entry(app)
            .or_insert_with(|| Arc::from(*app))
            .clone();
        let ad = appdomain(app);
        for (di, domain) in settings.domains.iter().enumerate() {
            let base = format!("{ad}.{domain}");
            let what = format!("endpoints/{app}/{proc_name}");
            let Some(proc_fqdn) = b.name(&format!("{proc_name}.{base}"), &what) else {
                continue;
            };
            for e in instances.iter() {
                let Some(inst) = b.name(&format!("{proc_name}-{}.{base}", e.instance), &what)
                else {
                    continue;
                };
                b.add(&inst, ttl, Builder::address(e.address));
                if e.healthy {
                    b.add(&proc_fqdn, ttl, Builder::address(e.address));
                    b.node(&proc_fqdn).rotate = true;
                    for (port_name, port) in &e.ports {
                        let Some(srv) =
                            b.name(&format!("_{port_name}._tcp.{proc_name}.{base}"), &what)
                        else {
                            continue;
                        };
                        b.add(&srv, ttl, RData::SRV(SRV::new(0, 10, *port, inst.clone())));
                    }
                }
                if di == 0 {
                    if let Some(rev) = b.name(&reverse_name(e.address), &what) {
                        b.add(&rev, ttl, RData::PTR(PTR(inst.clone())));
                    }
                    let slot = owners
                        .entry(e.address)
                        .or_insert_with(|| Some(app_arc.clone()));
                    if slot.as_deref() != Some(&*app_arc) {
                        *slot = None;
                    }
                }
            }
        }
    }

    // Services, under each client app that declared them.
    let healthy = |app: &str, proc_name: &str| -> Vec<IpAddr> {
        procs
            .get(&(app, proc_name))
            .map(|v| v.iter().filter(|e| e.healthy).map(|e| e.address).collect())
            .unwrap_or_default()
    };
    let mut services: HashMap<(&str, &str), &lain_state::ServiceRecord> = HashMap::new();
    for item in snap.services.values() {
        services.insert(
            (item.value.app.as_str(), item.value.service.as_str()),
            &item.value,
        );
    }
    for client in snap.apps.values() {
        let client = &client.value;
        let mut used: BTreeSet<(&str, &str)> = BTreeSet::new();
        for (provider, names) in &client.use_services {
            for s in names {
                used.insert((provider.as_str(), s.as_str()));
            }
        }
        for instantiated in client.use_resources.values() {
            for ((app, s), _) in services.iter() {
                if *app == instantiated.as_str() {
                    used.insert((*app, *s));
                }
            }
        }
        let client_arc: Arc<str> = Arc::from(client.name.as_str());
        let cad = appdomain(&client.name);
        for (provider, service) in used {
            let Some(rec) = services.get(&(provider, service)) else {
                continue;
            };
            if !rec.allow_clients.is_empty() && !rec.allow_clients.contains(&client.name) {
                continue;
            }
            let target_proc = rec.portal.as_deref().unwrap_or(&rec.proc_name);
            let addrs = healthy(provider, target_proc);
            for domain in &settings.domains {
                let what = format!("services/{provider}/{service} for {}", client.name);
                let Some(name) = b.name(&format!("{service}.{cad}.{domain}"), &what) else {
                    continue;
                };
                if let Some(existing) = b.nodes.get(&LowerName::from(&name))
                    && existing.view_app.is_none()
                    && existing.has_data()
                {
                    b.skip(
                        &what,
                        SkipReason::Conflict,
                        format!("{name} is already a proc name"),
                    );
                    continue;
                }
                let node = b.node(&name);
                node.rotate = true;
                node.view_app = Some(client_arc.clone());
                for ip in &addrs {
                    b.add(&name, ttl, Builder::address(*ip));
                }
            }
        }
    }

    // The proxy's addresses: `{app}.{domain}` and the wildcard `*.{domain}`.
    let ingress: BTreeSet<IpAddr> = snap
        .ingress
        .values()
        .flat_map(|i| i.value.addresses.iter().copied())
        .collect();
    if !ingress.is_empty() {
        for domain in &settings.domains {
            let mut owners_of_ingress = Vec::new();
            if let Ok(w) = domain.prepend_label("*") {
                owners_of_ingress.push(w);
            }
            for app in snap.apps.values() {
                let what = format!("apps/{}", app.value.name);
                if let Some(n) = b.name(&format!("{}.{domain}", app.value.name), &what) {
                    owners_of_ingress.push(n);
                }
            }
            for n in owners_of_ingress {
                for ip in &ingress {
                    b.add(&n, ttl, Builder::address(*ip));
                }
                b.node(&n).rotate = true;
            }
        }
    }

    // Static records.
    let all_apexes: Vec<Name> = settings
        .domains
        .iter()
        .chain(&settings.reverse_zones)
        .cloned()
        .collect();
    for item in snap.dns.values() {
        let r = &item.value;
        let what = item.key.as_str();
        let Some(name) = b.name(r.name.trim_end_matches('.'), what) else {
            continue;
        };
        if !all_apexes.iter().any(|a| a.zone_of(&name)) {
            b.skip(
                what,
                SkipReason::OutsideZones,
                format!("{name} is in no served zone"),
            );
            continue;
        }
        let data = match static_rdata(r.rtype, &r.data) {
            Ok(d) => d,
            Err(e) => {
                b.skip(what, SkipReason::BadData, e);
                continue;
            }
        };
        let node = b.nodes.get(&LowerName::from(&name));
        let conflict = match node {
            Some(n) if data.record_type() == RecordType::CNAME => n.has_data(),
            Some(n) => n.get(RecordType::CNAME).is_some(),
            None => false,
        };
        if conflict {
            b.skip(
                what,
                SkipReason::Conflict,
                format!("CNAME and other data at {name}"),
            );
            continue;
        }
        b.add(&name, r.ttl_secs.unwrap_or(ttl), data);
    }

    // Empty non-terminals between every name and its apex.
    let apex_set: BTreeSet<LowerName> = apexes.keys().cloned().collect();
    let names: Vec<LowerName> = b.nodes.keys().cloned().collect();
    for n in names {
        if !apex_set.iter().any(|a| a.zone_of(&n)) {
            continue;
        }
        let mut cur = n.base_name();
        while !apex_set.contains(&cur) && !cur.is_root() {
            b.nodes.entry(cur.clone()).or_default();
            cur = cur.base_name();
        }
    }

    let records = b
        .nodes
        .values()
        .map(|n| n.rrsets.iter().map(|(_, r)| r.len()).sum::<usize>())
        .sum();
    Zone {
        nodes: b.nodes,
        apexes,
        owners: owners
            .into_iter()
            .filter_map(|(ip, app)| Some((ip, app?)))
            .collect(),
        records,
        skipped: b.skipped,
        revision: snap.revision,
        ttl,
    }
}

fn absolute(text: &str) -> Result<Name, String> {
    let mut n = Name::from_ascii(text).map_err(|e| format!("{text:?} is not a name: {e}"))?;
    n.set_fqdn(true);
    Ok(n.to_lowercase())
}

fn static_rdata(t: DnsType, data: &str) -> Result<RData, String> {
    let fields: Vec<&str> = data.split_whitespace().collect();
    let num = |s: &str, what: &str| -> Result<u16, String> {
        s.parse::<u16>()
            .map_err(|_| format!("{what} {s:?} is not a number from 0 to 65535"))
    };
    match t {
        DnsType::A => data
            .trim()
            .parse()
            .map(|ip| RData::A(A(ip)))
            .map_err(|_| format!("{data:?} is not an IPv4 address")),
        DnsType::Aaaa => data
            .trim()
            .parse()
            .map(|ip| RData::AAAA(AAAA(ip)))
            .map_err(|_| format!("{data:?} is not an IPv6 address")),
        DnsType::Cname => match fields.as_slice() {
            [target] => Ok(RData::CNAME(CNAME(absolute(target)?))),
            _ => Err(format!("CNAME data {data:?} must be one name")),
        },
        DnsType::Txt => {
            // A TXT string holds at most 255 octets; longer text is split into several.
            let bytes = data.as_bytes();
            let chunks = bytes
                .chunks(255)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>();
            if chunks.len() > 64 {
                return Err("TXT data longer than 16 KiB".into());
            }
            Ok(RData::TXT(TXT::new(chunks)))
        }
        DnsType::Srv => match fields.as_slice() {
            [p, w, port, target] => Ok(RData::SRV(SRV::new(
                num(p, "priority")?,
                num(w, "weight")?,
                num(port, "port")?,
                absolute(target)?,
            ))),
            _ => Err(format!(
                "SRV data {data:?} must be `priority weight port target`"
            )),
        },
        DnsType::Mx => match fields.as_slice() {
            [pref, exchange] => Ok(RData::MX(MX::new(
                num(pref, "preference")?,
                absolute(exchange)?,
            ))),
            _ => Err(format!("MX data {data:?} must be `preference exchange`")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lain_state::{Keyspace, StateDocument};

    fn settings() -> ZoneSettings {
        ZoneSettings {
            domains: vec![
                Name::from_ascii("lain.").unwrap(),
                Name::from_ascii("lain.local.").unwrap(),
            ],
            reverse_zones: vec![Name::from_ascii("10.in-addr.arpa.").unwrap()],
            ttl: 5,
            nameserver_addresses: vec!["10.0.0.53".parse().unwrap()],
            soa: SoaSettings {
                rname: None,
                refresh: 60,
                retry: 10,
                expire: 86_400,
                minimum: 3,
                ttl: 30,
            },
        }
    }

    const DOC: &str = r#"{
      "apps": [
        {"name": "hello", "use_services": {"redis-svc": ["redis"]}},
        {"name": "other"},
        {"name": "resource.mysql.hello", "apptype": "resource"},
        {"name": "consumer", "use_resources": {"mysql": "resource.mysql.hello"}}
      ],
      "endpoints": [
        {"app": "hello", "proc": "web", "instance": 1, "address": "10.0.0.1", "port": 8080, "ports": {"http": 8080}},
        {"app": "hello", "proc": "web", "instance": 2, "address": "10.0.0.2", "port": 8080, "ports": {"http": 8080}},
        {"app": "hello", "proc": "web", "instance": 3, "address": "10.0.0.3", "port": 8080, "ports": {"http": 8080}, "healthy": false},
        {"app": "redis-svc", "proc": "redis", "instance": 1, "address": "10.0.1.1", "port": 6379},
        {"app": "redis-svc", "proc": "portal-redis", "instance": 1, "address": "10.0.1.9", "port": 6379},
        {"app": "resource.mysql.hello", "proc": "mysqld", "instance": 1, "address": "10.0.2.1", "port": 3306}
      ],
      "services": [
        {"app": "redis-svc", "service": "redis", "proc": "redis", "portal": "portal-redis"},
        {"app": "resource.mysql.hello", "service": "mysql", "proc": "mysqld"}
      ],
      "ingress": [{"addresses": ["10.9.9.9"]}],
      "dns": [
        {"name": "db.lain", "type": "CNAME", "data": "web.hello.lain."},
        {"name": "txt.lain", "type": "TXT", "data": "hello world"},
        {"name": "mail.lain", "type": "MX", "data": "10 mx.example.com"},
        {"name": "svc.lain", "type": "SRV", "data": "1 2 3 web-1.hello.lain."},
        {"name": "outside.example.com", "type": "A", "data": "1.2.3.4"},
        {"name": "db.lain", "type": "A", "data": "1.2.3.4"},
        {"name": "v6.lain", "type": "AAAA", "data": "fd00::1"}
      ]
    }"#;

    fn zone() -> Zone {
        let doc: StateDocument = serde_json::from_str(DOC).unwrap();
        let (snap, rejected) = Snapshot::from_document(&Keyspace::default(), &doc);
        assert!(rejected.is_empty(), "{rejected:?}");
        compile(&snap, &settings(), 42)
    }

    fn q(
        zone: &Zone,
        name: &str,
        t: RecordType,
        viewer: Option<&str>,
    ) -> Option<(ResponseCode, Vec<String>, Vec<String>)> {
        let name = LowerName::from(Name::from_ascii(name).unwrap());
        let a = zone.lookup(&name, t, viewer, 0)?;
        let show = |rs: &[Cow<'_, Record>]| {
            rs.iter()
                .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
                .collect::<Vec<_>>()
        };
        Some((a.rcode, show(&a.answers), show(&a.authorities)))
    }

    type Expected = Option<(ResponseCode, Vec<String>, Vec<String>)>;

    #[test]
    fn lookups() {
        use RecordType::*;
        let z = zone();
        let soa = |apex: &str| format!("{apex} SOA ns.{apex} hostmaster.{apex} 42 60 10 86400 3");
        let nx = |apex: &str| Some((ResponseCode::NXDomain, vec![], vec![soa(apex)]));
        let nodata = |apex: &str| Some((ResponseCode::NoError, vec![], vec![soa(apex)]));
        let ok = |answers: &[&str]| {
            Some((
                ResponseCode::NoError,
                answers.iter().map(|s| s.to_string()).collect(),
                vec![],
            ))
        };
        let cases: Vec<(&str, RecordType, Option<&str>, Expected)> = vec![
            // Per-instance names, also unhealthy ones, in every domain.
            (
                "web-1.hello.lain.",
                A,
                None,
                ok(&["web-1.hello.lain. A 10.0.0.1"]),
            ),
            (
                "WEB-3.Hello.lain.",
                A,
                None,
                ok(&["web-3.hello.lain. A 10.0.0.3"]),
            ),
            (
                "web-2.hello.lain.local.",
                A,
                None,
                ok(&["web-2.hello.lain.local. A 10.0.0.2"]),
            ),
            ("web-9.hello.lain.", A, None, nx("lain.")),
            ("web-1.hello.lain.", AAAA, None, nodata("lain.")),
            // Per-proc names hold healthy instances only.
            (
                "web.hello.lain.",
                A,
                None,
                ok(&["web.hello.lain. A 10.0.0.1", "web.hello.lain. A 10.0.0.2"]),
            ),
            (
                "_http._tcp.web.hello.lain.",
                SRV,
                None,
                ok(&[
                    "_http._tcp.web.hello.lain. SRV 0 10 8080 web-1.hello.lain.",
                    "_http._tcp.web.hello.lain. SRV 0 10 8080 web-2.hello.lain.",
                ]),
            ),
            ("_grpc._tcp.web.hello.lain.", SRV, None, nx("lain.")),
            // Empty non-terminals are NODATA, not NXDOMAIN.
            ("_tcp.web.hello.lain.", A, None, nodata("lain.")),
            // Apex records.
            ("lain.", SOA, None, ok(&[&soa("lain.")])),
            (
                "lain.local.",
                NS,
                None,
                ok(&["lain.local. NS ns.lain.local."]),
            ),
            ("ns.lain.", A, None, ok(&["ns.lain. A 10.0.0.53"])),
            (
                "10.in-addr.arpa.",
                SOA,
                None,
                ok(&[&soa("10.in-addr.arpa.")]),
            ),
            // PTR inside a reverse zone, and NXDOMAIN there with its SOA.
            (
                "1.0.0.10.in-addr.arpa.",
                PTR,
                None,
                ok(&["1.0.0.10.in-addr.arpa. PTR web-1.hello.lain."]),
            ),
            ("7.7.0.10.in-addr.arpa.", PTR, None, nx("10.in-addr.arpa.")),
            // Reverse names outside configured reverse zones are not ours.
            ("1.1.168.192.in-addr.arpa.", PTR, None, None),
            // Services: the portal's instances for the client that declared the service.
            (
                "redis.hello.lain.",
                A,
                None,
                ok(&["redis.hello.lain. A 10.0.1.9"]),
            ),
            ("redis.other.lain.", A, None, nx("lain.")),
            // Resources: the instantiated app's services under the consumer's appdomain.
            (
                "mysql.consumer.lain.",
                A,
                None,
                ok(&["mysql.consumer.lain. A 10.0.2.1"]),
            ),
            // Views: another app's instance does not see hello's service names.
            ("redis.hello.lain.", A, Some("other"), nx("lain.")),
            (
                "redis.hello.lain.",
                A,
                Some("hello"),
                ok(&["redis.hello.lain. A 10.0.1.9"]),
            ),
            // Ingress: the app name and the wildcard.
            ("hello.lain.", A, None, ok(&["hello.lain. A 10.9.9.9"])),
            (
                "anything.lain.local.",
                A,
                None,
                ok(&["anything.lain.local. A 10.9.9.9"]),
            ),
            (
                "deep.anything.lain.",
                A,
                None,
                ok(&["deep.anything.lain. A 10.9.9.9"]),
            ),
            ("anything.lain.", TXT, None, nodata("lain.")),
            // Static records; a CNAME is followed inside the zone, its conflicting A skipped.
            (
                "db.lain.",
                A,
                None,
                ok(&[
                    "db.lain. CNAME web.hello.lain.",
                    "web.hello.lain. A 10.0.0.1",
                    "web.hello.lain. A 10.0.0.2",
                ]),
            ),
            (
                "db.lain.",
                CNAME,
                None,
                ok(&["db.lain. CNAME web.hello.lain."]),
            ),
            ("txt.lain.", TXT, None, ok(&["txt.lain. TXT hello world"])),
            (
                "mail.lain.",
                MX,
                None,
                ok(&["mail.lain. MX 10 mx.example.com."]),
            ),
            (
                "svc.lain.",
                SRV,
                None,
                ok(&["svc.lain. SRV 1 2 3 web-1.hello.lain."]),
            ),
            ("v6.lain.", AAAA, None, ok(&["v6.lain. AAAA fd00::1"])),
            // RFC 8482: ANY gets one small record.
            (
                "web-1.hello.lain.",
                ANY,
                None,
                ok(&["web-1.hello.lain. HINFO RFC8482 "]),
            ),
            // Not ours.
            ("example.com.", A, None, None),
            ("outside.example.com.", A, None, None),
        ];
        for (name, t, viewer, want) in cases {
            assert_eq!(q(&z, name, t, viewer), want, "{name} {t} viewer {viewer:?}");
        }
    }

    #[test]
    fn negative_ttl_is_soa_minimum_and_answers_use_configured_ttl() {
        let z = zone();
        let name = LowerName::from(Name::from_ascii("nope.hello.lain.").unwrap());
        let a = z.lookup(&name, RecordType::A, None, 0).unwrap();
        assert_eq!(a.authorities[0].ttl, 3);
        let name = LowerName::from(Name::from_ascii("web-1.hello.lain.").unwrap());
        let a = z.lookup(&name, RecordType::A, None, 0).unwrap();
        assert_eq!(a.answers[0].ttl, 5);
    }

    #[test]
    fn per_proc_answers_rotate() {
        let z = zone();
        let name = LowerName::from(Name::from_ascii("web.hello.lain.").unwrap());
        let first = |rot| {
            z.lookup(&name, RecordType::A, None, rot).unwrap().answers[0]
                .data
                .clone()
        };
        assert_ne!(first(0), first(1));
        assert_eq!(first(0), first(2));
        // Two addresses: answers repeat every two rotations, which the period says.
        assert_eq!(
            z.lookup(&name, RecordType::A, None, 0)
                .unwrap()
                .rotation_period,
            2
        );
        // A per-instance name does not rotate.
        let one = LowerName::from(Name::from_ascii("web-1.hello.lain.").unwrap());
        assert_eq!(
            z.lookup(&one, RecordType::A, None, 7)
                .unwrap()
                .rotation_period,
            1
        );
    }

    #[test]
    fn rotation_periods_combine_as_least_common_multiples() {
        assert_eq!(lcm(1, 2), 2);
        assert_eq!(lcm(2, 3), 6);
        assert_eq!(lcm(4, 6), 12);
        assert_eq!(lcm(0, 3), 0);
        assert_eq!(lcm(usize::MAX, 2), usize::MAX);
    }

    #[test]
    fn srv_answers_carry_target_addresses() {
        let z = zone();
        let name = LowerName::from(Name::from_ascii("_http._tcp.web.hello.lain.").unwrap());
        let a = z.lookup(&name, RecordType::SRV, None, 0).unwrap();
        assert_eq!(a.additionals.len(), 2);
    }

    #[test]
    fn bad_records_are_skipped_with_reasons() {
        let z = zone();
        let reasons: Vec<(SkipReason, &str)> = z
            .skipped()
            .iter()
            .map(|s| (s.reason, s.what.as_str()))
            .collect();
        assert!(
            reasons.iter().any(|(r, _)| *r == SkipReason::OutsideZones),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|(r, _)| *r == SkipReason::Conflict),
            "{reasons:?}"
        );
        let long = "x".repeat(70);
        let doc: StateDocument = serde_json::from_str(&format!(
            r#"{{"endpoints":[{{"app":"{long}","proc":"web","instance":1,"address":"10.0.0.1","port":80}}],
                "dns":[{{"name":"s.lain","type":"SRV","data":"1 2 99999 x.lain"}}]}}"#
        ))
        .unwrap();
        let (snap, _) = Snapshot::from_document(&Keyspace::default(), &doc);
        let z = compile(&snap, &settings(), 1);
        let reasons: Vec<SkipReason> = z.skipped().iter().map(|s| s.reason).collect();
        assert!(reasons.contains(&SkipReason::BadName), "{reasons:?}");
        assert!(reasons.contains(&SkipReason::BadData), "{reasons:?}");
    }

    #[test]
    fn shared_addresses_have_no_owner() {
        let doc: StateDocument = serde_json::from_str(
            r#"{"endpoints":[
                {"app":"a","proc":"web","instance":1,"address":"127.0.0.1","port":80},
                {"app":"b","proc":"web","instance":1,"address":"127.0.0.1","port":80},
                {"app":"a","proc":"web","instance":2,"address":"127.0.0.2","port":80}]}"#,
        )
        .unwrap();
        let (snap, _) = Snapshot::from_document(&Keyspace::default(), &doc);
        let z = compile(&snap, &settings(), 1);
        assert_eq!(z.owner_of("127.0.0.1".parse().unwrap()), None);
        assert_eq!(z.owner_of("127.0.0.2".parse().unwrap()), Some("a"));
    }

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("10.1.2.3".parse().unwrap()),
            "3.2.1.10.in-addr.arpa."
        );
        assert!(reverse_name("::1".parse().unwrap()).starts_with("1.0.0.0."));
        assert!(reverse_name("::1".parse().unwrap()).ends_with(".ip6.arpa."));
    }
}
