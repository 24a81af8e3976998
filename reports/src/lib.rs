//! `reports`: turns measurements into things people read: charts (SVG),
//! flamegraphs coloured by layer, and HTML/JSON/Markdown reports. Knows
//! nothing of eBPF or of how the numbers were produced.

pub mod chart;
pub mod flamegraph;
