"""The command line: each verb imports only itself (and no torch for --help), the README's synopsis lists
exactly the options `--help` does, and the train verb's defaults are TrainConfig's."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pocketquant.cli import VERBS, build_parser, main

README = Path(__file__).parent.parent / "README.md"


def options(verb: str) -> list[list[str]]:
    parser = build_parser(verb)
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return [a.option_strings for a in sub.choices[verb]._actions if a.option_strings and "-h" not in a.option_strings]


def synopsis(verb: str) -> set[str]:
    """The options the README's synopsis of `verb` names."""
    text = README.read_text()
    block = text[text.index("## Commands"):]
    m = re.search(rf"^    pocketquant {verb} (.*?)(?=^    pocketquant |^$)", block, re.S | re.M)
    assert m, f"README has no synopsis of {verb}"
    return set(re.findall(r"(?<![\w-])(--[a-z0-9-]+|-o)\b", m.group(1)))


@pytest.mark.parametrize("verb", list(VERBS))
def test_readme_synopsis_matches_help(verb):
    named = synopsis(verb)
    parser_options = options(verb)
    missing = [o[-1] for o in parser_options if not named & set(o)]
    unknown = named - {s for o in parser_options for s in o}
    assert not missing and not unknown, f"README synopsis of {verb}: missing {missing}, not options {unknown}"


@pytest.mark.parametrize("verb", list(VERBS))
def test_help_is_quick_and_imports_no_torch(verb):
    code = ("import sys\nfrom pocketquant.cli import main\n"
            f"try:\n    main([{verb!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, *sorted(m for m in sys.modules if m.startswith('pocketquant.cli.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    torch, *verbs = proc.stdout.strip().splitlines()[-1].split()
    assert torch == "False" and set(verbs) - {"pocketquant.cli.common"} == {f"pocketquant.cli.{verb}"}, proc.stdout


def test_choices_are_listed():
    for verb, option in [("quantize", "--method"), ("quantize", "--scheme"), ("train", "--scheme"),
                         ("generate", "--dtype"), ("eval", "--dtype")]:
        proc = subprocess.run([sys.executable, "-m", "pocketquant", verb, "--help"], capture_output=True, text=True)
        assert re.search(rf"{option} \{{[a-z0-9,-]+\}}", proc.stdout), (verb, option, proc.stdout)


def test_train_verb_defaults_are_train_configs():
    from pocketquant.cli.train import d
    from pocketquant.quant.train import TrainConfig

    config = TrainConfig()
    assert {k: getattr(config, k) for k in vars(d)} == vars(d)


@pytest.mark.slow
def test_readme_python_api_runs_as_written(tmp_path):
    """The README's Python example, run as written (SmolLM2-135M, RTN)."""
    text = README.read_text()
    code = text[text.index("```python\n", text.index("## Python API")) + 10:]
    code = code[:code.index("```")]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "Paris" in lines[0]
    assert re.fullmatch(r"length: 24 tokens, [0-9.]+ tok/s", lines[-2])
    ppl, kl = map(float, lines[-1].split())
    assert 5 < ppl < 40 and 0 < kl < 1
    assert (tmp_path / "smollm2-rtn.safetensors").is_file()


def test_progress_away_from_a_terminal_is_a_line_per_item(capsys):
    from pocketquant import progress

    lines = progress.bar(range(3, 6), desc="gptq", unit="layer", initial=3, total=6)
    lines.set_postfix(loss="1.5")
    assert list(lines) == [3, 4, 5]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "gptq: 3 of 6 layers done, starting"
    assert [line.split(",")[0] for line in err[1:]] == ["gptq: 4 of 6 layers", "gptq: 5 of 6 layers",
                                                         "gptq: 6 of 6 layers"]
    assert "left" in err[1] and "left" not in err[3] and err[3].endswith("(loss=1.5)")


def test_an_option_of_another_verb_is_refused_with_this_verbs_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--prompt", "hi", "--calib-len", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: pocketquant generate" in err
    assert "unrecognized arguments: --calib-len 3 (pocketquant generate -h lists its options)" in err
