//! The end-of-run summary: `summary.json` and the one-screen text, from the run's whole
//! `metrics.jsonl` (every session).

use std::path::Path;

use anyhow::Result;
use serde_json::json;

/// Complete `report` with the best validation and the final test loss from the run's whole
/// `metrics.jsonl` (every session), write it to `summary.json`, and return the one-screen text.
pub fn run_summary(
    run_dir: &Path,
    mut report: serde_json::Value,
    unit: crate::source::Unit,
) -> Result<String> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let loss = |l: &serde_json::Value| l["loss"].as_f64();
    let best = lines
        .iter()
        .filter(|l| l["split"] == "valid")
        .filter_map(|l| Some((loss(l)?, l["step"].as_u64()?)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let test = lines
        .iter()
        .rfind(|l| l["split"] == "test")
        .and_then(|l| Some((loss(l)?, l["step"].as_u64()?)));
    let shown = |nats: f64| match unit.metric(nats) {
        Some((name, value)) => format!("{nats:.4} nats ({name} {value:.4})"),
        None => format!("{nats:.4} nats"),
    };
    report["best_valid"] = json!(best.map(|(l, s)| json!({"loss": l, "step": s})));
    report["final_test"] = json!(test.map(|(l, s)| json!({"loss": l, "step": s})));
    std::fs::write(run_dir.join("summary.json"), format!("{report}\n"))?;
    let r = &report;
    let mut out = String::from("── run summary ──────────────────────────────────────────\n");
    out += &format!(
        "  model       {} · {} parameters · {}\n",
        r["model"].as_str().unwrap_or("?"),
        r["params"],
        r["backend"].as_str().unwrap_or("?")
    );
    out += &format!(
        "  steps       {} ({} this session, {:.1} s{})\n",
        r["step"],
        r["steps_this_session"],
        r["seconds_this_session"].as_f64().unwrap_or(0.0),
        if r["interrupted"] == true {
            ", interrupted"
        } else {
            ""
        }
    );
    out += &format!(
        "  throughput  {:.0} tokens/s\n",
        r["tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    match best {
        Some((l, s)) => out += &format!("  best valid  {} at step {s}\n", shown(l)),
        None => out += "  best valid  - (no evaluation yet)\n",
    }
    if let Some((l, s)) = test {
        out += &format!("  final test  {} at step {s}\n", shown(l));
    }
    if let Some(mb) = r["peak_rss_mb"].as_f64() {
        out += &format!("  peak memory {mb:.0} MB (resident)\n");
    }
    if r["skipped_steps"].as_u64().unwrap_or(0) > 0 {
        out += &format!("  skipped     {} non-finite steps\n", r["skipped_steps"]);
    }
    if let Some(layers) = r["learned_spans"].as_array()
        && layers
            .iter()
            .any(|l| l.as_array().is_some_and(|h| !h.is_empty()))
    {
        let show: Vec<String> = layers
            .iter()
            .map(|l| {
                let heads: Vec<String> = l
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_f64())
                    .map(|v| format!("{v:.0}"))
                    .collect();
                heads.join(" ")
            })
            .collect();
        out += &format!(
            "  spans       {} (tokens, per head, layer by layer)\n",
            show.join(" | ")
        );
    }
    out += &format!("  run dir     {} (summary.json)", run_dir.display());
    Ok(out)
}
