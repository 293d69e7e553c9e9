"""What the `lightning` command checks in its input before and while jsonargparse reads it.

- `check_config_files(args)`: every `--config` file is UTF-8 YAML holding a mapping, and some
  config (or a `--model...` argument) has a `model:` section; else one ValueError line.
- `yaml_spelling_of_nonfinite(args)`: `nan`, `inf`, `-inf` given as values become YAML's `.nan`,
  `.inf`, `-.inf`, so that they reach the classes as floats and are refused there by name
  ("lr must be a finite positive number, got nan") instead of as "not a float".
- `null_of_nested_class_args(args)`: `--a.init_args.b.init_args.k null` (an argument of a class
  nested in another class's arguments) becomes `--a.init_args.b '{"init_args": {"k": null}}'`, a
  merge jsonargparse accepts, where it rejects the null given directly ("Expected a <class 'float'>").
- `nearest_key_hint(message, option_strings)`: for a jsonargparse "not accepted / unrecognized"
  message, "; did you mean lr?" with the closest valid key (a class's init arguments and the
  fields of its option blocks, e.g. config.d_model), else "".
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import re
import typing
from pathlib import Path

import yaml

_NONFINITE = {"nan": ".nan", "+nan": ".nan", "-nan": ".nan", "inf": ".inf", "+inf": ".inf", "infinity": ".inf",
              "+infinity": ".inf", "-inf": "-.inf", "-infinity": "-.inf"}  # fmt: skip
EXAMPLE_CONFIG = "configs/quickstart.yaml"


def config_paths(args: list[str]) -> list[str]:
    """The values of every `--config PATH` / `--config=PATH` in `args`, in order."""
    paths = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(args: list[str]) -> None:
    """ValueError (one line) if a --config file is not YAML text holding a mapping, or if no config and
    no --model argument gives the model. Missing files are left to the parser ("File does not exist")."""
    loaded = {}
    for path in config_paths(args):
        file = Path(path)
        if not file.is_file():
            continue
        data = file.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"config file {path!r} is not YAML text (byte 0x{data[err.start]:02x} at offset {err.start} is not "
                f"UTF-8); pass a YAML config such as {EXAMPLE_CONFIG}"
            ) from None
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(
                f"config file {path!r} is not valid YAML ({where}{problem}); fix it or start from {EXAMPLE_CONFIG}"
            ) from None
        if content is None:
            content = {}
        if not isinstance(content, dict):
            raise ValueError(
                f"config file {path!r} holds a YAML {type(content).__name__}, not the sections model:, data:, "
                f"trainer:; start from {EXAMPLE_CONFIG}"
            )
        loaded[path] = content
    given_on_command_line = any(arg == "--model" or arg.startswith(("--model.", "--model=")) for arg in args)
    if loaded and not given_on_command_line and not any("model" in content for content in loaded.values()):
        names = ", ".join(repr(p) for p in loaded)
        raise ValueError(
            f"no model: section in {names}: a config names the network it trains, e.g. model: init_args: "
            f"network: class_path: resnet_bk.models.ResNetBKLM (see {EXAMPLE_CONFIG})"
        )


def yaml_spelling_of_nonfinite(args: list[str]) -> list[str]:
    """`args` with values spelled nan / inf / -inf (any case) written as YAML's .nan / .inf / -.inf."""
    out = []
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            out.append(f"{key}={_NONFINITE.get(value.lower(), value)}")
        elif not arg.startswith("--"):
            out.append(_NONFINITE.get(arg.lower(), arg))
        else:
            out.append(arg)
    return out


_NULL = {"null", "none", "~"}


def null_of_nested_class_args(args: list[str]) -> list[str]:
    """`args` with each null given to a nested class's argument written as a merge into that class."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key, value, width = None, None, 1
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            key, value, width = arg[2:], args[i + 1], 2
        if key is not None and value.lower() in _NULL and key.count(".init_args.") >= 2:
            owner, _, field = key.rpartition(".init_args.")
            merge: dict = {}
            node = merge.setdefault("init_args", {})
            *parents, last = field.split(".")
            for name in parents:
                node = node.setdefault(name, {})
            node[last] = None
            out += [f"--{owner}", json.dumps(merge)]
        else:
            out += args[i : i + width]
        i += width
    return out


def nearest_key_hint(message: str, option_strings: list[str]) -> str:
    """ "; did you mean X?" for an unknown key named in a jsonargparse error `message`, else ""."""
    classes = re.findall(r"class_path[ =]'([\w.]+)'", message)  # the innermost class is the last one named
    unknown = re.search(r"Option '([\w.]+)' is not accepted", message)
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    flag = re.search(r"[Uu]nrecognized arguments: --([\w.]+)", message)
    match = None
    if classes and (unknown or group or flag):  # an init arg of a class, or a field of one of its option blocks
        key = unknown.group(1) if unknown else f"{group.group(1)}.{group.group(2)}" if group else flag.group(1)
        match = _closest(key, option_names(classes[-1]))
    if match is None and (group or flag):
        key = group.group(2) if group else flag.group(1)
        match = _closest(key, [s.removeprefix("--") for s in option_strings if s.startswith("--")])
    return f"; did you mean {match}?" if match else ""


def _closest(key: str, candidates: list[str]) -> str | None:
    """The candidate nearest to `key`: within key's own section first (trainer.max_stesp ->
    trainer.max_steps), else anywhere; a key given outside its block matches by name (d_model ->
    config.d_model)."""
    if "." in key:
        section = key.rsplit(".", 1)[0] + "."
        candidates = [c for c in candidates if c.startswith(section)] or candidates
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not match and "." not in key:
        match = [c for c in candidates if c.rsplit(".", 1)[-1] == key]
    return match[0] if match else None


def option_names(class_path: str) -> list[str]:
    """init_parameter_names of the class, and for each argument typed as a dataclass (an option block
    such as BKConfig) its fields as "argument.field", recursively."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        hints = {}
        for klass in reversed(getattr(cls, "__mro__", (cls,))):
            if "__init__" in klass.__dict__:
                hints.update(typing.get_type_hints(klass.__init__))
    except Exception:  # noqa: BLE001 - no hint is better than a second error
        return []

    def fields_of(prefix: str, kind) -> list[str]:
        if not dataclasses.is_dataclass(kind):
            return []
        names = []
        for f in dataclasses.fields(kind):
            names += [f"{prefix}.{f.name}", *fields_of(f"{prefix}.{f.name}", hints_of(kind).get(f.name))]
        return names

    names = init_parameter_names(class_path)
    return names + [n for arg in names for n in fields_of(arg, hints.get(arg))]


def hints_of(kind) -> dict:
    try:
        return typing.get_type_hints(kind)
    except Exception:  # noqa: BLE001
        return {}


def init_parameter_names(class_path: str) -> list[str]:
    """Names of the __init__ arguments of the class at `class_path`, following *args/**kwargs to the
    base classes; [] if it cannot be imported."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            break
    return list(dict.fromkeys(names))
