"""Reports: results.csv rows, per-category plots, sweep summaries."""
