"""Testing what an SAE found: residual edits (`interventions`), spliced-in fidelity (`fidelity`),
exemplars and concept scores (`features`, `concept_metrics`), linear probes (`probes`), and the
paper's three experiments (`semprobe`, `probe_edits`, `segmentation`)."""
