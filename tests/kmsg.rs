//! The kernel-log source against floods and the real `/dev/kmsg`, through the library's public
//! API only.
//!
//! The file-backed source runs everywhere. The `/dev/kmsg` tests need to write records into
//! the kernel log (root); without that they print why and pass without checking anything.
//! They tag their records with a per-test marker and classify on it, because the kernel and
//! other programs write into the same log meanwhile; they run one at a time (a flood must not
//! skew the latency measurement). Records they write use level 6 (info) or 4 (warning) with
//! the user facility, so none of them reaches the console.

mod common;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::skip;
use gpuwarden::sources::kernel::{
    self, FollowConfig, Follower, KernelEvent, KernelSource, read_all,
};
use gpuwarden::sources::kmsg::{FACILITY_USER, Record};

/// One real `/dev/kmsg` test at a time, across test processes too.
fn kmsg_lock() -> common::Turn {
    common::machine_turn("kmsg")
}

/// Writes one record through a fresh descriptor: the kernel's rate limit (10 records in 5 s)
/// is per descriptor, so this is never limited.
fn write_kmsg(line: &[u8]) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(kernel::DEV_KMSG)?
        .write_all(line)
}

/// Whether this test can write into and read the kernel log; says why not otherwise.
fn kmsg_usable(test: &str) -> bool {
    let probe = format!("<14>gpuwarden test {test}: checking /dev/kmsg access\n");
    let readable = OpenOptions::new().read(true).open(kernel::DEV_KMSG);
    match (write_kmsg(probe.as_bytes()), readable) {
        (Ok(()), Ok(_)) => true,
        (Err(e), _) | (_, Err(e)) => {
            skip(
                test,
                &format!(
                    "/dev/kmsg is not writable and readable here ({e}); run as root to check it"
                ),
            );
            false
        }
    }
}

/// A tag unique to one test run, so records of other tests and runs never match.
fn tag(test: &str) -> String {
    format!("gpuwarden-test-{}-{test}", std::process::id())
}

/// Follows `source`, keeping only records whose text starts with `tag`.
fn follow_tagged(
    source: KernelSource,
    tag: &str,
    capacity: usize,
) -> (Follower, Receiver<KernelEvent<Record>>) {
    let (tx, rx) = sync_channel(capacity);
    let tag = tag.to_string();
    let follower = kernel::follow(
        FollowConfig::new(source),
        move |r: Record| r.text().starts_with(&tag).then_some(r),
        tx,
        |e| e,
    )
    .expect("the follower starts");
    (follower, rx)
}

/// Receives until a record with exactly `text` arrives; returns what came before it.
fn until(
    rx: &Receiver<KernelEvent<Record>>,
    text: &str,
    within: Duration,
) -> Vec<KernelEvent<Record>> {
    let deadline = Instant::now() + within;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(KernelEvent::Record(r)) if r.text() == text => return before,
            Ok(ev) => before.push(ev),
            Err(e) => panic!(
                "{text:?} did not arrive within {within:?} ({e}); got {} events before",
                before.len()
            ),
        }
    }
}

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the test file");
    f.write_all(text.as_bytes())
        .expect("append to the test file");
}

#[test]
fn a_flood_of_50000_lines_in_a_file_neither_kills_nor_wedges_the_reader() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("kmsg.txt");
    append(&path, "");
    let source = KernelSource::File {
        path: path.clone(),
        from_start: false,
    };
    let (follower, rx) = follow_tagged(source, "NVRM: Xid", 16);
    // 50,000 records in 50 writes over about a second; one in a thousand is a fault.
    let writer = {
        let path = path.clone();
        thread::spawn(move || {
            for block in 0..50u64 {
                let mut text = String::new();
                for i in 0..1000u64 {
                    let seq = block * 1000 + i + 1;
                    if i == 500 {
                        text.push_str(&format!(
                            "4,{seq},{seq},-;NVRM: Xid (PCI:0000:00:06): 31, pid={seq}, name=python3\n SUBSYSTEM=pci\n"
                        ));
                    } else {
                        text.push_str(&format!(
                            "6,{seq},{seq},-;eth0: link flapping, flood line {seq}\n"
                        ));
                    }
                }
                append(&path, &text);
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // A slow consumer: every fault still arrives because the noise never reaches the channel.
    let mut faults = Vec::new();
    while faults.len() < 50 {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(KernelEvent::Record(r)) => {
                assert_eq!(r.dict_value("SUBSYSTEM"), Some("pci"));
                faults.push(r.seq);
                thread::sleep(Duration::from_millis(5));
            }
            Ok(other) => panic!("nothing but faults expected, got {other:?}"),
            Err(e) => panic!("only {} of 50 faults arrived: {e}", faults.len()),
        }
    }
    writer.join().expect("the writer finishes");
    assert_eq!(
        faults,
        (0..50u64).map(|b| b * 1000 + 501).collect::<Vec<_>>()
    );
    // Still live after the flood.
    append(&path, "3,50001,50001,-;NVRM: Xid after the flood\n");
    let before = until(&rx, "NVRM: Xid after the flood", Duration::from_secs(10));
    assert!(before.is_empty(), "{before:?}");
    assert!(follower.is_running());
    follower.stop();
}

#[test]
fn a_flood_kept_whole_by_a_stalled_consumer_is_counted_not_lost_silently() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("kmsg.txt");
    let mut text = String::new();
    for seq in 1..=50_000u64 {
        text.push_str(&format!("6,{seq},{seq},-;flood line {seq}\n"));
    }
    append(&path, &text);
    let source = KernelSource::File {
        path: path.clone(),
        from_start: true,
    };
    let (follower, rx) = follow_tagged(source, "", 64);
    // The consumer stalls for a second while the reader takes in the whole file.
    thread::sleep(Duration::from_secs(1));
    append(&path, "6,50001,50001,-;marker\n");
    let mut records = 0u64;
    let mut dropped = 0u64;
    for ev in until(&rx, "marker", Duration::from_secs(20)) {
        match ev {
            KernelEvent::Record(_) => records += 1,
            KernelEvent::Dropped { records } => dropped += records,
            other => panic!("{other:?}"),
        }
    }
    assert!(dropped > 0, "a stalled consumer must cost drops");
    assert_eq!(
        records + dropped,
        50_000,
        "every record is delivered or counted"
    );
    follower.stop();
}

#[test]
fn live_records_are_followed_from_now_on_with_facility_and_escapes() {
    let _one = kmsg_lock();
    if !kmsg_usable("live") {
        return;
    }
    let tag = tag("live");
    write_kmsg(format!("<12>{tag} before the follower\n").as_bytes()).expect("write");
    let (follower, rx) = follow_tagged(KernelSource::kmsg(), &tag, 64);
    // Bytes outside printable ASCII come back as they were written, not as `\xNN`.
    let mut odd = format!("<12>{tag} odd bytes:").into_bytes();
    odd.extend_from_slice(b" tab\there caf\xc3\xa9 back\\slash\n");
    write_kmsg(&odd).expect("write");
    write_kmsg(format!("<12>{tag} after the follower\n").as_bytes()).expect("write");
    let before = until(
        &rx,
        &format!("{tag} after the follower"),
        Duration::from_secs(10),
    );
    follower.stop();
    assert_eq!(
        before.len(),
        1,
        "only the odd-bytes record, never the older one: {before:?}"
    );
    let KernelEvent::Record(r) = &before[0] else {
        panic!("{before:?}")
    };
    assert_eq!(r.message, &odd[4..odd.len() - 1]);
    assert_eq!(r.facility, FACILITY_USER);
    assert_eq!(r.level, 4);
}

#[test]
fn a_real_kmsg_flood_overrunning_the_reader_reports_the_loss_and_stays_live() {
    let _one = kmsg_lock();
    if !kmsg_usable("flood") {
        return;
    }
    let tag = tag("flood");
    let (release_tx, release_rx) = sync_channel::<()>(1);
    let release_rx = Mutex::new(release_rx);
    // Room for the whole flood: this test is about the kernel's losses, not the channel's.
    let (tx, rx) = sync_channel(8192);
    let tag_c = tag.clone();
    let mut stalled = false;
    // A classifier that stalls on the first flood record until the flood is written: the
    // kernel's buffer (about 1,600 records of this size here) overflows under the reader.
    let follower = kernel::follow(
        FollowConfig::new(KernelSource::kmsg()),
        move |r: Record| {
            if !r.text().starts_with(&tag_c) {
                return None;
            }
            if !stalled {
                stalled = true;
                let rx = release_rx.lock().unwrap_or_else(|p| p.into_inner());
                let _ = rx.recv_timeout(Duration::from_secs(20));
            }
            Some(r)
        },
        tx,
        |e| e,
    )
    .expect("the follower starts");
    let consumer = {
        let marker = format!("{tag} marker");
        thread::spawn(move || until(&rx, &marker, Duration::from_secs(30)))
    };
    const FLOOD: u64 = 5000;
    let t0 = Instant::now();
    for i in 0..FLOOD {
        write_kmsg(
            format!("<14>{tag} flood {i:05} padding-to-look-like-a-driver-line\n").as_bytes(),
        )
        .expect("write");
    }
    let wrote_in = t0.elapsed();
    release_tx.send(()).expect("release the classifier");
    write_kmsg(format!("<14>{tag} marker\n").as_bytes()).expect("write");
    let before = consumer.join().expect("the marker arrives");
    assert!(follower.is_running());
    follower.stop();
    let records = before
        .iter()
        .filter(|e| matches!(e, KernelEvent::Record(_)))
        .count() as u64;
    let lost: u64 = before
        .iter()
        .map(|e| match e {
            KernelEvent::Lost { records } => records.expect("a counted loss after a first record"),
            _ => 0,
        })
        .sum();
    println!(
        "kmsg flood: {FLOOD} records written in {wrote_in:?}; {records} delivered, {lost} reported lost"
    );
    assert!(
        before
            .iter()
            .all(|e| matches!(e, KernelEvent::Record(_) | KernelEvent::Lost { .. })),
        "{:?}",
        before
            .iter()
            .find(|e| !matches!(e, KernelEvent::Record(_) | KernelEvent::Lost { .. }))
    );
    assert!(lost > 0, "the stalled reader must have been overrun");
    // The loss counts every record of the gap, ours and others' alike.
    assert!(records + lost >= FLOOD, "{records} + {lost} < {FLOOD}");
}

#[test]
fn a_real_kmsg_flood_at_full_speed_is_followed_to_the_end() {
    let _one = kmsg_lock();
    if !kmsg_usable("full_speed") {
        return;
    }
    let tag = tag("full_speed");
    let (follower, rx) = follow_tagged(KernelSource::kmsg(), &tag, 1024);
    let consumer = {
        let marker = format!("{tag} marker");
        thread::spawn(move || until(&rx, &marker, Duration::from_secs(30)))
    };
    const FLOOD: u64 = 10_000;
    let t0 = Instant::now();
    for i in 0..FLOOD {
        write_kmsg(format!("<14>{tag} flood {i:05}\n").as_bytes()).expect("write");
    }
    let wrote_in = t0.elapsed();
    write_kmsg(format!("<14>{tag} marker\n").as_bytes()).expect("write");
    let before = consumer.join().expect("the marker arrives");
    assert!(follower.is_running());
    follower.stop();
    let mut records = 0u64;
    let mut lost = 0u64;
    let mut dropped = 0u64;
    for ev in &before {
        match ev {
            KernelEvent::Record(_) => records += 1,
            KernelEvent::Lost { records } => lost += records.unwrap_or(0),
            KernelEvent::Dropped { records } => dropped += records,
            other => panic!("{other:?}"),
        }
    }
    println!(
        "kmsg flood at full speed: {FLOOD} records written in {wrote_in:?}; {records} delivered, {lost} lost, {dropped} dropped"
    );
    assert!(
        records + lost + dropped >= FLOOD,
        "every record is delivered or counted"
    );
}

#[test]
fn latency_from_a_kmsg_write_to_the_delivered_record() {
    let _one = kmsg_lock();
    if !kmsg_usable("latency") {
        return;
    }
    let tag = tag("latency");
    let (follower, rx) = follow_tagged(KernelSource::kmsg(), &tag, 1024);
    const N: usize = 300;
    let sent = Arc::new(Mutex::new(vec![None::<Instant>; N]));
    let writer = {
        let sent = Arc::clone(&sent);
        let tag = tag.clone();
        thread::spawn(move || {
            for i in 0..N {
                let line = format!("<14>{tag} {i}\n");
                let t = Instant::now();
                write_kmsg(line.as_bytes()).expect("write");
                sent.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(t);
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut got = vec![None::<Instant>; N];
    for _ in 0..N {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(KernelEvent::Record(r)) => {
                let at = Instant::now();
                let i: usize = r
                    .text()
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("an index");
                got[i] = Some(at);
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => panic!("a record did not arrive: {e}"),
        }
    }
    writer.join().expect("the writer finishes");
    follower.stop();
    let sent = sent.lock().unwrap_or_else(|p| p.into_inner());
    let mut lat: Vec<Duration> = sent
        .iter()
        .zip(&got)
        .map(|(s, g)| match (s, g) {
            (Some(s), Some(g)) => g.saturating_duration_since(*s),
            _ => panic!("every record is written and received once"),
        })
        .collect();
    lat.sort();
    let p50 = lat[N / 2];
    let p99 = lat[N * 99 / 100];
    println!(
        "kmsg latency over {N} records 5 ms apart: p50 {p50:?}, p99 {p99:?}, max {:?}",
        lat[N - 1]
    );
    // The kernel's deferred wakeup sets the floor (a few ms); anything near a second would be
    // a fault the user sees late.
    assert!(p99 < Duration::from_millis(250), "p99 {p99:?}");
}

/// Set in the copy of this test that runs without privileges.
const UNPRIVILEGED: &str = "GPUWARDEN_TEST_UNPRIVILEGED";

#[test]
fn without_permission_the_follower_says_so_once_and_nothing_more() {
    let readable = OpenOptions::new().read(true).open(kernel::DEV_KMSG);
    let denied = matches!(
        &readable,
        Err(e) if matches!(e.raw_os_error(), Some(nix::libc::EPERM | nix::libc::EACCES))
    );
    if denied {
        let (follower, rx) = follow_tagged(KernelSource::kmsg(), "never", 4);
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(KernelEvent::Unavailable { reason }) => {
                assert!(reason.contains("/dev/kmsg"), "{reason}");
                assert!(reason.contains("CAP_SYSLOG"), "{reason}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        // The reader ends after saying so; on a loaded machine that can take a moment.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while follower.is_running() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !follower.is_running(),
            "the reader goes on after Unavailable"
        );
        follower.stop();
        let e = read_all(&KernelSource::kmsg()).expect_err("read_all is refused too");
        assert!(e.to_string().contains("CAP_SYSLOG"), "{e}");
        return;
    }
    if std::env::var_os(UNPRIVILEGED).is_some() {
        return skip(
            "without_permission_the_follower_says_so_once_and_nothing_more",
            "/dev/kmsg is readable even without privileges here (kernel.dmesg_restrict = 0)",
        );
    }
    if !is_root() {
        return skip(
            "without_permission_the_follower_says_so_once_and_nothing_more",
            "/dev/kmsg is readable here and only root can drop to `nobody`",
        );
    }
    // Run this very test again as `nobody`, where the kernel refuses the read. From a copy: the
    // checkout may lie where nobody cannot enter (a clone under /root).
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().expect("a scratch directory");
    let copy = dir.path().join("kmsg-test");
    std::fs::copy(std::env::current_exe().expect("the test binary"), &copy).expect("copy it");
    for (path, mode) in [(dir.path(), 0o755), (copy.as_path(), 0o755)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let out = std::process::Command::new(&copy)
        .args([
            "without_permission_the_follower_says_so_once_and_nothing_more",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(UNPRIVILEGED, "1")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run the test as nobody");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 passed"), "{text}");
    let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !all.contains("SKIPPED"),
        "the run as nobody checked nothing: {all}"
    );
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn read_all_returns_the_buffer_in_order_with_a_record_just_written() {
    let _one = kmsg_lock();
    if !kmsg_usable("read_all") {
        return;
    }
    let tag = tag("read_all");
    write_kmsg(format!("<12>{tag} in the backlog\n SHOULD_NOT=be a dictionary\n").as_bytes())
        .expect("write");
    let backlog = read_all(&KernelSource::kmsg()).expect("read the kernel log");
    assert!(
        backlog.records.windows(2).all(|w| w[0].seq < w[1].seq),
        "records come oldest first"
    );
    let ours: Vec<_> = backlog
        .records
        .iter()
        .filter(|r| r.text().starts_with(&tag))
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].facility, FACILITY_USER);
    // A newline inside a written record is escaped by the kernel, so it cannot forge a
    // dictionary line; unescaped, it is part of the message again.
    assert!(
        ours[0]
            .message
            .ends_with(b"backlog\n SHOULD_NOT=be a dictionary")
    );
    assert!(ours[0].dict.is_empty());
    // Records are parsed whole: the kernel's own records carry dictionaries, and none of them
    // shows up as a separate, broken record.
    assert!(backlog.malformed.is_empty(), "{:?}", backlog.malformed);
}
