"""Jobs: sources -> models -> store. Each is resumable per slide or batch, takes a table's lease, and is what a CLI
command runs: `tile` (slides -> tile rows), `embed` (records -> vectors), `import_h5` / `export_h5` (CLAM / TRIDENT
feature files in and out)."""
