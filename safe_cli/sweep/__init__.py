"""`safe sweep`: variants x seeds x stages, run locally or as SLURM job arrays, then compared.

    <out>/sweep.json                          the manifest: profile, overrides, grid, SLURM jobs
    <out>/<variant>/seed-<N>/stage-a/ ...     one run per variant and seed (training.run_dir's layout)
    <out>/sweep-state/<variant>.seed-<N>.stage-<x>.json   each run's state, attempts, exit codes
    <out>/logs/<variant>.seed-<N>.stage-<x>.log           each run's output (appended per attempt)
    <out>/slurm/stage-<x>.sbatch, slurm-<x>-<job>_<task>.out   --slurm scripts and their output
    <out>/report.json, report.md, report.png  the comparison table (safe sweep report)
"""
