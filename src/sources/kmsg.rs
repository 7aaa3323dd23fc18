//! The `/dev/kmsg` record format: turns one raw record into a [`Record`].
//!
//! A record, as one `read()` of `/dev/kmsg` returns it (see the kernel's
//! `Documentation/ABI/testing/dev-kmsg`):
//!
//! ```text
//! 3,1024,5012345678,-;amdgpu 0000:03:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:24 vmid:8 pasid:32769)
//!  SUBSYSTEM=pci
//!  DEVICE=+pci:0000:03:00.0
//! ```
//!
//! The header is `priority,sequence,timestamp,flags[,more fields]` up to the first `;`, then the
//! message up to the newline, then optional dictionary lines that start with a space. The kernel
//! escapes every byte of the message outside printable ASCII (and the backslash itself) as
//! `\xNN`, so a raw record is plain ASCII; the parser undoes the escaping, which gives back the
//! exact bytes the driver (or a user-space writer) logged.
//!
//! It also splits a file of such records (one a line, dictionary lines after it) into records,
//! for the file-backed source and one-shot reads of a saved log.
//!
//! This module only parses; reading the device, following it and deciding what a record means
//! are elsewhere ([`super::kernel`] reads, the rules classify).

use std::borrow::Cow;

/// The syslog facility of records the kernel itself logs.
pub const FACILITY_KERNEL: u8 = 0;
/// The syslog facility of records written into `/dev/kmsg` from user space without a facility.
pub const FACILITY_USER: u8 = 1;

/// One kernel log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Severity, 0 (emergency) to 7 (debug): the priority's low three bits.
    pub level: u8,
    /// Syslog facility: 0 for the kernel, 1 ([`FACILITY_USER`]) for records written into
    /// `/dev/kmsg` by a program. Kept so the journal can tell them apart; both are matched alike.
    pub facility: u8,
    /// The kernel's sequence number; consecutive records differ by one, so a gap counts lost
    /// records.
    pub seq: u64,
    /// When the record was logged, in microseconds since boot (the kernel's clock, which stops
    /// during suspend).
    pub ts_us: u64,
    /// The message, unescaped: the bytes that were logged, without the trailing newline.
    pub message: Vec<u8>,
    /// The dictionary (`SUBSYSTEM=pci`, `DEVICE=+pci:0000:03:00.0`), in the order given.
    pub dict: Vec<(String, String)>,
}

impl Record {
    /// The message for matching and display. Kernel messages are ASCII; anything else is shown
    /// with replacement characters, while [`Record::message`] keeps the bytes.
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.message)
    }

    /// The value of a dictionary key, such as `DEVICE`.
    pub fn dict_value(&self, key: &str) -> Option<&str> {
        self.dict
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "kernel log record without the `;` that ends its header; the source is not in /dev/kmsg format"
    )]
    NoHeaderEnd,
    #[error(
        "kernel log record with a bad {field} field {value:?} in its header; the source is not in /dev/kmsg format"
    )]
    BadField { field: &'static str, value: String },
    #[error("kernel log dictionary line {0:?} has no `=`; the source is not in /dev/kmsg format")]
    BadDictLine(String),
}

/// Parses one record: the header line and its dictionary lines, with or without the final
/// newline (one `read()` of `/dev/kmsg`, or the lines of a record in a file).
pub fn parse_record(raw: &[u8]) -> Result<Record, ParseError> {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let (first, rest) = match memchr::memchr(b'\n', raw) {
        Some(i) => (&raw[..i], &raw[i + 1..]),
        None => (raw, &[][..]),
    };
    let semi = memchr::memchr(b';', first).ok_or(ParseError::NoHeaderEnd)?;
    let mut fields = first[..semi].split(|&b| b == b',');
    let priority: u32 = number(fields.next(), "priority")?;
    let seq: u64 = number(fields.next(), "sequence number")?;
    let ts_us: u64 = number(fields.next(), "timestamp")?;
    // The flags field (`-`, or `c`/`+` for continuation lines on old kernels) says nothing a
    // reader of whole records needs; it must be there all the same.
    if fields.next().is_none() {
        return Err(ParseError::BadField {
            field: "flags",
            value: String::new(),
        });
    }
    // The kernel writes facility and level as `facility << 3 | level`, facility one byte.
    let facility = u8::try_from(priority >> 3).map_err(|_| ParseError::BadField {
        field: "priority",
        value: priority.to_string(),
    })?;
    let level = (priority & 7) as u8;
    let message = unescape(&first[semi + 1..]);

    let mut dict = Vec::new();
    for line in rest.split(|&b| b == b'\n') {
        // Dictionary lines start with one space; an empty line (a trailing newline) is nothing.
        let Some(entry) = line.strip_prefix(b" ") else {
            if line.is_empty() {
                continue;
            }
            return Err(ParseError::BadDictLine(
                String::from_utf8_lossy(line).into_owned(),
            ));
        };
        let eq = memchr::memchr(b'=', entry)
            .ok_or_else(|| ParseError::BadDictLine(String::from_utf8_lossy(entry).into_owned()))?;
        dict.push((
            String::from_utf8_lossy(&unescape(&entry[..eq])).into_owned(),
            String::from_utf8_lossy(&unescape(&entry[eq + 1..])).into_owned(),
        ));
    }
    Ok(Record {
        level,
        facility,
        seq,
        ts_us,
        message,
        dict,
    })
}

fn number<T: std::str::FromStr>(field: Option<&[u8]>, name: &'static str) -> Result<T, ParseError> {
    let bytes = field.unwrap_or_default();
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ParseError::BadField {
            field: name,
            value: String::from_utf8_lossy(bytes).into_owned(),
        })
}

/// Undoes the kernel's `\xNN` escaping. A backslash not followed by `x` and two hex digits is
/// kept as it is: the kernel never writes one (it escapes `\` as `\x5c`), but a hand-written
/// record in a test file may.
pub fn unescape(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = memchr::memchr(b'\\', rest) {
        out.extend_from_slice(&rest[..i]);
        rest = &rest[i..];
        let byte = match rest {
            [b'\\', b'x', hi, lo, ..] => hex(*hi).zip(hex(*lo)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match byte {
            Some(b) => {
                out.push(b);
                rest = &rest[4..];
            }
            None => {
                out.push(b'\\');
                rest = &rest[1..];
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Longest line a file of records may hold: records are at most 8 KiB, so a longer line is not
/// one.
const MAX_LINE: usize = 16 * 1024;

/// Longest record (header and dictionary) assembled from a file.
const MAX_RECORD: usize = 64 * 1024;

/// Raw text shown of a record or line that could not be read.
pub(crate) const SHOWN: usize = 256;

/// What [`FileRecords`] cuts out of a file; `end` is the file offset just past it.
pub(crate) enum Piece {
    /// The raw lines of one record, for [`parse_record`].
    Record { raw: Vec<u8>, end: u64 },
    /// A line that cannot be part of a record: its start and why.
    Bad {
        line: Vec<u8>,
        why: String,
        end: u64,
    },
}

impl Piece {
    pub(crate) fn end(&self) -> u64 {
        match self {
            Piece::Record { end, .. } | Piece::Bad { end, .. } => *end,
        }
    }
}

/// Splits a file in `/dev/kmsg` format into records: a header line and the dictionary lines
/// (starting with a space) after it. Lines are capped at [`MAX_LINE`] and records at
/// [`MAX_RECORD`]; what is longer is reported as a bad line and skipped.
pub(crate) struct FileRecords {
    /// Bytes after the last newline.
    partial: Vec<u8>,
    /// The line in `partial` is too long and is being skipped up to its newline.
    skipping: bool,
    /// The record being assembled.
    record: Vec<u8>,
    /// File offset just past the last complete line seen.
    offset: u64,
    /// File offset just past the record being assembled.
    record_end: u64,
}

impl FileRecords {
    pub(crate) fn new(offset: u64) -> Self {
        FileRecords {
            partial: Vec::new(),
            skipping: false,
            record: Vec::new(),
            offset,
            record_end: offset,
        }
    }

    pub(crate) fn holds_record(&self) -> bool {
        !self.record.is_empty()
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8], out: &mut impl FnMut(Piece)) {
        while let Some(i) = memchr::memchr(b'\n', bytes) {
            let rest = &bytes[..i];
            self.offset += (self.partial.len() + i + 1) as u64;
            if self.skipping {
                self.skipping = false;
                self.partial.clear();
            } else if self.partial.is_empty() {
                self.line(rest, out);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(rest);
                self.line(&line, out);
            }
            bytes = &bytes[i + 1..];
        }
        if self.skipping {
            // Count what is skipped so offsets stay true, without keeping it.
            self.offset += bytes.len() as u64;
            return;
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() > MAX_LINE {
            // Whatever record was open is complete: hand it on first, so that offsets handed
            // on only ever grow.
            self.close_record(out);
            self.offset += self.partial.len() as u64;
            out(Piece::Bad {
                line: self.partial[..SHOWN].to_vec(),
                why: format!(
                    "a line longer than {} KiB is not a kernel log record",
                    MAX_LINE / 1024
                ),
                end: self.offset,
            });
            self.partial.clear();
            self.skipping = true;
        }
    }

    /// One complete line (without its newline); `self.offset` is already past it.
    fn line(&mut self, line: &[u8], out: &mut impl FnMut(Piece)) {
        if line.is_empty() {
            return;
        }
        if line[0] == b' ' {
            if self.record.is_empty() {
                out(Piece::Bad {
                    line: line.to_vec(),
                    why: "a dictionary line without a record before it".into(),
                    end: self.offset,
                });
            } else if self.record.len() + line.len() >= MAX_RECORD {
                self.close_record(out);
                out(Piece::Bad {
                    line: line.to_vec(),
                    why: format!(
                        "a record with more than {} KiB of dictionary lines",
                        MAX_RECORD / 1024
                    ),
                    end: self.offset,
                });
            } else {
                self.record.push(b'\n');
                self.record.extend_from_slice(line);
                self.record_end = self.offset;
            }
            return;
        }
        self.close_record(out);
        self.record.extend_from_slice(line);
        self.record_end = self.offset;
    }

    /// The record being assembled is complete (a new header came, or the writer went quiet).
    pub(crate) fn close_record(&mut self, out: &mut impl FnMut(Piece)) {
        if !self.record.is_empty() {
            out(Piece::Record {
                raw: std::mem::take(&mut self.record),
                end: self.record_end,
            });
        }
    }

    /// End of input for a one-shot read: a last line without a newline counts.
    pub(crate) fn finish(&mut self, out: &mut impl FnMut(Piece)) {
        if !self.skipping && !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.offset += line.len() as u64;
            self.line(&line, out);
        }
        self.close_record(out);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_amdgpu_page_fault_with_its_dictionary() {
        let raw = b"3,1024,5012345678,-;amdgpu 0000:03:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:24 vmid:8 pasid:32769)\n SUBSYSTEM=pci\n DEVICE=+pci:0000:03:00.0\n";
        let r = parse_record(raw).unwrap();
        assert_eq!(r.level, 3);
        assert_eq!(r.facility, FACILITY_KERNEL);
        assert_eq!(r.seq, 1024);
        assert_eq!(r.ts_us, 5_012_345_678);
        assert_eq!(
            r.text(),
            "amdgpu 0000:03:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:24 vmid:8 pasid:32769)"
        );
        assert_eq!(r.dict_value("SUBSYSTEM"), Some("pci"));
        assert_eq!(r.dict_value("DEVICE"), Some("+pci:0000:03:00.0"));
        assert_eq!(r.dict.len(), 2);
    }

    #[test]
    fn splits_priority_into_facility_and_level() {
        // `<12>` written by a program: facility user (1), level warning (4).
        let r = parse_record(b"12,7,100,-;trainer: hello").unwrap();
        assert_eq!((r.facility, r.level), (FACILITY_USER, 4));
        // local7.debug, the largest standard priority.
        let r = parse_record(b"191,8,100,-;x").unwrap();
        assert_eq!((r.facility, r.level), (23, 7));
    }

    #[test]
    fn unescapes_the_message_and_keeps_odd_backslashes() {
        let r = parse_record(b"6,1,2,-;tab\\x09here \\x5cx41 caf\\xc3\\xa9 raw\\ \\xzz end\\x4")
            .unwrap();
        assert_eq!(
            r.message,
            b"tab\there \\x41 caf\xc3\xa9 raw\\ \\xzz end\\x4"
        );
        assert_eq!(r.text(), "tab\there \\x41 café raw\\ \\xzz end\\x4");
        // Bytes that are not UTF-8 survive in `message` and are replaced only in `text`.
        let r = parse_record(b"6,1,2,-;bad \\xff byte").unwrap();
        assert_eq!(r.message, b"bad \xff byte");
        assert_eq!(r.text(), "bad \u{fffd} byte");
    }

    #[test]
    fn accepts_extra_header_fields_and_semicolons_in_the_message() {
        let r = parse_record(b"4,99,12,c,caller=T12;a; b;c").unwrap();
        assert_eq!(r.seq, 99);
        assert_eq!(r.message, b"a; b;c");
        assert!(r.dict.is_empty());
    }

    #[test]
    fn an_nvidia_xid_line_parses_whole() {
        let raw = b"4,2201,91022331,-;NVRM: Xid (PCI:0000:00:06): 31, pid=447, name=python3, channel 0x0000000a, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC1 GPCCLIENT_T1_8 faulted @ 0x7f7c_9fe00000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE\n";
        let r = parse_record(raw).unwrap();
        assert!(
            r.text()
                .starts_with("NVRM: Xid (PCI:0000:00:06): 31, pid=447")
        );
        assert!(r.text().ends_with("ACCESS_TYPE_VIRT_WRITE"));
    }

    #[test]
    fn dictionary_values_may_hold_equals_signs_and_escapes() {
        let r = parse_record(b"6,1,2,-;m\n K=a=b\n SPACE=x\\x20y").unwrap();
        assert_eq!(
            r.dict,
            vec![
                ("K".to_string(), "a=b".to_string()),
                ("SPACE".to_string(), "x y".to_string())
            ]
        );
    }

    #[test]
    fn rejects_what_is_not_a_record() {
        assert_eq!(
            parse_record(b"just some text"),
            Err(ParseError::NoHeaderEnd)
        );
        assert!(matches!(
            parse_record(b"x,1,2,-;m"),
            Err(ParseError::BadField {
                field: "priority",
                ..
            })
        ));
        assert!(matches!(
            parse_record(b"6,-1,2,-;m"),
            Err(ParseError::BadField {
                field: "sequence number",
                ..
            })
        ));
        assert!(matches!(
            parse_record(b"6,1,2;m"),
            Err(ParseError::BadField { field: "flags", .. })
        ));
        // A facility above 255 cannot come from the kernel.
        assert!(matches!(
            parse_record(b"4096,1,2,-;m"),
            Err(ParseError::BadField {
                field: "priority",
                ..
            })
        ));
        assert!(matches!(
            parse_record(b"6,1,2,-;m\nnot a dictionary line"),
            Err(ParseError::BadDictLine(_))
        ));
        assert!(matches!(
            parse_record(b"6,1,2,-;m\n NOEQUALS"),
            Err(ParseError::BadDictLine(_))
        ));
    }

    #[test]
    fn the_error_message_says_what_is_wrong() {
        let e = parse_record(b"6,1,zz,-;m").unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel log record with a bad timestamp field \"zz\" in its header; the source is not in /dev/kmsg format"
        );
    }

    fn split(chunks: &[&[u8]]) -> Vec<Result<String, String>> {
        let mut lines = FileRecords::new(0);
        let mut out = Vec::new();
        let mut push = |p: Piece| {
            out.push(match p {
                Piece::Record { raw, .. } => Ok(String::from_utf8(raw).unwrap()),
                Piece::Bad { why, end, .. } => Err(format!("{why} @{end}")),
            })
        };
        for c in chunks {
            lines.feed(c, &mut push);
        }
        lines.finish(&mut push);
        out
    }

    #[test]
    fn file_lines_group_into_records_across_chunks() {
        assert_eq!(
            split(&[b"6,1,1,-;a\n SUB", b"SYSTEM=pci\n\n6,2,2,-;b", b"\n"]),
            vec![
                Ok("6,1,1,-;a\n SUBSYSTEM=pci".to_string()),
                Ok("6,2,2,-;b".to_string())
            ]
        );
        // A last line without a newline still counts in a one-shot read.
        assert_eq!(split(&[b"6,1,1,-;a"]), vec![Ok("6,1,1,-;a".to_string())]);
    }

    #[test]
    fn an_endless_line_is_skipped_and_offsets_stay_true() {
        let big = vec![b'x'; MAX_LINE + 10];
        let got = split(&[b"6,1,1,-;a\n", &big, &big, b"\n6,2,2,-;b\n"]);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Ok("6,1,1,-;a".to_string()));
        assert!(got[1].as_ref().unwrap_err().contains("longer than 16 KiB"));
        assert_eq!(got[2], Ok("6,2,2,-;b".to_string()));
        // The offset of the last record's end counts every skipped byte.
        let mut lines = FileRecords::new(0);
        let mut ends = Vec::new();
        for c in [&b"6,1,1,-;a\n"[..], &big, &big, b"\n6,2,2,-;b\n"] {
            lines.feed(c, &mut |p| ends.push(p.end()));
        }
        lines.finish(&mut |p| ends.push(p.end()));
        let total = 10 + 2 * big.len() as u64 + 1 + 10;
        assert_eq!(ends.last(), Some(&total));
    }
}
