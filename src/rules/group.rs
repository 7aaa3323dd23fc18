//! From classified lines to findings: one finding per fault, however many lines it spans and
//! however often it repeats.
//!
//! A real fault is rarely one line. An amdgpu page fault is six to ten kernel lines; a CUDA error
//! comes with hint lines; an NVIDIA "fallen off the bus" message can put its fault words on its
//! third line; and a broken GPU repeats the same fault a thousand times a second. [`Grouper`]
//! takes lines in order (with their 1-based numbers; lines that are neither fault nor context may
//! be skipped) and makes [`Finding`]s: a fault line, the context lines that joined it (`[[context]]`
//! entries of the rule files), and the repeats of the same rule folded into a count.
//!
//! This is for reading logs (`gpuwarden scan`). The supervisor acts on the first fault line at
//! once and counts repeats itself; it does not wait for a finding to be complete.

use std::collections::{BTreeMap, VecDeque};

use super::prefix::{self, Stamp};
use super::{Examined, Fault, FaultClass, RuleSet, Stream};

/// How many lines apart a context line and the finding it joins may be. The lines of one kernel
/// message come together, but other subsystems (or other ranks) can log in between.
pub const CONTEXT_GAP: usize = 8;

/// How many lines apart two occurrences of one rule may be and still be one storm.
pub const STORM_GAP: usize = 64;

/// How many seconds apart two occurrences of one rule may be and still be one storm, when both
/// lines carry timestamps on the same clock. Lines an hour apart are two incidents, even when
/// nothing was logged in between.
pub const STORM_SECONDS: f64 = 10.0;

/// One fault as a person would count it.
#[derive(Clone, Debug)]
pub struct Finding {
    /// The first line of the finding (1-based): the fault line, or a context line before it.
    pub line: usize,
    /// The last line of the finding: the last context line or repeat that joined it.
    pub end_line: usize,
    /// The first fault line's classification. Its captures are completed from context lines.
    pub fault: Fault,
    /// How many times the rule's fault line appeared (1 unless it was a storm).
    pub count: u64,
    /// When the first and the last occurrence were logged, where the lines say.
    pub first_stamp: Option<Stamp>,
    pub last_stamp: Option<Stamp>,
}

/// A context line that may start the finding after it.
struct Lead {
    line: usize,
    classes: Vec<FaultClass>,
    captures: std::collections::BTreeMap<String, String>,
}

/// Groups classified lines into findings. Feed it lines in order with [`Grouper::push`]; take
/// the findings that can no longer grow with [`Grouper::ready`], and the rest with
/// [`Grouper::finish`].
#[derive(Default)]
pub struct Grouper {
    /// Findings that may still grow, oldest first.
    open: Vec<Finding>,
    /// The finding that a context line after it would join (index into `open`).
    current: Option<usize>,
    /// Recent "before" context lines, oldest first.
    leads: VecDeque<Lead>,
    /// Findings that can no longer grow, by first line (then last line, then closing order):
    /// `ready` takes them from the front, so an old storm that stays open for a million lines
    /// does not make each call look at every finding closed meanwhile.
    closed: BTreeMap<(usize, usize, u64), Finding>,
    /// How many findings have closed, to keep keys of `closed` unique.
    closings: u64,
}

impl Grouper {
    pub fn new() -> Grouper {
        Grouper::default()
    }

    /// Takes line `number` (1-based, increasing). `stream` `None` applies every rule. Returns
    /// whether the line was part of a finding (a fault line or a context line that joined one).
    pub fn push(
        &mut self,
        rules: &RuleSet,
        stream: Option<Stream>,
        number: usize,
        line: &str,
    ) -> bool {
        self.close_before(number);
        let context = match rules.examine(stream, line) {
            Examined::Fault(fault) => {
                self.fault(number, line, fault);
                return true;
            }
            Examined::Context(context) => context,
            Examined::Neither => return false,
        };
        match context.context.joins {
            super::Joins::After => {
                // The finding it follows most closely among those it may join: usually the
                // current one, but a detail line of a reset can follow a hang reported in
                // between.
                let joined = self
                    .open
                    .iter()
                    .enumerate()
                    .filter(|(_, open)| {
                        number - open.end_line <= CONTEXT_GAP
                            && context.context.joins_class(open.fault.class)
                    })
                    .max_by_key(|(i, open)| (open.end_line, self.current == Some(*i)))
                    .map(|(i, _)| i);
                let Some(i) = joined else {
                    return false;
                };
                let finding = &mut self.open[i];
                finding.end_line = number;
                fill(&mut finding.fault, context.captures);
                true
            }
            super::Joins::Before => {
                self.leads.push_back(Lead {
                    line: number,
                    classes: context.context.classes.clone(),
                    captures: context.captures,
                });
                // It may still start nothing; it counts once a fault follows.
                false
            }
        }
    }

    /// A fault line: a repeat of an open finding's rule, or a new finding.
    fn fault(&mut self, number: usize, line: &str, fault: Fault) {
        let stamp = prefix::strip(line).stamp;
        let repeat = self.open.iter().rposition(|open| {
            open.fault.rule == fault.rule
                && number - open.end_line <= STORM_GAP
                && match (stamp, open.last_stamp) {
                    (Some(now), Some(then)) => now
                        .seconds_since(then)
                        .is_none_or(|gap| gap.abs() <= STORM_SECONDS),
                    _ => true,
                }
        });
        // Leads within reach of this line join whichever finding it is part of.
        let mut start = number;
        let mut captures = std::collections::BTreeMap::new();
        self.leads.retain(|lead| {
            let joins = number - lead.line <= CONTEXT_GAP
                && (lead.classes.is_empty() || lead.classes.contains(&fault.class));
            if joins {
                start = start.min(lead.line);
                for (name, value) in &lead.captures {
                    captures
                        .entry(name.clone())
                        .or_insert_with(|| value.clone());
                }
            }
            !joins
        });
        match repeat {
            Some(i) => {
                let open = &mut self.open[i];
                open.count += 1;
                open.end_line = number;
                open.last_stamp = stamp.or(open.last_stamp);
                self.current = Some(i);
            }
            None => {
                let mut fault = fault;
                fill(&mut fault, captures);
                self.open.push(Finding {
                    line: start,
                    end_line: number,
                    fault,
                    count: 1,
                    first_stamp: stamp,
                    last_stamp: stamp,
                });
                self.current = Some(self.open.len() - 1);
            }
        }
    }

    /// Closes the findings that line `number` is too far from to join.
    fn close_before(&mut self, number: usize) {
        self.leads
            .retain(|lead| number.saturating_sub(lead.line) <= CONTEXT_GAP);
        if self
            .open
            .iter()
            .all(|open| number.saturating_sub(open.end_line) <= STORM_GAP)
        {
            return;
        }
        let current = self.current.map(|i| self.open[i].line);
        let (closing, open): (Vec<Finding>, Vec<Finding>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|open| number.saturating_sub(open.end_line) > STORM_GAP);
        self.open = open;
        for finding in closing {
            self.closings += 1;
            self.closed
                .insert((finding.line, finding.end_line, self.closings), finding);
        }
        // `current` pointed into the old list; find it again by its first line, if it is open.
        self.current = current.and_then(|line| self.open.iter().position(|o| o.line == line));
    }

    /// Whether any finding may still grow.
    pub fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// Closes every open finding now (live input went quiet): [`Grouper::ready`] returns them,
    /// and a later repeat of the same rule starts a new finding.
    pub fn close_open(&mut self) {
        for finding in std::mem::take(&mut self.open) {
            self.closings += 1;
            self.closed
                .insert((finding.line, finding.end_line, self.closings), finding);
        }
        self.current = None;
    }

    /// The findings that can no longer grow and that no open finding starts before, in the
    /// order of their first line. What it returns is not returned again.
    pub fn ready(&mut self) -> Vec<Finding> {
        let first_open = self.open.iter().map(|o| o.line).min();
        let mut ready = Vec::new();
        while let Some(entry) = self.closed.first_entry() {
            if first_open.is_some_and(|first| entry.key().0 >= first) {
                break;
            }
            ready.push(entry.remove());
        }
        ready
    }
    /// Every finding not yet returned, in the order of their first line.
    pub fn finish(mut self) -> Vec<Finding> {
        let mut all: Vec<Finding> = std::mem::take(&mut self.closed).into_values().collect();
        all.append(&mut self.open);
        all.sort_by_key(|f| (f.line, f.end_line));
        all
    }
}

/// Adds the captures a context line found that the fault line did not have.
fn fill(fault: &mut Fault, captures: std::collections::BTreeMap<String, String>) {
    for (name, value) in captures {
        fault.captures.entry(name).or_insert(value);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rules() -> RuleSet {
        // A fixture file like the other rule sets the tests load; its faults and contexts are
        // the shapes of block that grouping must handle.
        let text = include_str!("../../tests/rules/grouping/rules.toml");
        RuleSet::build(super::super::file::parse("grouping/rules.toml", text).unwrap()).unwrap()
    }

    fn group(lines: &[&str]) -> Vec<Finding> {
        let rules = rules();
        let mut grouper = Grouper::new();
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            grouper.push(&rules, None, i + 1, line);
            out.extend(grouper.ready());
        }
        out.extend(grouper.finish());
        out
    }

    fn spans(findings: &[Finding]) -> Vec<(usize, usize, &str, u64)> {
        findings
            .iter()
            .map(|f| (f.line, f.end_line, f.fault.rule.as_str(), f.count))
            .collect()
    }

    #[test]
    fn a_page_fault_block_is_one_finding_with_the_pid_of_its_process_line() {
        let found = group(&[
            "[   67.058794] amdgpu 0000:c4:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:153 vmid:8 pasid:32786)",
            "[   67.058806] amdgpu 0000:c4:00.0: amdgpu:  Process python3 pid 3370 thread python3 pid 3370",
            "[   67.058809] amdgpu 0000:c4:00.0: amdgpu:   in page starting at address 0x00007fa4808cb000 from client 10",
            "[   67.058813] amdgpu 0000:c4:00.0: amdgpu: VM_L2_PROTECTION_FAULT_STATUS:0x00801031",
            "[   70.000000] usb 1-1: new high-speed USB device",
        ]);
        assert_eq!(spans(&found), vec![(1, 4, "page-fault", 1)]);
        let captures = &found[0].fault.captures;
        assert_eq!(captures["pid"], "3370");
        assert_eq!(captures["pci"], "0000:c4:00.0");
    }

    #[test]
    fn hint_lines_join_an_error_and_are_nothing_alone() {
        let found = group(&[
            "CUDA kernel errors might be asynchronously reported at some other API call",
            "epoch 1 loss 0.3",
            "RuntimeError: CUDA error: an illegal memory access was encountered",
            "CUDA kernel errors might be asynchronously reported at some other API call",
        ]);
        assert_eq!(spans(&found), vec![(3, 4, "cuda-illegal", 1)]);
    }

    #[test]
    fn a_leading_context_line_starts_the_finding_and_gives_its_device() {
        let found = group(&[
            "NVRM: The NVIDIA GPU 0000:3b:00.0 (PCI ID: 10de:1eb8)",
            "NVRM: installed in this system has",
            "NVRM: fallen off the bus and is not responding to commands.",
        ]);
        assert_eq!(spans(&found), vec![(1, 3, "fallen-off", 1)]);
        assert_eq!(found[0].fault.captures["pci"], "0000:3b:00.0");
    }

    #[test]
    fn a_storm_is_one_finding_with_a_count() {
        let mut lines = Vec::new();
        for i in 0..1000 {
            lines.push(format!(
                "[ 67.{i:06}] amdgpu 0000:c4:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:153 vmid:8 pasid:32786)"
            ));
            lines.push(format!(
                "[ 67.{i:06}] amdgpu 0000:c4:00.0: amdgpu:   in page starting at address 0x{i:x}000 from client 10"
            ));
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let found = group(&refs);
        assert_eq!(spans(&found), vec![(1, 2000, "page-fault", 1000)]);
    }

    #[test]
    fn repeats_far_apart_in_time_or_lines_are_separate_findings() {
        let fault = "amdgpu 0000:c4:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:153 vmid:8 pasid:32786)";
        let a = format!("[  100.0] {fault}");
        let b = format!("[ 3700.0] {fault}");
        assert_eq!(
            spans(&group(&[&a, &b])),
            vec![(1, 1, "page-fault", 1), (2, 2, "page-fault", 1)]
        );
        let mut lines = vec![fault.to_string()];
        lines.extend((0..STORM_GAP).map(|i| format!("step {i}")));
        lines.push(fault.to_string());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let far = STORM_GAP + 2;
        assert_eq!(
            spans(&group(&refs)),
            vec![(1, 1, "page-fault", 1), (far, far, "page-fault", 1)]
        );
    }

    #[test]
    fn a_context_line_too_far_from_its_fault_joins_nothing() {
        let mut lines =
            vec!["RuntimeError: CUDA error: an illegal memory access was encountered".to_string()];
        lines.extend((0..CONTEXT_GAP).map(|i| format!("  File \"train.py\", line {i}")));
        lines.push(
            "CUDA kernel errors might be asynchronously reported at some other API call".into(),
        );
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(spans(&group(&refs)), vec![(1, 1, "cuda-illegal", 1)]);
    }

    #[test]
    fn findings_closed_behind_a_long_storm_wait_for_it_and_keep_line_order() {
        // One fault on every line (a storm that never closes) and an error every 100 lines.
        let rules = rules();
        let mut grouper = Grouper::new();
        let storm = "amdgpu 0000:c4:00.0: amdgpu: [gfxhub] page fault (src_id:0 ring:153 vmid:8 pasid:32786)";
        let error = "RuntimeError: CUDA error: an illegal memory access was encountered";
        let mut early = 0;
        for n in 1..=20_000 {
            let line = if n % 100 == 0 { error } else { storm };
            grouper.push(&rules, None, n, line);
            early += grouper.ready().len();
        }
        assert_eq!(
            early, 0,
            "nothing is ready while the storm that started first is open"
        );
        let all = grouper.finish();
        assert_eq!(
            all.len(),
            1 + 200,
            "the storm, and each error (100 lines apart)"
        );
        assert_eq!((all[0].line, all[0].count), (1, 20_000 - 200));
        assert!(all.windows(2).all(|w| w[0].line < w[1].line));
    }

    #[test]
    fn findings_come_out_in_line_order_as_soon_as_they_are_complete() {
        let rules = rules();
        let mut grouper = Grouper::new();
        grouper.push(
            &rules,
            None,
            1,
            "RuntimeError: CUDA error: an illegal memory access was encountered",
        );
        assert!(grouper.ready().is_empty(), "could still grow");
        grouper.push(
            &rules,
            None,
            2 + STORM_GAP,
            "NVRM: fallen off the bus and is not responding",
        );
        let ready = grouper.ready();
        assert_eq!(spans(&ready), vec![(1, 1, "cuda-illegal", 1)]);
        assert!(grouper.ready().is_empty());
        assert_eq!(
            spans(&grouper.finish()),
            vec![(2 + STORM_GAP, 2 + STORM_GAP, "fallen-off", 1)]
        );
    }
}
