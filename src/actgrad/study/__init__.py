"""What a study asks for: its settings and schema, sweeps, comparisons and training jobs; load.py completes one."""
