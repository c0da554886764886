"""`python -m jaxad.main --help`: every mode explained, with the README's example for each."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ('train', 'eval', 'predict', 'calibrate', 'export')


def _commands(text):
    """`python -m jaxad.main ...` commands, backslash continuations joined, spaces collapsed."""
    text = re.sub(r'\\\n\s*', ' ', text)
    return [' '.join(line.split()) for line in text.splitlines()
            if line.strip().startswith('python -m jaxad.main')]


def _readme_examples():
    readme = open(os.path.join(ROOT, 'README.md')).read()
    section = readme.split('### After training', 1)[1].split('\n###', 1)[0]
    block = section.split('```bash', 1)[1].split('```', 1)[0]
    return _commands(block)


def test_help_lists_every_mode_with_the_readme_example():
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
    proc = subprocess.run([sys.executable, '-m', 'jaxad.main', '--help'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert 'Traceback' not in out, out
    commands = _commands(out)
    for mode in MODES:
        assert re.search(rf'^\s+{mode}\s+\S', out, re.M), f'mode {mode} not described'
        assert re.search(rf'^\s+{mode}: \S', out, re.M), f'--mode help lacks {mode}'
        example = [c for c in commands if (f'--mode={mode}' in c if mode != 'train'
                                           else '--mode=' not in c)]
        assert example, f'no example for --mode={mode}'
    readme = _readme_examples()
    assert {c.split('--mode=')[1].split()[0] if '--mode=' in c else 'train'
            for c in readme} == set(MODES), readme
    for command in readme:  # the help's examples are the README's, word for word
        assert command in commands, command
