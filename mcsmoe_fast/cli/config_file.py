"""Settings from a YAML or JSON file: `mcsmoe-fast merge --config merge.yaml` reads the file's keys as the
subcommand's options (spelled as on the command line, without the dashes: num-groups or num_groups);
options given on the command line win over the file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = file.read_text()
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


def apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the file's values the parser's defaults (and no longer required on the command line)."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in read_config(path).items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; known: "
                         f"{sorted(k.replace('_', '-') for k in actions)}")
    for dest, value in values.items():
        action = actions[dest]
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"--config {path}: {dest} must be one of {list(action.choices)}, got {value!r}")
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                values[dest] = action.type(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"--config {path}: {dest}: {exc}") from exc
        action.required = False
    parser.set_defaults(**values)


def config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
