"""The command line, `python -m moe`: bad option values end in argparse's usage error (exit
code 2, naming the option), not in a traceback from deep inside the benchmark, and every
option says what it does in --help."""
import pytest

from moe import __main__ as cli


@pytest.mark.parametrize("argv, option", [
    (["bench", "--tokens", "0"], "--tokens"),
    (["bench", "--tokens", "-5"], "--tokens"),
    (["bench", "--tokens", "many"], "--tokens"),
    (["bench", "--repeat", "0"], "--repeat"),
])
def test_bad_values_are_usage_errors(argv, option, capsys, monkeypatch):
    monkeypatch.setattr(cli, "bench", lambda *a, **k: pytest.fail("bench ran"))
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be a positive integer, got {argv[-1]!r}" in err, err


def test_good_values_reach_bench(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "bench", lambda *a: calls.append(a))
    monkeypatch.setattr("moe.show_config", lambda: None)
    assert cli.main(["bench", "--tokens", "64", "--repeat", "2"]) == 0
    assert calls == [("mixtral-small", 64, 2, True)]


def test_every_option_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    entries = out.split("options:\n", 1)[1].split("\n  -")
    helps = {e.strip().lstrip("-").split()[0].strip(","): e.strip().partition("  ")[2].strip()
             for e in entries}
    assert set(helps) >= {"h", "config", "tokens", "repeat", "no-check"}, out
    assert all(helps.values()), f"options without help text: {helps}"
