//! Fuzz target over `lain dns`'s request handler: any bytes that hickory decodes into a
//! request are answered from a populated zone, and the answer must encode and decode again.
//! Bytes that do not decode are what the servers in front of the handler answer FORMERR to.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use hickory_proto::op::Message;
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use lain_dns::handler::{DnsHandler, HandlerOptions};
use lain_dns::metrics::DnsMetrics;
use lain_dns::zone::{SoaSettings, ZoneSettings, compile};
use lain_state::{Keyspace, Snapshot, StateDocument};
use libfuzzer_sys::fuzz_target;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut buf = Vec::new();
        let mut encoder = BinEncoder::new(&mut buf);
        let info = response.destructive_emit(&mut encoder)?;
        *self.0.lock().unwrap() = buf;
        Ok(info)
    }
}

const STATE: &str = r#"{
  "apps": [{"name": "hello", "use_services": {"svc": ["redis"]}}],
  "endpoints": [
    {"app": "hello", "proc": "web", "instance": 1, "address": "10.0.0.1", "port": 80, "ports": {"http": 80}},
    {"app": "hello", "proc": "web", "instance": 2, "address": "fd00::2", "port": 80, "ports": {"http": 80}},
    {"app": "svc", "proc": "redis", "instance": 1, "address": "10.0.1.1", "port": 6379}
  ],
  "services": [{"app": "svc", "service": "redis", "proc": "redis"}],
  "ingress": [{"addresses": ["10.9.9.9"]}],
  "dns": [
    {"name": "a.lain", "type": "CNAME", "data": "b.lain"},
    {"name": "b.lain", "type": "CNAME", "data": "a.lain"},
    {"name": "t.lain", "type": "TXT", "data": "x"}
  ]
}"#;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    handler: DnsHandler,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let doc: StateDocument = serde_json::from_str(STATE).unwrap();
        let (snap, _): (Snapshot, _) = Snapshot::from_document(&Keyspace::default(), &doc);
        let settings = ZoneSettings {
            domains: vec!["lain.".parse().unwrap(), "lain.local.".parse().unwrap()],
            reverse_zones: vec!["10.in-addr.arpa.".parse().unwrap()],
            ttl: 5,
            nameserver_addresses: vec![],
            soa: SoaSettings {
                rname: None,
                refresh: 60,
                retry: 10,
                expire: 600,
                minimum: 5,
                ttl: 5,
            },
        };
        let zone = Arc::new(ArcSwap::from_pointee(compile(&snap, &settings, 1)));
        let handler = DnsHandler::new(
            zone,
            None,
            HandlerOptions {
                views: true,
                max_udp_payload: 1232,
                allowed_networks: vec![],
            },
            DnsMetrics::unregistered(),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        Fixture { runtime, handler }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let src: SocketAddr = "10.0.0.1:5353".parse().unwrap();
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let Ok(request) = Request::from_bytes(data.to_vec(), src, protocol) else {
            return;
        };
        let capture = Capture::default();
        f.runtime.block_on(
            f.handler
                .handle_request::<_, TokioTime>(&request, capture.clone()),
        );
        let bytes = capture.0.lock().unwrap().clone();
        let answer = Message::from_vec(&bytes).expect("the handler's answer decodes");
        assert_eq!(answer.metadata.id, request.metadata.id);
        if protocol == Protocol::Udp {
            assert!(bytes.len() <= 1232, "UDP answer of {} octets", bytes.len());
        }
    }
});
