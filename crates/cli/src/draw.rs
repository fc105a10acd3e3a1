//! `idsync graph`: the groups a read discovered and their nesting, as Graphviz DOT or Mermaid —
//! the picture users of the old tool drew by hand. Each group shows its name, its direct users and
//! service principals, and the search depth it was found at; each edge, parent to nested group,
//! carries the depth of the group it leads to. Edges to groups beyond the search depth are drawn
//! dashed to a "not read" node, so the limit is visible.

use idsync_model::{Kind, Snapshot};
use std::collections::BTreeMap;
use std::fmt::Write;

/// The output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Graphviz DOT (`dot -Tsvg`).
    Dot,
    /// Mermaid (`flowchart`), for Markdown and notebooks.
    Mermaid,
}

struct Node {
    label: String,
    depth: Option<u32>,
}

/// The drawing of `s`, with `depth` the search depth each group was found at.
pub fn draw(s: &Snapshot, depth: &BTreeMap<String, u32>, format: Format) -> String {
    // Stable node names: n0, n1, ... in the snapshot's (id) order; ids themselves may hold
    // anything.
    let mut names: BTreeMap<&str, String> = BTreeMap::new();
    let mut nodes: Vec<(String, Node)> = Vec::new();
    for (i, (id, g)) in s.groups.iter().enumerate() {
        let name = format!("n{i}");
        names.insert(id, name.clone());
        let users = g.members.of_kind(Kind::User).count();
        let sps = g
            .members
            .iter()
            .filter(|m| m.kind == Kind::ServicePrincipal)
            .count();
        let d = depth.get(id).copied();
        let mut label = g.display_name.clone();
        label.push_str(&format!("\n{users} users"));
        if sps > 0 {
            label.push_str(&format!(", {sps} service principals"));
        }
        if let Some(d) = d {
            label.push_str(&format!("\ndepth {d}"));
        }
        nodes.push((name, Node { label, depth: d }));
    }
    let mut edges: Vec<(String, String, Option<u32>)> = Vec::new();
    let mut unread = 0usize;
    for (id, g) in &s.groups {
        for m in g.members.groups() {
            match names.get(m.id.as_str()) {
                Some(child) => edges.push((
                    names[id.as_str()].clone(),
                    child.clone(),
                    depth.get(&*m.id).copied(),
                )),
                None => {
                    unread += 1;
                    edges.push((names[id.as_str()].clone(), format!("x{unread}"), None));
                }
            }
        }
    }
    match format {
        Format::Dot => dot(&nodes, &edges, unread),
        Format::Mermaid => mermaid(&nodes, &edges, unread),
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn dot(nodes: &[(String, Node)], edges: &[(String, String, Option<u32>)], unread: usize) -> String {
    let mut out = String::from(
        "digraph groups {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n",
    );
    for (name, n) in nodes {
        let fill = if n.depth == Some(1) {
            ", style=\"rounded,filled\", fillcolor=\"#e8f0fe\""
        } else {
            ""
        };
        let _ = writeln!(out, "  {name} [label=\"{}\"{fill}];", dot_escape(&n.label));
    }
    for i in 1..=unread {
        let _ = writeln!(
            out,
            "  x{i} [label=\"not read\", shape=plaintext, fontcolor=gray];"
        );
    }
    for (from, to, d) in edges {
        match d {
            Some(d) => {
                let _ = writeln!(out, "  {from} -> {to} [label=\"depth {d}\"];");
            }
            None => {
                let _ = writeln!(out, "  {from} -> {to} [style=dashed, color=gray];");
            }
        }
    }
    out.push_str("}\n");
    out
}

/// Mermaid labels: quotes and angle brackets as entities, line breaks as `<br/>`.
fn mermaid_escape(s: &str) -> String {
    s.replace('#', "#35;")
        .replace('&', "#amp;")
        .replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
        .replace('\n', "<br/>")
}

fn mermaid(
    nodes: &[(String, Node)],
    edges: &[(String, String, Option<u32>)],
    unread: usize,
) -> String {
    let mut out = String::from("flowchart LR\n");
    for (name, n) in nodes {
        let _ = writeln!(out, "  {name}[\"{}\"]", mermaid_escape(&n.label));
    }
    for i in 1..=unread {
        let _ = writeln!(out, "  x{i}((\"not read\"))");
    }
    for (from, to, d) in edges {
        match d {
            Some(d) => {
                let _ = writeln!(out, "  {from} -->|depth {d}| {to}");
            }
            None => {
                let _ = writeln!(out, "  {from} -.-> {to}");
            }
        }
    }
    let roots: Vec<&str> = nodes
        .iter()
        .filter(|(_, n)| n.depth == Some(1))
        .map(|(name, _)| name.as_str())
        .collect();
    if !roots.is_empty() {
        out.push_str("  classDef selected fill:#e8f0fe\n");
        let _ = writeln!(out, "  class {} selected", roots.join(","));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use idsync_model::{Group, Member};

    fn group(id: &str, name: &str, members: &[Member]) -> Group {
        Group {
            id: id.into(),
            display_name: name.into(),
            description: None,
            security_enabled: true,
            mail_enabled: false,
            members: members.iter().cloned().collect(),
        }
    }

    fn snapshot() -> (Snapshot, BTreeMap<String, u32>) {
        let mut s = Snapshot::default();
        for g in [
            group(
                "a",
                "Data \"Platform\" <core>",
                &[
                    Member::user("u1"),
                    Member::service_principal("s1"),
                    Member::group("b"),
                ],
            ),
            group(
                "b",
                "O'Brien Équipe",
                &[Member::user("u2"), Member::group("c")],
            ),
        ] {
            s.groups.insert(g.id.clone(), g);
        }
        let depth = [("a".to_owned(), 1), ("b".to_owned(), 2)].into();
        (s, depth)
    }

    #[test]
    fn dot_draws_groups_nesting_depth_and_the_limit() {
        let (s, depth) = snapshot();
        let d = draw(&s, &depth, Format::Dot);
        assert!(d.starts_with("digraph groups {"), "{d}");
        assert!(
            d.contains(
                r#"n0 [label="Data \"Platform\" <core>\n1 users, 1 service principals\ndepth 1""#
            ),
            "{d}"
        );
        assert!(
            d.contains(r#"n1 [label="O'Brien Équipe\n1 users\ndepth 2"];"#),
            "{d}"
        );
        assert!(d.contains(r#"n0 -> n1 [label="depth 2"];"#), "{d}");
        // c was not read (beyond the depth): a dashed edge to a marker.
        assert!(d.contains("n1 -> x1 [style=dashed"), "{d}");
        assert!(d.trim_end().ends_with('}'));
    }

    #[test]
    fn mermaid_escapes_labels_and_marks_the_selected_groups() {
        let (s, depth) = snapshot();
        let m = draw(&s, &depth, Format::Mermaid);
        assert!(m.starts_with("flowchart LR\n"), "{m}");
        assert!(
            m.contains(r#"n0["Data #quot;Platform#quot; #lt;core#gt;<br/>1 users, 1 service principals<br/>depth 1"]"#),
            "{m}"
        );
        assert!(m.contains("n0 -->|depth 2| n1"), "{m}");
        assert!(m.contains("n1 -.-> x1"), "{m}");
        assert!(m.contains("class n0 selected"), "{m}");
    }
}
