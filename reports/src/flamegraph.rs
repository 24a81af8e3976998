//! Flamegraphs (inferno) with frames coloured by the layer they are
//! charged to — one hue per layer, the same in every report — and
//! differential flamegraphs of one profile against another. The caller
//! says which layer each frame belongs to; this module knows only names.

use std::{collections::HashMap, io::Write};

use inferno::flamegraph::{
    self,
    color::{Color, PaletteMap},
};

#[derive(Debug, thiserror::Error)]
pub enum FlameError {
    #[error("no samples to draw")]
    Empty,
    #[error("drawing the flamegraph: {0}")]
    Render(#[from] std::io::Error),
}

/// Canonical layer colours (layer names as in DESIGN.md); unknown names
/// get the `other` grey.
pub fn layer_color(layer: &str) -> (u8, u8, u8) {
    match layer {
        "proxy" => (230, 126, 34),
        "socket" => (52, 152, 219),
        "netfilter" => (231, 76, 60),
        "switch" => (155, 89, 182),
        "vnic" => (46, 204, 113),
        "irq" => (241, 196, 15),
        "vmexit" => (192, 57, 43),
        "backend" => (26, 188, 156),
        "sched" => (127, 140, 141),
        "loadgen" => (189, 195, 199),
        _ => (149, 165, 166),
    }
}

/// What to draw.
pub struct FlameOptions<'a> {
    pub title: &'a str,
    pub subtitle: Option<&'a str>,
    /// Unit of the counts ("samples", "samples per 1000 connections").
    pub count_name: &'a str,
    /// Layer of each frame name; frames not listed are drawn as `other`.
    pub frame_layers: &'a HashMap<String, String>,
}

/// Renders folded `lines` (`a;b;c count`) as an SVG flamegraph.
pub fn render<W: Write>(
    lines: &[String],
    opts: &FlameOptions<'_>,
    out: W,
) -> Result<(), FlameError> {
    if lines.is_empty() {
        return Err(FlameError::Empty);
    }
    let mut palette = PaletteMap::default();
    for (frame, layer) in opts.frame_layers {
        let (r, g, b) = layer_color(layer);
        palette.insert(frame, Color { r, g, b });
    }
    // Frames without a layer: "other".
    let (r, g, b) = layer_color("other");
    for line in lines {
        let stack = line.rsplit_once(' ').map_or(line.as_str(), |(s, _)| s);
        for frame in stack.split(';') {
            if palette.get(frame).is_none() {
                palette.insert(frame, Color { r, g, b });
            }
        }
    }
    let mut o = flamegraph::Options::default();
    o.title = opts.title.to_string();
    o.subtitle = opts.subtitle.map(str::to_string);
    o.count_name = opts.count_name.to_string();
    o.palette_map = Some(&mut palette);
    o.deterministic = true;
    o.min_width = 0.05;
    flamegraph::from_lines(&mut o, lines.iter().map(String::as_str), out)?;
    Ok(())
}

/// Renders a differential flamegraph: the shape of `after`, coloured red
/// where it grew against `before` and blue where it shrank (counts should
/// be normalised, e.g. per 1000 connections, for the comparison to mean
/// anything).
pub fn render_diff<W: Write>(
    before: &[String],
    after: &[String],
    title: &str,
    out: W,
) -> Result<(), FlameError> {
    if after.is_empty() {
        return Err(FlameError::Empty);
    }
    let mut folded = Vec::new();
    inferno::differential::from_readers(
        inferno::differential::Options::default(),
        before.join("\n").as_bytes(),
        after.join("\n").as_bytes(),
        &mut folded,
    )?;
    let mut o = flamegraph::Options::default();
    o.title = title.to_string();
    o.deterministic = true;
    o.min_width = 0.05;
    flamegraph::from_reader(&mut o, folded.as_slice(), out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_layer_colours() {
        let lines = vec!["haproxy-1/1;main;tcp_sendmsg_[k] 3".to_string()];
        let mut layers = HashMap::new();
        layers.insert("tcp_sendmsg_[k]".to_string(), "socket".to_string());
        let mut svg = Vec::new();
        render(
            &lines,
            &FlameOptions {
                title: "t",
                subtitle: None,
                count_name: "samples",
                frame_layers: &layers,
            },
            &mut svg,
        )
        .expect("renders");
        let svg = String::from_utf8(svg).expect("utf8");
        assert!(svg.contains("tcp_sendmsg"), "{svg}");
        assert!(svg.contains("rgb(52,152,219)"), "socket colour used");
        assert!(
            render(
                &[],
                &FlameOptions {
                    title: "t",
                    subtitle: None,
                    count_name: "s",
                    frame_layers: &layers
                },
                Vec::new()
            )
            .is_err()
        );
    }
}
