use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

fn entry(n: u8) -> Entry {
    Entry {
        id: 0,
        operation: "create_event".into(),
        method: "POST".into(),
        path_and_query: "/client/events?company_id=SECRETCO".into(),
        headers: vec![("authorization".into(), b"Klaviyo-API-Key pk_secret".to_vec())],
        body: vec![b'{', n, b'}'],
        unique_id: Some(format!("u{n}")),
        accepted_at_ms: 1,
        last_error: None,
    }
}

/// The counters kept in memory match what the file holds.
fn assert_counted(spool: &Spool) {
    let counted = spool.with_db(true, prepare).unwrap();
    assert_eq!(spool.stats(), counted);
}

/// A directory removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("kp-spool-{name}-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("spool.redb")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn append_replay_order_dead_letters_and_reopen() {
    let dir = TempDir::new("order");
    let path = dir.file();
    let spool = Spool::open(&path).unwrap();
    let ids: Vec<u64> = (0..3).map(|n| spool.append(entry(n)).unwrap()).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(spool.first_pending().unwrap().unwrap().body, b"{\0}");
    spool.delivered(1).unwrap();
    spool.dead_letter(2, "400 invalid").unwrap();
    assert_eq!(spool.first_pending().unwrap().unwrap().id, 3);
    let before = spool.stats();
    drop(spool);
    // Reopened (as after a crash): the same state, and ids are not reused.
    let spool = Spool::open(&path).unwrap();
    assert_eq!(spool.stats(), before);
    assert_eq!(spool.pending_len().unwrap(), 1);
    assert_eq!(spool.append(entry(9)).unwrap(), 4);
    let dead = spool.list_dead(10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("400 invalid"));
    let shown = serde_json::to_string(&admin(&spool, &http::Method::GET, "/spool/dead").unwrap().1).unwrap();
    assert!(!shown.contains("pk_secret") && !shown.contains("SECRETCO"), "{shown}");
    // Requeued, it goes back in its original place: before 3 and 4.
    let (status, _) = admin(&spool, &http::Method::POST, "/spool/dead/2/requeue").unwrap();
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(spool.first_pending().unwrap().unwrap().id, 2);
    spool.dead_letter(2, "again").unwrap();
    assert_eq!(admin(&spool, &http::Method::DELETE, "/spool/dead/2").unwrap().0, http::StatusCode::OK);
    assert_eq!(admin(&spool, &http::Method::DELETE, "/spool/dead/2").unwrap().0, http::StatusCode::NOT_FOUND);
    assert!(admin(&spool, &http::Method::GET, "/health").is_none());
    assert_eq!(spool.list_dead(10).unwrap().len(), 0);
    assert_eq!((spool.stats().pending, spool.stats().dead), (2, 0));
}

#[test]
fn file_is_private_and_debug_shows_no_secret() {
    let dir = TempDir::new("perm");
    let path = dir.file();
    let spool = Spool::open(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    spool.append(entry(1)).unwrap();
    let printed = format!("{:?} {spool:?}", spool.first_pending().unwrap().unwrap());
    for secret in ["pk_secret", "SECRETCO", "Klaviyo-API-Key"] {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
    assert!(printed.contains("authorization") && printed.contains("body_bytes: 3"), "{printed}");
}

#[test]
fn bounds_refuse_writes_until_room_is_made() {
    let dir = TempDir::new("bounds");
    let limits = SpoolLimits { max_entries: 3, ..SpoolLimits::default() };
    let spool = Spool::open_with(&dir.file(), limits).unwrap();
    for n in 0..3 {
        spool.append(entry(n)).unwrap();
    }
    assert!(matches!(spool.append(entry(3)), Err(SpoolError::Full("spool.max_entries"))));
    assert_eq!(spool.health().status, crate::admin::Status::Degraded);
    // Dead letters take room too: moving one frees nothing; deleting one does.
    spool.dead_letter(1, "400").unwrap();
    assert!(matches!(spool.append(entry(3)), Err(SpoolError::Full(_))));
    spool.drop_dead(1).unwrap();
    assert_eq!(spool.health().status, crate::admin::Status::Healthy);
    assert_eq!(spool.append(entry(3)).unwrap(), 4);
    assert_eq!(spool.pending_len().unwrap(), 3);
    spool.requeue(1).unwrap_err();
    assert_counted(&spool);

    // Bytes: a body that does not fit is refused; the spool holds what it said.
    let dir = TempDir::new("bytes");
    let spool = Spool::open_with(&dir.file(), SpoolLimits { max_bytes: 10_000, ..SpoolLimits::default() }).unwrap();
    let big = |len| Entry { body: vec![b'x'; len], ..entry(0) };
    spool.append(big(4_000)).unwrap();
    spool.append(big(4_000)).unwrap();
    assert!(matches!(spool.append(big(4_000)), Err(SpoolError::Full("spool.max_bytes"))));
    assert!(spool.stats().bytes <= 10_000, "{:?}", spool.stats());
    spool.delivered(1).unwrap();
    spool.append(big(4_000)).unwrap();
    assert_eq!(spool.pending_len().unwrap(), 2);

    // Concurrent writers cannot both take the last room.
    let dir = TempDir::new("race");
    let spool = Spool::open_with(&dir.file(), SpoolLimits { max_entries: 5, ..SpoolLimits::default() }).unwrap();
    let writers: Vec<_> = (0..8)
        .map(|n| {
            let spool = spool.clone();
            std::thread::spawn(move || spool.append(entry(n)).is_ok())
        })
        .collect();
    let stored = writers.into_iter().map(|w| w.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!((stored, spool.pending_len().unwrap()), (5, 5));
    assert_counted(&spool);
}

#[test]
fn bodies_are_stored_raw() {
    let dir = TempDir::new("raw");
    let spool = Spool::open(&dir.file()).unwrap();
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let event = Entry { body: body.clone(), ..entry(0) };
    spool.append(event.clone()).unwrap();
    // As a JSON array of numbers (the old format) the body alone takes ~3.5 bytes a byte.
    let stored = spool.stats().bytes;
    let old = serde_json::to_vec(&event).unwrap().len();
    println!(
        "FIGURES spool entry with a {}-byte body: {stored} bytes stored, {old} in the old format ({:.2}x)",
        body.len(),
        old as f64 / stored as f64
    );
    assert!(stored < body.len() as u64 + 512, "{stored} bytes stored for a {}-byte body", body.len());
    assert!(old as u64 > 3 * stored);
    assert_eq!(spool.first_pending().unwrap().unwrap().body, body);
}

/// Writes `entry` in the format of earlier versions (a JSON document, body included),
/// straight into the file.
fn write_legacy(path: &Path, id: u64, table: TableDefinition<u64, &[u8]>, entry: &Entry) {
    let db = Database::create(path).unwrap();
    let tx = db.begin_write().unwrap();
    let json = serde_json::to_vec(&Entry { id, ..entry.clone() }).unwrap();
    tx.open_table(table).unwrap().insert(id, json.as_slice()).unwrap();
    tx.open_table(META).unwrap().insert("next_id", id + 1).unwrap();
    tx.commit().unwrap();
}

#[test]
fn entries_of_the_old_format_are_still_read() {
    let dir = TempDir::new("legacy");
    let path = dir.file();
    write_legacy(&path, 1, PENDING, &Entry { body: b"{\"old\":1}".to_vec(), ..entry(1) });
    write_legacy(&path, 2, PENDING, &Entry { body: b"{\"old\":2}".to_vec(), accepted_at_ms: now_ms(), ..entry(2) });
    write_legacy(&path, 3, DEAD, &Entry { last_error: Some("old 400".into()), ..entry(3) });
    let spool = Spool::open(&path).unwrap();
    assert_eq!((spool.stats().pending, spool.stats().dead), (2, 1));
    let first = spool.first_pending().unwrap().unwrap();
    assert_eq!((first.id, first.body.as_slice(), first.headers.len()), (1, &b"{\"old\":1}"[..], 1));
    assert_eq!(spool.list_dead(10).unwrap()[0].last_error.as_deref(), Some("old 400"));
    // Moved, retried or requeued, an old entry keeps its body.
    spool.dead_letter(1, "400").unwrap();
    assert_eq!(spool.body(1).unwrap().unwrap(), b"{\"old\":1}");
    spool.requeue(1).unwrap();
    assert!(!spool.failed_attempt(2, "503").unwrap());
    assert_eq!(spool.body(2).unwrap().unwrap(), b"{\"old\":2}");
    assert_eq!(spool.list_pending(10).unwrap()[1].attempts, 1);
    spool.delivered(1).unwrap();
    spool.delivered(2).unwrap();
    // New ids go on after the old ones.
    assert_eq!(spool.append(entry(4)).unwrap(), 4);
    assert_counted(&spool);
    drop(spool);
    let spool = Spool::open(&path).unwrap();
    assert_eq!((spool.stats().pending, spool.stats().dead), (1, 1));
}

#[test]
fn failing_and_unreadable_entries_go_to_the_dead_letters() {
    let dir = TempDir::new("giveup");
    let path = dir.file();
    let limits = SpoolLimits { max_attempts: 3, ..SpoolLimits::default() };
    let spool = Spool::open_with(&path, limits.clone()).unwrap();
    let fresh = Entry { accepted_at_ms: now_ms(), ..entry(1) };
    let id = spool.append(fresh.clone()).unwrap();
    assert!(!spool.failed_attempt(id, "upstream answered 503").unwrap());
    assert!(!spool.failed_attempt(id, "upstream answered 503").unwrap());
    assert!(spool.failed_attempt(id, "upstream answered 503").unwrap());
    let dead = spool.list_dead(10).unwrap();
    assert_eq!(dead[0].last_error.as_deref(), Some("gave up: upstream answered 503"));
    assert_eq!(dead[0].attempts, 3);
    // Too old: one failure is enough.
    let old = spool.append(entry(2)).unwrap();
    assert!(spool.failed_attempt(old, "timeout").unwrap());
    drop(spool);

    // Bytes that are no entry: listed, moved at once, kept for the operator.
    let db = Database::create(&path).unwrap();
    let tx = db.begin_write().unwrap();
    tx.open_table(PENDING).unwrap().insert(50, &b"\x07garbage"[..]).unwrap();
    tx.commit().unwrap();
    drop(db);
    let spool = Spool::open_with(&path, limits).unwrap();
    let heads = spool.pending_heads(10).unwrap();
    assert!(heads[0].entry.is_err(), "{heads:?}");
    spool.dead_letter(50, "unreadable").unwrap();
    let dead = spool.list_dead(10).unwrap();
    assert_eq!(dead.len(), 3);
    assert!(dead[2].last_error.as_deref().unwrap().contains("unreadable"), "{dead:?}");
    assert_eq!(spool.body(50).unwrap().unwrap(), b"\x07garbage");
    assert_eq!(spool.stats().pending, 0);
    assert_counted(&spool);
}

#[test]
fn dead_letters_expire() {
    let dir = TempDir::new("expire");
    let limits = SpoolLimits { dead_letter_ttl: Duration::from_secs(60), ..SpoolLimits::default() };
    let spool = Spool::open_with(&dir.file(), limits).unwrap();
    for n in 0..3 {
        let id = spool.append(entry(n)).unwrap();
        spool.dead_letter(id, "400").unwrap();
    }
    spool.append(entry(9)).unwrap();
    let bytes = spool.stats().bytes;
    let now = now_ms();
    assert_eq!(spool.expire_dead(now, 100).unwrap(), 0);
    assert_eq!(spool.expire_dead(now + 61_000, 2).unwrap(), 2);
    assert_eq!(spool.expire_dead(now + 61_000, 2).unwrap(), 1);
    assert_eq!((spool.stats().dead, spool.stats().pending), (0, 1));
    assert!(spool.stats().bytes < bytes / 2, "{} of {bytes}", spool.stats().bytes);
    assert_counted(&spool);
}

#[test]
fn an_io_error_is_recovered_by_reopening() {
    let dir = TempDir::new("io");
    let path = dir.file();
    let fail = Arc::new(AtomicBool::new(false));
    let opener = crate::durable::testing::flaky_opener(fail.clone());
    let spool = Spool::with_opener(&path, SpoolLimits::default(), opener, Duration::ZERO).unwrap();
    spool.append(entry(1)).unwrap();
    fail.store(true, Ordering::SeqCst);
    assert!(matches!(spool.append(entry(2)), Err(SpoolError::Unavailable { .. })));
    assert!(matches!(spool.append(entry(3)), Err(SpoolError::Unavailable { .. })));
    let health = spool.health();
    assert_eq!(health.status, crate::admin::Status::Degraded);
    assert!(health.error.as_deref().unwrap().contains("no space"), "{health:?}");
    // Nothing refused was counted.
    assert_eq!(spool.stats().pending, 1);
    // Space again: the next call reopens the file, and everything stored is there.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(spool.append(entry(4)).unwrap(), 2);
    assert_eq!(spool.health().status, crate::admin::Status::Healthy);
    let pending: Vec<u64> = spool.list_pending(10).unwrap().iter().map(|e| e.id).collect();
    assert_eq!(pending, [1, 2]);
    assert_eq!(spool.stats().pending, 2);
}

#[test]
fn next_pending_skips_held_lanes_without_reading_them() {
    let dir = TempDir::new("lanes");
    let path = dir.file();
    let spool = Spool::open(&path).unwrap();
    let of = |key: &str, n: u8| Entry { headers: vec![("authorization".into(), key.as_bytes().to_vec())], ..entry(n) };
    for n in 0..100u32 {
        spool.append(of("Klaviyo-API-Key pk_a", (n % 200) as u8)).unwrap();
    }
    let b = spool.append(of("Klaviyo-API-Key pk_b", 1)).unwrap();
    // Same key, other company: another lane.
    let c = spool
        .append(Entry { path_and_query: "/client/events?company_id=OTHER".into(), ..of("Klaviyo-API-Key pk_b", 2) })
        .unwrap();
    let ready = |held: &[u64]| match spool.next_pending(&held.iter().copied().collect()).unwrap() {
        Next::Ready(q) => Some((q.id, q.lane)),
        _ => None,
    };
    let (first, lane_a) = ready(&[]).unwrap();
    assert_eq!(first, 1);
    let (id, lane_b) = ready(&[lane_a]).unwrap();
    assert_eq!(id, b);
    let (id, lane_c) = ready(&[lane_a, lane_b]).unwrap();
    assert_eq!(id, c);
    assert!(matches!(spool.next_pending(&[lane_a, lane_b, lane_c].into_iter().collect()).unwrap(), Next::Waiting));
    // The index follows delivery, dead letters and requeues, and a reopen.
    spool.delivered(b).unwrap();
    spool.dead_letter(c, "400").unwrap();
    assert!(matches!(spool.next_pending(&[lane_a].into_iter().collect()).unwrap(), Next::Waiting));
    spool.requeue(c).unwrap();
    drop(spool);
    let spool = Spool::open(&path).unwrap();
    let lane_a = spool.lane(&of("Klaviyo-API-Key pk_a", 0));
    match spool.next_pending(&[lane_a].into_iter().collect()).unwrap() {
        Next::Ready(q) => assert_eq!(q.id, c),
        other => panic!("{other:?}"),
    }
    for id in 1..=100 {
        spool.delivered(id).unwrap();
    }
    spool.delivered(c).unwrap();
    assert!(matches!(spool.next_pending(&Default::default()).unwrap(), Next::Empty));
}
