"""The amqtt contract: each name pacegate hooks (broker.amqtt_hooks.AMQTT_HOOKS)
exists in the installed amqtt with the parameters pacegate expects. An amqtt upgrade that
renames or reshapes one of them fails here, loudly, rather than in production."""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import version
from typing import Any

import pytest

from broker import delivery, plugins, server, strict
from broker.amqtt_hooks import AMQTT_HOOKS, AMQTT_VERSION, Hook


def _resolve(dotted: str) -> Any:
    """A module, or a class inside one, from its dotted path."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def _params(func: Any) -> tuple[str, ...]:
    names = tuple(inspect.signature(func).parameters)
    return names[1:] if names and names[0] in ("self", "cls") else names


def _assigned_by(owner: type, name: str) -> bool:
    """True if a method of ``owner`` (or of a base) assigns ``self.<name>``."""
    for klass in owner.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(name)}\s*(:[^=]*)?=", source):
            return True
    return False


def test_installed_amqtt_is_the_version_the_hooks_were_checked_against() -> None:
    assert version("amqtt") == AMQTT_VERSION


@pytest.mark.parametrize("hook", AMQTT_HOOKS, ids=lambda h: f"{h.owner.split('.')[-1]}.{h.name}")
def test_amqtt_name_pacegate_hooks_exists_with_the_expected_signature(hook: Hook) -> None:
    owner = _resolve(hook.owner)
    if hook.kind == "attr":
        assert _assigned_by(owner, hook.name), f"{hook.owner} no longer sets self.{hook.name}"
        return
    assert hasattr(owner, hook.name), f"{hook.owner} has no {hook.name}"
    if hook.kind == "method":
        member = inspect.getattr_static(owner, hook.name)
        func = member.__func__ if isinstance(member, staticmethod | classmethod) else member
        assert callable(func)
        assert _params(func) == hook.params, f"{hook.owner}.{hook.name}{inspect.signature(func)}"


def test_every_amqtt_method_pacegate_overrides_is_in_the_table() -> None:
    """An override added without its table row would escape the contract."""
    listed = {(h.owner, h.name) for h in AMQTT_HOOKS}
    ours = [
        server.PacegateBroker,
        delivery.DeliveringHandler,
        strict.StrictHandler,
        plugins.CertIdentityAuthPlugin,
        plugins.TopicAclPlugin,
    ]
    missing = []
    for cls in ours:
        amqtt_bases = [b for b in cls.__mro__ if b.__module__.startswith("amqtt.")]
        for name, value in vars(cls).items():
            if not callable(value) or (name.startswith("__") and name != "__init__"):
                continue
            for base in amqtt_bases:
                if name in vars(base):
                    if not any(
                        (f"{b.__module__}.{b.__qualname__}", name) in listed for b in amqtt_bases
                    ):
                        missing.append(f"{cls.__name__}.{name} (from {base.__qualname__})")
                    break
    assert not missing, missing


def test_only_the_amqtt_api_module_imports_amqtt() -> None:
    """All contact with amqtt goes through ``broker/amqtt_api.py``: an upgrade is read
    there and in the hooks table, not discovered in four modules."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    allowed = root / "broker" / "amqtt_api.py"
    offenders = []
    for package in ("pacegate", "console", "device_sim", "broker", "gateway", "hospital", "cloud"):
        for path in sorted((root / package).rglob("*.py")):
            if path == allowed:
                continue
            text = path.read_text()
            if "amqtt" not in text:  # (parsing only the files that name it keeps this fast)
                continue
            for node in ast.walk(ast.parse(text)):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(n == "amqtt" or n.startswith("amqtt.") for n in names):
                    offenders.append(f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}")
    assert offenders == []
