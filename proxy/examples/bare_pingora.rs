//! The floor under `lain proxy` in `benches/proxy/run.sh`: pingora's own server running an
//! HTTP proxy whose only phase sends every request to one upstream, with the same allocator
//! as `lain`. What `lain proxy` costs above this is lain's; what this costs is pingora's.
//!
//! Usage: `bare_pingora LISTEN UPSTREAM THREADS`, all on loopback.

use async_trait::async_trait;
use pingora_core::prelude::HttpPeer;
use pingora_core::server::Server;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_core::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream), Some(threads)) = (args.get(1), args.get(2), args.get(3))
    else {
        eprintln!("usage: bare_pingora LISTEN UPSTREAM THREADS");
        std::process::exit(64);
    };
    let Ok(threads) = threads.parse::<usize>() else {
        eprintln!("bare_pingora: THREADS must be a number, not {threads:?}");
        std::process::exit(64);
    };
    // One single-threaded runtime per thread, as `lain proxy` serves; on two shared cores
    // it costs less per request than pingora's default work-stealing runtime.
    // It stops at once on SIGTERM: pingora's default is to keep serving for five minutes.
    let conf = ServerConf {
        threads,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None::<Opt>, conf);
    server.bootstrap();
    let mut service = pingora_proxy::http_proxy_service(
        &server.configuration,
        Bare {
            upstream: upstream.clone(),
        },
    );
    service.add_tcp(listen);
    server.add_service(service);
    server.run_forever();
}
