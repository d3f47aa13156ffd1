"""The command line: working subcommands, and bad values named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.cli import main


def test_generate_streams_from_zoo(zoo: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "generate",
        "--model",
        str(zoo / "general"),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--adapter-dir",
        f"a={zoo / 'adapters' / 'lora-a'}",
        "--adapter",
        "a",
    ]
    assert main(args) == 0
    assert "completion tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "--model", "/nope", "--prompt", "x"], "path '/nope' does not exist"),
        (["generate", "--model", ".", "--prompt", "x", "--temperature", "3"], "'3' is outside [0, 2]"),
        (["generate", "--model", ".", "--prompt", "x", "--top-p", "0"], "'0' is outside (0, 1]"),
        (["generate", "--model", ".", "--prompt", "x", "--max-new-tokens", "-1"], "positive integer, got '-1'"),
        (["generate", "--model", ".", "--prompt", "x", "--adapter-dir", "nodir"], "expected NAME=DIR, got 'nodir'"),
        (["generate", "--model", ".", "--prompt", "x", "--quantization", "fp3"], "invalid choice: 'fp3'"),
        (["serve", "/nope.yaml"], "path '/nope.yaml' does not exist"),
    ],
)
def test_bad_values_are_named(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_config_check_names_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("specialists: [{name: a, model: m, backend: tpu}]\nrouter: {fallback: a}\nmerger: {model: t}\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "specialists.0.backend" in capsys.readouterr().err
    assert main(["config", "check", str(Path(__file__).parents[1] / "configs" / "zoo.yaml")]) == 0


def test_prompt_too_long_is_a_cli_error(zoo: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--model", str(zoo / "code"), "--prompt", "fever " * 2000]) == 2
    assert "this model accepts at most" in capsys.readouterr().err
