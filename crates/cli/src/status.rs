//! The status page of `idsync run --listen`, at `/`: read-only HTML with no script and no request
//! off the machine (styles and the picture are inline). For each agreement: its status, its last
//! run (outcome, when, how long) and the next, the principals it owns by kind, whether the picture
//! is trusted; the quarantined principals; the latest changes from the change log; and the scope's
//! nested groups, as last applied, drawn as an SVG.
//!
//! The page is made when it is asked for, from the state store (each agreement's state, the last
//! week of the change log) and what this process saw of its runs; nobody looking costs nothing.
//! It shows principals' names: keep the listener on loopback or the pod network.

use idsync_model::{AgreementState, AgreementStatus, Kind, Snapshot};
use idsync_state::StateStore;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One agreement's last run, as this process saw it.
#[derive(Clone, Debug)]
pub struct LastRun {
    /// When it ended (Unix time).
    pub at: u64,
    /// `success`, `pending`, `halted`, `busy` or `failure`.
    pub outcome: &'static str,
    /// Its exit code.
    pub code: u8,
    /// How long it took.
    pub took: Duration,
    /// Operations applied and failed.
    pub applied: usize,
    /// Operations that failed.
    pub failed: usize,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// Where the service keeps its state, and its agreements (from the configuration in force).
struct Source {
    store: Arc<dyn StateStore>,
    location: String,
    agreements: Vec<String>,
}

/// What the service knows that the state does not: its runs, its schedule.
#[derive(Default)]
pub struct Board {
    runs: Mutex<BTreeMap<String, LastRun>>,
    next: Mutex<Option<u64>>,
    source: Mutex<Option<Arc<Source>>>,
    started: u64,
    /// The page last made, and when: pages asked for within [`FRESH`] of it get it again.
    made: Mutex<Option<(std::time::Instant, String)>>,
    /// One page is made at a time (each reads every agreement's state).
    making: tokio::sync::Mutex<()>,
}

/// How long a page made is served again.
const FRESH: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Board(..)")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Board {
    /// An empty board, started now.
    pub fn new() -> Board {
        Board {
            started: idsync_runner::unix_now(),
            ..Board::default()
        }
    }

    /// An agreement's run ended.
    pub fn record(&self, name: &str, run: LastRun) {
        lock(&self.runs).insert(name.to_owned(), run);
        // A run that ended shows at once.
        *lock(&self.made) = None;
    }

    fn fresh(&self) -> Option<String> {
        lock(&self.made)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < FRESH)
            .map(|(_, page)| page.clone())
    }

    /// When the next cycle starts (Unix time).
    pub fn next_cycle(&self, at: u64) {
        *lock(&self.next) = Some(at);
    }

    /// The state store and the agreements of the configuration in force.
    pub fn configure(&self, store: Box<dyn StateStore>, location: &str, agreements: Vec<String>) {
        *lock(&self.source) = Some(Arc::new(Source {
            store: Arc::from(store),
            location: location.to_owned(),
            agreements,
        }));
    }

    /// The page, from the state store and this process's runs: made at most once per [`FRESH`],
    /// one at a time, however often it is asked for.
    pub async fn page(&self) -> String {
        if let Some(p) = self.fresh() {
            return p;
        }
        let _one = self.making.lock().await;
        if let Some(p) = self.fresh() {
            return p;
        }
        let page = self.make().await;
        *lock(&self.made) = Some((std::time::Instant::now(), page.clone()));
        page
    }

    async fn make(&self) -> String {
        let source = lock(&self.source).clone();
        let mut view = View {
            now: idsync_runner::unix_now(),
            started: self.started,
            next: *lock(&self.next),
            runs: lock(&self.runs).clone(),
            location: String::new(),
            agreements: Vec::new(),
            changes: Vec::new(),
            problems: Vec::new(),
        };
        let Some(source) = source else {
            return render(&view);
        };
        view.location = source.location.clone();
        for name in &source.agreements {
            match source.store.load(name).await {
                Ok(state) => view.agreements.push((name.clone(), state)),
                Err(e) => {
                    view.problems
                        .push(format!("the state of {name} cannot be read: {e}"));
                    view.agreements.push((name.clone(), None));
                }
            }
        }
        let (week_ago, _, _) =
            idsync_runner::changes::day_time(view.now.saturating_sub(7 * 86_400));
        match source.store.changes(None, Some(&week_ago)).await {
            Ok(objects) => {
                let (records, _) = idsync_runner::changes::parse(&objects);
                view.changes = records.into_iter().rev().take(LATEST).collect();
            }
            Err(e) => view
                .problems
                .push(format!("the change log cannot be read: {e}")),
        }
        render(&view)
    }
}

/// Changes shown.
const LATEST: usize = 25;
/// Groups drawn at most.
const DRAWN: usize = 120;

/// Everything the page shows.
struct View {
    now: u64,
    started: u64,
    next: Option<u64>,
    runs: BTreeMap<String, LastRun>,
    location: String,
    agreements: Vec<(String, Option<AgreementState>)>,
    changes: Vec<idsync_runner::changes::Change>,
    problems: Vec<String>,
}

/// Escapes text for HTML and SVG.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn utc(t: u64) -> String {
    idsync_runner::changes::day_time(t).2
}

/// A time of day when `t` falls on the same UTC day as `now`, else the whole time.
fn short(now: u64, t: u64) -> String {
    let (day, _, full) = idsync_runner::changes::day_time(t);
    if day == idsync_runner::changes::day_time(now).0 {
        full[11..].to_owned()
    } else {
        full
    }
}

/// "3m ago", "in 12m".
fn relative(now: u64, t: u64) -> String {
    let (d, past) = if t <= now {
        (now - t, true)
    } else {
        (t - now, false)
    };
    let span = match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        3600..86_400 => format!("{}h{:02}m", d / 3600, d % 3600 / 60),
        _ => format!("{}d", d / 86_400),
    };
    if past {
        format!("{span} ago")
    } else {
        format!("in {span}")
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}\
.meta{color:#5a6272}table{border-collapse:collapse;background:#fff}\
th,td{border:1px solid #d9dde5;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#eef1f6}td{white-space:nowrap}td.e{white-space:normal;max-width:40em}td.n{text-align:right}.ok{color:#1a7f37}.warn{color:#9a6700}.bad{color:#cf222e}\
.none{color:#5a6272;font-style:italic}svg{background:#fff;border:1px solid #d9dde5}";

fn outcome_class(outcome: &str) -> &'static str {
    match outcome {
        "success" => "ok",
        "pending" | "busy" => "warn",
        _ => "bad",
    }
}

fn render(v: &View) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"30\">\
<title>idsync status</title><style>{STYLE}</style></head><body><h1>idsync status</h1><p class=\"meta\">"
    );
    let _ = write!(
        h,
        "idsync {} · up since {} ({}) · page made {}",
        env!("CARGO_PKG_VERSION"),
        utc(v.started),
        relative(v.now, v.started),
        utc(v.now)
    );
    if !v.location.is_empty() {
        let _ = write!(h, " · state: <code>{}</code>", esc(&v.location));
    }
    match v.next {
        Some(t) => {
            let _ = write!(
                h,
                " · next cycle {} ({})",
                utc(t),
                relative(v.now, t.max(v.now))
            );
        }
        None => h.push_str(" · the first cycle is running"),
    }
    h.push_str("</p>");
    for p in &v.problems {
        let _ = write!(h, "<p class=\"bad\">{}</p>", esc(p));
    }

    // Agreements.
    h.push_str("<h2>Agreements</h2><table><tr><th>agreement</th><th>status</th><th>last run</th><th>outcome</th><th>took</th><th>applied / failed</th><th>next run</th><th>users</th><th>service principals</th><th>groups</th><th>quarantined</th><th>picture</th></tr>");
    for (name, state) in &v.agreements {
        let run = v.runs.get(name);
        let status = match state {
            None => "<span class=\"none\">no state yet</span>".to_owned(),
            Some(s) if s.halted.is_some() => "<span class=\"bad\">halted</span>".to_owned(),
            Some(s) => match s.status {
                AgreementStatus::Active => "<span class=\"ok\">active</span>".to_owned(),
                AgreementStatus::Finalised => "finalised".to_owned(),
                AgreementStatus::Terminated => "terminated".to_owned(),
            },
        };
        let _ = write!(h, "<tr><td>{}</td><td>{status}</td>", esc(name));
        match run {
            Some(r) => {
                let _ = write!(
                    h,
                    "<td title=\"{}\">{} ({})</td><td class=\"{}\">{} (exit {})</td><td class=\"n\">{:.1}s</td><td class=\"n\">{} / {}</td>",
                    utc(r.at),
                    short(v.now, r.at),
                    relative(v.now, r.at),
                    outcome_class(r.outcome),
                    r.outcome,
                    r.code,
                    r.took.as_secs_f64(),
                    r.applied,
                    r.failed
                );
            }
            None => h.push_str(
                "<td class=\"none\">not yet by this process</td><td></td><td></td><td></td>",
            ),
        }
        let _ = write!(
            h,
            "<td>{}</td>",
            v.next
                .map(|t| short(v.now, t.max(v.now)))
                .unwrap_or_default()
        );
        match state {
            Some(s) => {
                let quarantined = s.failing.values().filter(|f| f.until > v.now).count();
                let _ = write!(
                    h,
                    "<td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n{}\">{quarantined}</td><td>{}</td></tr>",
                    s.owned.get(Kind::User).len(),
                    s.owned.get(Kind::ServicePrincipal).len(),
                    s.owned.get(Kind::Group).len(),
                    if quarantined > 0 { " bad" } else { "" },
                    if s.trust.is_some() {
                        "trusted"
                    } else {
                        "observed in full next run"
                    }
                );
            }
            None => h.push_str("<td></td><td></td><td></td><td></td><td></td></tr>"),
        }
    }
    h.push_str("</table>");
    let errors: Vec<(&String, &LastRun)> =
        v.runs.iter().filter(|(_, r)| r.error.is_some()).collect();
    for (name, r) in errors {
        let _ = write!(
            h,
            "<p class=\"bad\">{}: {}</p>",
            esc(name),
            esc(r.error.as_deref().unwrap_or_default())
        );
    }
    for (name, s) in &v.agreements {
        if let Some(why) = s.as_ref().and_then(|s| s.halted.as_deref()) {
            let _ = write!(
                h,
                "<p class=\"bad\">{} is halted: {} (<code>idsync agreement resume {}</code>)</p>",
                esc(name),
                esc(why),
                esc(name)
            );
        }
    }

    // Quarantined principals.
    h.push_str("<h2>Quarantined principals</h2>");
    let mut any = false;
    for (name, s) in &v.agreements {
        let Some(s) = s else { continue };
        for (key, f) in s.failing.iter().filter(|(_, f)| f.until > v.now) {
            if !any {
                h.push_str("<table><tr><th>agreement</th><th>principal</th><th>failed runs in a row</th><th>since</th><th>tried again</th><th>last error</th></tr>");
                any = true;
            }
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"e\">{}</td></tr>",
                esc(name),
                esc(key),
                f.runs,
                utc(f.since),
                utc(f.until),
                esc(&f.error)
            );
        }
    }
    if any {
        h.push_str("</table>");
    } else {
        h.push_str("<p class=\"none\">none</p>");
    }

    // The change log.
    let _ = write!(
        h,
        "<h2>Latest changes</h2><p class=\"meta\">the last {LATEST} of the past week, newest first; <code>idsync log</code> has them all</p>"
    );
    if v.changes.is_empty() {
        h.push_str("<p class=\"none\">none</p>");
    } else {
        h.push_str("<table><tr><th>time</th><th>agreement</th><th>operation</th><th>principal</th><th>result</th><th>error</th></tr>");
        for c in &v.changes {
            let class = if c.result == "applied" { "ok" } else { "bad" };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{}{}</td><td class=\"e\">{}</td></tr>",
                esc(&c.time),
                esc(&c.agreement),
                esc(&c.op),
                esc(&c.principal),
                esc(&c.result),
                if c.rolled_back { " (rolled back)" } else { "" },
                esc(c.error.as_deref().unwrap_or_default())
            );
        }
        h.push_str("</table>");
    }

    // The nested groups, from the first agreement with an applied snapshot (the scope is shared).
    h.push_str("<h2>Nested groups</h2>");
    match v.agreements.iter().find_map(|(name, s)| {
        s.as_ref()
            .and_then(|s| s.last_applied.as_ref())
            .map(|snap| (name, snap))
    }) {
        Some((name, snap)) => {
            let _ = write!(
                h,
                "<p class=\"meta\">the scope's groups as last applied to {}: an arrow goes from a group to a group nested in it</p>",
                esc(name)
            );
            h.push_str(&nesting_svg(snap));
        }
        None => h.push_str("<p class=\"none\">nothing applied yet</p>"),
    }
    h.push_str("</body></html>\n");
    h
}

/// A layered drawing of the groups and their nesting: groups no other group holds on the first
/// row, the groups nested in them on the next, and so on (a group reached again, as in a cycle,
/// keeps its first row and the edge back is dashed). At most [`DRAWN`] groups are drawn.
pub fn nesting_svg(s: &Snapshot) -> String {
    fn nested<'s>(s: &'s Snapshot, g: &'s idsync_model::Group) -> Vec<&'s str> {
        g.members
            .groups()
            .filter(|m| s.groups.contains_key(&*m.id))
            .map(|m| m.id.as_str())
            .collect()
    }
    let held: BTreeSet<&str> = s.groups.values().flat_map(|g| nested(s, g)).collect();
    // Breadth first from the roots (then from whatever a cycle kept out of reach).
    let mut row: BTreeMap<&str, usize> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    let mut starts: Vec<&str> = s
        .groups
        .keys()
        .map(String::as_str)
        .filter(|id| !held.contains(id))
        .collect();
    starts.extend(s.groups.keys().map(String::as_str));
    for start in starts {
        if row.contains_key(start) || order.len() >= DRAWN {
            continue;
        }
        let mut queue = VecDeque::from([(start, 0usize)]);
        row.insert(start, 0);
        while let Some((id, r)) = queue.pop_front() {
            if order.len() >= DRAWN {
                row.remove(id);
                continue;
            }
            order.push(id);
            for child in s.groups.get(id).map(|g| nested(s, g)).unwrap_or_default() {
                if !row.contains_key(child) {
                    row.insert(child, r + 1);
                    queue.push_back((child, r + 1));
                }
            }
        }
    }
    row.retain(|id, _| order.contains(id));
    if order.is_empty() {
        return "<p class=\"none\">no groups</p>".into();
    }
    // Place each row's groups left to right, by name.
    let mut rows: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for id in &order {
        rows.entry(row[id]).or_default().push(id);
    }
    let name = |id: &str| -> String {
        let n = s.groups.get(id).map_or(id, |g| g.display_name.as_str());
        if n.chars().count() > 26 {
            format!("{}…", n.chars().take(25).collect::<String>())
        } else {
            n.to_owned()
        }
    };
    const H: u32 = 44;
    const GAP: u32 = 18;
    const ROW: u32 = 96;
    /// A level wider than this wraps onto more lines.
    const WRAP: u32 = 1200;
    let mut place: BTreeMap<&str, (u32, u32, u32)> = BTreeMap::new();
    let mut width = 0;
    let mut y = 16;
    for ids in rows.values_mut() {
        ids.sort_by_key(|id| name(id).to_lowercase());
        let mut x = GAP;
        for id in ids.iter() {
            let w = (name(id).chars().count() as u32 * 8 + 24).clamp(110, 240);
            if x > GAP && x + w > WRAP {
                x = GAP;
                y += ROW;
            }
            place.insert(id, (x, y, w));
            x += w + GAP;
            width = width.max(x);
        }
        y += ROW;
    }
    let height = y - ROW + H + 16;
    // The edges that close a cycle: back edges of a depth-first walk. Only those are dashed; an
    // edge to a group on the same or an earlier row is not a cycle by itself.
    let mut back: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    for root in &order {
        if done.contains(root) {
            continue;
        }
        // (group, its children, the next child to look at); the stack is the current path.
        let mut stack: Vec<(&str, Vec<&str>, usize)> = Vec::new();
        let mut on_path: BTreeSet<&str> = BTreeSet::new();
        let kids = |id: &str| -> Vec<&str> {
            s.groups
                .get(id)
                .map(|g| nested(s, g))
                .unwrap_or_default()
                .into_iter()
                .filter(|c| place.contains_key(c))
                .collect()
        };
        stack.push((root, kids(root), 0));
        on_path.insert(root);
        while let Some((id, children, next)) = stack.last_mut() {
            let id: &str = id;
            if *next < children.len() {
                let child = children[*next];
                *next += 1;
                if on_path.contains(child) {
                    back.insert((id, child));
                } else if !done.contains(child) {
                    on_path.insert(child);
                    stack.push((child, kids(child), 0));
                }
            } else {
                on_path.remove(id);
                done.insert(id);
                stack.pop();
            }
        }
    }
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"nested groups\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"system-ui,sans-serif\" font-size=\"13\">\
<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#5a6272\"/></marker></defs>"
    );
    for id in &order {
        let (px, py, pw) = place[id];
        for child in s.groups.get(*id).map(|g| nested(s, g)).unwrap_or_default() {
            let Some(&(cx, cy, cw)) = place.get(child) else {
                continue;
            };
            let (x1, y1) = (px + pw / 2, py + H);
            let (x2, y2) = (cx + cw / 2, cy);
            let back = back.contains(&(*id, child));
            let mid = (y1 + y2) / 2;
            let _ = write!(
                svg,
                "<path d=\"M{x1},{y1} C{x1},{mid} {x2},{mid} {x2},{y2}\" fill=\"none\" stroke=\"#5a6272\" stroke-width=\"1.4\"{} marker-end=\"url(#arrow)\"/>",
                if back {
                    " stroke-dasharray=\"5 4\""
                } else {
                    ""
                }
            );
        }
    }
    for id in &order {
        let (x, y, w) = place[id];
        let g = &s.groups[*id];
        let users = g.members.of_kind(Kind::User).count();
        let sps = g
            .members
            .iter()
            .filter(|m| m.kind == Kind::ServicePrincipal)
            .count();
        let mut detail = format!("{users} user{}", if users == 1 { "" } else { "s" });
        if sps > 0 {
            let _ = write!(detail, " · {sps} SP{}", if sps == 1 { "" } else { "s" });
        }
        let _ = write!(
            svg,
            "<g><title>{}</title><rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{H}\" rx=\"6\" fill=\"#eef4ff\" stroke=\"#3b6fd8\"/>\
<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"600\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#5a6272\" font-size=\"11\">{detail}</text></g>",
            esc(&g.display_name),
            x + w / 2,
            y + 18,
            esc(&name(id)),
            x + w / 2,
            y + 35
        );
    }
    svg.push_str("</svg>");
    if s.groups.len() > order.len() {
        let _ = write!(
            svg,
            "<p class=\"meta\">{} more groups are not drawn; <code>idsync graph</code> draws them all</p>",
            s.groups.len() - order.len()
        );
    }
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Group, Member};

    fn group(id: &str, name: &str, members: &[(Kind, &str)]) -> (String, Group) {
        let g: Group = serde_json::from_value(serde_json::json!({
            "id": id, "displayName": name,
            "members": members.iter().map(|(k, m)| Member { kind: *k, id: (*m).into() }).collect::<Vec<_>>(),
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        (id.to_owned(), g)
    }

    #[test]
    fn names_are_escaped_and_a_cycle_is_drawn_once_with_a_dashed_edge_back() {
        let mut s = Snapshot::default();
        s.groups.extend([
            group(
                "a",
                "<script>alert(1)</script>",
                &[(Kind::Group, "b"), (Kind::User, "u1")],
            ),
            group("b", "B & co", &[(Kind::Group, "c")]),
            group("c", "C", &[(Kind::Group, "b")]),
        ]);
        let svg = nesting_svg(&s);
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(
            svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{svg}"
        );
        assert!(svg.contains("B &amp; co"), "{svg}");
        assert_eq!(svg.matches("<rect ").count(), 3, "{svg}");
        assert_eq!(svg.matches("marker-end=").count(), 3, "{svg}");
        assert_eq!(svg.matches("stroke-dasharray").count(), 1, "{svg}");
        assert!(svg.contains(">1 user<"), "{svg}");
    }

    #[test]
    fn a_shortcut_is_not_a_cycle() {
        let mut s = Snapshot::default();
        s.groups.extend([
            group("a", "A", &[(Kind::Group, "b"), (Kind::Group, "c")]),
            group("b", "B", &[(Kind::Group, "c")]),
            group("c", "C", &[]),
        ]);
        let svg = nesting_svg(&s);
        assert_eq!(svg.matches("marker-end=").count(), 3, "{svg}");
        assert!(!svg.contains("stroke-dasharray"), "{svg}");
    }

    #[test]
    fn a_large_scope_is_drawn_in_part_and_says_so() {
        let mut s = Snapshot::default();
        for i in 0..(DRAWN + 5) {
            s.groups
                .extend([group(&format!("g{i:04}"), &format!("G{i}"), &[])]);
        }
        let svg = nesting_svg(&s);
        assert_eq!(svg.matches("<rect ").count(), DRAWN);
        assert!(svg.contains("5 more groups are not drawn"), "{svg}");
    }

    #[test]
    fn the_page_shows_runs_quarantine_halts_and_changes_escaped() {
        let now = 1_800_000_000;
        let mut st = AgreementState::new("lake");
        st.failing.insert(
            "user:<b>eve</b>@corp.example".into(),
            idsync_model::Strikes {
                runs: 3,
                error: "lakeFS answered 400".into(),
                since: now - 7200,
                until: now + 3600,
            },
        );
        st.failing.insert(
            "user:fixed@corp.example".into(),
            idsync_model::Strikes {
                runs: 1,
                error: "old".into(),
                since: now - 7200,
                until: 0,
            },
        );
        st.halted = Some("too many failures".into());
        let mut snap = Snapshot::default();
        snap.groups.extend([
            group("g1", "Data", &[(Kind::Group, "g2")]),
            group("g2", "Platform", &[]),
        ]);
        st.last_applied = Some(Arc::new(snap));
        let change: idsync_runner::changes::Change = serde_json::from_value(serde_json::json!({
            "time": "2027-01-15T08:00:00Z", "agreement": "lake", "run": "r1", "op": "create",
            "principal": "user:<img src=x>", "result": "failed", "error": "a \"quoted\" error",
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let v = View {
            now,
            started: now - 600,
            next: Some(now + 1200),
            runs: BTreeMap::from([(
                "lake".to_owned(),
                LastRun {
                    at: now - 60,
                    outcome: "halted",
                    code: 3,
                    took: Duration::from_millis(2500),
                    applied: 7,
                    failed: 2,
                    error: None,
                },
            )]),
            location: "s3://bucket/idsync".into(),
            agreements: vec![("lake".into(), Some(st)), ("dbx".into(), None)],
            changes: vec![change],
            problems: vec![],
        };
        let h = render(&v);
        for want in [
            "<td>lake</td><td><span class=\"bad\">halted</span></td>",
            "halted (exit 3)",
            ">2.5s<",
            ">7 / 2<",
            "(1m ago)",
            "next cycle 2027-01-15T08:20:00Z (in 20m)",
            "lake is halted: too many failures (<code>idsync agreement resume lake</code>)",
            "<td>user:&lt;b&gt;eve&lt;/b&gt;@corp.example</td><td class=\"n\">3</td>",
            "user:&lt;img src=x&gt;",
            "a &quot;quoted&quot; error",
            "<td>dbx</td><td><span class=\"none\">no state yet</span></td>",
            "as last applied to lake",
            ">Platform</text>",
            "state: <code>s3://bucket/idsync</code>",
        ] {
            assert!(h.contains(want), "{want}\n{h}");
        }
        assert!(
            !h.contains("fixed@corp.example"),
            "not quarantined any more"
        );
        assert!(!h.contains("<img") && !h.contains("<b>"), "{h}");
        assert!(!h.contains("<script"), "{h}");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(1000, 940), "1m ago");
        assert_eq!(relative(1000, 1000 + 3600 * 2 + 60), "in 2h01m");
        assert_eq!(relative(1000, 1000), "0s ago");
    }
}
