"""Reading kohya launch scripts as users write them: bash, cmd and PowerShell continuations,
comments and commented-out flags, variables, quoting, accelerate's options, errors that name the line."""

from __future__ import annotations

import pytest

from tunelab.errors import TunelabError
from tunelab.kohya.shell import parse_script, parse_words, split_words

BASH = r"""#!/usr/bin/env bash
# production run
source venv/bin/activate
MODEL='/models/my base.safetensors'
export DATA=/data/set1
OUT="$HOME_OVERRIDE/out"

accelerate launch --num_processes=4 --multi_gpu "sdxl_train.py" \
  --pretrained_model_name_or_path="$MODEL" \
  --train_data_dir ${DATA}/img --in_json "${DATA}/meta.json" \
  #--noise_offset=0.0357 \
  --learning_rate=1.5e-6 \
  --optimizer_args "weight_decay=0.01" "betas=0.9,0.999" \
  --sample_prompts="a \"quoted\" prompt.txt" --full_bf16 # trailing comment
echo done
"""


def test_bash_script_with_continuations_comments_variables_and_quotes():
    launch = parse_script(BASH, "train.sh")
    assert launch.script == "sdxl_train.py"
    assert [(f.name, f.values) for f in launch.launcher] == [("num_processes", ["4"]), ("multi_gpu", [])]
    flags = {f.name: f.values for f in launch.flags}
    assert flags["pretrained_model_name_or_path"] == ["/models/my base.safetensors"]
    assert flags["train_data_dir"] == ["/data/set1/img"] and flags["in_json"] == ["/data/set1/meta.json"]
    assert "noise_offset" not in flags  # commented out
    assert flags["optimizer_args"] == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert flags["sample_prompts"] == ['a "quoted" prompt.txt']
    assert flags["full_bf16"] == []
    assert any("line(s) 11" in n and "bash itself would end the command" in n for n in launch.notes)
    assert any("HOME_OVERRIDE" in n for n in launch.notes)  # unknown variable, left as written
    assert launch.flags[0].line == 8


def test_windows_cmd_script_keeps_backslash_paths():
    text = "\r\n".join([
        "@echo off",
        "REM kohya on Windows",
        'set MODEL=C:\\models\\base.safetensors',
        'accelerate launch --num_cpu_threads_per_process 2 sdxl_train.py ^',
        '  --pretrained_model_name_or_path="%MODEL%" ^',
        ':: --xformers ^',
        '  --output_dir "D:\\runs\\my run" ^',
        '  --learning_rate 1e-5',
    ])
    launch = parse_script(text, "train.bat")
    flags = {f.name: f.values for f in launch.flags}
    assert flags["pretrained_model_name_or_path"] == ["C:\\models\\base.safetensors"]
    assert flags["output_dir"] == ["D:\\runs\\my run"]
    assert flags["learning_rate"] == ["1e-5"] and "xformers" not in flags


def test_powershell_script():
    text = "\n".join([
        '$env:DATA = "E:\\data"',
        '$lr = "2e-6"',
        'accelerate launch sdxl_train.py `',
        '  --train_data_dir "$env:DATA\\img" `',
        "  --learning_rate $lr `",
        "  --caption_extension '.txt'",
    ])
    flags = {f.name: f.values for f in parse_script(text, "train.ps1").flags}
    assert flags == {"train_data_dir": ["E:\\data\\img"], "learning_rate": ["2e-6"], "caption_extension": [".txt"]}


def test_words_from_the_command_line_with_or_without_the_launcher():
    launch = parse_words(["python", "-m", "accelerate.commands.launch", "--num_processes=2", "./sd-scripts/sdxl_train.py",
                          "--learning_rate", "1e-6", "--train_text_encoder"])
    assert [f.name for f in launch.launcher] == ["num_processes"]
    assert [(f.name, f.values) for f in launch.flags] == [("learning_rate", ["1e-6"]), ("train_text_encoder", [])]
    only = parse_words(["--learning_rate=1e-6", "--max-train-steps", "10"])  # flags alone; dashes read as kohya's
    assert only.script == "sdxl_train.py" and [f.name for f in only.flags] == ["learning_rate", "max_train_steps"]


def test_unreadable_lines_are_named():
    with pytest.raises(TunelabError, match=r"train.sh:3: unterminated \" quote"):
        parse_script('cd x\n\naccelerate launch sdxl_train.py --output_dir "oops\n', "train.sh")
    with pytest.raises(TunelabError, match=r"'stray' before any flag"):
        parse_words(["accelerate", "launch", "sdxl_train.py", "stray", "--learning_rate=1"])
    with pytest.raises(TunelabError, match="no line runs a kohya training script"):
        parse_script("echo hello\n", "x.sh")
    assert split_words("a 'b c' \"d\\\"e\" f\\ g # h", "bash", "x") == ["a", "b c", 'd"e', "f g"]
