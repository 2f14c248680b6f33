"""Settings from a YAML or JSON file: `mcsmoe-fast merge --config merge.yaml` reads the file's keys as the
subcommand's options (spelled as on the command line, without the dashes: num-groups or num_groups; an on/off
option by its positive name: permute: false for --no-permute, globally: false for --no-globally); options given
on the command line win over the file (prune's --ratio on the command line replaces the file's num-experts, and
the other way round). One --config per command; a key with no value is refused unless its option's default is
None (then it stays unset)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_config(path: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError: one line for the user
        raise ValueError(f"--config {path}: not valid {'YAML' if file.suffix in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(exc).splitlines()[0]})") from exc
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    return values


def apply_config(parser: argparse.ArgumentParser, path: str, argv: list[str] = ()) -> None:
    """Make the file's values the parser's defaults (and no longer required on the command line), each converted
    as the command line converts it: a number or a list item as the text it would be typed as, an on/off option
    from true/false (yes/no, on/off, 1/0), one value for a multi-value option as a list of one. argv: the command
    line, whose member of a group of exclusive options replaces the file's."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in read_config(path).items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; known: "
                         f"{sorted(k.replace('_', '-') for k in actions)}")
    for dest, value in values.items():
        values[dest] = _converted(actions[dest], value, f"--config {path}: {dest}")
    for group in parser._mutually_exclusive_groups:  # e.g. prune's --num-experts | --ratio
        in_file = [a.dest for a in group._group_actions if values.get(a.dest) is not None]
        if len(in_file) > 1:
            raise ValueError(f"--config {path}: {' and '.join(in_file)} exclude each other; keep one")
        if any(arg.split("=", 1)[0] in a.option_strings for a in group._group_actions for arg in argv):
            values = {dest: value for dest, value in values.items() if dest not in in_file}  # the command line's wins
        elif in_file:
            group.required = False
    for dest, value in values.items():
        if value is not None:
            actions[dest].required = False
    parser.set_defaults(**values)


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _converted(action: argparse.Action, value, where: str):
    if value is None:  # YAML's `key:` with nothing after it
        if action.default is None and not action.required and action.nargs != 0:
            return None  # an option whose None already means "not given" (--tokenizer, --layers, --dtype)
        raise ValueError(f"{where} has no value; give one or leave the key out")
    if action.nargs == 0:  # an on/off option: the file gives its value
        text = str(value).lower()
        if isinstance(value, bool) or text in TRUE + FALSE:
            return value if isinstance(value, bool) else text in TRUE
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        if not items and action.nargs == "+":
            raise ValueError(f"{where}: expected at least one value")
        return [_scalar(action, item, where) for item in items]
    if isinstance(value, dict) and action.type is None:  # a mapping (--device-map, --max-memory per device)
        return value
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where}: expected one value, got {value!r}")
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value, where: str):
    if isinstance(value, bool) and action.type is not None:
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where}: expected a value, got {value!r}")
    text = value if isinstance(value, str) else str(value)  # as it would be typed on the command line
    try:
        converted = action.type(text) if action.type is not None else text
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return converted


def config_path(argv: list[str]) -> str | None:
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    if len(paths) > 1:
        raise ValueError(f"--config given {len(paths)} times ({', '.join(paths)}): give one file (options on the "
                         "command line win over it)")
    return paths[0] if paths else None
