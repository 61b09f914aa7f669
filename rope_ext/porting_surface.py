"""The porting-surface check: a vLLM source tree or wheel, read without importing it, against our lists of vLLM names.

Every private vLLM name longrope-serve relies on is listed with the versions that have it
(``rope_ext/vllm_plugin/vllm_internals.py``, ``server/vllm_internals.py``). This reads the tree's Python
sources with ``ast`` (nothing is imported, so a CUDA wheel can be checked on a CPU machine and a release
can be checked before anyone installs it) and confirms each entry of the tree's version: the module, the
name (a module-level definition or re-export; a class's method, property, class attribute, field, or an
attribute its methods assign on ``self``; inherited ones through the class's bases) and, for a callable,
every parameter we pass or take by name. A missing one is reported with its entry and the version.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rope_ext.vllm_plugin.vllm_internals import SUPPORTED_VLLM, Internal, base_version


class SourceTree:
    """The ``vllm`` package of a source folder (one holding ``vllm/``), an installed copy, or a wheel."""

    def __init__(self, path: Path):
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None
        if self._zip is None and not (path / "vllm").is_dir():
            raise FileNotFoundError(f"{path} holds no vllm/ package (give a folder that holds it, or a wheel)")

    @classmethod
    def installed(cls) -> SourceTree:
        """The installed vLLM's sources, found without importing it."""
        spec = importlib.util.find_spec("vllm")
        if spec is None or spec.origin is None:
            raise FileNotFoundError("vLLM is not installed")
        return cls(Path(spec.origin).parent.parent)

    def read(self, relative: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(relative).decode()
            except KeyError:
                return None
        file = self.path / relative
        return file.read_text() if file.is_file() else None

    @functools.lru_cache(maxsize=None)
    def module(self, dotted: str) -> tuple[ast.Module, bool] | None:
        """(parsed module, is a package) or None."""
        base = dotted.replace(".", "/")
        for relative, package in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            text = self.read(relative)
            if text is not None:
                return ast.parse(text), package
        return None

    def version(self) -> str:
        """The release the tree is (``vllm/_version.py``, as setuptools-scm writes it)."""
        parsed = self.module("vllm._version")
        if parsed is not None:
            for node in ast.walk(parsed[0]):
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id in ("__version__", "version") for t in node.targets
                ) and isinstance(node.value, ast.Constant):
                    return base_version(str(node.value.value))
        raise ValueError(f"{self.path}: no version in vllm/_version.py")


@dataclass(frozen=True)
class Found:
    """A definition found in the tree: a class (with its module, to resolve its bases), a function, or a value."""

    node: ast.AST | None  # ClassDef or FunctionDef; None for a value (an assignment or field)
    module: str


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements of a module or class body, including those inside if / try blocks (TYPE_CHECKING, fallbacks)."""
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            found += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            found += _top_level(node.body) + _top_level(node.orelse) + _top_level(node.finalbody)
            for handler in node.handlers:
                found += _top_level(handler.body)
        else:
            found.append(node)
    return found


def _assigned_names(node: ast.stmt) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names: list[str] = []
    for target in targets:
        elements = target.elts if isinstance(target, ast.Tuple) else [target]
        names += [t.id for t in elements if isinstance(t, ast.Name)]
    return names


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class Resolver:
    def __init__(self, tree: SourceTree):
        self.tree = tree

    def in_module(self, module: str, name: str, seen: frozenset = frozenset()) -> Found | None:
        """``name`` defined at the top of ``module``, or re-exported there from another module."""
        if (module, name) in seen:
            return None
        seen = seen | {(module, name)}
        parsed = self.tree.module(module)
        if parsed is None:
            return None
        tree, is_package = parsed
        found: Found | None = None
        for node in _top_level(tree.body):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found = Found(node, module)
            elif name in _assigned_names(node):
                found = found or Found(None, module)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = _absolute(module, is_package, node)
                        found = self.in_module(source, alias.name, seen) or (
                            Found(None, f"{source}.{alias.name}") if self.tree.module(f"{source}.{alias.name}")
                            else found)
        if found is None and is_package and self.tree.module(f"{module}.{name}") is not None:
            found = Found(None, f"{module}.{name}")  # a submodule
        return found

    def in_class(self, found: Found, name: str) -> Found | None:
        """A member of the class ``found``: a definition or assignment in its body, ``self.<name> = …`` in one of
        its methods, or the same in one of its bases."""
        cls = found.node
        assert isinstance(cls, ast.ClassDef)
        for node in _top_level(cls.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return Found(node, found.module)
            if name in _assigned_names(node):
                return Found(None, found.module)
        for method in ast.walk(cls):
            if isinstance(method, (ast.Assign, ast.AnnAssign)):
                targets = method.targets if isinstance(method, ast.Assign) else [method.target]
                if any(isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                       and t.value.id == "self" for t in targets):
                    return Found(None, found.module)
        for base in cls.bases:
            base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)  # Name, or mod.Name
            resolved = self.in_module(found.module, base_name) if base_name else None
            if resolved is not None and isinstance(resolved.node, ast.ClassDef):
                member = self.in_class(resolved, name)
                if member is not None:
                    return member
        return None

    def find(self, internal: Internal) -> Found | None:
        first, *rest = internal.name.split(".")
        found = self.in_module(internal.module, first)
        for part in rest:
            if found is None or not isinstance(found.node, ast.ClassDef):
                return None
            found = self.in_class(found, part)
        return found


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    args = function.args
    return {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}


def problems(tree: SourceTree, internals: tuple[Internal, ...], version: str | None = None) -> list[str]:
    """What the tree lacks of ``internals`` for its version: one line per missing name or parameter."""
    version = version or tree.version()
    resolver = Resolver(tree)
    found_problems: list[str] = []
    for internal in internals:
        if version not in internal.versions:
            continue
        found = resolver.find(internal)
        if found is None:
            found_problems.append(f"vLLM {version} has no {internal.where} (longrope {internal.use})")
            continue
        if internal.params and isinstance(found.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            missing = [p for p in internal.params if p not in _parameters(found.node)]
            if missing:
                found_problems.append(
                    f"vLLM {version}'s {internal.where} has no parameter {', '.join(missing)} (longrope {internal.use})"
                )
    return found_problems


def check_tree(tree: SourceTree, lists: dict[str, tuple[Internal, ...]]) -> tuple[str, dict[str, list[str]]]:
    """(the version checked, problems per list). A release that is not supported is checked against the names
    of the newest supported one: where a port to it would start."""
    release = tree.version()
    version = release if release in SUPPORTED_VLLM else SUPPORTED_VLLM[-1]
    return version, {name: problems(tree, internals, version) for name, internals in lists.items()}


def download_release(release: str, cache: Path) -> Path:
    """vLLM ``release``'s wheel, downloaded with pip into ``cache`` once (no dependencies: only its sources are
    read). Any platform's wheel will do: the Python sources are the same."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"vllm-{release}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", str(cache), f"vllm=={release}"], check=True)
        found = sorted(cache.glob(f"vllm-{release}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip downloaded no vllm {release} wheel into {cache}")
    return found[0]
