"""Command-line entry points: flags with SGLang's names and help, argument parsing, chat templates by name."""

import json
import subprocess
import sys

import pytest

from mmserve import Engine
from mmserve.cli import main
from mmserve.launch_server import parse_args

SGLANG_FLAGS = ["--model-path", "--tokenizer-path", "--served-model-name", "--chat-template", "--context-length",
                "--dtype", "--mem-fraction-static", "--max-running-requests", "--chunked-prefill-size", "--tp-size",
                "--api-key", "--trust-remote-code", "--log-level", "--enable-metrics", "--host", "--port",
                "--max-queued-requests", "--disable-radix-cache", "--max-total-tokens", "--load-format"]


def test_launch_server_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "mmserve.launch_server", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in SGLANG_FLAGS:
        assert flag in out, flag
    assert "Tensor-parallel degree" in out and "Authorization: Bearer KEY" in out


def test_serve_help_takes_a_positional_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "model" in out and "--port" in out and "--api-key" in out


def test_flags_parse_into_server_args(tiny_model_dir):
    args = parse_args(["--model-path", str(tiny_model_dir("qwen2")), "--port", "8123", "--max-running-requests", "4",
                       "--enable-metrics", "--mem-fraction-static", "0.5", "--dtype", "bfloat16"])
    assert (args.port, args.max_running_requests, args.enable_metrics, args.mem_fraction_static, args.dtype) == (
        8123, 4, True, 0.5, "bfloat16")


def test_no_model_means_the_smollm2_default():
    args = parse_args([])
    assert args.model_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_tensor_parallel_beyond_one_is_refused_clearly(tiny_model_dir):
    with pytest.raises(ValueError, match="tp_size=2"):
        Engine(model_path=str(tiny_model_dir("qwen2")), tp_size=2)


def test_named_chat_template_is_used(tiny_model_dir):
    with Engine(model_path=str(tiny_model_dir("qwen2")), chat_template="llama-3-instruct") as engine:
        ids = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
        text = engine.tokenizer.decode(ids)
        assert "<|start_header_id|>user<|end_header_id|>" in text and text.endswith(
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="chatml"):
        Engine(model_path=str(tiny_model_dir("qwen2")), chat_template="no-such-template")


def test_generate_command_prints_the_answer(tiny_model_dir, capsys):
    code = main(["generate", "--raw", "Hello", "--model-path", str(tiny_model_dir("qwen2")), "--max-new-tokens", "4",
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    meta = result["meta_info"]
    assert meta["prompt_tokens"] == 1 and 1 <= meta["completion_tokens"] <= 4
    assert meta["finish_reason"]["type"] == ("length" if meta["completion_tokens"] == 4 else "stop")
