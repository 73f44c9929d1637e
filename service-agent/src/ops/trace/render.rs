//! The human-readable form of a [`Trace`].

use std::fmt::Write as _;

use super::{Stage, Trace, TracedEntry, packet::PacketView};

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
                    let mut s = format!("{}:{}", b.address, b.port);
                    if b.state != "active" {
                        s.push_str(&format!(" ({})", b.state));
                    }
                    if !b.node_local {
                        s.push_str(" (remote)");
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
                ""
            } else {
                ", on another node"
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
