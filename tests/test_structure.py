"""Package structure: no import cycle anywhere in jaxad/ (docs/architecture.md §1.2); every
document the repository cites is in the repository."""
import ast
import functools
import json
import os
import re

PACKAGE = 'jaxad'
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-len('.py')].split(os.sep)
    if rel[-1] == '__init__':
        rel = rel[:-1]
    return '.'.join(rel)


def _modules():
    """{dotted module name: path} of every .py file under jaxad/."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith('.py'):
                path = os.path.join(folder, f)
                out[_module_name(path)] = path
    return out


def _resolve(name, known):
    """The innermost known jaxad module `name` refers to (a.b.c -> a.b if c is a name)."""
    while name and name not in known:
        name = name.rpartition('.')[0]
    return name or None


def import_graph():
    """{module: set of jaxad modules it imports}, module-level and function-level alike
    (`import jaxad.x`, `from jaxad import x`, `from jaxad.x import y`, relative forms)."""
    known = _modules()
    graph = {}
    for module, path in known.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    parts = package.split('.')
                    parts = parts[:len(parts) - node.level + 1]
                    base = '.'.join(parts + ([base] if base else []))
                # `from jaxad import x` imports module jaxad.x when there is one, else a
                # name of jaxad itself.
                targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + '.'):
                    hit = _resolve(target, known)
                    if hit and hit != module and hit != PACKAGE:
                        edges.add(hit)
        graph[module] = edges
    return graph


def strongly_connected(graph):
    """Tarjan's strongly connected components of `graph`."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert 'jaxad.train' in graph and 'jaxad.methods.csi' in graph
    assert 'jaxad.checkpoint' in graph['jaxad.train'] or any(
        'jaxad.checkpoint' in graph[m] for m in graph['jaxad.train'])
    # main imports train inside main(), after flag parsing.
    assert 'jaxad.train' in graph['jaxad.main']


def test_no_import_cycle_in_jaxad():
    cycles = [sorted(c) for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, f'import cycles in {PACKAGE}/: {cycles}'


# Modules of jaxad/methods/ that are not methods: the registry, the contract and the shared
# helpers every method may import.
METHOD_INFRASTRUCTURE = {'jaxad.methods', 'jaxad.methods.base', 'jaxad.methods.common'}


def test_no_method_module_imports_another():
    """A method is one file behind one contract (docs/architecture.md §1.2): a method module
    imports the contract and the shared helpers (jaxad/methods/common.py), never another
    method's module, at module level or inside a function."""
    graph = import_graph()
    methods = {m for m in graph if m.startswith('jaxad.methods.')} - METHOD_INFRASTRUCTURE
    assert {'jaxad.methods.csi', 'jaxad.methods.mcl', 'jaxad.methods.oecl'} <= methods
    bad = {m: sorted(graph[m] & (methods | {'jaxad.methods'})) for m in sorted(methods)}
    bad = {m: others for m, others in bad.items() if others}
    assert not bad, f'method modules importing other method modules: {bad}'


# ------------------------------------------------------------------ cited documents

REPO = os.path.dirname(ROOT)
# Files that may cite a document: sources, configs, notebooks, docs, launchers, CI.
CITING_SUFFIXES = ('.py', '.md', '.ipynb', '.sh', '.sbatch', '.txt', '.cfg', '.toml', '.yml',
                   '.yaml')
SKIPPED_DIRS = {'__pycache__', 'build', 'dist', 'node_modules'}
# Any mention of a <name>.md, with the folders written before it (docs/<name>.md).
MD_MENTION = re.compile(r'(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b')
# The sections a citation names: docs/<name>.md followed by '§2.1', '§1.2, §2.3' or '§2-§7'.
SECTION_CITATION = re.compile(
    r'(?<![\w./-])(docs/[\w/.-]+\.md)((?:[ ,;–-]*(?:and )?§\d+(?:\.\d+)*)+)')
SECTION_NUMBER = re.compile(r'§(\d+(?:\.\d+)*)')
HEADING_NUMBER = re.compile(r'^#+\s+(\d+(?:\.\d+)*)\.?\s', re.M)


def _citing_files():
    """Repository files that may cite documents (hidden folders other than .ci skipped)."""
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith('.egg-info')
                         and (not d.startswith('.') or d == '.ci')
                         and not os.path.isfile(os.path.join(folder, d, 'pyvenv.cfg')))
        for f in sorted(files):
            if f.endswith(CITING_SUFFIXES) or os.path.basename(folder) == '.ci':
                yield os.path.join(folder, f)


def _lines(path):
    """(where, line) pairs of a text file ('12'), or of a notebook's cells ('cell 3, line 2':
    the JSON may escape characters such as the section sign)."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (UnicodeDecodeError, OSError):
        return []
    if path.endswith('.ipynb'):
        try:
            cells = json.loads(text).get('cells', [])
        except ValueError:  # scanned as text (tests/test_notebooks.py reports the JSON)
            cells = None
        if cells is not None:
            return [(f'cell {c}, line {n}', line) for c, cell in enumerate(cells)
                    for n, line in enumerate(''.join(cell.get('source', [])).splitlines(), 1)]
    return [(str(n), line) for n, line in enumerate(text.splitlines(), 1)]


def _doc_names():
    """Stems of the documents under docs/ ('methods', ...)."""
    docs = os.path.join(REPO, 'docs')
    if not os.path.isdir(docs):
        return set()
    return {f[:-len('.md')].lower() for f in os.listdir(docs) if f.endswith('.md')}


@functools.lru_cache(maxsize=None)
def _headings(doc_path):
    """Numbered section headings ('2', '2.1', ...) of a Markdown document."""
    with open(doc_path, encoding='utf-8') as f:
        return frozenset(HEADING_NUMBER.findall(f.read()))


def bad_citations():
    """['file:line: why'] for every citation of a document or section that does not exist.

    A path under a top-level folder of the repository (docs/<name>.md, launch/<NAME>.md) must
    exist; so must an upper-case <NAME>.md at the root or beside the citing file. A bare
    <name>.md of a project document (without its docs/ folder, or a design note kept outside
    the repository) cannot be followed from a clone and is refused outside docs/, where it
    resolves beside the citing file. Other lower-case names (the results and report files a
    run writes) are outputs, not citations. Every section a docs/<name>.md citation names,
    and every bare '§N' inside a document of docs/ itself, must be a numbered heading of that
    document.
    """
    top_level = {d for d in os.listdir(REPO) if os.path.isdir(os.path.join(REPO, d))}
    project_docs = _doc_names() | {'methods', 'architecture', 'design', 'jax-stack'}
    outside = 'shared' + '/docs'  # the old home of the design notes, outside the repository
    problems = []
    for path in _citing_files():
        rel = os.path.relpath(path, REPO)
        here = os.path.dirname(path)
        in_docs = rel.startswith('docs' + os.sep)
        for number, line in _lines(path):
            where = f'{rel}:{number}'
            if outside in line:
                problems.append(f'{where}: cites {outside}/, which is outside the repository')
            for cited in MD_MENTION.findall(line):
                first, _, _ = cited.partition('/')
                stem = os.path.basename(cited)[:-len('.md')]
                if '/' in cited:
                    if first in top_level and not os.path.isfile(os.path.join(REPO, cited)):
                        problems.append(f'{where}: cites {cited}, which does not exist')
                elif in_docs and stem.lower() in project_docs:
                    if not os.path.isfile(os.path.join(here, cited)):
                        problems.append(f'{where}: cites {cited}, which is not in docs/')
                elif stem.lower() in project_docs:
                    problems.append(f'{where}: cites {cited}; the documents live in docs/ '
                                    f'(write docs/{stem}.md if it exists there)')
                elif stem.isupper() and not any(os.path.isfile(os.path.join(d, cited))
                                                for d in (REPO, here)):
                    problems.append(f'{where}: cites {cited}, which does not exist')
            for doc, sections in SECTION_CITATION.findall(line):
                doc_path = os.path.join(REPO, doc)
                if os.path.isfile(doc_path):
                    for section in SECTION_NUMBER.findall(sections):
                        if section not in _headings(doc_path):
                            problems.append(f'{where}: cites {doc} §{section}, which has no '
                                            f'heading numbered {section}')
            if in_docs and rel.endswith('.md'):
                own = SECTION_CITATION.sub('', line)  # left: this document's own sections
                for section in SECTION_NUMBER.findall(own):
                    if section not in _headings(path):
                        problems.append(f'{where}: cites §{section}, which has no heading '
                                        f'numbered {section} in {rel}')
    return problems


def test_cited_documents_exist():
    """Every document (and section) the code, tests, configs, notebooks and docs cite is in
    the repository, so a clone can follow every reference."""
    problems = bad_citations()
    assert not problems, ('citations of documents that are not in the repository:\n'
                          + '\n'.join(problems))


def test_documentation_is_linked_from_readme():
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    for doc in ('docs/architecture.md', 'docs/methods.md'):
        assert os.path.isfile(os.path.join(REPO, doc)), doc
        assert doc in readme, f'README.md does not link {doc}'
