"""Loading YAML config files so that every error names the file, the line and the key.

Each config *schema* lives in the module that owns it (broker, gateway, hospital, cloud);
this module only reads YAML with line numbers and offers small typed accessors that raise
:class:`~pacegate.errors.ConfigError` with ``path:line: key: problem (fix: ...)``.
Relative paths resolve against the config file's directory (ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from pacegate.errors import ConfigError

T = TypeVar("T")
MAX_CONFIG_BYTES = 1 << 20  # a config file is hand-written; a megabyte is already absurd


class ConfigSection:
    """A mapping from a YAML file that remembers where each key stands."""

    def __init__(self, path: Path, data: CommentedMap, prefix: str = "") -> None:
        self.path = path
        self.data = data
        self.prefix = prefix

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def key_name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def line_of(self, key: str | None = None) -> int | None:
        try:
            if key is not None and key in self.data:
                return int(self.data.lc.key(key)[0]) + 1
            return int(self.data.lc.line) + 1
        except (AttributeError, KeyError, TypeError):
            return None

    def error(self, key: str, problem: str, fix: str | None = None) -> ConfigError:
        return ConfigError(self.path, self.key_name(key), problem, fix=fix, line=self.line_of(key))

    def check_keys(self, allowed: set[str]) -> None:
        """Refuse unknown keys: a typo must not silently fall back to a default."""
        for key in self.data:
            if key not in allowed:
                raise self.error(
                    str(key), "unknown key", fix=f"use one of: {', '.join(sorted(allowed))}"
                )

    def get(
        self, key: str, kind: type[T], default: T | None = None, *, required: bool = False
    ) -> T:
        if key not in self.data or self.data[key] is None:
            if required or default is None:
                raise self.error(key, "is required", fix=f"add '{key}:' to this section")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool):
            raise self.error(key, f"must be an integer, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(key, f"must be {kind.__name__}, got {type(value).__name__} {value!r}")
        return value  # type: ignore[return-value]

    def get_int(
        self,
        key: str,
        default: int | None = None,
        *,
        lo: int | None = None,
        hi: int | None = None,
        required: bool = False,
    ) -> int:
        value = self.get(key, int, default, required=required)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(key, f"{value} is out of range", fix=f"use a value in [{lo}, {hi}]")
        return value

    def get_float(
        self,
        key: str,
        default: float | None = None,
        *,
        lo: float | None = None,
        hi: float | None = None,
        required: bool = False,
    ) -> float:
        value = self.get(key, float, default, required=required)
        if not math.isfinite(value):  # NaN passes every range comparison below
            raise self.error(
                key, f"must be a finite number, got {value!r}", fix=f"use a value in [{lo}, {hi}]"
            )
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(key, f"{value} is out of range", fix=f"use a value in [{lo}, {hi}]")
        return value

    def get_path(
        self,
        key: str,
        default: str | None = None,
        *,
        required: bool = False,
        must_exist: bool = False,
    ) -> Path:
        raw = self.get(key, str, default, required=required)
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if must_exist and not path.exists():
            raise self.error(
                key,
                f"file {path} does not exist",
                fix="create it with 'pacegate pki' or correct the path",
            )
        return path

    def section(self, key: str, *, required: bool = False) -> ConfigSection:
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(key, "section is required", fix=f"add a '{key}:' mapping")
            return ConfigSection(self.path, CommentedMap(), self.key_name(key))
        value = self.data[key]
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {type(value).__name__}")
        return ConfigSection(self.path, value, self.key_name(key))  # type: ignore[arg-type]

    def sections(self, key: str, *, required: bool = False) -> list[ConfigSection]:
        """A list of mappings, each a section named ``key[i]``."""
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(key, "list is required", fix=f"add a '{key}:' list")
            return []
        value = self.data[key]
        if not isinstance(value, CommentedSeq | list):
            raise self.error(key, f"must be a list, got {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            name = f"{self.key_name(key)}[{i}]"
            if not isinstance(item, CommentedMap):
                line = None
                with contextlib.suppress(AttributeError, KeyError, TypeError):
                    line = int(value.lc.item(i)[0]) + 1  # type: ignore[union-attr,attr-defined]
                raise ConfigError(self.path, name, "must be a mapping", line=line)
            out.append(ConfigSection(self.path, item, name))
        return out


def _syntax_error_position(exc: MarkedYAMLError) -> tuple[int | None, str, str]:
    """The line of the mistake, the problem and the fix.

    The scanner notices a mistake late: ``port 8883`` (a missing colon) is a plain scalar
    until the next line's ``key:`` proves it was meant as a key, so ``problem_mark`` points
    one line too far. While scanning a token, ``context_mark`` is where that token began:
    the line the operator must edit. (For a duplicate key the context is the enclosing
    mapping instead, and the problem mark is right.)"""
    problem = str(exc.problem)
    mark = exc.problem_mark
    context = str(exc.context or "")
    if exc.context_mark is not None and context.startswith("while scanning"):
        mark = exc.context_mark
    line = mark.line + 1 if mark is not None else None
    if "expected ':'" in problem:
        return line, "a key without its ':'", "write 'key: value', with a space after the colon"
    return line, problem, "check indentation and quoting on that line"


def load_config(path: str | Path) -> ConfigSection:
    """Read a YAML mapping from ``path``; syntax errors carry the file and line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(p, "", "file not found", fix="check the path given with -c") from None
    except OSError as exc:
        raise ConfigError(p, "", f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(p, "", f"file is larger than {MAX_CONFIG_BYTES} bytes")
    yaml = YAML(typ="rt")
    try:
        data: Any = yaml.load(raw)
    except MarkedYAMLError as exc:
        line, problem, fix = _syntax_error_position(exc)
        raise ConfigError(p, "", f"YAML syntax error: {problem}", line=line, fix=fix) from None
    except YAMLError as exc:
        raise ConfigError(p, "", f"YAML error: {exc}") from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        raise ConfigError(p, "", "the top level must be a mapping of keys to values", line=1)
    return ConfigSection(p, data)
