"""The shape of threadward.py: its largest classes and functions.

    python bench/structure.py [FILE]

Lines are counted from the ``def``/``class`` line to the last line of the
body; attributes are the distinct ``self.NAME = ...`` targets of a class;
nesting is the deepest block (if/for/while/with/try) inside a function.
"""

import ast
import sys

BLOCKS = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith)


def depth(node, level=0):
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, depth(child, level + isinstance(child, BLOCKS)))
    return deepest


def attributes(cls):
    names = set()
    for node in ast.walk(cls):
        for target in getattr(node, "targets", []) + [getattr(node, "target", None)]:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                    and target.value.id == "self":
                names.add(target.attr)
    return names


def main(path="threadward.py"):
    with open(path) as stream:
        tree = ast.parse(stream.read())
    classes, functions = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            methods = [n for n in node.body if isinstance(n, ast.FunctionDef)]
            classes.append((node.end_lineno - node.lineno + 1, node.name, len(methods),
                            len(attributes(node))))
        elif isinstance(node, ast.FunctionDef):
            functions.append((node.end_lineno - node.lineno + 1, node.name, depth(node)))
    lengths = sorted(length for length, _, _ in functions)
    print("%s: %d lines, %d classes, %d functions (median %d lines, deepest nesting %d)" % (
        path, tree.body[-1].end_lineno, len(classes), len(functions),
        lengths[len(lengths) // 2], max(nest for _, _, nest in functions)))
    print("\nlargest classes            lines  methods  attributes")
    for length, name, methods, attrs in sorted(classes, reverse=True)[:8]:
        print("  %-24s %6d %8d %11d" % (name, length, methods, attrs))
    print("\nlongest functions          lines  nesting")
    for length, name, nest in sorted(functions, reverse=True)[:8]:
        print("  %-24s %6d %8d" % (name, length, nest))


if __name__ == "__main__":
    main(*sys.argv[1:])
