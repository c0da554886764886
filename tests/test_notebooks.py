"""The notebooks in colabs/ run top to bottom (CPU, tiny settings), in a fresh kernel."""
import os
import subprocess
import sys

import importlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# nbformat, nbclient, ipykernel and matplotlib are in the `test` extra that CI installs:
# imported, not skipped, so a missing one fails instead of hiding the notebook test.
for _needed in ('ipykernel', 'matplotlib', 'nbclient'):
    importlib.import_module(_needed)
import nbformat  # noqa: E402


def _kernel_env(monkeypatch, cache_dir):
    """The kernel inherits this process's environment: make it a plain 1-device CPU.

    conftest.py asks XLA for 8 emulated CPU devices; the notebook should see what
    a user without an accelerator sees (the tiny batches would divide over 8 too).
    A compilation cache (fresh per test) lets the 2nd and 3rd runs reuse the init,
    scoring and eval programs, whose shapes do not depend on the batch (~25 s each).
    """
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(cache_dir))
    monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    flags = os.environ.get('XLA_FLAGS', '').split()
    monkeypatch.setenv('XLA_FLAGS', ' '.join(
        f for f in flags if not f.startswith('--xla_force_host_platform_device_count')))
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    monkeypatch.setenv('MPLBACKEND', 'agg')


_EXECUTE = """
import sys, nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                        resources={'metadata': {'path': sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[3])
"""


def execute_notebook(path, workdir, tmp_path):
    """Executes the notebook in a child process in its own session, and returns it executed.

    Kernel shutdown can signal the launching process's group; in its own session that
    never reaches the pytest worker (seen once as a stray KeyboardInterrupt).
    """
    out = tmp_path / 'executed.ipynb'
    proc = subprocess.run([sys.executable, '-c', _EXECUTE, path, str(workdir), str(out)],
                          capture_output=True, text=True, start_new_session=True, timeout=900)
    # A failing cell raises CellExecutionError in the child, with the cell's traceback.
    assert proc.returncode == 0, proc.stderr[-5000:]
    return nbformat.read(str(out), as_version=4)


def _outputs_text(cell):
    parts = []
    for out in cell.get('outputs', []):
        parts.append(out.get('text', ''))
        for value in out.get('data', {}).values():
            parts.append(value if isinstance(value, str) else '')
    return '\n'.join(parts)


def test_scaling_study_runs_on_cpu(tmp_path, monkeypatch):
    _kernel_env(monkeypatch, tmp_path / 'xla_cache')
    work = tmp_path / 'work'
    work.mkdir()
    nb = execute_notebook(os.path.join(REPO, 'colabs', 'scaling_study.ipynb'), work, tmp_path)

    root = work / 'scaling_study_tiny'
    runs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert runs == ['batch_size-16__seed-0', 'batch_size-32__seed-0', 'batch_size-64__seed-0']
    for run in runs:
        assert (root / run / 'results.json').exists() and (root / run / 'metrics.jsonl').exists()

    # The table: in the notebook's output and as CSV, one row per run with numbers.
    table_cell = next(c for c in nb.cells if 'format_table' in c.source)
    text = _outputs_text(table_cell)
    assert '| name | global_batch |' in text
    for run in runs:
        assert run in text
    lines = (root / 'scaling.csv').read_text().splitlines()
    assert lines[0].startswith('name,global_batch') and len(lines) == 4
    header = lines[0].split(',')
    for line in lines[1:]:
        row = dict(zip(header, line.split(',')))
        assert float(row['images_per_sec']) > 0 and 0 <= float(row['image_AUROC']) <= 1

    # The plot: saved, and shown as an image.
    png = root / 'scaling.png'
    assert png.stat().st_size > 1000
    plot_cell = next(c for c in nb.cells if 'plot_scaling' in c.source)
    assert any('image/png' in out.get('data', {}) for out in plot_cell.outputs)
