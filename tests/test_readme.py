"""Every code block of the README runs as written, in order, in one scratch directory: the Python blocks
in one namespace, the shell blocks line by line (`pip install` steps left out: the package is installed;
`mcsmoe-fast` run as `python -m mcsmoe_fast.cli` of this interpreter). A block preceded by
`<!-- readme-test: skip (reason) -->` is not run."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- readme-test: skip \((?P<reason>[^)]*)\) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def readme_blocks():
    return [(m["lang"], m["code"], m["reason"]) for m in BLOCK.finditer(README.read_text())]


def shell_commands(code: str) -> list[str]:
    commands = []
    for line in code.splitlines():
        line = line.split("  #")[0].strip()
        for part in (p.strip() for p in line.split("&&")):
            if part and not part.startswith("pip "):
                commands.append(part)
    return commands


def test_readme_has_runnable_blocks():
    blocks = readme_blocks()
    assert [lang for lang, _, _ in blocks].count("python") >= 1
    skipped = [reason for _, _, reason in blocks if reason]
    assert all(skipped) and len(skipped) < len(blocks)


def test_readme_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    ran = 0
    for lang, code, skip in readme_blocks():
        if skip:
            continue
        if lang == "python":
            exec(compile(code, str(README), "exec"), namespace)
        elif lang == "bash":
            for command in shell_commands(code):
                argv = shlex.split(command)
                assert argv[0] == "mcsmoe-fast", f"README shell step the test cannot run offline: {command}"
                result = subprocess.run([sys.executable, "-m", "mcsmoe_fast.cli", *argv[1:]], cwd=tmp_path,
                                        capture_output=True, text=True, timeout=600)
                assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        else:
            pytest.fail(f"README block in {lang!r}: teach tests/test_readme.py to run it or mark it skipped")
        ran += 1
    assert ran >= 3
    assert (tmp_path / "compressed" / "config.json").is_file()
