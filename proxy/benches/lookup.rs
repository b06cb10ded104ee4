//! Route lookup time at 10, 1,000 and 100,000 routes, the figure the proxy benchmark reports.

use criterion::{Criterion, criterion_group, criterion_main};
use lain_proxy::table::RouteTable;
use lain_state::{Keyspace, Snapshot, StateDocument};

fn table(n: usize) -> RouteTable {
    let routes: Vec<String> = (0..n)
        .map(|i| {
            let path = if i % 4 == 0 { "/api" } else { "/" };
            format!(r#"{{"host":"app{i}.lain.local","path":"{path}","app":"app{i}","proc":"web"}}"#)
        })
        .collect();
    let doc: StateDocument =
        serde_json::from_str(&format!(r#"{{"routes":[{}]}}"#, routes.join(","))).expect("doc");
    let (snap, _) = Snapshot::from_document(&Keyspace::default(), &doc);
    RouteTable::compile(&snap, &RouteTable::default(), 1)
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for n in [10usize, 1_000, 100_000] {
        let t = table(n);
        let hosts: Vec<String> = (0..64)
            .map(|i| format!("www.app{}.lain.local:8080", (i * 7919) % n))
            .collect();
        let mut i = 0;
        group.bench_function(n.to_string(), |b| {
            b.iter(|| {
                i = (i + 1) % hosts.len();
                let m = t.lookup(std::hint::black_box(&hosts[i]), "/api/users/42");
                std::hint::black_box(m.map(|m| m.upstream_path.len()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
