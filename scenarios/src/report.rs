//! Writing a run's outputs: `report.json`, the accuracy-per-round plot (SVG) and the final
//! global model (`model.safetensors`).

use std::path::Path;

use plotters::prelude::*;

use crate::runner::{Report, RunError};

/// Writes `report.json`, `accuracy.svg` and, when a round completed, `model.safetensors` (the
/// final global model, with its spec in the metadata) into `dir`.
pub fn write(report: &Report, dir: &Path) -> Result<(), RunError> {
    let err = |path: &Path, problem: String| RunError::Report { path: path.display().to_string(), problem };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let json_path = dir.join("report.json");
    let json = serde_json::to_string_pretty(report).map_err(|e| err(&json_path, e.to_string()))?;
    cohort_io::files::write_atomic(&json_path, json.as_bytes()).map_err(|e| err(&json_path, e.to_string()))?;
    let plot_path = dir.join("accuracy.svg");
    plot(report, &plot_path).map_err(|e| err(&plot_path, e))?;
    if let Some(model) = &report.final_model {
        let model_path = dir.join("model.safetensors");
        cohort_io::files::write_atomic(&model_path, model).map_err(|e| err(&model_path, e.to_string()))?;
    }
    Ok(())
}

fn plot(report: &Report, path: &Path) -> Result<(), String> {
    let points: Vec<(u64, f64)> =
        report.rounds.iter().filter_map(|r| r.test_accuracy.map(|a| (r.round, a * 100.0))).collect();
    let last_round = report.rounds.last().map_or(1, |r| r.round).max(1);
    let lowest = points.iter().map(|p| p.1).fold(100.0, f64::min);
    let y_min = (lowest - 5.0).clamp(0.0, 90.0).floor();
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: test accuracy per round", report.scenario.name), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0..last_round, y_min..100.0)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("round").y_desc("test accuracy (%)").draw().map_err(|e| e.to_string())?;
    chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE)).map_err(|e| e.to_string())?;
    if let Some(target) = report.scenario.target_accuracy {
        let t = target * 100.0;
        if t >= y_min {
            chart
                .draw_series(LineSeries::new([(0, t), (last_round, t)], RED.mix(0.5)))
                .map_err(|e| e.to_string())?
                .label(format!("target {t:.0}%"));
        }
    }
    root.present().map_err(|e| e.to_string())
}
