"""Models: timm backbones (one place that creates them), their weights and fingerprint (`backbones`), pathology
foundation models' extra creation kwargs (`foundation`), the image transform a backbone expects (`preprocess`), and
inference on a batch of images (`inference`), used by the embed job, `search` and the viewer alike."""
