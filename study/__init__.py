"""The study harness behind reproduce.py: stages.py runs the study's stages, summary.py writes results.json,
stats.py holds its statistics and report.py writes results.md and the plots."""
