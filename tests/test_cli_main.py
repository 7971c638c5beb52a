"""The ``omniseg`` entry point itself: options every command shares and how a run ends."""

from __future__ import annotations

import argparse

import pytest

import omniseg
from omniseg.cli import segment
from omniseg.cli.main import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"omniseg {omniseg.__version__}"


def test_ctrl_c_ends_with_one_line_and_status_130(tmp_path, capsys, monkeypatch) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(segment, "run", interrupted)
    # Used to end in a KeyboardInterrupt traceback.
    assert main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == "omniseg segment: interrupted"
