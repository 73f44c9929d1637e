//! The results of one bench run: every figure with our value, each
//! baseline's value and the ratio, written as `results.json` and as the
//! Markdown tables of `results.md`.

use std::fmt::Write as _;

use serde::Serialize;

use super::stats::Summary;

/// Which part of the system a figure measures (one table each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// Per-packet cost of the eBPF programs (BPF_PROG_TEST_RUN).
    Datapath,
    /// Real TCP traffic through a ClusterIP in namespaces.
    Traffic,
    /// Programming time, change latency and memory of the agent.
    ControlPlane,
    /// The agent's conntrack collector on a large map.
    Conntrack,
}

impl Group {
    /// Every group, in report order.
    pub const ALL: [Group; 4] = [
        Group::Datapath,
        Group::Traffic,
        Group::ControlPlane,
        Group::Conntrack,
    ];

    /// The name on the command line (`--only NAME`).
    pub fn name(self) -> &'static str {
        match self {
            Group::Datapath => "datapath",
            Group::Traffic => "traffic",
            Group::ControlPlane => "control-plane",
            Group::Conntrack => "conntrack",
        }
    }

    /// The table heading.
    pub fn title(self) -> &'static str {
        match self {
            Group::Datapath => "Datapath cost per packet (BPF_PROG_TEST_RUN)",
            Group::Traffic => "Real traffic through a ClusterIP (namespaces, real TCP)",
            Group::ControlPlane => "Control plane",
            Group::Conntrack => "Conntrack collector (one pass of the agent's collector)",
        }
    }
}

/// Whether smaller or larger values are better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// Times, costs, memory.
    Lower,
    /// Rates.
    Higher,
}

/// A baseline measured in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// Short name, also the table column (`floor`, `iptables`, `nftables`).
    pub name: String,
    /// Its value, in the figure's unit (median of its runs).
    pub value: f64,
    /// Its runs, when it was measured several times.
    pub runs: Option<Summary>,
    /// Ours divided by the baseline's value.
    pub ratio: f64,
    /// Whether we are ahead of it; `None` for a reference that cannot be
    /// beaten (the pass-only floor).
    pub ahead: Option<bool>,
}

/// A target from the spec, and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// The target in words, e.g. `< 1 s`.
    pub text: String,
    /// Whether our value meets it.
    pub met: bool,
}

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Its table.
    pub group: Group,
    /// Machine-readable series name, e.g. `tc_new_flow` (for plots).
    pub series: String,
    /// Number of Services programmed, when the figure depends on it.
    pub services: Option<u64>,
    /// Human-readable name.
    pub name: String,
    /// Unit of every value, e.g. `ns/packet`.
    pub unit: String,
    /// Whether lower or higher is better.
    pub better: Better,
    /// Our value (median of our runs).
    pub ours: f64,
    /// Our runs, when measured several times.
    pub ours_runs: Option<Summary>,
    /// The baselines measured next to it.
    pub baselines: Vec<Baseline>,
    /// The spec's target, if it sets one.
    pub target: Option<Target>,
    /// How it was measured, or what to keep in mind.
    pub note: Option<String>,
}

impl Figure {
    /// A figure with our value and no baseline yet.
    pub fn new(group: Group, series: &str, name: String, unit: &str, better: Better) -> Self {
        Figure {
            group,
            series: series.to_owned(),
            services: None,
            name,
            unit: unit.to_owned(),
            better,
            ours: f64::NAN,
            ours_runs: None,
            baselines: Vec::new(),
            target: None,
            note: None,
        }
    }

    /// Sets the Service count.
    pub fn services(mut self, services: u64) -> Self {
        self.services = Some(services);
        self
    }

    /// Sets our value from per-run values (their median).
    pub fn ours_runs(mut self, runs: &[f64]) -> Self {
        if let Some(summary) = Summary::of(runs) {
            self.ours = summary.median;
            self.ours_runs = (runs.len() > 1).then_some(summary);
        }
        self
    }

    /// Sets our value from a single measurement.
    pub fn ours(mut self, value: f64) -> Self {
        self.ours = value;
        self
    }

    /// Adds a competitor measured with per-run values.
    pub fn competitor(self, name: &str, runs: &[f64]) -> Self {
        self.baseline(name, runs, true)
    }

    /// Adds a reference that cannot be beaten (the pass-only floor).
    pub fn reference(self, name: &str, runs: &[f64]) -> Self {
        self.baseline(name, runs, false)
    }

    fn baseline(mut self, name: &str, runs: &[f64], competitor: bool) -> Self {
        if let Some(summary) = Summary::of(runs) {
            let value = summary.median;
            let ahead = competitor.then_some(match self.better {
                Better::Lower => self.ours < value,
                Better::Higher => self.ours > value,
            });
            self.baselines.push(Baseline {
                name: name.to_owned(),
                value,
                runs: (runs.len() > 1).then_some(summary),
                ratio: self.ours / value,
                ahead,
            });
        }
        self
    }

    /// Sets the spec's target: `limit` in the figure's unit, met when our
    /// value is on the better side of it.
    pub fn target(mut self, text: &str, limit: f64) -> Self {
        let met = match self.better {
            Better::Lower => self.ours <= limit,
            Better::Higher => self.ours >= limit,
        };
        self.target = Some(Target {
            text: text.to_owned(),
            met,
        });
        self
    }

    /// Sets the note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// The baseline named `name`.
    pub fn baseline_named(&self, name: &str) -> Option<&Baseline> {
        self.baselines.iter().find(|b| b.name == name)
    }
}

/// Something the bench cannot measure yet, and why.
#[derive(Clone, Debug, Serialize)]
pub struct NotAvailable {
    /// What would be measured.
    pub name: String,
    /// Why it is not.
    pub reason: String,
}

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// `nproc`.
    pub cpus: usize,
    /// CPU model from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// `iptables -V` (shows the nf_tables or legacy backend).
    pub iptables: String,
    /// `nft -v`.
    pub nft: String,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `quick` or `full`.
    pub mode: String,
    /// The machine.
    pub machine: Machine,
    /// Wall time of the whole bench, seconds.
    pub duration_secs: f64,
    /// Every figure.
    pub figures: Vec<Figure>,
    /// What could not be measured.
    pub not_available: Vec<NotAvailable>,
}

impl Report {
    /// The figures of one group, in measurement order.
    pub fn group(&self, group: Group) -> impl Iterator<Item = &Figure> {
        self.figures.iter().filter(move |f| f.group == group)
    }

    /// `results.md`: the machine, then one table per group.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "Machine: {} CPUs ({}), kernel {}, {}, {}. Mode: {}, {:.0} s in all.\n",
            m.cpus, m.cpu_model, m.kernel, m.iptables, m.nft, self.mode, self.duration_secs
        );
        out.push_str(
            "Values measured several times are medians, their interquartile range in brackets.\n\n",
        );
        for group in Group::ALL {
            let figures: Vec<&Figure> = self.group(group).collect();
            if figures.is_empty() {
                continue;
            }
            let _ = writeln!(out, "#### {}\n", group.title());
            out.push_str(&table(&figures));
            out.push('\n');
        }
        if !self.not_available.is_empty() {
            out.push_str("Not measured yet:\n\n");
            for item in &self.not_available {
                let _ = writeln!(out, "- {}: {}", item.name, item.reason);
            }
            out.push('\n');
        }
        out
    }
}

/// One Markdown table: a column pair (value, ratio) per baseline name.
fn table(figures: &[&Figure]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for figure in figures {
        for baseline in &figure.baselines {
            if !names.contains(&baseline.name.as_str()) {
                names.push(&baseline.name);
            }
        }
    }
    let with_target = figures.iter().any(|f| f.target.is_some());
    let with_notes = figures.iter().any(|f| f.note.is_some());
    let mut header = vec!["Figure".to_owned(), "Ours".to_owned()];
    for name in &names {
        header.push((*name).to_owned());
        header.push(format!("ours ÷ {name}"));
    }
    if with_target {
        header.push("Target".to_owned());
    }
    if with_notes {
        header.push("Note".to_owned());
    }
    let mut out = row(&header);
    out.push_str(&row(&vec!["---".to_owned(); header.len()]));
    for figure in figures {
        let mut cells = vec![
            figure.name.clone(),
            format!(
                "{} {}",
                with_spread(figure.ours, figure.ours_runs.as_ref()),
                figure.unit
            ),
        ];
        for name in &names {
            match figure.baseline_named(name) {
                Some(b) => {
                    cells.push(with_spread(b.value, b.runs.as_ref()));
                    let verdict = match b.ahead {
                        Some(true) => " (ahead)",
                        Some(false) => " (**behind**)",
                        None => "",
                    };
                    cells.push(format!("{}×{verdict}", ratio(b.ratio)));
                }
                None => cells.extend(["–".to_owned(), "–".to_owned()]),
            }
        }
        if with_target {
            cells.push(match &figure.target {
                Some(t) => format!("{} {}", t.text, if t.met { "✓" } else { "✗ missed" }),
                None => "–".to_owned(),
            });
        }
        if with_notes {
            cells.push(figure.note.clone().unwrap_or_default());
        }
        out.push_str(&row(&cells));
    }
    out
}

/// A value, and when it is the median of several runs, their
/// interquartile range: the spread a comparison must stand clear of.
fn with_spread(value: f64, runs: Option<&Summary>) -> String {
    match runs {
        Some(runs) => format!(
            "{} ({}–{})",
            number(value),
            number(runs.q1),
            number(runs.q3)
        ),
        None => number(value),
    }
}

fn row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

/// A ratio with two significant digits below 0.1, two decimals above.
fn ratio(value: f64) -> String {
    if value.is_finite() && value.abs() < 0.1 {
        format!("{value:.2e}")
    } else {
        format!("{value:.2}")
    }
}

/// A value with as many digits as are meaningful at its size.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        "n/a".to_owned()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_verdicts_follow_the_direction_of_better() {
        let rate = Figure::new(
            Group::Traffic,
            "rps",
            "rate".into(),
            "req/s",
            Better::Higher,
        )
        .ours_runs(&[90.0, 100.0, 110.0])
        .competitor("iptables", &[50.0])
        .competitor("nftables", &[200.0]);
        assert_eq!(rate.ours, 100.0);
        assert_eq!(rate.baselines[0].ratio, 2.0);
        assert_eq!(rate.baselines[0].ahead, Some(true));
        assert_eq!(rate.baselines[1].ahead, Some(false));

        let cost = Figure::new(Group::Datapath, "ns", "cost".into(), "ns", Better::Lower)
            .ours(30.0)
            .reference("floor", &[10.0])
            .target("< 40", 40.0);
        assert_eq!(cost.baselines[0].ratio, 3.0);
        assert_eq!(cost.baselines[0].ahead, None);
        assert!(cost.target.as_ref().unwrap().met);
    }

    #[test]
    fn the_table_has_a_column_pair_per_baseline() {
        let figure = Figure::new(
            Group::Traffic,
            "cps",
            "conns".into(),
            "conn/s",
            Better::Higher,
        )
        .ours(10.0)
        .competitor("iptables", &[20.0]);
        let report = Report {
            mode: "quick".into(),
            machine: Machine {
                cpus: 2,
                cpu_model: "cpu".into(),
                kernel: "6.18".into(),
                iptables: "iptables".into(),
                nft: "nft".into(),
            },
            duration_secs: 1.0,
            figures: vec![figure],
            not_available: vec![],
        };
        let md = report.markdown();
        assert!(
            md.contains("| Figure | Ours | iptables | ours ÷ iptables |"),
            "{md}"
        );
        assert!(
            md.contains("| conns | 10.0 conn/s | 20.0 | 0.50× (**behind**) |"),
            "{md}"
        );
    }
}
