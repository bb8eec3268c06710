//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`) through the checks of the fuzz targets
//! (`fuzz/src/lib.rs`, compiled here as a module), so a plain `cargo test` on stable Rust
//! keeps every seed and every input the fuzzers found interesting passing, without
//! cargo-fuzz or a nightly compiler. See FUZZING.md.
//!
//! `cargo test --test fuzz_corpus -- --ignored write_seed_corpus` writes the hand-made seeds
//! again (sealed cookies, DNS messages, forwarding headers) into `fuzz/corpus/`.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use lbkit::sticky::{CookieSecret, StickyLayer};
use lbkit::EndpointId;

/// The check of one fuzz target.
type Check = fn(&[u8]);

/// Every fuzz target, by the name of its corpus directory.
const TARGETS: [(&str, Check); 6] = [
    ("sticky_cookie", targets::sticky_cookie),
    ("forwarded", targets::forwarded),
    ("hash_key", targets::hash_key),
    ("dns_srv", targets::dns_srv),
    ("headers", targets::headers),
    ("proxy_protocol", targets::proxy_protocol),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The files of a corpus directory, sorted by name.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn replay_the_fuzz_corpus() {
    let mut total = 0usize;
    let mut failed = Vec::new();
    for (target, check) in TARGETS {
        let inputs = files(&corpus_dir(target));
        assert!(
            inputs.len() >= 5,
            "{target}: only {} corpus files",
            inputs.len()
        );
        let mut bytes = 0usize;
        for path in &inputs {
            let data = std::fs::read(path).expect("read corpus file");
            bytes += data.len();
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failed.push(path.display().to_string());
            }
        }
        eprintln!(
            "fuzz corpus {target}: {} inputs ({bytes} bytes) replayed",
            inputs.len()
        );
        total += inputs.len();
    }
    assert!(failed.is_empty(), "corpus inputs that fail: {failed:?}");
    eprintln!("fuzz corpus: {total} inputs, no failure");
}

/// The names of the entries of `dir` (relative to the crate) that `keep` takes, sorted.
fn entries(dir: &str, keep: impl Fn(&Path) -> Option<String>) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| keep(&e.expect("directory entry").path()))
        .collect();
    names.sort();
    names
}

/// [`TARGETS`] is every fuzz target there is: a new target in `fuzz/fuzz_targets/` (or a new
/// corpus directory) without a replay here fails this test.
#[test]
fn every_fuzz_target_is_replayed() {
    let mut replayed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    replayed.sort();
    let targets = entries("fuzz/fuzz_targets", |p| {
        (p.is_file() && p.extension().is_some_and(|e| e == "rs"))
            .then(|| p.file_stem()?.to_str().map(str::to_owned))
            .flatten()
    });
    assert_eq!(
        targets, replayed,
        "fuzz targets, and the ones replayed here"
    );
    let corpora = entries("fuzz/corpus", |p| {
        p.is_dir()
            .then(|| p.file_name()?.to_str().map(str::to_owned))
            .flatten()
    });
    assert_eq!(
        corpora, replayed,
        "corpus directories, and the targets replayed here"
    );
}

/// Writes `data` as `fuzz/corpus/<target>/seed-<name>`.
fn seed(target: &str, name: &str, data: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("name")
}

/// A DNS response to an SRV query for `_http._tcp.fuzz.test.`, wire format, after the mode
/// byte of the `dns_srv` target.
fn srv_message(records: &[(u16, u16, u16, &str)], addrs: &[(&str, &str)]) -> Vec<u8> {
    let owner = name("_http._tcp.fuzz.test.");
    let mut msg = Message::new();
    msg.set_id(7)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_recursion_available(true)
        .set_authoritative(true);
    msg.add_query(Query::query(owner.clone(), RecordType::SRV));
    for &(priority, weight, port, target) in records {
        let srv = SRV::new(priority, weight, port, name(target));
        msg.add_answer(Record::from_rdata(owner.clone(), 30, RData::SRV(srv)));
    }
    for &(host, ip) in addrs {
        let rdata = match ip.parse::<std::net::IpAddr>().expect("ip") {
            std::net::IpAddr::V4(v4) => RData::A(A(v4)),
            std::net::IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        msg.add_additional(Record::from_rdata(name(host), 30, rdata));
    }
    let mut out = vec![0u8];
    out.extend(msg.to_vec().expect("encode"));
    out
}

/// The compact form of the `dns_srv` target: records of priority, weight, port and target
/// index (1 to 4: `t<i>.fuzz.test.`, 0: `"."`), then addresses of target index and IPv4.
fn srv_compact(records: &[(u16, u16, u16, u8)], addrs: &[(u8, Ipv4Addr)]) -> Vec<u8> {
    let mut out = vec![1u8, records.len() as u8];
    for &(p, w, port, t) in records {
        out.extend(p.to_be_bytes());
        out.extend(w.to_be_bytes());
        out.extend(port.to_be_bytes());
        out.push(t);
    }
    for &(t, ip) in addrs {
        out.push(t);
        out.extend(ip.octets());
    }
    out
}

#[test]
#[ignore = "writes the hand-made seeds into fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    // Sticky cookies: values sealed with the target's key, as headers and alone.
    let layer = StickyLayer::cookie(
        targets::STICKY_COOKIE,
        CookieSecret::from_bytes(targets::STICKY_KEY),
    );
    let ids = [
        "10.0.0.7:8080",
        "api-1",
        "[2001:db8::1]:443",
        "",
        "ünïcode-☃",
    ];
    for (i, id) in ids.iter().enumerate() {
        let v = layer.seal(&EndpointId::new(*id)).expect("seal");
        seed("sticky_cookie", &format!("value-{i}"), v.as_bytes());
        let header = format!("session=abc; lb={v}; theme=dark");
        seed("sticky_cookie", &format!("header-{i}"), header.as_bytes());
    }
    let long = layer.seal(&EndpointId::new("x".repeat(255))).expect("seal");
    seed("sticky_cookie", "value-longest", long.as_bytes());
    let v = layer.seal(&EndpointId::new("b")).expect("seal");
    seed(
        "sticky_cookie",
        "header-quoted-twice",
        format!("lb=junk; lb=\"{v}\"").as_bytes(),
    );
    let mut flipped = v.clone().into_bytes();
    flipped[5] ^= 1;
    seed("sticky_cookie", "value-flipped", &flipped);
    seed("sticky_cookie", "value-cut", &v.as_bytes()[..v.len() - 3]);
    seed("sticky_cookie", "value-padded", format!("{v}==").as_bytes());
    for (n, raw) in [
        ("empty", &b""[..]),
        ("not-base64", b"lb=%%%; x"),
        ("bare-names", b"lb; =; ;;lb=="),
        ("binary", b"\xff\xfe\x00lb=\x80"),
        ("id-256", &[b'y'; 256][..]),
    ] {
        seed("sticky_cookie", n, raw);
    }

    // Forwarding headers: X-Forwarded-For lists and RFC 7239 elements, one per line.
    for (n, raw) in [
        ("xff-chain", &b"198.51.100.7, 203.0.113.9, 10.0.0.1"[..]),
        ("xff-ports", b"192.0.2.1:4711, [2001:db8::1]:443, 10.0.0.2"),
        ("xff-mapped", b"::ffff:192.0.2.1,,10.1.2.3 , "),
        ("xff-junk", b"unknown, _hidden, 999.1.1.1, [::1, 1.2.3"),
        (
            "forwarded-rfc",
            b"for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\"",
        ),
        (
            "forwarded-quoted",
            b"for=\"_gazonk\", for=unknown;host=\"a,b;c\", for=\"1.1.1.1",
        ),
        (
            "forwarded-escapes",
            b"for=\"[::1]\\\"x\", for=2.2.2.2;for=3.3.3.3",
        ),
        (
            "both-lines",
            b"203.0.113.9, 10.0.0.1\nfor=198.51.100.1, for=10.0.0.3\n10.0.0.4",
        ),
        ("empty", b""),
        ("commas", b",,, ,;;=\"\""),
    ] {
        seed("forwarded", n, raw);
    }

    // Hash keys: target line, x-user, Cookie, X-Forwarded-For, Forwarded.
    for (n, raw) in [
        (
            "all-fields",
            &b"/cart?user=42&x=1\nalice\nsid=s-1; lb=x\n203.0.113.9, 10.0.0.2\nfor=192.0.2.1"[..],
        ),
        ("query-forms", b"/?user&user=2&=&&user=3\n\n\n\n"),
        ("absolute-uri", b"http://shop.example/a/b?user=%20x\nbob"),
        ("cookie-quoted", b"/\n\nsid=\"quoted\"; sid=second\n"),
        ("no-path", b"*\n\xff\n"),
        ("mapped-peer", b"/\n\n\n::ffff:10.0.0.9, 198.51.100.2"),
        ("empty", b""),
    ] {
        seed("hash_key", n, raw);
    }

    // DNS SRV answers: wire messages and the compact form.
    seed(
        "dns_srv",
        "wire-two-tiers",
        &srv_message(
            &[
                (10, 60, 8080, "a.fuzz.test."),
                (10, 20, 8080, "b.fuzz.test."),
                (20, 0, 9090, "backup.fuzz.test."),
            ],
            &[
                ("a.fuzz.test.", "192.0.2.10"),
                ("a.fuzz.test.", "2001:db8::10"),
                ("b.fuzz.test.", "192.0.2.11"),
                ("backup.fuzz.test.", "192.0.2.20"),
            ],
        ),
    );
    seed(
        "dns_srv",
        "wire-no-service",
        &srv_message(&[(0, 0, 0, "a.fuzz.test."), (0, 0, 80, ".")], &[]),
    );
    seed(
        "dns_srv",
        "wire-shared-address",
        &srv_message(
            &[
                (1, 65535, 443, "a.fuzz.test."),
                (1, 65535, 443, "b.fuzz.test."),
                (2, 5, 443, "a.fuzz.test."),
            ],
            &[
                ("a.fuzz.test.", "192.0.2.1"),
                ("b.fuzz.test.", "192.0.2.1"),
                ("b.fuzz.test.", "0.0.0.0"),
                ("b.fuzz.test.", "224.0.0.1"),
            ],
        ),
    );
    seed(
        "dns_srv",
        "wire-missing-target",
        &srv_message(
            &[(5, 1, 53, "gone.fuzz.test."), (7, 1, 53, "here.fuzz.test.")],
            &[("here.fuzz.test.", "::1")],
        ),
    );
    seed("dns_srv", "wire-empty", &srv_message(&[], &[]));
    seed(
        "dns_srv",
        "compact-tiers",
        &srv_compact(
            &[
                (0, 3, 80, 1),
                (0, 0, 80, 2),
                (9, 1, 81, 3),
                (9, 1, 0, 4),
                (3, 1, 82, 0),
            ],
            &[
                (1, Ipv4Addr::new(10, 0, 0, 1)),
                (2, Ipv4Addr::new(10, 0, 0, 1)),
                (3, Ipv4Addr::new(10, 0, 0, 3)),
                (4, Ipv4Addr::UNSPECIFIED),
            ],
        ),
    );
    seed(
        "dns_srv",
        "compact-unusable",
        &srv_compact(&[(1, 1, 80, 1)], &[(1, Ipv4Addr::new(239, 1, 1, 1))]),
    );
    // Header rewriting: a mode byte (forwarding kind, trusted peer, IPv6 peer), then lines.
    for (n, mode, lines) in [
        ("plain", 0u8, "host: shop.example\naccept: */*"),
        ("spoof-untrusted", 2u8, "host: shop.example\nx-forwarded-for: 1.2.3.4\nforwarded: for=1.2.3.4\nx-forwarded-host: evil.example\nx-real-ip: 1.2.3.4\nx-forwarded-port: 443"),
        ("chain-trusted", 6u8, "host: a\nx-forwarded-for: 203.0.113.9, 10.0.0.1\nforwarded: for=203.0.113.9"),
        ("connection-list", 0u8, "host: a\nconnection: host, x-custom, keep-alive, authorization\nx-custom: 1\nte: trailers\ntransfer-encoding: chunked\nupgrade: h2c\nauthorization: x"),
        ("location", 9u8, "location: http://10.0.0.9:8080/next?a=1\ncontent-location: //10.0.0.9:8080/x\nset-cookie: a=1; Domain=10.0.0.9"),
    ] {
        let mut data = vec![mode];
        data.extend_from_slice(lines.as_bytes());
        seed("headers", n, &data);
    }
}
