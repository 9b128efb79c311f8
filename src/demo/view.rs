//! What the demo shows: a live terminal view (ratatui) on a terminal,
//! plain progress lines in a pipe, and at the end a summary table or one
//! JSON object.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use serde::Serialize;

use super::clusters::CLUSTERS;
use super::drive::ServiceView;
use super::load::Stats;

/// Everything one frame shows.
pub struct Frame<'a> {
    pub views: &'a [ServiceView],
    pub stats: &'a Stats,
    pub console: &'a str,
    pub elapsed: Duration,
    pub proxies: &'a [String],
    pub finished: bool,
}

fn pct(bp: u32) -> String {
    format!("{}.{:02} %", bp / 100, bp % 100)
}

fn weights_text(w: &BTreeMap<String, u32>) -> String {
    if w.is_empty() {
        return "weights —".to_owned();
    }
    CLUSTERS
        .iter()
        .map(|c| format!("{c}={}", pct(w.get(*c).copied().unwrap_or(0))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A weights bar: `old` in blue, `new` in green, `width` cells.
fn bar(w: &BTreeMap<String, u32>, width: usize) -> Line<'static> {
    let new = w.get("new").copied().unwrap_or(0) as usize;
    let filled = (new * width + 5_000) / 10_000;
    Line::from(vec![
        Span::styled(
            "█".repeat(width - filled.min(width)),
            Style::default().fg(Color::Blue),
        ),
        Span::styled(
            "█".repeat(filled.min(width)),
            Style::default().fg(Color::Green),
        ),
        Span::raw(format!(" {:>3}%", (new + 50) / 100)),
    ])
}

fn stage_style(stage: &str) -> Style {
    let color = match stage {
        "DONE" => Color::Green,
        "ROLLED_BACK" | "ROLLING_BACK" | "FAILED" => Color::Red,
        "PINNED" | "PAUSED" => Color::Yellow,
        _ => Color::Cyan,
    };
    Style::default().fg(color).add_modifier(Modifier::BOLD)
}

fn cluster_cell(stats: &Stats, service: &str, cluster: &str) -> String {
    let w = stats.window(service, cluster);
    if w.rps == 0.0 {
        return "—".to_owned();
    }
    format!(
        "{:>5.1}/s {:>5.1}% {:>4.1}/{:>5.1}ms",
        w.rps, w.error_pct, w.p50_ms, w.p99_ms
    )
}

/// Draws one frame of the terminal view.
pub fn draw(f: &mut ratatui::Frame<'_>, frame: &Frame<'_>) {
    let [head, table, notes] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(frame.views.len() as u16 + 3),
        Constraint::Min(3),
    ])
    .areas(f.area());
    let s = frame.stats;
    let header = vec![
        Line::from(vec![
            Span::styled("Ferry demo", Style::default().add_modifier(Modifier::BOLD)),
            Span::raw(format!(
                " — moving services from cluster old to new   {}s",
                frame.elapsed.as_secs()
            )),
        ]),
        Line::from(format!(
            "web console: {}    proxies: {}",
            frame.console,
            frame.proxies.join(", ")
        )),
        Line::from(vec![
            Span::raw(format!("requests sent {}   ", s.sent)),
            Span::styled(
                format!("failed {}", s.failed),
                Style::default().fg(if s.failed == 0 {
                    Color::Green
                } else {
                    Color::Red
                }),
            ),
            Span::raw(format!("   injected 503s {}", s.injected)),
            Span::raw(if frame.finished {
                "   — finished (Ctrl-C to stop)".to_owned()
            } else {
                String::new()
            }),
        ]),
    ];
    f.render_widget(Paragraph::new(header), head);
    let rows = frame.views.iter().map(|v| {
        let name = v.plan.full_name();
        Row::new(vec![
            Cell::from(name.clone()),
            Cell::from(Span::styled(v.stage().to_owned(), stage_style(v.stage()))),
            Cell::from(
                v.step()
                    .map(|(k, n)| format!("{k}/{n}"))
                    .unwrap_or_default(),
            ),
            Cell::from(bar(&v.weights, 20)),
            Cell::from(cluster_cell(s, v.plan.name, "old")),
            Cell::from(cluster_cell(s, v.plan.name, "new")),
        ])
    });
    let widths = [
        Constraint::Length(15),
        Constraint::Length(13),
        Constraint::Length(5),
        Constraint::Length(26),
        Constraint::Length(27),
        Constraint::Length(27),
    ];
    let table_widget = Table::new(rows, widths)
        .header(
            Row::new(vec![
                "SERVICE",
                "STAGE",
                "STEP",
                "WEIGHTS old █ new █",
                "OLD req/s err p50/p99",
                "NEW req/s err p50/p99",
            ])
            .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().borders(Borders::ALL).title(" services "));
    f.render_widget(table_widget, table);
    let lines: Vec<Line<'_>> = frame
        .views
        .iter()
        .flat_map(|v| {
            let mut out = vec![Line::from(vec![
                Span::styled(
                    format!("{:<15}", v.plan.full_name()),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(v.detail()),
            ])];
            if let Some(note) = v.plan.note() {
                out.push(Line::from(Span::styled(
                    format!("{:<15}{note}", ""),
                    Style::default().fg(Color::Yellow),
                )));
            }
            out
        })
        .collect();
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(Block::default().borders(Borders::ALL).title(" why ")),
        notes,
    );
}

/// The terminal while the live view shows: the alternate screen, the
/// cursor hidden; both restored by [`Screen::leave`].
pub struct Screen {
    terminal: ratatui::Terminal<ratatui::backend::CrosstermBackend<std::io::Stdout>>,
}

impl Screen {
    pub fn enter() -> std::io::Result<Self> {
        use ratatui::crossterm::{cursor, execute, terminal};
        let mut out = std::io::stdout();
        execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
        let terminal = ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(out))?;
        Ok(Self { terminal })
    }

    pub fn draw(&mut self, frame: &Frame<'_>) -> std::io::Result<()> {
        self.terminal.draw(|f| draw(f, frame)).map(|_| ())
    }

    pub fn leave(mut self) {
        use ratatui::crossterm::{cursor, execute, terminal};
        let _ = execute!(
            self.terminal.backend_mut(),
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
    }
}

/// Prints a line for each service whose stage, step or weights changed
/// since `last`, and a totals line every 10 s.
pub struct Plain {
    last: BTreeMap<String, String>,
    last_totals: u64,
}

impl Plain {
    pub fn new() -> Self {
        Self {
            last: BTreeMap::new(),
            last_totals: 0,
        }
    }

    pub fn print(&mut self, out: &mut dyn Write, frame: &Frame<'_>) {
        let t = frame.elapsed.as_secs();
        for v in frame.views {
            let name = v.plan.full_name();
            let step = v
                .step()
                .map(|(k, n)| format!(" step {k}/{n}"))
                .unwrap_or_default();
            let key = format!("{}{step} {}", v.stage(), weights_text(&v.weights));
            if self.last.get(&name) == Some(&key) {
                continue;
            }
            let _ = writeln!(out, "[{t:>4}s] {name:<15} {key} — {}", v.detail());
            self.last.insert(name, key);
        }
        if t >= self.last_totals + 10 {
            self.last_totals = t;
            let s = frame.stats;
            let _ = writeln!(
                out,
                "[{t:>4}s] requests sent {}, failed {}, injected 503s {}; console {}",
                s.sent, s.failed, s.injected, frame.console
            );
        }
        let _ = out.flush();
    }
}

#[derive(Debug, Serialize)]
pub struct MigrationSummary {
    pub service: String,
    pub outcome: String,
    pub duration_s: f64,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Requests {
    pub total: u64,
    pub failed: u64,
    pub injected_errors: u64,
    /// cluster → requests it served.
    pub by_cluster: BTreeMap<String, u64>,
    /// service → cluster → requests.
    pub by_service: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Debug, Serialize)]
pub struct Sticky {
    /// Users of the services that moved, through Ferry's proxies.
    pub users: u64,
    /// Of those, users served by `new` and then by `old` again.
    pub moved_back: u64,
}

/// The demo's outcome.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub migrations: Vec<MigrationSummary>,
    pub requests: Requests,
    pub sticky: Sticky,
    pub console: String,
    /// The first few failed requests, if any.
    pub failures: Vec<String>,
}

impl Summary {
    pub fn new(views: &[ServiceView], stats: &Stats, console: &str) -> Self {
        let mut by_cluster = BTreeMap::new();
        let mut by_service: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((service, cluster), n) in &stats.served {
            *by_cluster.entry(cluster.clone()).or_default() += n;
            by_service
                .entry(service.clone())
                .or_default()
                .insert(cluster.clone(), *n);
        }
        // Only forward moves promise stickiness: a rollback moves users
        // back on purpose.
        let moved: Vec<&str> = views
            .iter()
            .filter(|v| v.outcome() == Some("DONE"))
            .map(|v| v.plan.name)
            .collect();
        let count = |m: &BTreeMap<String, std::collections::BTreeSet<u32>>| -> u64 {
            moved
                .iter()
                .map(|s| m.get(*s).map_or(0, |u| u.len() as u64))
                .sum()
        };
        Self {
            migrations: views
                .iter()
                .map(|v| MigrationSummary {
                    service: v.plan.full_name(),
                    outcome: v.outcome().unwrap_or(v.stage()).to_owned(),
                    duration_s: (v.duration_s() * 10.0).round() / 10.0,
                    reason: v.detail(),
                })
                .collect(),
            requests: Requests {
                total: stats.answered,
                failed: stats.failed,
                injected_errors: stats.injected,
                by_cluster,
                by_service,
            },
            sticky: Sticky {
                users: count(&stats.sticky_users),
                moved_back: count(&stats.moved_back),
            },
            console: console.to_owned(),
            failures: stats.failures.clone(),
        }
    }

    /// The human summary.
    pub fn print_table(&self, out: &mut dyn Write) {
        let _ = writeln!(out, "\nFerry demo: summary\n");
        let _ = writeln!(
            out,
            "{:<15} {:<12} {:>9}  {:>9} {:>9}  WHY",
            "SERVICE", "OUTCOME", "DURATION", "OLD REQS", "NEW REQS"
        );
        for m in &self.migrations {
            let served = self
                .requests
                .by_service
                .get(m.service.split('.').next().unwrap_or_default());
            let n = |c: &str| served.and_then(|s| s.get(c)).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{:<15} {:<12} {:>8.1}s  {:>9} {:>9}  {}",
                m.service,
                m.outcome,
                m.duration_s,
                n("old"),
                n("new"),
                m.reason.chars().take(100).collect::<String>()
            );
        }
        let r = &self.requests;
        let _ = writeln!(
            out,
            "\nrequests: {} answered, {} failed, {} injected 503s (by cluster: {})",
            r.total,
            r.failed,
            r.injected_errors,
            r.by_cluster
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            out,
            "sticky users: {} moved with their service, {} moved back",
            self.sticky.users, self.sticky.moved_back
        );
        for f in &self.failures {
            let _ = writeln!(out, "  failed: {f}");
        }
    }
}
