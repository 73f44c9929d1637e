//! The human-readable form of a [`Trace`].

use std::fmt::Write as _;

use super::{Stage, Trace, TracedEntry, packet::PacketView};
use crate::ops::list::with_port;

/// Renders a trace as text.
pub fn render_text(trace: &Trace) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "packet    {}, {}", trace.packet.summary, trace.entry);
    match &trace.frontend {
        Some(f) => {
            let service = if f.service.is_empty() {
                "?"
            } else {
                &f.service
            };
            let _ = writeln!(
                out,
                "frontend  {} {} {} (rev-NAT id {})",
                f.frontend,
                service,
                f.flags.join(","),
                f.rev_nat_id
            );
            let backends: Vec<String> = f
                .backends
                .iter()
                .map(|b| {
                    let mut s = with_port(&b.address, b.port);
                    if b.state != "active" {
                        s.push_str(&format!(" ({})", b.state));
                    }
                    s
                })
                .collect();
            let _ = writeln!(
                out,
                "          backends: {}",
                if backends.is_empty() {
                    "none".to_owned()
                } else {
                    backends.join(", ")
                }
            );
        }
        None => {
            let _ = writeln!(out, "frontend  none matched");
        }
    }
    let _ = writeln!(out, "outcome   {}", trace.outcome);
    if let Some(b) = &trace.backend {
        let _ = writeln!(
            out,
            "backend   {} (id {}, {}{})",
            b.backend,
            b.id,
            b.choice,
            if b.node_local {
                ", node-local"
            } else {
                ", not node-local"
            }
        );
    }
    out.push('\n');
    render_stages(&mut out, &trace.packet, &trace.stages);
    if !trace.conntrack.is_empty() {
        let _ = writeln!(out, "conntrack (after the packet):");
        render_entries(&mut out, &trace.conntrack);
    }
    if let Some(reply) = &trace.reply {
        out.push('\n');
        let _ = writeln!(out, "reply from the backend:");
        render_stages(&mut out, &reply.packet, &reply.stages);
        let _ = writeln!(
            out,
            "the client sees the reply from the frontend: {}",
            if reply.from_frontend { "yes" } else { "NO" }
        );
        if !reply.conntrack.is_empty() {
            let _ = writeln!(out, "conntrack changed by the reply:");
            render_entries(&mut out, &reply.conntrack);
        }
    }
    if !trace.events.is_empty() {
        let events: Vec<String> = trace
            .events
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let _ = writeln!(out, "\ndatapath events: {}", events.join(" "));
    }
    if !trace.notes.is_empty() {
        out.push('\n');
        for note in &trace.notes {
            let _ = writeln!(out, "note: {note}");
        }
    }
    out
}

/// The packet `input` through `stages`, each output with its bytes.
fn render_stages(out: &mut String, input: &PacketView, stages: &[Stage]) {
    let _ = writeln!(out, "  in    {}", input.summary);
    for stage in stages {
        let _ = writeln!(
            out,
            "  {} ({}): {}",
            stage.program, stage.hook, stage.verdict
        );
        let _ = writeln!(
            out,
            "  out   {}{}  ({} bytes, checksums {})",
            stage.output.summary,
            if stage.rewritten { "" } else { "  (unchanged)" },
            stage.output.length,
            if stage.output.checksums_valid {
                "valid"
            } else {
                "INVALID"
            }
        );
        if stage.rewritten {
            for line in stage.output.hex.lines() {
                let _ = writeln!(out, "        {line}");
            }
        }
    }
}

/// Conntrack entries, one a line.
fn render_entries(out: &mut String, entries: &[TracedEntry]) {
    for e in entries {
        let mut detail = format!("backend {} rev-NAT {}", e.backend_id, e.rev_nat_id);
        if e.snat_port != 0 {
            detail.push_str(&format!(" snat-port {}", e.snat_port));
        }
        if !e.flags.is_empty() {
            detail.push_str(&format!(" flags {}", e.flags.join(",")));
        }
        detail.push_str(&format!(
            " state {}",
            if e.state.is_empty() {
                "new".to_owned()
            } else {
                e.state.join(",")
            }
        ));
        let _ = writeln!(
            out,
            "  {:<9} {:<13} {} => {}  {} (idle {} s)",
            e.change, e.direction, e.tuple, e.translates_to, detail, e.idle_secs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{
        list::ListedBackend,
        trace::{Reply, TracedBackend, TracedFrontend, packet::describe},
    };

    fn view(summary: &str) -> PacketView {
        PacketView {
            summary: summary.to_owned(),
            hex: "0000  02 00".to_owned(),
            ..describe(&[])
        }
    }

    fn stage(program: &str, verdict: &str, out: &str) -> Stage {
        Stage {
            program: program.to_owned(),
            hook: "tc ingress".to_owned(),
            verdict: verdict.to_owned(),
            output: PacketView {
                checksums_valid: true,
                length: 54,
                ..view(out)
            },
            rewritten: true,
        }
    }

    fn entry(change: &str, direction: &str, state: Vec<&'static str>) -> TracedEntry {
        TracedEntry {
            change: change.to_owned(),
            direction: direction.to_owned(),
            tuple: "10.200.0.2:40000 -> 10.96.0.10:80 TCP".to_owned(),
            translates_to: "10.200.2.2:8080".to_owned(),
            backend_id: 2,
            rev_nat_id: 1,
            snat_port: 0,
            flags: Vec::new(),
            state,
            idle_secs: 0,
            age_secs: 0,
        }
    }

    fn trace() -> Trace {
        Trace {
            packet: view("10.200.0.2:40000 -> 10.96.0.10:80 TCP [SYN]"),
            entry: "from pod".to_owned(),
            outcome: "translated".to_owned(),
            frontend: Some(TracedFrontend {
                service: "demo/web".to_owned(),
                frontend: "10.96.0.10:80/TCP".to_owned(),
                flags: vec!["ClusterIP"],
                rev_nat_id: 1,
                backends: [1, 2]
                    .map(|i| ListedBackend {
                        id: i,
                        address: format!("10.200.{i}.2"),
                        port: 8080,
                        state: if i == 1 { "terminating" } else { "active" },
                        node_local: true,
                    })
                    .into(),
            }),
            backend: Some(TracedBackend {
                backend: "10.200.2.2:8080".to_owned(),
                id: 2,
                choice: "new flow".to_owned(),
                node_local: true,
            }),
            stages: vec![stage(
                "from_pod",
                "TC_ACT_UNSPEC (continue)",
                "10.200.0.2:40000 -> 10.200.2.2:8080 TCP [SYN]",
            )],
            conntrack: vec![entry("created", "forward", Vec::new())],
            reply: Some(Reply {
                packet: view("10.200.2.2:8080 -> 10.200.0.2:40000 TCP [SYN,ACK]"),
                stages: vec![stage(
                    "to_pod",
                    "TC_ACT_UNSPEC (continue)",
                    "10.96.0.10:80 -> 10.200.0.2:40000 TCP [SYN,ACK]",
                )],
                from_frontend: true,
                conntrack: vec![entry("updated", "forward", vec!["seen-reply"])],
            }),
            events: vec![("reply_translated".to_owned(), 1)],
            notes: vec!["backend choice is random".to_owned()],
        }
    }

    #[test]
    fn the_text_says_frontend_backend_stages_conntrack_and_reply_in_order() {
        let text = render_text(&trace());
        let expected_in_order = [
            "packet    10.200.0.2:40000 -> 10.96.0.10:80 TCP [SYN], from pod\n",
            "frontend  10.96.0.10:80/TCP demo/web ClusterIP (rev-NAT id 1)\n",
            "          backends: 10.200.1.2:8080 (terminating), 10.200.2.2:8080\n",
            "outcome   translated\n",
            "backend   10.200.2.2:8080 (id 2, new flow, node-local)\n",
            "  in    10.200.0.2:40000 -> 10.96.0.10:80 TCP [SYN]\n",
            "  from_pod (tc ingress): TC_ACT_UNSPEC (continue)\n",
            "  out   10.200.0.2:40000 -> 10.200.2.2:8080 TCP [SYN]  (54 bytes, checksums valid)\n",
            "        0000  02 00\n",
            "conntrack (after the packet):\n",
            "  created   forward       10.200.0.2:40000 -> 10.96.0.10:80 TCP => 10.200.2.2:8080  backend 2 rev-NAT 1 state new (idle 0 s)\n",
            "reply from the backend:\n",
            "  to_pod (tc ingress): TC_ACT_UNSPEC (continue)\n",
            "  out   10.96.0.10:80 -> 10.200.0.2:40000 TCP [SYN,ACK]",
            "the client sees the reply from the frontend: yes\n",
            "  updated   forward",
            "state seen-reply",
            "datapath events: reply_translated=1\n",
            "note: backend choice is random\n",
        ];
        let mut rest = text.as_str();
        for expected in expected_in_order {
            let at = rest
                .find(expected)
                .unwrap_or_else(|| panic!("{expected:?} missing (in order) from:\n{text}"));
            rest = &rest[at + expected.len()..];
        }
    }

    #[test]
    fn a_packet_left_alone_shows_no_backend_and_no_reply() {
        let mut untouched = trace();
        untouched.frontend = None;
        untouched.backend = None;
        untouched.reply = None;
        untouched.conntrack.clear();
        untouched.outcome = "untouched".to_owned();
        untouched.stages[0].rewritten = false;
        let text = render_text(&untouched);
        assert!(text.contains("frontend  none matched\n"), "{text}");
        assert!(text.contains("(unchanged)"), "{text}");
        for absent in ["backend   ", "reply from", "conntrack (", "0000  02 00"] {
            assert!(!text.contains(absent), "{absent:?} in:\n{text}");
        }
    }
}
