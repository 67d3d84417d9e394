"""Pruning engine: pure scoring/pattern/OBS math (`scores`, `patterns`, `sparsegpt`, `reconstruct`), the
calibration walk over decoder layers (`calibration`), compact masks on disk (`masks`), the typed config
(`config`) and the orchestration that writes a self-describing output directory (`engine`)."""
