"""Launch tools of the jaxad checkout (not installed with the package): `launch.sweep`.

Importable from the repository root (`from launch import sweep`); the shell launchers
(tpu_pod.sh, slurm_multinode.sbatch) sit next to it.
"""
