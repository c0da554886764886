"""Package structure: no import cycle anywhere in jaxad/ (DESIGN.md principle 8)."""
import ast
import os

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
