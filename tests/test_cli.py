"""Command-line entry points: flags with SGLang's names and help, argument parsing, chat templates by name."""

import json
import subprocess
import sys
import threading

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


def test_help_shows_defaults():
    out = subprocess.run([sys.executable, "-m", "mmserve.launch_server", "--help"], capture_output=True, text=True,
                         check=True).stdout
    out = " ".join(out.split())  # argparse wraps lines
    for shown in ["Port of the HTTP server (default: 30000).", "Address the HTTP server binds (default: 127.0.0.1).",
                  "Logging level (default: info).", "(default: auto)", "(default: fcfs)", "(default: 16384)"]:
        assert shown in out, shown
    assert "(default: None)" not in out and "(default: False)" not in out
    assert out.startswith("usage: python -m mmserve.launch_server [--model-path MODEL] [options]")


def test_generate_help_lists_only_in_process_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--model-path", "--tokenizer-path", "--dtype", "--device", "--context-length", "--max-total-tokens",
                 "--mem-fraction-static", "--chat-template", "--temperature", "--top-p", "--top-k",
                 "--repetition-penalty", "--seed", "--max-new-tokens", "--raw", "--json", "--log-level"]:
        assert flag in out, flag
    for flag in ["--port", "--host", "--api-key", "--enable-metrics", "--max-request-body-mb", "--request-read-timeout",
                 "--served-model-name", "--allow-private-media-urls", "--max-queued-requests"]:
        assert flag not in out, flag


def test_generate_takes_sampling_flags(tiny_model_dir, capsys):
    common = ["generate", "--raw", "Hello", "--model-path", str(tiny_model_dir("qwen2")), "--max-new-tokens", "6",
              "--json", "--temperature", "1.0", "--seed", "7"]
    assert main(common) == 0
    first = json.loads(capsys.readouterr().out)["text"]
    assert main([*common, "--top-k", "1"]) == 0  # top-k 1 is greedy whatever the temperature and seed
    greedy_k1 = json.loads(capsys.readouterr().out)["text"]
    assert main([*common[:-4], "--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == greedy_k1
    assert main(common) == 0  # the seed reproduces the sample
    assert json.loads(capsys.readouterr().out)["text"] == first
    assert main([*common, "--top-p", "2"]) == 2  # a bad value: one line, exit 2
    assert capsys.readouterr().err.strip() == "mmserve: error: top_p must be in (0, 1], got 2.0"


def test_offline_benchmark_shows_progress(tiny_model_dir, capsys, monkeypatch):
    from mmserve.bench import offline

    monkeypatch.setattr(offline, "_PROGRESS_EVERY_S", 0.01)
    offline.main(["--model-path", str(tiny_model_dir("qwen2")), "--num-prompts", "4", "--input-len", "8",
                  "--output-len", "24", "--dtype", "float32", "--log-level", "warning"])
    out = capsys.readouterr().out
    for phase in ["mmserve: loading ", "mmserve: warm-up", "mmserve: 4 prompts x 8 tokens in, 24 out",
                  "tokens generated: ", "/96 ("]:
        assert phase in out, out
    assert out.index("mmserve: warm-up") < out.index("tokens generated: ") < out.index("output tok/s")


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


def test_replicas_are_the_servers_not_the_engines(tiny_model_dir):
    with pytest.raises(ValueError, match="--dp-size and --nnodes are the server's"):
        Engine(model_path=str(tiny_model_dir("qwen2")), dp_size=2)


def test_named_chat_template_is_used(tiny_model_dir):
    with Engine(model_path=str(tiny_model_dir("qwen2")), chat_template="llama-3-instruct") as engine:
        ids = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
        text = engine.tokenizer.decode(ids)
        assert "<|start_header_id|>user<|end_header_id|>" in text and text.endswith(
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    schedulers = sum(t.name == "mmserve-scheduler" for t in threading.enumerate())
    with pytest.raises(ValueError, match="chatml"):
        Engine(model_path=str(tiny_model_dir("qwen2")), chat_template="no-such-template")
    # the scheduler thread that had built the model for it is stopped, not left holding the model
    assert sum(t.name == "mmserve-scheduler" for t in threading.enumerate()) == schedulers


def test_generate_command_prints_the_answer(tiny_model_dir, capsys):
    code = main(["generate", "--raw", "Hello", "--model-path", str(tiny_model_dir("qwen2")), "--max-new-tokens", "4",
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    meta = result["meta_info"]
    assert meta["prompt_tokens"] == 1 and 1 <= meta["completion_tokens"] <= 4
    assert meta["finish_reason"]["type"] == ("length" if meta["completion_tokens"] == 4 else "stop")
