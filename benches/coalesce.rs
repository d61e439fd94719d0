//! The coalescer's CPU cost per event, disk aside: checking a `create_event` body and
//! turning it into a bulk entry ([`event::parse`]), then its share of building a
//! 1,000-event job body ([`coalesce::job_body`]). Target: under 5 µs per event.
//!
//! `cargo bench --bench coalesce`. The delivered-events-per-minute comparison with and
//! without coalescing is `cargo bench --bench coalesce_load`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use klaviyo_proxy::coalesce::{self, event, Group, Record};

fn body(i: u32) -> Vec<u8> {
    format!(
        r#"{{"data":{{"type":"event","attributes":{{"properties":{{"Brand":"Kids Book","ProductID":{i},"Categories":["Fiction","Children"],"$extra":{{"URL":"http://www.example.com/p/{i}"}}}},"time":"2026-11-08T00:00:00+00:00","value":9.99,"value_currency":"USD","metric":{{"data":{{"type":"metric","attributes":{{"name":"Viewed Product"}}}}}},"profile":{{"data":{{"type":"profile","attributes":{{"email":"user{i}@example.com","first_name":"Sarah"}}}}}}}}}}}}"#
    )
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let bodies: Vec<Vec<u8>> = (0..1000).map(body).collect();
    let mut g = c.benchmark_group("coalesce");
    g.throughput(Throughput::Elements(1));
    let mut n = 0usize;
    g.bench_function("parse one event", |b| {
        b.iter(|| {
            n = (n + 1) % bodies.len();
            black_box(event::parse(&bodies[n], || "0123456789abcdef0123456789abcdef".into()).unwrap())
        })
    });
    let records: Vec<Record> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let e = event::parse(b, || format!("{i:032x}")).unwrap();
            Record {
                id: i as u64,
                group: Group { authorization: b"Klaviyo-API-Key pk_bench".to_vec(), revision: "2026-07-15".into() },
                unique_id: e.unique_id,
                identity: e.identity,
                entry: e.entry,
                accepted_at_ms: 0,
            }
        })
        .collect();
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("build a 1000-event job", |b| b.iter(|| black_box(coalesce::job_body(&records))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
