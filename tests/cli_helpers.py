"""Shared by the CLI tests: run ``qvec`` in-process and check that an error is one line with exit status 2."""

from __future__ import annotations

from qvec.cli import main


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, (cap.out + cap.err).strip()


def one_line_error(capsys, message: str, *args) -> str:
    code, text = run(capsys, *args)
    assert code == 2, text
    assert len(text.splitlines()) == 1 and message in text and "Traceback" not in text, text
    return text
