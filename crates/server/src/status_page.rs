//! The status page: `GET /` (the store against its bound, the hour's ActionCache hit ratio as
//! a chart, recent invocations), `GET /invocations/<id>` (one invocation's misses by mnemonic
//! and target, with the action ids), and the same as JSON at `GET /status` and
//! `GET /status/invocations/<id>`. Self-contained HTML: no script, no external asset; the
//! chart is inline SVG. Every string from a client is escaped.
//!
//! It reads what [`crate::status::Invocations`] kept; nothing here touches the store but its
//! usage counters.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::access::{json, rfc3339};
use crate::core::Core;
use crate::status::{Invocation, Minute, unix};

/// Invocations listed on the overview (the most recently seen; JSON lists every one kept).
const LISTED: usize = 200;

/// `s` escaped for HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` percent-encoded for a path segment (everything but unreserved characters).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A percent-encoded path segment decoded; `None` when it is not valid UTF-8 or a `%` is not
/// followed by two hex digits.
pub(crate) fn decode_segment(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Bytes for people: `1.5 GiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_owned(), |r| format!("{:.0} %", r * 100.0))
}

/// A time to the second, UTC.
fn when(t: SystemTime) -> String {
    let mut s = rfc3339(t);
    s.truncate(19);
    s.replace('T', " ")
}

fn seconds(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:80em}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}\
table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top;white-space:nowrap}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
code{font-size:.9em}.muted{color:#777}meter{width:20em}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n{body}</body></html>\n",
        esc(title)
    )
}

/// The hour's hit ratio as an SVG bar chart: one bar a minute, its height the ratio (grey
/// when the minute had no lookups), each with its counts as a tooltip.
fn chart(hour: &[Minute]) -> String {
    const W: usize = 8;
    const H: f64 = 80.0;
    let width = hour.len() * W;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" \
         role=\"img\" aria-label=\"ActionCache hit ratio per minute, last hour\">\
         <rect width=\"{width}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ccc\"/>",
        H as usize + 14
    );
    for (i, m) in hour.iter().enumerate() {
        let lookups = m.hits + m.misses;
        let x = i * W;
        let t = when(std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.minute * 60));
        if lookups == 0 {
            let _ = write!(
                svg,
                "<rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"2\" fill=\"#ccc\"><title>{} UTC: no lookups</title></rect>",
                H - 2.0,
                W - 1,
                &t[11..16]
            );
            continue;
        }
        let r = m.hits as f64 / lookups as f64;
        let h = (r * H).max(2.0);
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"{}\" height=\"{h:.1}\" fill=\"{}\"><title>{} UTC: {} hits, {} misses ({:.0} %)</title></rect>",
            H - h,
            W - 1,
            if r >= 0.5 { "#2e7d32" } else { "#c62828" },
            &t[11..16],
            m.hits,
            m.misses,
            r * 100.0
        );
    }
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"{}\" font-size=\"11\" fill=\"#777\">60 min ago</text>\
         <text x=\"{width}\" y=\"{}\" font-size=\"11\" fill=\"#777\" text-anchor=\"end\">now</text></svg>",
        H as usize + 12,
        H as usize + 12
    );
    svg
}

/// `GET /`: the overview.
pub(crate) fn overview(core: &Core) -> String {
    let now = SystemTime::now();
    let usage = core.store().usage();
    let max = core.0.options.max_size;
    let hour = core.0.invocations.last_hour(now);
    let (hits, misses) = hour
        .iter()
        .fold((0, 0), |(h, m), x| (h + x.hits, m + x.misses));
    let invocations = core.0.invocations.recent();
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<h1>recache serve</h1>\n<h2>Store</h2><p><meter min=\"0\" max=\"{max}\" value=\"{}\"></meter> \
         {} of {} ({:.0} %), {} blobs</p>",
        usage.total_bytes().min(max),
        human(usage.total_bytes()),
        human(max),
        usage.total_bytes() as f64 * 100.0 / max.max(1) as f64,
        usage.total_blobs()
    );
    let _ = writeln!(
        b,
        "<h2>ActionCache hit ratio, last hour</h2>{}<p>{} lookups: {hits} hits, {misses} misses ({}).</p>",
        chart(&hour),
        hits + misses,
        ratio((hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64))
    );
    let _ = writeln!(
        b,
        "<h2>Recent invocations</h2>\n<p class=\"muted\">By REAPI invocation id (Bazel's \
         <code>--invocation_id</code>, <code>recache run --invocation-id</code>); the last {} \
         are kept. Open one to see what it missed and why.</p>",
        crate::status::INVOCATIONS
    );
    if invocations.is_empty() {
        b.push_str("<p>No invocation has called this server yet.</p>\n");
    } else {
        b.push_str(
            "<table><tr><th>Invocation</th><th>Tool</th><th>Who</th><th>Last seen (UTC)</th>\
             <th>Duration</th><th>Hits</th><th>Misses</th><th>Hit ratio</th><th>Down</th>\
             <th>Up</th><th>Most missed</th></tr>\n",
        );
        for inv in invocations.iter().take(LISTED) {
            let most = Invocation::top(&inv.mnemonics, 2)
                .into_iter()
                .map(|(m, n)| format!("{} ({n})", esc(&m)))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                b,
                "<tr><td><a href=\"/invocations/{}\"><code>{}</code></a></td><td>{}</td><td>{}</td>\
                 <td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{most}</td></tr>",
                encode_segment(&inv.id),
                esc(&inv.id),
                esc(&inv.tool),
                esc(inv.identity.as_deref().unwrap_or("–")),
                when(inv.last_seen),
                seconds(inv.duration()),
                inv.hits,
                inv.misses,
                ratio(inv.hit_ratio()),
                human(inv.bytes_down),
                human(inv.bytes_up),
            );
        }
        b.push_str("</table>\n");
        if invocations.len() > LISTED {
            let _ = writeln!(
                b,
                "<p class=\"muted\">{} more in <a href=\"/status\">/status</a>.</p>",
                invocations.len() - LISTED
            );
        }
    }
    b.push_str(
        "<p class=\"muted\">JSON: <a href=\"/status\">/status</a> · metrics: \
         <a href=\"/metrics\">/metrics</a> · <a href=\"/readyz\">/readyz</a></p>\n",
    );
    page("recache serve", &b)
}

/// `GET /invocations/<id>`: one invocation's misses; `None` when it is not (or no longer)
/// kept.
pub(crate) fn invocation_page(core: &Core, id: &str) -> Option<String> {
    let inv = core.0.invocations.get(id)?;
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<p><a href=\"/\">← recache serve</a></p><h1>Invocation <code>{}</code></h1>\n\
         <table><tr><th>Tool</th><td>{}</td></tr><tr><th>Who</th><td>{}</td></tr>\
         <tr><th>First seen (UTC)</th><td>{}</td></tr><tr><th>Last seen (UTC)</th><td>{}</td></tr>\
         <tr><th>Duration</th><td>{}</td></tr><tr><th>Requests</th><td>{}</td></tr>\
         <tr><th>ActionCache</th><td>{} hits, {} misses ({} hits){}</td></tr>\
         <tr><th>Bytes</th><td>{} down, {} up</td></tr>{}</table>",
        esc(&inv.id),
        esc(&inv.tool),
        esc(inv.identity.as_deref().unwrap_or("–")),
        when(inv.first_seen),
        when(inv.last_seen),
        seconds(inv.duration()),
        inv.requests,
        inv.hits,
        inv.misses,
        ratio(inv.hit_ratio()),
        if inv.misses_outputs_gone > 0 {
            format!(
                "; {} of the misses had a result whose outputs were evicted",
                inv.misses_outputs_gone
            )
        } else {
            String::new()
        },
        human(inv.bytes_down),
        human(inv.bytes_up),
        if inv.correlated_id.is_empty() {
            String::new()
        } else {
            format!(
                "<tr><th>Correlated invocations</th><td><code>{}</code></td></tr>",
                esc(&inv.correlated_id)
            )
        }
    );
    if inv.misses == 0 {
        b.push_str("<p>No misses: every ActionCache lookup of this invocation hit.</p>\n");
        return Some(page(&format!("Invocation {}", inv.id), &b));
    }
    b.push_str(
        "<h2>Why it missed</h2><p>A miss <em>not recorded</em> means no build wrote a result \
         for that action here: its command, inputs, environment or platform differ from every \
         recorded run (compare the action id with the same target's in a build that hit, e.g. \
         in Bazel's <code>--execution_log_json_file</code>), or no caller allowed to write has \
         built it yet. A miss <em>outputs evicted</em> had a result, but the cache had dropped a \
         file it names: the cache is too small for the builds it serves.</p>\n",
    );
    for (title, counts) in [
        ("Misses by mnemonic", &inv.mnemonics),
        ("Misses by target", &inv.targets),
    ] {
        let _ = write!(
            b,
            "<h2>{title}</h2><table><tr><th>Name</th><th>Misses</th></tr>"
        );
        for (name, n) in Invocation::top(counts, usize::MAX) {
            let _ = write!(
                b,
                "<tr><td><code>{}</code></td><td class=\"n\">{n}</td></tr>",
                esc(&name)
            );
        }
        b.push_str("</table>\n");
    }
    let _ = write!(
        b,
        "<h2>Misses</h2><table><tr><th>Time (UTC)</th><th>Mnemonic</th><th>Target</th>\
         <th>Action id</th><th>Why</th></tr>"
    );
    for m in &inv.missed {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
            when(m.at),
            esc(&m.mnemonic),
            esc(&m.target),
            esc(&m.action_id),
            if m.outputs_gone {
                "outputs evicted"
            } else {
                "not recorded"
            }
        );
    }
    b.push_str("</table>\n");
    if inv.misses as usize > inv.missed.len() {
        let _ = writeln!(
            b,
            "<p class=\"muted\">The first {} of {} misses are listed.</p>",
            inv.missed.len(),
            inv.misses
        );
    }
    Some(page(&format!("Invocation {}", inv.id), &b))
}

fn invocation_json(inv: &Invocation, with_misses: bool) -> String {
    let pairs = |counts| {
        Invocation::top(counts, usize::MAX)
            .iter()
            .map(|(k, n)| format!("[{},{n}]", json(k)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut s = format!(
        "{{\"id\":{},\"tool\":{},\"identity\":{},\"correlated_id\":{},\"first_seen\":{},\
         \"last_seen\":{},\"duration_seconds\":{:.3},\"requests\":{},\"hits\":{},\"misses\":{},\
         \"misses_outputs_gone\":{},\"bytes_down\":{},\"bytes_up\":{},\"misses_by_mnemonic\":[{}],\
         \"misses_by_target\":[{}]",
        json(&inv.id),
        json(&inv.tool),
        inv.identity.as_deref().map_or_else(|| "null".into(), json),
        json(&inv.correlated_id),
        json(&rfc3339(inv.first_seen)),
        json(&rfc3339(inv.last_seen)),
        inv.duration().as_secs_f64(),
        inv.requests,
        inv.hits,
        inv.misses,
        inv.misses_outputs_gone,
        inv.bytes_down,
        inv.bytes_up,
        pairs(&inv.mnemonics),
        pairs(&inv.targets),
    );
    if with_misses {
        let misses: Vec<String> = inv
            .missed
            .iter()
            .map(|m| {
                format!(
                    "{{\"time\":{},\"action_id\":{},\"mnemonic\":{},\"target\":{},\"why\":{}}}",
                    json(&rfc3339(m.at)),
                    json(&m.action_id),
                    json(&m.mnemonic),
                    json(&m.target),
                    json(if m.outputs_gone {
                        "outputs_evicted"
                    } else {
                        "not_recorded"
                    })
                )
            })
            .collect();
        let _ = write!(s, ",\"missed\":[{}]", misses.join(","));
    }
    s.push('}');
    s
}

/// `GET /status`: the overview as JSON (every invocation kept, without miss lists).
pub(crate) fn status_json(core: &Core) -> String {
    let usage = core.store().usage();
    let hour: Vec<String> = core
        .0
        .invocations
        .last_hour(SystemTime::now())
        .iter()
        .map(|m| {
            format!(
                "{{\"minute\":{},\"hits\":{},\"misses\":{}}}",
                json(&rfc3339(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.minute * 60)
                )),
                m.hits,
                m.misses
            )
        })
        .collect();
    let invocations: Vec<String> = core
        .0
        .invocations
        .recent()
        .iter()
        .map(|i| invocation_json(i, false))
        .collect();
    format!(
        "{{\"time\":{:.3},\"store\":{{\"bytes\":{},\"blobs\":{},\"max_bytes\":{}}},\
         \"last_hour\":[{}],\"invocations_kept\":{},\"invocations\":[{}]}}\n",
        unix(SystemTime::now()),
        usage.total_bytes(),
        usage.total_blobs(),
        core.0.options.max_size,
        hour.join(","),
        crate::status::INVOCATIONS,
        invocations.join(",")
    )
}

/// `GET /status/invocations/<id>`: one invocation with its misses.
pub(crate) fn invocation_status_json(core: &Core, id: &str) -> Option<String> {
    let inv = core.0.invocations.get(id)?;
    Some(invocation_json(&inv, true) + "\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn segments_round_trip_and_html_is_escaped() {
        let id = "a b/c%d<é>";
        let enc = encode_segment(id);
        assert!(
            enc.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b))
        );
        assert_eq!(decode_segment(&enc).unwrap(), id);
        assert_eq!(decode_segment("%zz"), None);
        assert_eq!(decode_segment("%4"), None);
        assert_eq!(
            esc("<script>\"x\"&'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;"
        );
        assert_eq!(human(1536), "1.5 KiB");
    }
}
