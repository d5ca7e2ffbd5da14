//! The harness's results as data: measurements produce [`Section`]s, the report renders them.
//! Kept as JSON next to BENCHMARKS.md (`bench/results.json`) so a report can be re-rendered
//! without re-measuring.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One run of the harness.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// Where and what was measured.
    pub meta: Meta,
    /// In the order they appear in BENCHMARKS.md.
    pub sections: Vec<Section>,
}

/// The stamp every table and figure carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// UTC, e.g. `2026-12-02 10:15 UTC`.
    pub date: String,
    /// `git describe --always --dirty` of the measured tree.
    pub commit: String,
    /// CPU model name.
    pub machine: String,
    /// Logical cores.
    pub cores: usize,
    /// Software versions: rustc, nats-server, PostgreSQL, tirea-store-adapters, ...
    pub versions: BTreeMap<String, String>,
    /// A smoke run (seconds, tiny sizes): its numbers mean nothing.
    pub smoke: bool,
    /// The command that produced this run.
    pub command: String,
}

/// One measured topic: a table and any number of plots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    /// Stable identifier (anchor, plot file prefix).
    pub id: String,
    /// Heading.
    pub title: String,
    /// Paragraphs shown above the table: method, targets, caveats.
    pub notes: Vec<String>,
    /// The numbers.
    pub table: Table,
    /// Figures of the same numbers (or of series too long for the table).
    pub plots: Vec<Plot>,
}

/// A markdown table; cells are already formatted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Table {
    /// Header cells.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub rows: Vec<Vec<String>>,
}

/// A line plot with one line per series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plot {
    /// File stem: written as `bench/plots/<file>.svg`.
    pub file: String,
    /// Caption and figure title.
    pub title: String,
    /// X axis label (with unit).
    pub x_label: String,
    /// Y axis label (with unit).
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// One line of a plot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// (x, y) points in x order.
    pub points: Vec<(f64, f64)>,
}
