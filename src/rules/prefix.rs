//! Taking a log line's timestamps and framing off, so rules see the message itself.
//!
//! The same kernel message reaches a person in many wrappings: `dmesg` (`[  12.345678] `),
//! `dmesg -T` (`[Sat Jan  7 14:25:56 2023] `), `dmesg -d` deltas, raw `/dev/kmsg` records
//! (`6,1234,5678901,-;`), printk levels (`<3>`), syslog and journald (`Feb  2 08:03:20 host
//! kernel: `, month names in any language, or RFC 3339 dates), `dmesg -x` (`kern  :warn  : `),
//! docker compose (`trainer  | `), CI logs (`2025-11-14T08:52:38.3746210Z `) and distributed
//! training frameworks (`[rank3]: `, `[default0]: `). [`strip`] peels these off, outermost first,
//! and keeps the one timestamp that can tell how far apart two lines are.
//!
//! This is not a log parser: it never fails and never rewrites the message. A line in a form it
//! does not know comes back whole, which is safe because rules do not anchor at the start of a
//! line unless they must.

use std::sync::LazyLock;

use regex::Regex;

/// When a line was logged, on the clock its prefix used. Two timestamps can only be compared when
/// they come from the same clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stamp {
    /// Seconds since boot (dmesg, `/dev/kmsg`).
    Boot(f64),
    /// Seconds of the wall clock, counted from an arbitrary origin that is the same for every
    /// line of one log (syslog lines carry no year, so this is not a Unix time).
    Wall(f64),
}

impl Stamp {
    /// Seconds between two stamps of the same clock; `None` across clocks.
    pub fn seconds_since(self, earlier: Stamp) -> Option<f64> {
        match (self, earlier) {
            (Stamp::Boot(a), Stamp::Boot(b)) | (Stamp::Wall(a), Stamp::Wall(b)) => Some(a - b),
            _ => None,
        }
    }
}

/// A line with its prefixes peeled off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stripped<'a> {
    /// The message: what rules match.
    pub body: &'a str,
    /// The innermost timestamp found (a dmesg stamp inside a syslog line wins: it is finer).
    pub stamp: Option<Stamp>,
}

/// One wrapping a line can come in: the regex that recognises it at the start of the line, and
/// how to read its timestamp from the captures.
struct Form {
    regex: Regex,
    stamp: fn(&regex::Captures<'_>) -> Option<Stamp>,
}

fn form(pattern: &str, stamp: fn(&regex::Captures<'_>) -> Option<Stamp>) -> Form {
    Form {
        // The patterns are constants of this file, checked by the tests below.
        regex: Regex::new(pattern).expect("prefix patterns are valid regexes"),
        stamp,
    }
}

fn no_stamp(_: &regex::Captures<'_>) -> Option<Stamp> {
    None
}

/// `HH:MM:SS(.frac)` with a day number, as wall-clock seconds. Days of different months
/// compare wrongly, which only matters for lines logged across a month boundary.
fn wall(caps: &regex::Captures<'_>) -> Option<Stamp> {
    let num = |name: &str| caps.name(name)?.as_str().parse::<f64>().ok();
    let frac = caps
        .name("frac")
        .and_then(|f| format!("0.{}", f.as_str()).parse::<f64>().ok())
        .unwrap_or(0.0);
    let seconds = num("day")? * 86_400.0 + num("h")? * 3600.0 + num("m")? * 60.0 + num("s")?;
    Some(Stamp::Wall(seconds + frac))
}

/// The wrappings, tried in this order at the start of what is left of the line; after one is
/// taken off, the list is tried again (a syslog line holds a dmesg stamp, a kmsg record a level).
static FORMS: LazyLock<Vec<Form>> = LazyLock::new(|| {
    // An ISO 8601 / RFC 3339 date and time, as journald, dmesg --time-format iso and CI use.
    const ISO: &str = r"\d{4}-\d\d-(?P<day>\d\d)[T ](?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)(?:[.,](?P<frac>\d+))?(?:Z|[+-]\d\d:?\d\d)?";
    vec![
        // Raw /dev/kmsg record: `PRI,SEQ,USEC,FLAGS[,...];`.
        form(r"^\d{1,4},\d+,(?P<us>\d+),[^;,]*(?:,[^;]*)?;", |c| {
            let us = c.name("us")?.as_str().parse::<f64>().ok()?;
            Some(Stamp::Boot(us / 1e6))
        }),
        // printk level `<3>` (what writers to /dev/kmsg and some log shippers show).
        form(r"^<\d{1,3}>", no_stamp),
        // dmesg: `[  12.345678] `.
        form(r"^\[ *(?P<t>\d+\.\d+)\] ?", |c| {
            Some(Stamp::Boot(c.name("t")?.as_str().parse().ok()?))
        }),
        // dmesg -d / --show-delta: `[  +0.000316] `, `[<    0.000316>] `.
        form(r"^\[<? *\+?\d+\.\d+>?\] ?", no_stamp),
        // dmesg -T: `[Sat Jan  7 14:25:56 2023] ` (weekday and month in the C locale or not).
        form(
            r"^\[\p{L}+\.? +\p{L}+\.? +(?P<day>\d{1,2}) +(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d) +\d{4}\] ?",
            wall,
        ),
        // Talos and similar: `192.168.11.119: kern: warning: [2026-04-22T21:27:51.291Z]: `.
        form(&format!(r"^(?:\S+: )?kern: *\w+: *\[{ISO}\]: ?"), wall),
        // dmesg -x: `kern  :warn  : ` (facility and level, padded), with dmesg's own ISO time
        // when it has one. Taken together: what follows the time is the message, not a syslog
        // program name (`pt_main_thread[2536443]: segfault at ...` keeps its pid).
        form(
            &format!(r"^[a-z]{{3,8}} *:[a-z]{{3,6}} *: (?:{ISO} )?"),
            wall,
        ),
        // syslog / journald short: `Feb  2 08:03:20 host kernel: `, localized month names
        // (`Mär`, `févr.`, `дек`), host optional, any program with an optional `[pid]`.
        form(
            r"^\p{L}{3,5}\.? +(?P<day>\d{1,2}),? +(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)(?:\.(?P<frac>\d+))? +(?:\S+ +)??[^\s:\[\]]+(?:\[\d+\])?: ",
            wall,
        ),
        // journald short-iso / rsyslog RFC 3339: `2024-08-18T01:19:27.141093+00:00 host kernel: `.
        form(
            &format!(r"^{ISO} +(?:\S+ +)??[^\s:\[\]]+(?:\[\d+\])?: "),
            wall,
        ),
        // A bare ISO time stamp (CI logs, dmesg --time-format iso, many loggers).
        form(&format!(r"^{ISO}:? +"), wall),
        // `kernel: ` left alone in front (journalctl -o cat with identifiers, some shippers).
        form(r"^kernel: ", no_stamp),
        // docker compose: `trainer-1  | `.
        form(r"^[\w.-]+ +\| ", no_stamp),
        // torchrun / torch.distributed: `[rank3]: `, `[default0]: `, `[rank3]:[W ...] ` keeps the rest.
        form(r"^\[(?:rank|default)\d+\]: ?", no_stamp),
    ]
});

/// How many wrappings one line may have. Real lines have at most three (syslog around dmesg
/// around a printk level); the bound keeps a hostile line from costing more than a few passes.
const MAX_LAYERS: usize = 6;

/// Peels the known prefixes off `line`. Leading spaces of the message are kept (indentation
/// matters for multi-line messages); a line with no known prefix comes back whole.
pub fn strip(line: &str) -> Stripped<'_> {
    let mut body = line;
    let mut stamp = None;
    'layers: for _ in 0..MAX_LAYERS {
        for form in FORMS.iter() {
            if let Some(caps) = form.regex.captures(body) {
                let end = caps.get(0).map_or(0, |m| m.end());
                if end == 0 {
                    continue;
                }
                if let Some(found) = (form.stamp)(&caps) {
                    // Keep the first boot-clock stamp, else the innermost wall-clock one: dmesg
                    // stamps inside syslog lines are finer and never jump with the wall clock.
                    if !matches!(stamp, Some(Stamp::Boot(_))) {
                        stamp = Some(found);
                    }
                }
                body = &body[end..];
                continue 'layers;
            }
        }
        break;
    }
    Stripped { body, stamp }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[track_caller]
    fn body(line: &str) -> &str {
        strip(line).body
    }

    const MSG: &str =
        "amdgpu 0000:c4:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:153 vmid:8 pasid:32786)";

    #[test]
    fn every_known_wrapping_comes_off() {
        let lines = [
            format!("[   67.058794] {MSG}"),
            format!("[  +0.088166] {MSG}"),
            format!("[<    0.000316>] {MSG}"),
            format!("[Sat Jan  7 14:25:56 2023] {MSG}"),
            format!("6,1234,5678901,-;{MSG}"),
            format!("6,3973,227996636,-,caller=T123;{MSG}"),
            format!("<3>{MSG}"),
            format!("Feb  2 08:03:20 kernel: [37932.038809] {MSG}"),
            format!("Feb  2 08:03:20 myhost kernel: [37932.038809] {MSG}"),
            format!("Mär 12 08:03:20 rechner kernel: {MSG}"),
            format!("févr. 12 08:03:20 machine kernel: {MSG}"),
            format!("дек 12 08:03:20 хост kernel: {MSG}"),
            format!("2024-08-18T01:19:27.141093+00:00 minipc kernel: {MSG}"),
            format!("kernel: [ 2478.486780] {MSG}"),
            format!("kern  :warn  : 2025-01-21T04:41:44,283302+00:00 {MSG}"),
            format!("kern  :err   : {MSG}"),
            format!("192.168.11.119: kern: warning: [2026-04-22T21:27:51.291660856Z]: {MSG}"),
            format!("2025-11-14T08:52:38.3746210Z {MSG}"),
            format!("ollama  | {MSG}"),
            format!("[rank3]: {MSG}"),
            format!("[default0]:{MSG}"),
            format!("Feb  2 08:03:20 host kernel: <3>[  12.5] {MSG}"),
        ];
        for line in &lines {
            assert_eq!(body(line), MSG, "{line}");
        }
    }

    #[test]
    fn lines_without_a_prefix_come_back_whole() {
        for line in [
            "Memory access fault by GPU node-1 (Agent handle: 0x1f829860) on address 0x7a8a4be00000.",
            "  what():  CUDA error: misaligned address",
            "RuntimeError: CUDA error: an illegal memory access was encountered",
            "| 0  NVIDIA H100 80GB HBM3   On |   00000000:18:00.0 Off |   0 |",
            "[W socket.cpp:464] [c10d] The server socket has failed to bind",
            "",
        ] {
            assert_eq!(body(line), line);
        }
    }

    #[test]
    fn stamps_are_read_on_their_clock() {
        assert_eq!(
            strip("[   67.058794] x").stamp,
            Some(Stamp::Boot(67.058794))
        );
        assert_eq!(
            strip("6,1234,5678901,-;x").stamp,
            Some(Stamp::Boot(5.678901))
        );
        // A dmesg stamp inside a syslog line is the one kept.
        assert_eq!(
            strip("Feb  2 08:03:20 kernel: [37932.5] x").stamp,
            Some(Stamp::Boot(37932.5))
        );
        let a = strip("Feb  2 08:03:20 host kernel: x").stamp.unwrap();
        let b = strip("Feb  2 08:03:29 host kernel: x").stamp.unwrap();
        assert_eq!(b.seconds_since(a), Some(9.0));
        assert_eq!(a.seconds_since(Stamp::Boot(1.0)), None);
        let c = strip("2025-11-14T08:52:38.5Z x").stamp.unwrap();
        let d = strip("2025-11-14T08:52:40.0Z x").stamp.unwrap();
        assert_eq!(d.seconds_since(c), Some(1.5));
        assert_eq!(strip("[  +0.088166] x").stamp, None);
    }

    #[test]
    fn a_process_name_after_a_dmesg_time_is_message_not_syslog_header() {
        assert_eq!(
            body(
                "kern  :info  : 2025-01-21T04:41:44,283302+00:00 pt_main_thread[2536443]: segfault at 0 ip 00007f"
            ),
            "pt_main_thread[2536443]: segfault at 0 ip 00007f"
        );
        assert_eq!(
            body("kern  :err   : 2025-01-21T04:41:44,283302+00:00 oom_reaper: reaped process 1234"),
            "oom_reaper: reaped process 1234"
        );
    }

    #[test]
    fn indentation_of_the_message_is_kept() {
        assert_eq!(
            body("[   67.058806] amdgpu 0000:c4:00.0: amdgpu:  Process python3 pid 3370"),
            "amdgpu 0000:c4:00.0: amdgpu:  Process python3 pid 3370"
        );
        assert_eq!(
            body("[rank0]:   what():  CUDA error"),
            "  what():  CUDA error"
        );
    }
}
