//! Human-readable output: plans grouped by kind with a summary line, apply reports, halts. Colour
//! only when stdout is a terminal and `NO_COLOR` is unset.

use idsync_engine::ApplyReport;
use idsync_model::{Halt, Kind, Observation, Op, PRef, Plan, ReadMode, Stage};
use idsync_runner::Mode;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};

/// Writes human output to stdout.
pub struct Printer {
    colour: bool,
    verbose: bool,
    out: Box<dyn Write>,
}

const MEMBER_PREVIEW: usize = 8;

/// Text from a source, a target or a server, made safe to print: control characters (escape
/// sequences that clear the screen or hide lines, newlines that fake plan lines, carriage returns)
/// and bidirectional overrides (which reorder what a reviewer reads) are shown as `\u{…}`
/// escapes, as `{:?}` shows them.
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The sections of a printed plan, in order.
const SECTIONS: [&str; 5] = [
    "users",
    "service principals",
    "groups",
    "memberships",
    "deprovisioning",
];

/// Which of [`SECTIONS`] an operation is shown under.
fn section(op: &Op) -> usize {
    match (op.stage(), op.subject().0) {
        (Stage::Principals, Kind::User) => 0,
        (Stage::Principals, Kind::ServicePrincipal) => 1,
        (Stage::Principals, Kind::Group) => 2,
        (Stage::Members, _) => 3,
        (Stage::Deprovision, _) => 4,
    }
}

impl Printer {
    /// A printer on stdout.
    pub fn stdout(verbose: bool) -> Self {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Printer {
            colour,
            verbose,
            out: Box::new(std::io::stdout()),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    fn emit(&mut self, s: &str) {
        let out = &mut self.out;
        idsync_engine::progress::suspend(|| {
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        });
    }

    /// A heading line.
    pub fn heading(&mut self, s: &str) {
        let line = format!("\n{}\n", self.paint("1", &clean(s)));
        self.emit(&line);
    }

    /// A remark.
    pub fn note(&mut self, s: &str) {
        let line = format!("  · {}\n", clean(s));
        self.emit(&line);
    }

    /// Prints a plan.
    pub fn plan(&mut self, plan: &Plan, target: &str, mode: Mode) {
        let read = match plan.mode {
            ReadMode::Full => "full read",
            ReadMode::Incremental => "incremental read",
        };
        let mut s = String::new();
        let observed = match &plan.observation {
            Observation::Full => String::new(),
            Observation::Incremental { read, touched, .. } => {
                let mut o = "; target as last applied".to_owned();
                if *read > 0 {
                    let _ = write!(o, ", {read} principal(s) read live");
                }
                if let Some(n) = touched.filter(|n| *n > 0) {
                    let _ = write!(o, ", planned on the change ({n} principal(s))");
                }
                o
            }
        };
        let _ = writeln!(
            s,
            "\n{} {} ({read}, state version {}{observed}) → {}",
            self.paint("1", "Plan for"),
            self.paint("1", &clean(&plan.agreement)),
            plan.state_version,
            clean(target)
        );
        for (i, title) in SECTIONS.iter().enumerate() {
            let ops: Vec<&Op> = plan.ops.iter().filter(|o| section(o) == i).collect();
            if ops.is_empty() {
                continue;
            }
            let _ = writeln!(s, "  {title}");
            for op in ops {
                let _ = writeln!(s, "    {}", self.op_line(op));
            }
        }
        if !plan.conflicts.is_empty() {
            let _ = writeln!(
                s,
                "  {}",
                self.paint("31;1", &format!("conflicts ({})", plan.conflicts.len()))
            );
            for c in &plan.conflicts {
                let _ = writeln!(
                    s,
                    "    {} {}: {}",
                    self.paint("31", "!"),
                    clean(&c.key.to_string()),
                    clean(&c.reason)
                );
            }
        }
        if !plan.notes.is_empty() {
            let _ = writeln!(s, "  notes");
            for n in &plan.notes {
                let _ = writeln!(s, "    · {}", clean(n));
            }
        }
        let _ = writeln!(s, "  {}", self.summary(plan));
        match mode {
            Mode::Plan if !plan.is_empty() => {
                let _ = writeln!(s, "  (plan only: nothing was written)");
            }
            Mode::PrincipalsOnly if plan.stage_ops(Stage::Members).next().is_some() => {
                let _ = writeln!(
                    s,
                    "  (--dry-run-members: principals are applied; membership changes above are not)"
                );
            }
            _ => {}
        }
        self.emit(&s);
    }

    fn summary(&self, plan: &Plan) -> String {
        if plan.is_empty() && plan.conflicts.is_empty() {
            if plan.held_back > 0 {
                return self.paint(
                    "33",
                    &format!(
                        "nothing to do but {} operation(s) held back: quarantined, or left out by --only (see the notes)",
                        plan.held_back
                    ),
                );
            }
            return self.paint("32", "in sync: nothing to do");
        }
        let count = |name: &str| -> usize {
            plan.summary
                .ops
                .iter()
                .filter(|(k, _)| k.split(' ').next() == Some(name))
                .map(|(_, v)| v)
                .sum()
        };
        let mut parts = vec![
            format!("{} to create", count("create")),
            format!("{} to update", count("update")),
            format!(
                "+{} / -{} members",
                plan.summary.members_added, plan.summary.members_removed
            ),
        ];
        if count("adopt") > 0 {
            parts.push(format!("{} to adopt", count("adopt")));
        }
        if count("attachPolicies") > 0 {
            parts.push(format!("{} policy attachments", count("attachPolicies")));
        }
        parts.push(format!("{} to deactivate", count("deactivate")));
        parts.push(format!("{} to delete", count("delete")));
        if plan.summary.kept > 0 {
            parts.push(format!("{} kept (deprovision = none)", plan.summary.kept));
        }
        if !plan.conflicts.is_empty() {
            parts.push(format!("{} conflicts", plan.conflicts.len()));
        }
        format!("summary: {}", parts.join(", "))
    }

    fn members(&self, ms: &[PRef]) -> String {
        let shown = if self.verbose {
            ms.len()
        } else {
            ms.len().min(MEMBER_PREVIEW)
        };
        let mut names: Vec<String> = ms[..shown]
            .iter()
            .map(|m| clean(&m.key).into_owned())
            .collect();
        if shown < ms.len() {
            names.push(format!(
                "… and {} more (--verbose shows all)",
                ms.len() - shown
            ));
        }
        names.join(", ")
    }

    fn op_line(&self, op: &Op) -> String {
        match op {
            Op::Create { principal, .. } => {
                let mut extra = Vec::new();
                if let Some(d) = &principal.display_name {
                    extra.push(format!("displayName {d:?}"));
                }
                if !principal.active {
                    extra.push("inactive".into());
                }
                let extra = if extra.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", extra.join(", "))
                };
                format!(
                    "{} create  {:?}{extra}",
                    self.paint("32", "+"),
                    principal.key
                )
            }
            Op::Update {
                target, changes, ..
            } => {
                let cs: Vec<String> = changes
                    .iter()
                    .map(|c| {
                        let (from, to) = (c.from.to_string(), c.to.to_string());
                        format!("{}: {} → {}", c.attr, clean(&from), clean(&to))
                    })
                    .collect();
                format!(
                    "{} update  {:?}  {}",
                    self.paint("33", "~"),
                    target.key,
                    cs.join("; ")
                )
            }
            Op::Adopt { target, .. } => {
                format!(
                    "{} adopt   {:?} (id {})",
                    self.paint("36", "&"),
                    target.key,
                    clean(target.id.as_deref().unwrap_or("?"))
                )
            }
            Op::Forget { target } => format!(
                "{} forget  {:?} (gone from the target)",
                self.paint("36", "·"),
                target.key
            ),
            Op::AttachPolicies { group, policies } => {
                format!(
                    "{} attach  {:?}  policies {}",
                    self.paint("32", "+"),
                    group.key,
                    clean(&policies.join(", "))
                )
            }
            Op::DetachPolicies { group, policies } => {
                format!(
                    "{} detach  {:?}  policies {}",
                    self.paint("31", "-"),
                    group.key,
                    clean(&policies.join(", "))
                )
            }
            Op::AddMembers { group, members } => {
                format!(
                    "{} {:?} += {}",
                    self.paint("32", "+"),
                    group.key,
                    self.members(members)
                )
            }
            Op::RemoveMembers { group, members } => {
                format!(
                    "{} {:?} -= {}",
                    self.paint("31", "-"),
                    group.key,
                    self.members(members)
                )
            }
            Op::Deactivate { target } => format!(
                "{} deactivate  {} {:?}",
                self.paint("31", "-"),
                target.kind,
                target.key
            ),
            Op::Delete { target, .. } => format!(
                "{} delete  {} {:?}",
                self.paint("31", "-"),
                target.kind,
                target.key
            ),
        }
    }

    /// Prints an apply report.
    pub fn report(&mut self, r: &ApplyReport) {
        let mut s = String::new();
        let line = format!("  applied: {}", clean(&r.to_string()));
        let _ = writeln!(
            s,
            "{}",
            if r.is_success() {
                self.paint("32", &line)
            } else {
                self.paint("31", &line)
            }
        );
        for f in &r.failed {
            let (k, key) = f.op.subject();
            let _ = writeln!(
                s,
                "    {} {k} {key:?}: {}",
                self.paint("31", "failed"),
                clean(&f.error)
            );
        }
        for f in &r.skipped {
            let (k, key) = f.op.subject();
            let _ = writeln!(s, "    skipped {k} {key:?}: {}", clean(&f.error));
        }
        for k in &r.quarantine.quarantined {
            let _ = writeln!(
                s,
                "    {} {}: its writes failed in several runs in a row; later runs hold it back and try it again at growing intervals (`idsync state show`, `idsync agreement release {}`)",
                self.paint("33", "quarantined"),
                clean(k),
                clean(k)
            );
        }
        for k in &r.quarantine.released {
            let _ = writeln!(s, "    released {}: it succeeded", clean(k));
        }
        if let Some(why) = &r.quarantine.halted {
            let _ = writeln!(
                s,
                "  {} {}; later runs write nothing until `idsync agreement resume`",
                self.paint("31;1", "agreement halted:"),
                clean(why)
            );
        }
        if let Some(rb) = &r.rollback {
            let _ = writeln!(
                s,
                "  {} {}: {} operation(s) undone",
                self.paint("31;1", "rolled back:"),
                clean(&rb.reason),
                rb.undone
            );
            for f in &rb.failed {
                let (k, key) = f.op.subject();
                let _ = writeln!(
                    s,
                    "    {} {k} {key:?}: {}",
                    self.paint("31", "not undone"),
                    clean(&f.error)
                );
            }
            let _ = writeln!(
                s,
                "{}",
                if rb.complete() {
                    "  the target is as it was before this run; fix the cause and run again"
                } else {
                    "  what was not undone stays in the journal; the next run undoes it before anything else"
                }
            );
        } else if !r.is_success() {
            let _ = writeln!(
                s,
                "  the state records what succeeded; the next run retries the rest"
            );
        }
        self.emit(&s);
    }

    /// Prints why a run halted.
    pub fn halt(&mut self, h: &Halt) {
        let s = format!(
            "  {} {}\n",
            self.paint("31;1", "halted:"),
            clean(&h.message)
        );
        self.emit(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_shown_escaped() {
        assert_eq!(clean("plain Ünal \"q\""), "plain Ünal \"q\"");
        assert_eq!(
            clean("evil\u{1b}[2J\u{1b}[31mred"),
            "evil\\u{1b}[2J\\u{1b}[31mred"
        );
        assert_eq!(clean("a\nb\rc\td"), "a\\u{a}b\\u{d}c\\u{9}d");
        assert_eq!(clean("x\u{202e}gnp.exe"), "x\\u{202e}gnp.exe");
        assert_eq!(clean("\u{2067}y\u{2069}"), "\\u{2067}y\\u{2069}");
        assert_eq!(clean("\u{85}\u{7f}"), "\\u{85}\\u{7f}");
    }

    #[test]
    fn a_plan_with_hostile_names_prints_no_control_character() {
        use idsync_model::{Conflict, PKey, PRef};
        let evil = "evil\u{1b}[2J\u{1b}[8m\n    - delete user \"ceo\"\u{202e}";
        let r = |kind, id: &str| PRef {
            kind,
            key: evil.into(),
            id: Some(id.to_owned()),
        };
        let plan = Plan {
            format: 1,
            agreement: "a".into(),
            state_version: 0,
            mode: ReadMode::Full,
            ops: vec![Op::AddMembers {
                group: r(Kind::Group, "g1"),
                members: vec![r(Kind::User, "u1")],
            }],
            conflicts: vec![Conflict {
                key: PKey::new(Kind::User, evil),
                sources: vec![],
                target_id: None,
                reason: evil.to_owned(),
            }],
            notes: vec![evil.to_owned()],
            halt: None,
            summary: Default::default(),
            observation: Observation::Full,
            trust: None,
            approved_deletions: 0,
            held_back: 0,
        };
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut p = Printer {
            colour: true,
            verbose: true,
            out: Box::new(Shared(buf.clone())),
        };
        p.plan(&plan, evil, Mode::Plan);
        p.note(evil);
        p.heading(evil);
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        for line in text.lines() {
            // The printer's own colours are the only escape sequences, each a colour code.
            let without_colours = strip_colours(line);
            assert!(
                !without_colours
                    .chars()
                    .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c)),
                "{line:?}"
            );
            assert!(
                !line.trim_start().starts_with("- delete"),
                "a faked line: {line:?}"
            );
        }
    }

    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Removes `ESC [ digits;… m` colour codes.
    fn strip_colours(line: &str) -> String {
        let mut out = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' && chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d == 'm' {
                        break;
                    }
                    assert!(
                        d.is_ascii_digit() || d == ';',
                        "not a colour code: {line:?}"
                    );
                }
            } else {
                out.push(c);
            }
        }
        out
    }
}
